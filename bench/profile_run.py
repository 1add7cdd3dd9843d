"""Where one fastdpo run on the benchmark fixture spends its time, by kind of operator (torch profiler).

    python bench/profile_run.py --precision bf16 [--trl-pairs-per-s 1.5] [--workdir DIR] [-- extra train flags]

Builds the fixture of bench.py (or reuses the one in --workdir), runs `fastdpo train` on it once with the
benchmark's flags, and prints the operators' time (self time on the calling thread, which is wall time while
the op runs on all torch threads) in the reference pass and in the rest of the run (the steps, the start-up check
and the final save), each split into matmuls, attention, softmax kernels (with the fused attention kernel, these
are the vocabulary-wide ones) and everything else. Given TRL's pairs/s for the precision (from bench.py), it
prints the time budget of a run `--target` times faster against the time the matmuls and the attention alone
take. Profiling adds a little time per operator; the split is what this is for, not the total.
"""

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402

KINDS = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear"),
    "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu",
                  "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
                  "aten::_scaled_dot_product_attention_math", "aten::_efficient_attention_forward",
                  "aten::_scaled_dot_product_efficient_attention",
                  "aten::_scaled_dot_product_efficient_attention_backward"),
    "softmax": ("aten::_softmax", "aten::_log_softmax", "aten::_log_softmax_backward_data",
                "aten::_softmax_backward_data"),
}


def split(profile) -> dict:
    """Seconds of operator self time per kind, over the aten operators of a finished profile."""
    out = dict.fromkeys([*KINDS, "other"], 0.0)
    for event in profile.key_averages():
        if not event.key.startswith("aten::"):
            continue
        kind = next((k for k, names in KINDS.items() if event.key in names), "other")
        out[kind] += event.self_cpu_time_total / 1e6
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--trl-pairs-per-s", type=float, default=None, help="TRL's pairs/s from bench.py")
    parser.add_argument("--target", type=float, default=10.0, help="speed-up whose budget is printed (default 10)")
    parser.add_argument("--workdir", default=None, help="fixture directory (built when absent)")
    parser.add_argument("extra", nargs="*", help="more fastdpo train flags (after --)")
    args = parser.parse_args()

    import time

    from torch.profiler import ProfilerActivity, profile

    import fastdpo.reference as reference
    import fastdpo.training as ft
    from fastdpo.config import build_config

    workdir = args.workdir or tempfile.mkdtemp(prefix="fastdpo-profile-")
    model, data = os.path.join(workdir, "model"), os.path.join(workdir, "pairs.jsonl")
    if not os.path.isdir(model):
        bench.build_model(model, 0)
    if not os.path.isfile(data):
        bench.write_pairs(data, 96, 0)
    spec = {"model": model, "data": data, "out": tempfile.mkdtemp(prefix="out-", dir=workdir), "batch": bench.BATCH,
            "precision": args.precision, "max_length": 1024, "max_prompt_length": 512,
            "fast_flags": bench.FASTDPO_FAST_FLAGS + ["--ref_cache_dir", "off", "--overwrite"] + args.extra}
    profiles = {}  # phase -> finished profile; the reference pass gets its own, the rest of the run the other

    def begin(name):
        profiles.setdefault(name, []).append(profile(activities=[ProfilerActivity.CPU]))
        profiles[name][-1].__enter__()

    def end(name):
        profiles[name][-1].__exit__(None, None, None)

    original, clock = reference.compute_reference_logps, {}

    def profiled_reference(*a, **kw):
        end("training (rest)")
        begin("reference pass")
        start = time.perf_counter()
        try:
            return original(*a, **kw)
        finally:
            clock["reference"] = clock.get("reference", 0.0) + time.perf_counter() - start  # one call per pair set
            end("reference pass")
            begin("training (rest)")

    reference.compute_reference_logps = profiled_reference
    bench.import_model_code()
    begin("training (rest)")
    start = time.perf_counter()
    try:
        ft.train(build_config(bench.train_flags(spec)))
    finally:
        wall = time.perf_counter() - start
        end("training (rest)")
    phases = {}
    for name, runs in profiles.items():
        parts = [split(p) for p in runs]
        phases[name] = {k: sum(part[k] for part in parts) for k in parts[0]}

    print(f"fastdpo {args.precision} on the fixture, profiled: {wall:.2f} s wall (reference pass "
          f"{clock.get('reference', 0):.2f} s)")
    print(f"{'phase':<18}" + "".join(f"{k:>12}" for k in [*KINDS, "other"]) + f"{'sum':>10}   (s of operator time)")
    for name, kinds in phases.items():
        print(f"{name:<18}" + "".join(f"{v:>12.2f}" for v in kinds.values()) + f"{sum(kinds.values()):>10.2f}")
    if args.trl_pairs_per_s:
        with open(data, encoding="utf-8") as f:
            pairs = sum(1 for line in f if line.strip())
        budget = pairs / (args.target * args.trl_pairs_per_s)
        floor = sum(p["matmul"] + p["attention"] for p in phases.values())
        print(f"x{args.target:g} against TRL's {args.trl_pairs_per_s} pairs/s leaves {budget:.2f} s for the whole "
              f"run; its matmuls and attention alone take {floor:.2f} s, leaving {budget - floor:.2f} s for "
              f"everything else (measured here, profiled: {wall - floor:.2f} s)")


if __name__ == "__main__":
    main()
