"""FlexAttention's BlockMask for one prefix-shared pair of T tokens: fastdpo's (`Batch.block_mask`, the blocks
classified 1,024 queries at a time) against torch's `create_block_mask` over the whole (L, L) grid. Time and the
growth of the process's peak resident memory, each in a process of its own (CPU; nothing is downloaded).

    python bench/block_mask.py --tokens 8190,32766
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time


def child(way: str, tokens: int) -> None:
    from fastdpo.batching import collate_packed
    from fastdpo.tokenize import TokenizedPair

    third = tokens // 3
    batch = collate_packed([TokenizedPair(list(range(3, 3 + third)), [5] * third, [6] * third, index=0)], 2)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if way == "torch":
        from torch.nn.attention.flex_attention import create_block_mask

        seg, side = batch.segment_ids, batch.sides

        def rule(b, h, q, k):
            return (q >= k) & (seg[b, q] == seg[b, k]) & ~((side[b, q] == 2) & (side[b, k] == 1))

        create_block_mask(rule, 1, None, tokens, tokens, device="cpu")
    else:
        batch.block_mask()
    grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 2**20
    print(f"{time.perf_counter() - start:.2f} {grew:.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", default="8190,32766")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child[0], int(args.child[1]))
    print("| tokens | create_block_mask s | GiB | fastdpo s | GiB |\n|---|---|---|---|---|")
    for tokens in [int(x) for x in args.tokens.split(",")]:
        cells = []
        for way in ("torch", "fastdpo"):
            out = subprocess.run([sys.executable, __file__, "--child", way, str(tokens)], capture_output=True,
                                 text=True, check=True).stdout.split()
            cells += out
        print(f"| {tokens:,} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
