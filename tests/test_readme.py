"""The README and docs stay true: the two opening commands, .ci/run, the Python API snippet, and the option
reference generated from the config and the loss table."""

import dataclasses
import os
import re
import subprocess
import sys

from fastdpo.config import Config
from fastdpo.losses import LOSSES

from conftest import example_rows, make_model_dir, write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return f.read()


def options_doc() -> str:
    with open(os.path.join(ROOT, "docs", "options.md"), encoding="utf-8") as f:
        return f.read()


def test_readme_opens_with_quickstart_and_test_commands_and_ci_runs_the_second():
    blocks = re.findall(r"```bash\n(.*?)\n```", readme(), flags=re.S)
    assert blocks[0].strip() == "pip install torch==2.13.0 -e . && fastdpo train"
    assert blocks[1].strip().endswith("python -m pytest")
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        assert blocks[1].strip() in f.read()
    head = readme().split("```bash")[0]
    assert head.strip() == "# fastdpo"  # nothing comes before the two commands


def test_every_option_is_documented():
    text = options_doc()
    for f in dataclasses.fields(Config):
        assert f"`--{f.name}`" in text, f.name


def test_the_option_reference_is_generated_from_the_config_and_the_loss_table():
    """docs/options.md is what scripts/make_docs.py renders now: names, types, defaults, help and losses."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    try:
        import make_docs
    finally:
        sys.path.pop(0)
    assert options_doc() == make_docs.render(), "docs/options.md is stale: run python scripts/make_docs.py"
    for f in dataclasses.fields(Config):
        assert re.search(rf"\| `--{f.name}` \|[^\n]*\| {re.escape(f.metadata['help'].replace('|', chr(92) + '|'))} \|",
                         options_doc()), f.name
    for name in LOSSES:
        assert f"| `{name}` |" in options_doc(), name


def test_the_readme_python_api_snippet_runs(tmp_path):
    """The snippet as a user would run it, in a directory holding the files it names."""
    snippet = re.findall(r"```python\n(.*?)\n```", readme(), flags=re.S)[0]
    make_model_dir(tmp_path / "my-sft-model", seed=2)
    write_jsonl(tmp_path / "pairs.jsonl", example_rows(16))
    write_jsonl(tmp_path / "heldout.jsonl", example_rows(8, "eval"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "hf-cache")}
    proc = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    accuracy, margin = (float(x) for x in proc.stdout.splitlines()[-2].split())
    loss, rows = proc.stdout.splitlines()[-1].split()
    assert 0 <= accuracy <= 1 and int(rows) == 8
    assert (tmp_path / "dpo-out" / "model.safetensors").is_file()
