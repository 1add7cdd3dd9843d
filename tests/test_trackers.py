"""--report_to: TensorBoard event files read back equal metrics.jsonl under HF Trainer's names (train/..., eval/...);
the W&B adapter gets the config and every record at its step (and runs offline for real); a tracker not installed
is one line; --overwrite replaces the trackers' files; without a terminal a log line every logging_steps."""

import json
import os
import sys

import pytest

from conftest import run_cli

from fastdpo.metrics import Sinks, WandB


def train(tmp_path, capsys, *flags, out="out"):
    run_cli(["train", "--model", "builtin:tiny", "--data", "builtin:example", "--eval_data", "builtin:example-eval",
             "--output_dir", str(tmp_path / out), "--max_steps", "4", "--logging_steps", "2", "--eval_steps", "2",
             "--batch_size", "4", *flags], capsys)
    lines = (tmp_path / out / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_tensorboard_events_hold_every_metrics_line_under_trl_names(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records = train(tmp_path, capsys, "--report_to", "tensorboard")
    events = EventAccumulator(str(tmp_path / "out" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/rewards/chosen", "train/rewards/margins", "train/logps/rejected",
            "train/learning_rate", "train/grad_norm", "eval/loss", "eval/rewards/accuracies"} <= tags
    for record in records:
        prefix = "" if any(k.startswith("eval/") for k in record) else "train/"
        for key, value in record.items():
            if key == "step" or not isinstance(value, (int, float)):
                continue
            logged = {e.step: e.value for e in events.Scalars(prefix + key)}
            assert logged[record["step"]] == pytest.approx(value, rel=1e-6, abs=1e-7), key
    assert sorted(e.step for e in events.Scalars("eval/loss")) == [0, 2, 4]


def test_the_wandb_adapter_gets_the_config_and_each_record_at_its_step(monkeypatch, tmp_path):
    calls = []

    class Run:
        def log(self, scalars, step):
            calls.append(("log", step, scalars))

        def finish(self):
            calls.append(("finish",))

    fake = type(sys)("wandb")
    fake.init = lambda **kw: calls.append(("init", kw)) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_PROJECT", "mine")
    sinks = Sinks(type("NoFile", (), {"write": lambda self, r: None})(), [WandB(str(tmp_path), {"beta": 0.1}, "r")])
    sinks.write({"step": 3, "loss": 0.5, "rewards/margins": 0.25, "epoch": 0.5})
    sinks.write({"step": 3, "eval/loss": 0.6})
    sinks.close()
    assert calls[0] == ("init", {"project": "mine", "name": "r", "config": {"beta": 0.1}, "dir": str(tmp_path)})
    assert calls[1] == ("log", 3, {"train/loss": 0.5, "train/rewards/margins": 0.25, "train/epoch": 0.5})
    assert calls[2] == ("log", 3, {"eval/loss": 0.6}) and calls[3] == ("finish",)


def test_wandb_runs_offline_into_the_output_directory_and_overwrite_replaces_it(tmp_path, capsys, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    train(tmp_path, capsys, "--report_to", "wandb,tensorboard")
    runs = [n for n in os.listdir(tmp_path / "out" / "wandb") if n.startswith("offline-run-")]
    assert len(runs) == 1
    assert any(f.endswith(".wandb") and os.path.getsize(tmp_path / "out" / "wandb" / runs[0] / f) > 0
               for f in os.listdir(tmp_path / "out" / "wandb" / runs[0]))
    train(tmp_path, capsys, "--overwrite", "true")  # no trackers this time: their files were fastdpo's
    assert not {"wandb", "tensorboard"} & set(os.listdir(tmp_path / "out"))


@pytest.mark.parametrize("value, message", [
    ("mlflow", "--report_to mlflow: mlflow is not installed (pip install mlflow)"),
    ("tensorbord", "--report_to: 'tensorbord': none, or a comma list of tensorboard, wandb, mlflow"),
    ("none,wandb", "--report_to: 'none,wandb'"),
])
def test_a_bad_or_missing_tracker_is_one_line(tmp_path, capsys, monkeypatch, value, message):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # not installed, whatever this machine has
    run_cli(["train", "--model", "builtin:tiny", "--data", "builtin:example", "--output_dir", str(tmp_path / "o"),
             "--max_steps", "1", "--report_to", value], capsys, expect_code=2)
    assert message in run_cli.last_stderr and "Traceback" not in run_cli.last_stderr


def test_without_a_terminal_each_logging_step_is_a_plain_line(tmp_path, capsys):
    """Captured stderr is no terminal: with the bar on or off, no carriage returns, one line per logging step."""
    for progress in ("true", "false"):
        records = train(tmp_path, capsys, "--progress", progress, out=f"o{progress}")
        lines = [line for line in run_cli.last_stderr.splitlines() if line.startswith("fastdpo: step ")]
        train_records = [r for r in records if "loss" in r]
        assert len(lines) == len(train_records) == 2
        assert f"loss {train_records[-1]['loss']:.4f}" in lines[-1] and lines[-1].startswith("fastdpo: step 4/4")
        assert "\r" not in "".join(lines)


def test_mlflow_gets_every_metrics_line_and_a_start_it_refuses_is_one_line(tmp_path, capsys, monkeypatch):
    pytest.importorskip("mlflow", reason="mlflow is not installed (pip install mlflow-skinny)")
    from mlflow.tracking import MlflowClient

    store = f"file://{tmp_path / 'mlruns'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    run_cli(["train", "--model", "builtin:tiny", "--data", "builtin:example", "--output_dir", str(tmp_path / "no"),
             "--max_steps", "1", "--report_to", "mlflow"], capsys, expect_code=2)
    assert "--report_to mlflow: the tracker could not start (MlflowException:" in run_cli.last_stderr
    assert "Traceback" not in run_cli.last_stderr
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow's file store, opted into
    records = train(tmp_path, capsys, "--report_to", "mlflow")
    client = MlflowClient(store)
    run = client.search_runs([client.search_experiments()[0].experiment_id])[0]
    assert run.data.params["beta"] == "0.1"
    logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/loss")}
    assert logged == {r["step"]: pytest.approx(r["loss"]) for r in records if "loss" in r}
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/loss")] == [0, 2, 4]


def test_trackers_started_before_one_that_fails_are_closed(monkeypatch, tmp_path):
    from fastdpo import metrics
    from fastdpo.errors import UserError

    closed = []

    class Started:
        def __init__(self, *args):
            pass

        def close(self):
            closed.append(True)

    monkeypatch.setattr(metrics, "TensorBoard", Started)
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(UserError, match="--report_to mlflow: mlflow is not installed"):
        metrics.open_trackers("tensorboard,mlflow", str(tmp_path), {}, "r")
    assert closed == [True]
