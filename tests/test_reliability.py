"""Reliability: bad input gives one clear line and touches nothing; non-finite steps are skipped; signals
checkpoint and exit 0; kill -9 at random moments then --resume equals an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastdpo.config import build_config
from fastdpo.data import load_records
from fastdpo.errors import UserError
from fastdpo.training import train

from conftest import example_rows, load_state, make_model_dir, run_cli, write_jsonl

GOOD = {"prompt": "Question: How do I swim?\nAnswer:", "chosen": " Float first.", "rejected": " No."}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("rel") / "model", seed=8)


def write_bytes(path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


CASES = {
    # name: (file contents, extra flags, exit code, text the one line must hold)
    "truncated JSON": (b'{"prompt": "a", "chosen": " b", "rejected": " c"}\n{"prompt": "a", "cho', [], 1,
                       "d.jsonl:2: invalid JSON"),
    "missing field": (b'{"prompt": "a", "chosen": " b"}\n', [], 1, "d.jsonl:1: missing field 'rejected'"),
    "wrong type": (b'{"prompt": "a", "chosen": [1], "rejected": " c"}\n', [], 1, "d.jsonl:1: field 'chosen'"),
    "empty string": (b'{"prompt": "a", "chosen": "", "rejected": " c"}\n', [], 1,
                     "d.jsonl:1: field 'chosen' is an empty string"),
    "empty file": (b"", [], 1, "d.jsonl: no preference records"),
    "not UTF-8": (b'{"prompt": "\xff", "chosen": " b", "rejected": " c"}\n', [], 1,
                  "d.jsonl:1: bytes that are not UTF-8"),
    "chosen equals rejected everywhere": (b'{"prompt": "a", "chosen": " b", "rejected": " b"}\n' * 3, [], 1,
                                          "no usable preference pair left"),
    "prompt longer than max_length": (json.dumps(GOOD).encode() + b"\n", ["--max_length", "4",
                                                                         "--max_prompt_length", "8"], 2,
                                      "--max_prompt_length: 8 is not below --max_length 4"),
    "beta <= 0": (json.dumps(GOOD).encode(), ["--beta", "-1"], 2, "--beta: must be > 0"),
    "label smoothing out of range": (json.dumps(GOOD).encode(), ["--label_smoothing", "0.7"], 2,
                                     "--label_smoothing: must be in [0, 0.5)"),
    "unknown loss": (json.dumps(GOOD).encode(), ["--loss", "dpo"], 2, "--loss: unknown loss 'dpo'"),
    "unknown flag": (json.dumps(GOOD).encode(), ["--learning-rat", "1"], 2, "unknown flag --learning_rat"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_line_and_leaves_the_output_dir_alone(name, model_dir, tmp_path, capsys):
    contents, extra, code, text = CASES[name]
    data = write_bytes(tmp_path / "d.jsonl", contents)
    out = previous_run(tmp_path / "out")  # --overwrite may replace it, but only once the new run has loaded
    run_cli(["train", "--model", model_dir, "--data", data, "--output_dir", str(out), "--overwrite",
             "--progress", "false", *extra], capsys, expect_code=code)
    err = run_cli.last_stderr.strip().splitlines()
    assert err[-1].startswith("fastdpo: error: ") and text in err[-1], err[-1]
    assert "Traceback" not in run_cli.last_stderr
    assert sorted(os.listdir(out)) == [".fastdpo-files.json", "keep.txt"] and (out / "keep.txt").read_text() == "precious"


def previous_run(out):
    """An output directory as an earlier, finished fastdpo run left it: its file, and the record that it wrote it."""
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    (out / ".fastdpo-files.json").write_text(json.dumps({"fastdpo": 1, "files": ["keep.txt"], "finished": True}))
    return out


@pytest.mark.parametrize("flags, text", [
    (["--data", "nowhere/pairs.jsonl"], "nowhere/pairs.jsonl: no such file"),
    (["--model", "./no/such/model"], "--model: ./no/such/model: no such model directory"),
])
def test_missing_paths_are_named(flags, text, model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [GOOD])
    run_cli(["train", "--model", model_dir, "--data", data, "--output_dir", str(tmp_path / "o"),
             "--progress", "false", *flags], capsys, expect_code=1)
    assert text in run_cli.last_stderr


def test_model_directory_without_tokenizer(model_dir, tmp_path, capsys):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(model_dir, bare)
    for name in os.listdir(bare):
        if name.startswith(("tokenizer", "special_tokens", "chat_template")):
            os.unlink(bare / name)
    data = write_jsonl(tmp_path / "d.jsonl", [GOOD])
    run_cli(["train", "--model", str(bare), "--data", data, "--output_dir", str(tmp_path / "o")], capsys,
            expect_code=1)
    assert "could not load a tokenizer" in run_cli.last_stderr and str(bare) in run_cli.last_stderr


def test_a_traceback_never_reaches_the_user(model_dir, tmp_path):
    data = write_bytes(tmp_path / "d.jsonl", b"{oops\n")
    proc = subprocess.run([sys.executable, "-m", "fastdpo", "train", "--model", model_dir, "--data", data,
                           "--output_dir", str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr


def test_degenerate_rows_are_skipped_with_a_count(model_dir, tmp_path, capsys):
    rows = example_rows(8) + [dict(GOOD, rejected=GOOD["chosen"])]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    run_cli(["train", "--model", model_dir, "--data", data, "--output_dir", str(tmp_path / "o"), "--max_steps",
             "1", "--progress", "false"], capsys)
    assert "9 records -> 8 pairs" in run_cli.last_stderr and "1 (chosen == rejected)" in run_cli.last_stderr


# --- non-finite steps -----------------------------------------------------------------------------------------


def poison(monkeypatch, bad_calls) -> list[str]:
    """A loss added to the loss table: DPO's, but NaN at the calls `bad_calls` picks. Returns its --loss flags."""
    from fastdpo.losses import LOSSES, Loss, sigmoid

    calls = {"n": 0}

    def sometimes_nan(pc, pr, rc, rr, *, beta):
        calls["n"] += 1
        losses = sigmoid(pc, pr, rc, rr, beta=beta)
        return losses * float("nan") if bad_calls(calls["n"]) else losses

    monkeypatch.setitem(LOSSES, "sometimes_nan", Loss(sometimes_nan))
    return ["--loss", "sometimes_nan"]


