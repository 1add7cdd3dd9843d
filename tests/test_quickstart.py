"""The quickstart as a new user runs it: `fastdpo train` in an empty directory, nothing else."""

import json
import os
import subprocess
import sys
import time



def test_quickstart_in_an_empty_directory(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    fastdpo = os.path.join(os.path.dirname(sys.executable), "fastdpo")
    command = [fastdpo, "train"] if os.path.exists(fastdpo) else [sys.executable, "-m", "fastdpo", "train"]
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert seconds < 120, f"the quickstart took {seconds:.0f} s"
    assert "held-out reward accuracy" in proc.stdout and "model saved to" in proc.stdout
    out = tmp_path / "fastdpo-output"
    results = json.loads((out / "results.json").read_text())
    assert results["eval_after"]["rewards/accuracies"] > 0.8
    assert results["eval_after"]["rewards/margins"] > results["eval_before"]["rewards/margins"]
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.vocab_size == len(tok)
    for name in ("config.yaml", "metrics.jsonl", "model.safetensors", "tokenizer.json"):
        assert (out / name).is_file(), name


def test_second_quickstart_refuses_the_existing_output(tmp_path):
    (tmp_path / "fastdpo-output").mkdir()
    (tmp_path / "fastdpo-output" / "x").write_text("x")
    proc = subprocess.run([sys.executable, "-m", "fastdpo", "train"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr and "Traceback" not in proc.stderr
