"""The `fastdpo eval` command: the table, --json, --per_pair_out, and one-line errors."""

import json
import subprocess
import sys

import pytest
import torch

from fastdpo.models import load_tokenizer

from conftest import run_cli, tiny_llama, write_jsonl

ROWS = [{"prompt": "Question: How do I cook rice?\nAnswer:", "chosen": " Sure, rinse it first.",
         "rejected": " No. Do it yourself."},
        {"chosen": "Question: How do I swim?\nAnswer: Happy to help, float first.",
         "rejected": "Question: How do I swim?\nAnswer: Figure it out."},
        {"prompt": [{"role": "user", "content": "How do I paint?"}],
         "chosen": [{"role": "assistant", "content": "Gladly: pick a brush."}],
         "rejected": [{"role": "assistant", "content": "Whatever."}]}]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    tok = load_tokenizer("builtin:tiny")
    for name, seed in (("policy", 1), ("reference", 2)):
        tiny_llama(len(tok), seed=seed).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root


def eval_args(models, data, *extra):
    return ["eval", "--model", str(models / "policy"), "--ref_model", str(models / "reference"), "--data",
            str(data), *extra]


def test_json_is_the_last_stdout_line_and_per_pair_rows_add_up(models, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    per_pair = tmp_path / "pairs.jsonl"
    out = run_cli(eval_args(models, data, "--json", "--per_pair_out", str(per_pair), "--batch_size", "2"), capsys)
    metrics = json.loads(out.strip().splitlines()[-1])
    rows = [json.loads(line) for line in per_pair.read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2] and metrics["pairs"] == 3
    for r in rows:
        assert abs(r["chosen_reward"] - 0.1 * (r["policy_chosen_logps"] - r["reference_chosen_logps"])) < 1e-5
        assert r["loss"] == pytest.approx(-torch.nn.functional.logsigmoid(
            torch.tensor(r["chosen_reward"] - r["rejected_reward"])).item(), abs=1e-5)
    assert metrics["loss"] == pytest.approx(sum(r["loss"] for r in rows) / 3, abs=1e-6)
    assert metrics["logps/chosen"] == pytest.approx(sum(r["policy_chosen_logps"] for r in rows) / 3, rel=1e-6)
    assert metrics["rewards/accuracies"] == pytest.approx(
        sum(r["chosen_reward"] > r["rejected_reward"] for r in rows) / 3)


def test_batch_size_does_not_change_the_metrics(models, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    one = json.loads(run_cli(eval_args(models, data, "--json", "--batch_size", "1"), capsys).splitlines()[-1])
    three = json.loads(run_cli(eval_args(models, data, "--json", "--batch_size", "3"), capsys).splitlines()[-1])
    for key in one:
        assert one[key] == pytest.approx(three[key], abs=1e-5)


def test_table_by_default(models, tmp_path, capsys):
    out = run_cli(eval_args(models, write_jsonl(tmp_path / "d.jsonl", ROWS)), capsys)
    assert "rewards/accuracies" in out and "logps/chosen" in out and not out.strip().startswith("{")


def test_bad_record_is_one_line_without_traceback(models, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [ROWS[0], '{"prompt": "a", "chosen": 7, "rejected": " b"}'])
    proc = subprocess.run([sys.executable, "-m", "fastdpo", *eval_args(models, data)], capture_output=True,
                          text=True)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "d.jsonl:2" in lines[0] and "'chosen'" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_skip_bad_records_reports_the_count(models, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [ROWS[0], "{oops", ROWS[1]])
    per_pair = tmp_path / "pairs.jsonl"
    out = run_cli(eval_args(models, data, "--json", "--on_bad_record", "skip", "--per_pair_out", str(per_pair)),
                  capsys)
    assert json.loads(out.splitlines()[-1])["pairs"] == 2
    # indices are positions in the file, the skipped line included
    assert [json.loads(line)["index"] for line in per_pair.read_text().splitlines()] == [0, 2]
    assert "skipped 1 bad records" in run_cli.last_stderr


@pytest.mark.parametrize("flags, message", [
    (["--loss", "sigmoidd"], "did you mean 'sigmoid'"),
    (["--beta", "0"], "--beta: must be > 0"),
    (["--label_smoothing", "0.5"], "--label_smoothing: must be in [0, 0.5)"),
    (["--bogus", "1"], "unknown flag --bogus"),
    (["--beta", "abc"], "--beta: expected float"),
])
def test_usage_errors_exit_2_naming_the_flag(models, tmp_path, capsys, flags, message):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    run_cli(eval_args(models, data, *flags), capsys, expect_code=2)
    assert message in run_cli.last_stderr and "Traceback" not in run_cli.last_stderr


def test_missing_model_directory_is_a_clear_error(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    run_cli(["eval", "--model", str(tmp_path / "nope"), "--ref_model", str(tmp_path / "nope"), "--data",
             str(data)], capsys, expect_code=1)
    assert "no such model directory" in run_cli.last_stderr


def test_flex_attention_eval_on_cpu_gives_the_sdpa_numbers_and_training_with_it_is_refused(models, tmp_path, capsys):
    """FlexAttention with the layout's BlockMask scores the pairs as SDPA does (forward only on CPU); training with
    it on CPU, where torch has no flex backward, is one line and writes nothing."""
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    rows = {}
    for impl in ("sdpa", "flex_attention"):
        out = tmp_path / f"{impl}.jsonl"
        run_cli(eval_args(models, data, "--attn_implementation", impl, "--per_pair_out", str(out)), capsys)
        assert f"fastdpo: attention: {impl}" in run_cli.last_stderr
        rows[impl] = [json.loads(line) for line in out.read_text().splitlines()]
    for a, b in zip(rows["sdpa"], rows["flex_attention"]):
        for key in ("policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps", "loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-4), key
    run_cli(["train", "--model", str(models / "policy"), "--data", str(data), "--output_dir", str(tmp_path / "o"),
             "--attn_implementation", "flex_attention"], capsys, expect_code=2)
    assert "--attn_implementation flex_attention: torch has no FlexAttention backward on CPU" in run_cli.last_stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention's backward runs on CUDA only (torch has "
                                                          "none on CPU); not yet run on a GPU")
def test_flex_attention_training_on_cuda_equals_sdpa(models, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS * 4)
    for impl in ("sdpa", "flex_attention"):
        run_cli(["train", "--model", str(models / "policy"), "--data", str(data), "--output_dir", str(tmp_path / impl),
                 "--attn_implementation", impl, "--max_steps", "2", "--batch_size", "4", "--progress", "false"],
                capsys)
    from conftest import assert_same_weights

    assert_same_weights(tmp_path / "sdpa", tmp_path / "flex_attention", atol=1e-4)


def test_auto_attention_takes_what_each_model_supports():
    """auto on CUDA asks for flex; a model without FlexAttention (GPT-2) gets SDPA instead of an error, and the
    start reports the one in effect; asked for explicitly, the same model is one line."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from fastdpo.config import build_config
    from fastdpo.errors import UserError
    from fastdpo.models import attention_implementation, set_attention

    cfg = build_config(["--model", "builtin:tiny", "--data", "builtin:example"])
    assert attention_implementation(cfg, "cuda") == "flex_attention" and attention_implementation(cfg, "cpu") == "sdpa"
    gpt2, llama = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=40)), tiny_llama(40)
    assert set_attention([gpt2], "flex_attention", asked=False) == "sdpa"
    assert set_attention([llama, gpt2], "flex_attention", asked=False) == "flex_attention"
    assert gpt2.config._attn_implementation == "sdpa"
    with pytest.raises(UserError, match="--attn_implementation flex_attention: not available for this model"):
        set_attention([gpt2], "flex_attention", asked=True)
