"""Nothing a user has is ever lost: fastdpo removes only what it wrote, refuses a directory holding anything else,
writes atomically, and ends a failed write (no permission, a full disk, a file-size limit) with one line that
leaves the previous state intact; a stopped set-up never blocks the same command; resume serves preemptible jobs."""

import json
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest

from fastdpo.config import build_config
from fastdpo.errors import UserError
from fastdpo.outputs import RECORD
from fastdpo.training import train

from conftest import example_rows, make_model_dir, model_and_pairs, run_cli, write_jsonl


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return model_and_pairs(tmp_path_factory, "outputs", seed=21, rows=16)


def flags(base, out, *extra):
    root, model, data = base
    return ["--model", model, "--data", data, "--output_dir", str(out), "--max_steps", "2", "--batch_size", "8",
            "--progress", "false", "--learning_rate", "1e-3", *extra]


def snapshot(path) -> dict:
    """Every file below `path` with its bytes (a directory's own state)."""
    return {os.path.relpath(os.path.join(root, name), path): open(os.path.join(root, name), "rb").read()
            for root, _, names in os.walk(path) for name in names}


def test_overwrite_in_a_project_directory_is_refused_and_touches_nothing(base, tmp_path, capsys, monkeypatch):
    """`--output_dir . --overwrite` inside a project: the model, the data, other files and .git all stay."""
    project = tmp_path / "project"
    shutil.copytree(base[1], project / "model")
    shutil.copy(base[2], project / "pairs.jsonl")
    (project / ".git").mkdir()
    (project / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (project / "notes.md").write_text("mine")
    before = snapshot(project)
    monkeypatch.chdir(project)
    run_cli(["train", "--model", "model", "--data", "pairs.jsonl", "--output_dir", ".", "--overwrite"], capsys,
            expect_code=2)
    line = run_cli.last_stderr.strip().splitlines()[-1]
    assert line.startswith("fastdpo: error: --output_dir: . is not empty: it holds files fastdpo did not write "
                           "(.git, model, notes.md, pairs.jsonl)")
    assert snapshot(project) == before


def test_overwrite_replaces_only_fastdpos_own_files(base, tmp_path):
    out = tmp_path / "out"
    train(build_config(flags(base, out)))
    record = json.loads((out / RECORD).read_text())
    assert record["finished"] and {"config.yaml", "metrics.jsonl", "model.safetensors", "results.json"} <= set(
        record["files"])
    with pytest.raises(UserError, match="holds a finished run; pass --overwrite to replace it or --resume"):
        train(build_config(flags(base, out)))
    (out / "model.safetensors").write_bytes(b"an old model")
    train(build_config(flags(base, out, "--overwrite")))  # only fastdpo's files: replaced
    assert (out / "model.safetensors").read_bytes() != b"an old model"
    (out / "mine.txt").write_text("keep")
    with pytest.raises(UserError, match=r"holds files fastdpo did not write \(mine.txt\)"):
        train(build_config(flags(base, out, "--overwrite")))
    assert (out / "mine.txt").read_text() == "keep" and (out / "model.safetensors").is_file()


def test_a_run_that_stopped_before_its_first_checkpoint_does_not_block_the_same_command(base, tmp_path,
                                                                                        monkeypatch, capsys):
    """A set-up or first step that fails after config.yaml was written: the same command starts it again."""
    from fastdpo.losses import LOSSES, Loss

    monkeypatch.setitem(LOSSES, "always_nan", Loss(lambda pc, pr, rc, rr, *, beta: (pc - pr) * float("nan")))
    out = tmp_path / "out"
    with pytest.raises(UserError, match="non-finite"):
        train(build_config(flags(base, out, "--loss", "always_nan", "--max_bad_steps", "1")))
    assert (out / "config.yaml").is_file()
    result = train(build_config(flags(base, out)))  # no --overwrite needed
    assert result.steps == 2 and "stopped before its first checkpoint; starting it again" in capsys.readouterr().err


def start(argv, out, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fastdpo", "train", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"), **kw)


