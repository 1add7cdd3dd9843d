"""`fastdpo report RUN_DIR` (the PNG decodes and holds the run's panels; the markdown holds its numbers) and the
model card saved with every model."""

import json
import os

import pytest

from conftest import run_cli

from fastdpo.report import PANELS


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    import contextlib
    import io

    from fastdpo.cli import main

    with contextlib.redirect_stderr(io.StringIO()), pytest.raises(SystemExit):
        main(["train", "--model", "builtin:tiny", "--data", "builtin:example", "--eval_data", "builtin:example-eval",
              "--output_dir", str(out), "--max_steps", "6", "--logging_steps", "2", "--eval_steps", "3",
              "--batch_size", "4", "--beta", "0.2", "--progress", "false"])
    return out


def test_the_report_png_decodes_and_holds_every_panel_the_run_logged(run_dir, capsys):
    pytest.importorskip("matplotlib")
    from matplotlib import image

    run_cli(["report", str(run_dir)], capsys)
    expected = [name for name, _ in PANELS if not name.startswith("samples")]  # no samples in this run
    assert f"({len(expected)} panels: {', '.join(expected)})" in run_cli.last_stderr
    pixels = image.imread(run_dir / "report.png")
    assert pixels.ndim == 3 and pixels.shape[0] > 800 and pixels.shape[1] > 1200  # 3 rows of 3 panels, 110 dpi
    assert pixels.std() > 0.05  # not a blank canvas
    text = (run_dir / "report.md").read_text()
    results = json.loads((run_dir / "results.json").read_text())
    after = results["eval_after"]["rewards/accuracies"]
    assert "| rewards/accuracies |" in text and f"{after:.6g}" in text and "β = 0.2" in text
    assert "![training curves](report.png)" in text
    from fastdpo.outputs import recorded

    assert {"report.png", "report.md", "README.md"} <= set(recorded(str(run_dir))["files"])  # --overwrite's to replace


@pytest.mark.parametrize("make, message", [
    (lambda d: None, "no such run directory"),
    (lambda d: d.mkdir(), "no metrics.jsonl here; give the --output_dir of a fastdpo train run"),
])
def test_report_of_something_that_is_not_a_run_is_one_line(tmp_path, capsys, make, message):
    make(tmp_path / "x")
    run_cli(["report", str(tmp_path / "x")], capsys, expect_code=2)
    assert message in run_cli.last_stderr and "Traceback" not in run_cli.last_stderr


def test_the_saved_model_has_a_card_that_says_what_trained_it_and_loads_as_before(run_dir):
    from transformers import AutoModelForCausalLM

    card = (run_dir / "README.md").read_text()
    results = json.loads((run_dir / "results.json").read_text())
    assert card.startswith("---\nlibrary_name: transformers\ntags: [fastdpo, dpo]\n---")
    for text in ("`builtin:tiny`", "`builtin:example`", "loss `sigmoid`", "β = 0.2", "| steps | 6 |",
                 "fastdpo train --config config.yaml", "fastdpo score --model THIS_DIR"):
        assert text in card, text
    assert f"| rewards/accuracies | {results['eval_before']['rewards/accuracies']:.6g} | " \
           f"{results['eval_after']['rewards/accuracies']:.6g} |" in card
    AutoModelForCausalLM.from_pretrained(run_dir)
    assert "README.md" in os.listdir(run_dir)