def test_a_non_finite_step_is_skipped_and_counted(model_dir, tmp_path, monkeypatch):
    loss = poison(monkeypatch, lambda n: n == 2)  # the second step's loss
    data = write_jsonl(tmp_path / "d.jsonl", example_rows(16))
    out = tmp_path / "o"
    train(build_config(["--model", model_dir, "--data", data, "--output_dir", str(out), "--max_steps", "3",
                        "--batch_size", "4", "--logging_steps", "1", "--progress", "false", "--learning_rate",
                        "1e-3", *loss]))
    lines = [json.loads(line) for line in open(out / "metrics.jsonl") if '"skipped_steps"' in line]
    assert [line["skipped_steps"] for line in lines] == [0, 1, 1]
    assert all(torch.isfinite(t).all() for t in load_state(out).values())


def test_too_many_non_finite_steps_stop_keeping_the_last_checkpoint(model_dir, tmp_path, monkeypatch):
    loss = poison(monkeypatch, lambda n: n > 2)  # steps 3, 4, ... all fail
    data = write_jsonl(tmp_path / "d.jsonl", example_rows(16))
    out = tmp_path / "o"
    with pytest.raises(UserError, match="3 steps in a row had a non-finite") as err:
        train(build_config(["--model", model_dir, "--data", data, "--output_dir", str(out), "--max_steps", "10",
                            "--batch_size", "4", "--save_steps", "2", "--save_total_limit", "0",
                            "--max_bad_steps", "3", "--progress", "false", *loss]))
    # skipped steps never touch the weights: the step-4 checkpoint holds step 2's weights
    assert "checkpoints/step-4" in str(err.value)
    kept, good = load_state(out / "checkpoints" / "step-4"), load_state(out / "checkpoints" / "step-2")
    assert all(torch.equal(kept[k], good[k]) and torch.isfinite(kept[k]).all() for k in kept)


# --- signals and kill -9 ----------------------------------------------------------------------------------------


def start_quickstart(out, *extra):
    cmd = [sys.executable, "-m", "fastdpo", "train", "--output_dir", str(out), "--max_steps", "3000",
           "--logging_steps", "1", "--progress", "false", "--eval_data", "", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"))
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.is_file() and metrics.stat().st_size > 0) and time.time() < deadline:
        time.sleep(0.2)
    return proc


def test_sigterm_finishes_the_step_checkpoints_and_exits_0(tmp_path):
    out = tmp_path / "o"
    proc = start_quickstart(out)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "SIGTERM" in err and "--resume" in err
    latest = (out / "checkpoints" / "latest").read_text().strip()
    step = int(latest.split("-")[1])
    assert 0 < step < 3000 and (out / "checkpoints" / latest / "optimizer.pt").is_file()


def test_second_ctrl_c_aborts_at_once(tmp_path):
    proc = start_quickstart(tmp_path / "o", "--batch_size", "400")  # steps of about a second
    proc.send_signal(signal.SIGINT)
    time.sleep(0.2)  # two presses, as a person makes them (signals of one kind that arrive together merge)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted" in err


def test_kill_9_at_random_moments_then_resume_equals_uninterrupted(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "kill_resume.py"), "--kills", "2",
                           "--seed", "1", "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    assert proc.stdout.count("exit -9") >= 1 and "equal the uninterrupted run" in proc.stdout


# --- the record loader never fails in any other way ----------------------------------------------------------------

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                         max_size=4), max_leaves=8)
records = st.dictionaries(st.sampled_from(["prompt", "chosen", "rejected", "x"]),
                          json_values | st.lists(st.fixed_dictionaries({"role": st.text(max_size=5),
                                                                         "content": st.text(max_size=5)}),
                                                 max_size=3), max_size=4)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.one_of(records.map(json.dumps), json_values.map(json.dumps), st.binary(max_size=40)),
                      max_size=5), skip=st.booleans())
def test_loader_yields_records_or_the_clear_error(tmp_path, lines, skip):
    path = tmp_path / "h.jsonl"
    path.write_bytes(b"\n".join(line if isinstance(line, bytes) else line.encode() for line in lines))
    try:
        result = load_records(str(path), on_bad_record="skip" if skip else "error")
    except UserError as e:
        assert str(e).startswith(str(path)) and "\n" not in str(e)
    else:
        for record in result.records:
            assert isinstance(record.chosen, (str, list)) and type(record.chosen) is type(record.rejected)