def wait_for(condition, timeout=120):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def test_an_interrupt_during_the_first_evaluation_leaves_a_directory_the_same_command_accepts(base, tmp_path):
    root, model, data = base
    heldout = write_jsonl(tmp_path / "heldout.jsonl", example_rows(128, "eval") * 40)  # a few seconds to score
    out = tmp_path / "out"
    argv = flags(base, out, "--eval_data", heldout, "--eval_batch_size", "4")
    proc = start(argv, out)
    wait_for(lambda: (out / "config.yaml").is_file())
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted" in err
    resumed = subprocess.run([sys.executable, "-m", "fastdpo", "train", *argv, "--resume", "--max_steps", "1"],
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "has no checkpoint yet (its run stopped before the first); starting from the beginning" in resumed.stderr


def test_resume_with_nothing_to_resume_starts_and_says_so(base, tmp_path, capsys):
    """A preemptible job passes --resume on every launch, the first one included."""
    result = train(build_config(flags(base, tmp_path / "new", "--resume")))
    assert result.steps == 2 and "holds no run yet; starting from the beginning" in capsys.readouterr().err


def test_kill_9_before_the_first_checkpoint_then_resume_starts_over(tmp_path):
    out = tmp_path / "out"
    argv = ["--model", "builtin:tiny", "--data", "builtin:example", "--output_dir", str(out), "--max_steps", "400",
            "--save_steps", "300", "--logging_steps", "1", "--progress", "false"]
    proc = start(argv, out)
    wait_for(lambda: (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").stat().st_size > 0)
    proc.kill()
    proc.wait()
    assert not (out / "checkpoints").exists()
    again = subprocess.run([sys.executable, "-m", "fastdpo", "train", *argv, "--max_steps", "3", "--resume"],
                           capture_output=True, text=True)
    assert again.returncode == 0 and "starting from the beginning" in again.stderr, again.stderr[-2000:]


def limited(nbytes: int):
    """preexec_fn: a file-size limit, so writes past it fail with EFBIG (Python ignores SIGXFSZ)."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))


def leftovers(out) -> list[str]:
    return [os.path.join(r, n) for r, dirs, files in os.walk(out) for n in dirs + files if n.startswith(".tmp-")]


def test_a_full_disk_at_a_checkpoint_keeps_the_last_one_and_resume_continues(tmp_path):
    out = tmp_path / "out"
    argv = ["--model", "builtin:tiny", "--data", "builtin:example", "--output_dir", str(out), "--max_steps", "60",
            "--save_steps", "1", "--save_total_limit", "0", "--batch_size", "200", "--logging_steps", "1",
            "--progress", "false", "--seed", "4"]
    proc = start(argv, out)
    wait_for(lambda: (out / "checkpoints" / "step-2" / "trainer_state.json").is_file())
    resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (200_000, 200_000))  # below the model's 0.9 MB
    _, err = proc.communicate(timeout=300)
    lines = err.strip().splitlines()
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert proc.returncode == 1 and "Traceback" not in err
    assert lines[-1].startswith("fastdpo: error: could not write the checkpoint of step ")
    assert "file-size limit" in lines[-1] and f"the last complete checkpoint is {out}/checkpoints/{latest}" in lines[-1]
    assert leftovers(out) == [] and (out / "checkpoints" / latest / "optimizer.pt").is_file()
    resumed = subprocess.run([sys.executable, "-m", "fastdpo", "train", *argv, "--resume", "--max_steps",
                              str(int(latest.split("-")[1]) + 1)], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {out}/checkpoints/{latest}" in resumed.stderr and (out / "model.safetensors").is_file()


def test_a_full_disk_at_the_final_save_keeps_the_last_checkpoint_and_says_where(tmp_path):
    """LoRA checkpoints are small; the merged model (0.9 MB) passes the limit: the final save fails, cleanly."""
    pytest.importorskip("peft")
    out = tmp_path / "out"
    argv = ["--model", "builtin:tiny", "--data", "builtin:example", "--output_dir", str(out), "--max_steps", "4",
            "--save_steps", "2", "--lora_r", "4", "--merge_lora", "--progress", "false", "--ref_cache_dir", "off"]
    proc = subprocess.run([sys.executable, "-m", "fastdpo", "train", *argv], capture_output=True, text=True,
                          preexec_fn=limited(400_000), env=dict(os.environ, HF_HUB_OFFLINE="1"))
    line = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert line.startswith(f"fastdpo: error: could not write the final model to {out}: a file is larger than")
    assert f"the last checkpoint, step-4, is at {out}/checkpoints/step-4 (the same command with --resume" in line
    assert leftovers(out) == [] and not (out / "merged").exists()
    assert (out / "checkpoints" / "step-4" / "adapter_model.safetensors").is_file()


def test_a_read_only_output_directory_is_one_line_before_anything_loads(base, tmp_path):
    """Root writes through permission bits, so the directory is made immutable (chattr +i) instead."""
    locked = tmp_path / "locked"
    locked.mkdir()
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode != 0:
            pytest.skip("running as root on a file system without chattr +i: no directory is read-only to root")
    else:
        locked.chmod(0o555)
    try:
        proc = subprocess.run([sys.executable, "-m", "fastdpo", "train", *flags(base, locked / "out")],
                              capture_output=True, text=True)
    finally:
        subprocess.run(["chattr", "-i", str(locked)], capture_output=True)
        locked.chmod(0o755)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"fastdpo: error: --output_dir: {locked}/out: cannot "
                                                           "write there (")
    assert "train data" not in proc.stderr and os.listdir(locked) == []  # refused before the data was read


def test_output_files_follow_the_umask(base, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", "import os, sys; os.umask(0o027); from fastdpo.cli import main; "
                           "main(sys.argv[1:])", "train", *flags(base, out, "--save_steps", "1")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for path in (out / "config.yaml", out / "model.safetensors", out / "checkpoints" / "latest",
                 out / "checkpoints" / "step-1" / "optimizer.pt", out / RECORD):
        assert stat.S_IMODE(path.stat().st_mode) == 0o640, path
    assert stat.S_IMODE((out / "checkpoints" / "step-1").stat().st_mode) == 0o750
