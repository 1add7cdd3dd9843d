"""Long sequences: peak memory and pairs/s against tokens per pair, fastdpo beside TRL 1.16, and the passes without
gradients with FlexAttention's BlockMask against the dense mask (CPU; nothing is downloaded).

    python bench/long_sequences.py --workdir /tmp/long --json /tmp/long/result.json --plot bench/long_sequences.png

The fixture is bench/bench.py's (a random Llama of 4 layers, hidden 256, a WordLevel tokenizer, one token per
word). A pair of T tokens has a prompt, a chosen and a rejected response of T/3 tokens each (so each of its two
sequences holds 2T/3). Training: `--pairs` pairs, one a step, fp32, fastdpo with `--reference precomputed` and its
defaults, TRL with its precomputed reference and no gradient checkpointing (bench/bench.py's fp32 set-up); each run
its own process, its peak resident memory (VmHWM) its own. pairs/s is end to end (from the trainer's construction
or `train()` to its return, the reference precompute included); steady is the median over optimizer steps after the
first. Without gradients: `fastdpo eval` of the same pairs (the policy's and the reference's forward passes, as a
reference precompute runs them) three ways: `--attn_implementation sdpa` over the dense mask (per-segment
attention switched off in the child), `sdpa` per segment (fastdpo's default), and `flex_attention` (the
BlockMask; its kernel compiled in the run, so the first shape pays its compile time).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench as b  # noqa: E402  (bench/bench.py: the fixture, the children and their measures)


# the passes without gradients: SDPA over the dense mask, SDPA per segment (fastdpo's default), FlexAttention
EVAL_WAYS = {"dense": "sdpa", "per segment": "sdpa", "flex": "flex_attention"}


def write_pairs(path: str, tokens: int, n: int, seed: int) -> None:
    """n pairs of `tokens` tokens each: prompt (with BOS), chosen and rejected (with EOS) of tokens/3 each."""
    rng = random.Random(seed + tokens)
    third = tokens // 3
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            f.write(json.dumps({"prompt": b.random_text(rng, third - 1, False),
                                "chosen": b.random_text(rng, third - 1, True),
                                "rejected": b.random_text(rng, third - 1, True)}) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="/tmp/fastdpo-long")
    p.add_argument("--train-lengths", default="1024,2048,4096,8192", help="tokens per pair for training")
    p.add_argument("--eval-lengths", default="2048,4096,8192,16384,32768", help="tokens per pair, no gradients")
    p.add_argument("--pairs", type=int, default=4, help="pairs per training run (one a step)")
    p.add_argument("--skip-trl", action="store_true")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None, help="write the figure (PNG) here")
    args = p.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    model = os.path.join(args.workdir, "model")
    if not os.path.isdir(model):
        b.log(f"building the fixture model in {model}")
        b.build_model(model, args.seed)
    report = {"command": " ".join([sys.executable] + sys.argv), "machine": b.machine_info(), "train": {}, "eval": {}}
    for tokens in [int(x) for x in args.train_lengths.split(",") if x]:
        data = os.path.join(args.workdir, f"pairs-{tokens}.jsonl")
        write_pairs(data, tokens, args.pairs, args.seed)
        report["train"][tokens] = {}
        for tool in ("fastdpo",) if args.skip_trl else ("TRL", "fastdpo"):
            b.log(f"train: {tool}, {tokens} tokens a pair")
            spec = dict(model=model, data=data, batch=1, max_length=2 * tokens // 3 + 8,
                        max_prompt_length=tokens // 3 + 4, tool=tool.lower(), precision="fp32",
                        fast_flags=list(b.FASTDPO_FAST_FLAGS))
            r = b.run_child(spec, args.workdir, args.timeout)
            if "wall_s" in r:
                r["pairs_per_s"] = args.pairs / r["wall_s"]
            report["train"][tokens][tool] = r
            b.log("  -> " + (r.get("error") or f"{r['pairs_per_s']:.3f} pairs/s, peak {r['peak_rss_gib']:.2f} GiB"))
    for tokens in [int(x) for x in args.eval_lengths.split(",") if x]:
        data = os.path.join(args.workdir, f"eval-{tokens}.jsonl")
        write_pairs(data, tokens, 2, args.seed + 1)
        report["eval"][tokens] = {}
        for way, attention in EVAL_WAYS.items():
            b.log(f"eval: {way}, {tokens} tokens a pair")
            spec = dict(model=model, data=data, batch=1, max_length=2 * tokens // 3 + 8,
                        max_prompt_length=tokens // 3 + 4, tool="fastdpo-eval", precision="fp32", attention=attention,
                        dense=way == "dense")
            r = b.run_child(spec, args.workdir, args.timeout)
            report["eval"][tokens][way] = r
            b.log("  -> " + (r.get("error") or f"{r['wall_s']:.1f} s, peak {r['peak_rss_gib']:.2f} GiB"))
    print_report(report)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1, default=str)
    if args.plot:
        plot(report, args.plot)


def print_report(report: dict) -> None:
    f = b.fmt
    print("\ntraining, fp32, one pair a step: pairs/s (end to end, steady) and peak GiB")
    print(f"  {'tokens':>7}{'TRL pairs/s':>13}{'fastdpo':>10}{'speed':>8}{'TRL steady':>12}{'fastdpo':>10}"
          f"{'TRL GiB':>9}{'fastdpo':>9}{'memory':>8}")
    for tokens, tools in report["train"].items():
        t, d = tools.get("TRL", {}), tools.get("fastdpo", {})
        speed = d["pairs_per_s"] / t["pairs_per_s"] if "pairs_per_s" in t and "pairs_per_s" in d else None
        memory = d["peak_rss_gib"] / t["peak_rss_gib"] if "peak_rss_gib" in t and "peak_rss_gib" in d else None
        print(f"  {tokens:>7}{f(t.get('pairs_per_s'), '.3f'):>13}{f(d.get('pairs_per_s'), '.3f'):>10}"
              f"{f(speed, '.2f'):>8}{f(t.get('steady_pairs_per_s'), '.3f'):>12}"
              f"{f(d.get('steady_pairs_per_s'), '.3f'):>10}{f(t.get('peak_rss_gib'), '.2f'):>9}"
              f"{f(d.get('peak_rss_gib'), '.2f'):>9}{f(memory, '.2f'):>8}")
        for tool, r in tools.items():
            if "error" in r:
                print(f"          {tool} failed: {r['error'][:300]}")
    print("\nwithout gradients (fastdpo eval: policy and reference forwards), fp32: seconds and peak GiB")
    print(f"  {'tokens':>7}" + "".join(f"{way + ' s':>15}" for way in EVAL_WAYS) + f"{'flex/dense':>12}"
          f"{'segment/dense':>15}" + "".join(f"{way + ' GiB':>18}" for way in EVAL_WAYS))
    for tokens, runs in report["eval"].items():
        wall = {way: runs.get(way, {}).get("wall_s") for way in EVAL_WAYS}
        ups = [wall["dense"] / wall[way] if wall["dense"] and wall[way] else None for way in ("flex", "per segment")]
        print(f"  {tokens:>7}" + "".join(f"{f(wall[way], '.1f'):>15}" for way in EVAL_WAYS) +
              f"{f(ups[0], '.2f'):>12}{f(ups[1], '.2f'):>15}" +
              "".join(f"{f(runs.get(way, {}).get('peak_rss_gib'), '.2f'):>18}" for way in EVAL_WAYS))
        for name, r in runs.items():
            if "error" in r:
                print(f"          {name} failed: {r['error'][:300]}")


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for tool, style in (("TRL", "s--"), ("fastdpo", "o-")):
        xs = [int(t) for t, tools in report["train"].items() if "peak_rss_gib" in tools.get(tool, {})]
        rows = [report["train"][t][tool] for t in report["train"] if int(t) in xs]
        axes[0].plot(xs, [r["peak_rss_gib"] for r in rows], style, label=tool)
        axes[1].plot(xs, [r["pairs_per_s"] for r in rows], style, label=tool)
    for way, style in zip(EVAL_WAYS, ("s--", "o-", "^:")):
        xs = [int(t) for t, runs in report["eval"].items() if "wall_s" in runs.get(way, {})]
        axes[2].plot(xs, [report["eval"][t][way]["wall_s"] for t in report["eval"] if int(t) in xs], style,
                     label=f"fastdpo, {way}")
    titles = ("training: peak memory (GiB)", "training: pairs/s (end to end)", "no gradients: eval seconds (2 pairs)")
    for ax, title in zip(axes, titles):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens per pair")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend()
    axes[1].set_yscale("log")
    axes[2].set_yscale("log")
    fig.suptitle("fastdpo and TRL 1.16 on long pairs (CPU, 2 cores, fp32; random 4-layer Llama, hidden 256)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
