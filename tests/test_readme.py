"""The README stays true: its two opening commands, .ci/run, and every option documented."""

import dataclasses
import os
import re

from fastdpo.config import Config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
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
    text = readme()
    for f in dataclasses.fields(Config):
        assert f"`--{f.name}`" in text, f.name
