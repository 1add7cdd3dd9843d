"""Crash-safety check: SIGKILL a CPU fp32 training run at random moments, resume each time, and compare the final
weights with an uninterrupted run's. Exit code 0 when they are equal (bit for bit), 1 otherwise.

    python bench/kill_resume.py --kills 5
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

TRAIN = ["--model", "builtin:tiny", "--data", "builtin:example", "--max_steps", "900", "--save_steps", "7",
         "--logging_steps", "1", "--learning_rate", "1e-4", "--progress", "false", "--seed", "3"]


def fastdpo(*args: str) -> list[str]:
    return [sys.executable, "-m", "fastdpo", "train", *TRAIN, *args]


def has_checkpoint(out: str) -> bool:
    return os.path.isfile(os.path.join(out, "checkpoints", "latest"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=5, help="how many times the run is killed")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    p.add_argument("--window", default="5,16", help="kill between these many seconds after a start")
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    low, high = (float(x) for x in args.window.split(","))
    work = args.workdir or tempfile.mkdtemp(prefix="fastdpo-kill-")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    full, cut = os.path.join(work, "full"), os.path.join(work, "cut")
    shutil.rmtree(full, ignore_errors=True)
    shutil.rmtree(cut, ignore_errors=True)
    subprocess.run(fastdpo("--output_dir", full), env=env, check=True, capture_output=True)
    print(f"uninterrupted run done: {full}", flush=True)
    for k in range(args.kills):
        mode = ["--resume"] if has_checkpoint(cut) else (["--overwrite"] if os.path.isdir(cut) else [])
        proc = subprocess.Popen(fastdpo("--output_dir", cut, *mode), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        delay = rng.uniform(low, high)
        time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        latest = os.path.join(cut, "checkpoints", "latest")
        point = open(latest).read().strip() if has_checkpoint(cut) else "none"
        print(f"kill {k + 1}: after {delay:.1f} s ({' '.join(mode) or 'fresh'}), exit {proc.returncode}; "
              f"latest checkpoint: {point}", flush=True)
    mode = ["--resume"] if has_checkpoint(cut) else ["--overwrite"]
    subprocess.run(fastdpo("--output_dir", cut, *mode), env=env, check=True, capture_output=True)
    from safetensors.torch import load_file

    a = load_file(os.path.join(full, "model.safetensors"))
    b = load_file(os.path.join(cut, "model.safetensors"))
    same = a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)
    print("final weights equal the uninterrupted run's" if same else "FINAL WEIGHTS DIFFER")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
