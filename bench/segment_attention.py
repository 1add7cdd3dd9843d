"""Attention per segment against SDPA with the dense mask: one forward and backward of a batch of prefix-shared
pairs, side by side in one process, at several widths (CPU; nothing is downloaded). Sets `attention.MIN_SEGMENT`.

    python bench/segment_attention.py --workdir /tmp/long --tokens 256,512,768,1024,1536,3072,4096

bench/bench.py's fixture (a random Llama of 4 layers, hidden 256). At each T: `--pairs` pairs of T tokens (prompt,
chosen and rejected T/3 each) in the prefix-shared, packed layout (`--row-length`: several pairs a row), the chunked
head; for each way, the median of
`--repeats` timed forward + backward passes after one warm-up, alternating the two ways.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench as b  # noqa: E402


def main() -> None:
    from transformers import AutoModelForCausalLM

    from fastdpo import attention
    from fastdpo.batching import collate_packed
    from fastdpo.logps import sequence_logps
    from fastdpo.tokenize import TokenizedPair

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="/tmp/fastdpo-long")
    p.add_argument("--tokens", default="256,512,768,1024,1536,3072,4096", help="tokens per pair")
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--row-length", type=int, default=0, help="pack pairs into rows this wide (0: a pair a row)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    model_dir = os.path.join(args.workdir, "model")
    if not os.path.isdir(model_dir):
        b.build_model(model_dir, args.seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa")
    rng = random.Random(args.seed)
    attention.MIN_SEGMENT = 1  # every batch per segment when it is on
    commit = subprocess.run(["git", "-C", HERE, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    print(f"{sys.executable} {' '.join(sys.argv)}\ncommit {commit.stdout.strip()}; {args.pairs} pairs, median of "
          f"{args.repeats}\n| tokens a pair | batch (R, L) | dense mask s | per segment s | per segment speed |\n"
          "|---|---|---|---|---|")
    for tokens in [int(x) for x in args.tokens.split(",")]:
        third = tokens // 3
        part = lambda: [rng.randrange(4, model.config.vocab_size) for _ in range(third)]  # noqa: E731
        batch = collate_packed([TokenizedPair(part(), part(), part(), index=i) for i in range(args.pairs)], 2,
                               row_length=args.row_length)
        times = {False: [], True: []}
        for k in range(1 + args.repeats):
            for per_segment in (False, True):
                attention.set_per_segment([model], per_segment)
                start = time.perf_counter()
                logps, _ = sequence_logps(model, batch, "chunked", 256)
                logps.sum().backward()
                model.zero_grad(set_to_none=True)
                if k:
                    times[per_segment].append(time.perf_counter() - start)
        dense, segmented = statistics.median(times[False]), statistics.median(times[True])
        print(f"| {tokens:,} | {tuple(batch.input_ids.shape)} | {dense:.3f} | {segmented:.3f} | "
              f"×{dense / segmented:.2f} |", flush=True)


if __name__ == "__main__":
    main()
