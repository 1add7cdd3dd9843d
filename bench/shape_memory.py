"""Heap memory kept per input shape by torch's CPU kernels (why packed row widths are bucketed).

    python bench/shape_memory.py sdpa|linear|mm [--dtype bf16|fp32]

Runs one op (forward + backward for sdpa and linear) at 47 sequence lengths, 1500..2098 tokens, and prints glibc's
heap in use (`mallinfo2`) every 10 lengths. Nothing is kept by this script between lengths: growth is what the
kernels cache per shape. Linux/glibc only.
"""

import argparse
import ctypes

import torch


class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("op", choices=["sdpa", "linear", "mm"])
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    args = parser.parse_args()
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    lin = torch.nn.Linear(256, 688)
    for i, length in enumerate(range(1500, 2100, 13)):
        if args.op == "linear":
            x = torch.randn(length, 256, requires_grad=True)
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                y = lin(x)
            y.float().sum().backward()
        elif args.op == "mm":
            torch.randn(length, 256).to(dtype) @ torch.randn(256, 688).to(dtype)
        else:  # 8 rows of length/8 tokens, 4 heads of 64, a causal 4-D boolean mask
            q = torch.randn(8, 4, length // 8, 64, dtype=dtype, requires_grad=True)
            mask = torch.ones(8, 1, length // 8, length // 8, dtype=torch.bool).tril()
            torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=mask).float().sum().backward()
        if i % 10 == 0:
            print(f"{args.op} {args.dtype} length {length}: {libc.mallinfo2().uordblks / 2**20:.1f} MiB in use")


if __name__ == "__main__":
    main()
