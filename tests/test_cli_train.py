"""`fastdpo train` as a user with their own model and data runs it: the documented defaults, evaluation only on
--eval_data, and no quickstart settings unless the command names neither a model, data nor a config."""

import dataclasses
import json

import pytest
import yaml

from fastdpo.config import Config

from conftest import example_rows, model_and_pairs, run_cli, write_jsonl


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return model_and_pairs(tmp_path_factory, "cli", seed=13, rows=12)


def saved_config(out) -> dict:
    return yaml.safe_load(open(out / "config.yaml"))


def test_data_without_a_model_is_refused_naming_the_model(base, tmp_path, capsys):
    root, model, data = base
    run_cli(["train", "--data", data, "--output_dir", str(tmp_path / "out")], capsys, expect_code=2)
    err = run_cli.last_stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastdpo: error: --model: which model should train?")
    assert "builtin:tiny" in err[0] and "running the built-in quickstart" not in run_cli.last_stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags", [["--eval_data", "EVAL"], ["--ref_model", "REF"], ["--adapter", "REF"]])
def test_any_model_or_data_of_the_users_means_no_quickstart(base, tmp_path, capsys, flags):
    root, model, data = base
    flags = [{"EVAL": data, "REF": model}.get(f, f) for f in flags]
    run_cli(["train", *flags, "--output_dir", str(tmp_path / "out")], capsys, expect_code=2)
    assert "running the built-in quickstart" not in run_cli.last_stderr
    assert "fastdpo: error: --model: which model should train?" in run_cli.last_stderr


def test_a_model_without_data_is_refused_naming_the_data(base, tmp_path, capsys):
    root, model, data = base
    run_cli(["train", "--model", model, "--output_dir", str(tmp_path / "out")], capsys, expect_code=2)
    assert "fastdpo: error: --data: no training data" in run_cli.last_stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("model", ["dir", "builtin:tiny"])
def test_a_users_run_takes_the_documented_defaults_and_no_eval_data(base, tmp_path, capsys, model):
    root, model_dir, data = base
    model = model_dir if model == "dir" else model
    out = tmp_path / "out"
    run_cli(["train", "--model", model, "--data", data, "--output_dir", str(out), "--max_steps", "2",
             "--progress", "false"], capsys)
    assert "quickstart" not in run_cli.last_stderr
    expected = dataclasses.asdict(Config(model=model, data=data, output_dir=str(out), max_steps=2,
                                         progress=False).resolve())
    assert saved_config(out) == expected  # every other option at its documented default
    assert (expected["learning_rate"], expected["lr_scheduler"], expected["eval_data"]) == (1e-6, "linear", None)
    results = json.load(open(out / "results.json"))
    assert results["eval_before"] is None and results["eval_after"] is None
    assert not any("eval/" in line for line in open(out / "metrics.jsonl"))


def test_a_users_run_evaluates_on_its_eval_data_only(base, tmp_path, capsys):
    root, model, data = base
    heldout = write_jsonl(tmp_path / "heldout.jsonl", example_rows(5, "eval"))
    out = tmp_path / "out"
    run_cli(["train", "--model", model, "--data", data, "--eval_data", heldout, "--output_dir", str(out),
             "--max_steps", "1", "--progress", "false"], capsys)
    results = json.load(open(out / "results.json"))
    assert results["eval_before"]["pairs"] == 5 and results["eval_after"]["pairs"] == 5


def test_no_model_data_or_config_is_the_quickstart_and_flags_still_override_it(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    stdout = run_cli(["train", "--max_steps", "2", "--eval_data", "", "--progress", "false"], capsys)
    assert "running the built-in quickstart" in run_cli.last_stderr
    saved = saved_config(tmp_path / "fastdpo-output")
    assert (saved["model"], saved["data"], saved["learning_rate"], saved["max_steps"]) == (
        "builtin:tiny", "builtin:example", 0.0001, 2)
    assert "next: fastdpo train --model" in stdout  # the quickstart's hint, after the summary


def test_a_config_file_means_no_quickstart(base, tmp_path, capsys):
    root, model, data = base
    path = tmp_path / "run.yaml"
    path.write_text(f"model: {model}\ndata: {data}\nmax_steps: 1\nprogress: false\n")
    out = tmp_path / "out"
    run_cli(["train", "--config", str(path), "--output_dir", str(out)], capsys)
    assert "quickstart" not in run_cli.last_stderr and saved_config(out)["learning_rate"] == 1e-6
