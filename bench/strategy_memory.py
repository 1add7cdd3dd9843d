"""Peak memory of each process under one process, DDP, FSDP2, DeepSpeed ZeRO-2 and ZeRO-3 (2 processes, CPU,
gloo), on a random Llama of about 150M parameters; fastdpo only.

    python bench/strategy_memory.py --workdir /tmp/smem

Each configuration trains 2 optimizer steps of 8 pairs (the package's example pairs) in micro-batches of 2, fp32
(or --precision bf16), the copy reference, AdamW, with glibc's mmap threshold fixed at 1 MiB (see --mmap-threshold). Every process
records its own peak resident set (VmHWM) at the end of set-up (the models loaded, sharded and placed) and at
exit; the table gives both for each process, and the ratio of a run's largest peak to one process's. Weights
(fp32), gradients and the two AdamW moments of a 150M-parameter model are 0.6 GB each; the frozen reference copy
another 0.6 GB.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def build(model_dir: str) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastdpo.models import load_tokenizer

    tokenizer = load_tokenizer("builtin:tiny")  # the package's own tokenizer
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=max(32000, len(tokenizer)), hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=2048,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return sum(p.numel() for p in model.parameters())


def peak_gib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 2**20


def child(argv: list[str]) -> None:
    """fastdpo's CLI, writing this process's peak resident set at the end of set-up (models loaded, sharded and
    placed) and at exit to $PEAK_DIR/rank-N.json."""
    import fastdpo.training as training

    setup_peak = []
    setup = training.setup

    def measured_setup(*args, **kwargs):
        run = setup(*args, **kwargs)
        setup_peak.append(peak_gib())
        return run

    training.setup = measured_setup

    def record():
        rank = os.environ.get("RANK", "0")
        with open(os.path.join(os.environ["PEAK_DIR"], f"rank-{rank}.json"), "w") as f:
            json.dump({"rank": int(rank), "peak_gib": peak_gib(), "setup_gib": setup_peak[0]}, f)

    atexit.register(record)
    from fastdpo.cli import main

    sys.argv = ["fastdpo", *argv]
    try:
        main()
    except SystemExit as e:
        if e.code:
            raise


def run(name: str, launcher: list[str], flags: list[str], workdir: str) -> dict:
    peak_dir = os.path.join(workdir, f"peaks-{name}")
    os.makedirs(peak_dir, exist_ok=True)
    for old in os.listdir(peak_dir):
        os.unlink(os.path.join(peak_dir, old))
    env = dict(os.environ, PEAK_DIR=peak_dir, OMP_NUM_THREADS="1" if launcher else "2", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *launcher, os.path.abspath(__file__), "--_child", *flags], env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        return {"error": proc.stderr[-1500:]}
    records = [json.load(open(os.path.join(peak_dir, n))) for n in sorted(os.listdir(peak_dir))]
    return {"peaks_gib": [r["peak_gib"] for r in records], "setup_gib": [r["setup_gib"] for r in records],
            "wall_s": wall}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--_child":
        return child(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="/tmp/fastdpo-strategy-memory")
    p.add_argument("--json", default=None)
    p.add_argument("--micro-batch-size", type=int, default=2, help="pairs per forward pass (default 2: the model's "
                   "states, not its activations, dominate; 0: each process's whole share)")
    p.add_argument("--mmap-threshold", type=int, default=1 << 20,
                   help="glibc's MALLOC_MMAP_THRESHOLD_ in the children (default 1 MiB: freed buffers go back to "
                        "the system instead of staying in the heap, as a GPU's caching allocator reuses them; "
                        "0: glibc's own dynamic threshold)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="fastdpo's --precision (bf16: autocast, and the frozen reference's matmul weights in bf16)")
    p.add_argument("--runs", default="", help="a comma list of the runs to make (one, ddp, fsdp, zero2, zero3); "
                   "default all")
    args = p.parse_args()
    if args.mmap_threshold:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    os.makedirs(args.workdir, exist_ok=True)
    model = os.path.join(args.workdir, "model")
    if not os.path.isdir(model):
        print(f"building a {build(model) / 1e6:.0f}M-parameter Llama in {model}", file=sys.stderr)
    configs = os.path.join(HERE, os.pardir, "configs", "accelerate")
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    runs = {
        "one process": ([], []),
        "DDP, 2 processes": (torchrun, []),
        "FSDP2, 2 processes": (["-m", "accelerate.commands.launch", "--config_file",
                                os.path.join(configs, "fsdp.yaml"), "--num_processes", "2"], []),
        "ZeRO-2, 2 processes": (["-m", "accelerate.commands.launch", "--config_file",
                                 os.path.join(configs, "deepspeed-zero2.yaml"), "--num_processes", "2"], []),
        "ZeRO-3, 2 processes": (["-m", "accelerate.commands.launch", "--config_file",
                                 os.path.join(configs, "deepspeed-zero3.yaml"), "--num_processes", "2"], []),
    }
    keys = dict(zip(runs, ("one", "ddp", "fsdp", "zero2", "zero3")))
    wanted = {name.strip() for name in args.runs.split(",") if name.strip()} or set(keys.values())
    results = {}
    for name, (launcher, extra) in runs.items():
        if keys[name] not in wanted:
            continue
        out = os.path.join(args.workdir, "out-" + name.split(",")[0].replace(" ", "-").lower())
        flags = ["train", "--model", model, "--data", "builtin:example", "--output_dir", out, "--overwrite",
                 "--max_steps", "2", "--batch_size", "8", "--max_length", "256", "--max_prompt_length", "128", "--progress", "false",
                 "--eval_data", "", "--reference", "copy", "--micro_batch_size", str(args.micro_batch_size),
                 "--precision", args.precision, *extra]
        print(f"[{time.strftime('%H:%M:%S')}] {name}", file=sys.stderr, flush=True)
        results[name] = run(name, launcher, flags, args.workdir)
    base = max(results.get("one process", {}).get("peaks_gib", [float("nan")]))
    print(f"\n{'run':<22}{'peak GiB per process':>24}{'largest / one process':>24}{'at set-up end':>16}"
          f"{'wall s':>9}")
    for name, r in results.items():
        if "error" in r:
            print(f"{name:<22} FAILED: {r['error'][-300:]}")
            continue
        peaks, setup = (", ".join(f"{x:.2f}" for x in r[key]) for key in ("peaks_gib", "setup_gib"))
        print(f"{name:<22}{peaks:>24}{max(r['peaks_gib']) / base:>24.2f}{setup:>16}{r['wall_s']:>9.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
