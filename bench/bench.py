"""Benchmark: TRL 1.16 DPOTrainer against fastdpo, side by side, in one run (CPU; nothing is downloaded).

    python bench/bench.py                                   # fp32 and bf16, one repeat each
    python bench/bench.py --precisions fp32 --repeats 3 --json bench.json
    python bench/bench.py --memory-curve --skip-main --curve-lengths 512,1024,2048

Fixture (built deterministically in --workdir or a temp dir): a random LlamaForCausalLM (4 layers, hidden 256,
intermediate 688, 4 attention heads of 64, vocab 32,000, untied lm_head) and a WordLevel tokenizer where one word
`wN` is token N; 96 text pairs with prompts and responses of 60-80 words. Every run is its own subprocess, so its
peak resident memory is its own: VmHWM of /proc/self/status in the child (ru_maxrss is not used for the figure
because Linux can carry the forking parent's high-water mark over execve into ru_maxrss; it is recorded in --json).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

# fastdpo's fastest set-up, appended to every fastdpo run (main runs and memory curve); prefix sharing, packing
# and chunked response-only logits are on by default. `--fastdpo-flags "..."` overrides it.
FASTDPO_FAST_FLAGS: list[str] = ["--reference", "precomputed"]

ARCH = dict(layers=4, hidden=256, intermediate=688, heads=4, vocab=32000)
BATCH, LR, BETA = 8, 1e-6, 0.1


def log(text: str) -> None:
    """Progress goes to stderr; stdout holds only the report."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# --- fixture -------------------------------------------------------------------------------------------------------


def build_model(model_dir: str, seed: int) -> None:
    """Random Llama (seeded) plus the WordLevel tokenizer `<s> </s> <pad> <unk> w4 .. w31999`, saved to model_dir."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<s>", "</s>", "<pad>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    vocab.update({f"w{i}": i for i in range(len(specials), ARCH["vocab"])})
    # the words of fastdpo's tokenizer check (ordinary text must not be unknown tokens only), as aliases of w4..:
    # the fixture's texts use the w-words only, so their ids are unchanged
    from fastdpo.models import PROBE

    vocab.update({word: len(specials) + k for k, word in enumerate(dict.fromkeys(PROBE.split()))})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.add_special_tokens(specials)  # split out before pre-tokenizing, so TRL's "w9</s>" gives w9, </s>
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    config = LlamaConfig(vocab_size=ARCH["vocab"], hidden_size=ARCH["hidden"], intermediate_size=ARCH["intermediate"],
                         num_hidden_layers=ARCH["layers"], num_attention_heads=ARCH["heads"],
                         num_key_value_heads=ARCH["heads"], max_position_embeddings=16384, tie_word_embeddings=False,
                         bos_token_id=0, eos_token_id=1, pad_token_id=2)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(model_dir, safe_serialization=True)
    fast.save_pretrained(model_dir)


def random_text(rng: random.Random, n_words: int, lead_space: bool) -> str:
    """n_words random vocabulary words (`w4`..`w31999`), one token each."""
    text = " ".join(f"w{rng.randrange(4, ARCH['vocab'])}" for _ in range(n_words))
    return (" " + text) if lead_space else text


def write_pairs(path: str, n: int, seed: int, lo: int = 60, hi: int = 80) -> None:
    """n text pairs; prompt, chosen and rejected each lo..hi words; responses start with a space; chosen != rejected."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            prompt = random_text(rng, rng.randint(lo, hi), False)
            chosen = random_text(rng, rng.randint(lo, hi), True)
            rejected = chosen
            while rejected == chosen:
                rejected = random_text(rng, rng.randint(lo, hi), True)
            f.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")


def write_curve_pair(path: str, length: int, seed: int) -> None:
    """One pair whose sequences are `length` tokens: prompt L/2 (with BOS) + response L/2 (with EOS)."""
    rng = random.Random(seed + length)
    half = length // 2
    prompt = random_text(rng, half - 1, False)
    chosen, rejected = random_text(rng, length - half - 1, True), random_text(rng, length - half - 1, True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")


def token_counts(model_dir: str, data_file: str) -> list[tuple[int, int, int]]:
    """(prompt, chosen, rejected) token counts per pair: prompt with its BOS, responses with their EOS."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    out = []
    with open(data_file, encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            p = len(tok(rec["prompt"])["input_ids"])
            c, r = (len(tok(rec[k], add_special_tokens=False)["input_ids"]) + 1 for k in ("chosen", "rejected"))
            out.append((p, c, r))
    return out


# --- model FLOPs and the matmul peak -------------------------------------------------------------------------------

FLOPS_FORMULA = (
    "per sequence of s tokens (prompt+response) with r response tokens, N = non-embedding params without lm_head, "
    "H = lm_head params (V*h), L layers, h hidden:\n"
    "  policy fwd+bwd = 6*N*s + 6*H*r + 12*L*h*s^2;  reference fwd = 2*N*s + 2*H*r + 4*L*h*s^2\n"
    "  pair = chosen sequence + rejected sequence (the standard two-sequence computation; logits only where scored,\n"
    "  attention counted unmasked as QK^T and AV; the same count is used for both tools)")


def param_counts(model_dir: str) -> tuple[int, int]:
    """(N, H): non-embedding parameters excluding the lm_head, and the lm_head's parameters."""
    from safetensors import safe_open

    with safe_open(os.path.join(model_dir, "model.safetensors"), "pt") as f:
        sizes = {name: math.prod(f.get_slice(name).get_shape()) for name in f.keys()}
    head = sum(n for name, n in sizes.items() if name.startswith("lm_head"))
    emb = sum(n for name, n in sizes.items() if "embed_tokens" in name)
    total = sum(sizes.values())
    return total - head - emb, head


def pair_flops(counts, n_body: int, n_head: int) -> float:
    """Training model FLOPs of one epoch over `counts` (see FLOPS_FORMULA)."""
    L, h = ARCH["layers"], ARCH["hidden"]
    total = 0.0
    for p, c, r in counts:
        for resp in (c, r):
            s = p + resp
            total += 8 * n_body * s + 8 * n_head * resp + 16 * L * h * s * s
    return total


def matmul_peak(precision: str, sizes: list[int], repeats: int = 5) -> dict:
    """Median GFLOP/s of an n x n matmul per size (all threads), and the best of the sizes as the peak."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    per_size = {}
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        for _ in range(2):
            torch.matmul(a, b)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            torch.matmul(a, b)
            times.append(time.perf_counter() - t)
        per_size[n] = 2 * n**3 / statistics.median(times) / 1e9
    return {"gflops_per_size": per_size, "peak_gflops": max(per_size.values()), "threads": torch.get_num_threads()}


# --- the runs (each in a child process) ----------------------------------------------------------------------------


def peak_rss() -> dict:
    """This process's peak resident memory: VmHWM (its own address space) and ru_maxrss, both in GiB."""
    import resource

    hwm = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1])
    return {"peak_rss_gib": hwm / 2**20, "ru_maxrss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def trl_config(spec: dict):
    """TRL's DPOConfig: fp32 = precompute, no checkpointing; bf16 = TRL's defaults (checkpointing on, no precompute)."""
    from trl import DPOConfig

    common = dict(output_dir=spec["out"], per_device_train_batch_size=spec["batch"], gradient_accumulation_steps=1,
                  num_train_epochs=1, learning_rate=LR, beta=BETA, loss_type=["sigmoid"], max_length=spec["max_length"],
                  use_cpu=True, report_to="none", save_strategy="no", logging_steps=1, dataloader_num_workers=0,
                  disable_tqdm=True, seed=42)
    if spec["precision"] == "fp32":
        return DPOConfig(precompute_ref_log_probs=True, gradient_checkpointing=False, bf16=False, fp16=False, **common)
    return DPOConfig(bf16=True, **common)


def import_model_code() -> None:
    """Import the Llama model and tokenizer code before either tool's clock starts. TRL's own import pulls in most
    of transformers (about 2 s of it here); fastdpo imports it lazily inside train(). Neither clock should time
    library imports, so both children import the same modules first."""
    import transformers.models.llama.modeling_llama  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast  # noqa: F401


def child_trl(spec: dict) -> dict:
    """Time TRL from reading the data and constructing the trainer to the end of train()."""
    from datasets import load_dataset
    from transformers import TrainerCallback
    from trl import DPOTrainer

    class StepEnds(TrainerCallback):
        times: list[float] = []

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter())

    timer = StepEnds()
    import_model_code()
    start = time.perf_counter()
    dataset = load_dataset("json", data_files=spec["data"], split="train")
    args = trl_config(spec)
    trainer = DPOTrainer(model=spec["model"], args=args, train_dataset=dataset, callbacks=[timer])
    trainer.train()
    wall = time.perf_counter() - start
    steps = [b - a for a, b in zip(timer.times, timer.times[1:])]  # optimizer steps after the first
    steady = spec["batch"] / statistics.median(steps) if steps else None
    return {"wall_s": wall, "steady_pairs_per_s": steady, "steps": len(timer.times),
            "gradient_checkpointing": args.gradient_checkpointing,
            "precompute_ref_log_probs": args.precompute_ref_log_probs, "bf16": args.bf16}


def train_flags(spec: dict) -> list[str]:
    """`fastdpo train` flags of a run: the fixture, one epoch at BATCH / LR / BETA, the spec's precision and
    output dir, then the fast flags."""
    return ["--model", spec["model"], "--data", spec["data"], "--output_dir", spec["out"], "--batch_size",
            str(spec["batch"]), "--epochs", "1", "--learning_rate", str(LR), "--beta", str(BETA), "--progress",
            "false", "--precision", spec["precision"], "--logging_steps", "1", "--max_length",
            str(spec["max_length"]), "--max_prompt_length", str(spec["max_prompt_length"])] + spec["fast_flags"]


def child_fastdpo_eval(spec: dict) -> dict:
    """Time `fastdpo eval` (the policy's and the reference's forward passes without gradients, as a precompute
    runs them) from the call to its return, with the spec's attention implementation."""
    import accelerate  # noqa: F401  imported before the clock starts

    from fastdpo import attention
    from fastdpo.cli import main as cli_main

    if spec.get("dense"):  # SDPA over the dense mask in every batch, not per segment
        attention.MIN_SEGMENT = 1 << 62
    argv = ["eval", "--model", spec["model"], "--ref_model", spec["model"], "--data", spec["data"], "--batch_size",
            str(spec["batch"]), "--precision", spec["precision"], "--max_length", str(spec["max_length"]),
            "--max_prompt_length", str(spec["max_prompt_length"]), "--attn_implementation", spec["attention"],
            "--json"]
    start = time.perf_counter()
    try:
        cli_main(argv)
    except SystemExit as e:
        if e.code:
            raise
    return {"wall_s": time.perf_counter() - start}


def child_fastdpo(spec: dict) -> dict:
    """Time fastdpo's train() from the call to its return, minus the final model save (TRL saves nothing)."""
    import accelerate  # noqa: F401  imported before the clock starts, as TRL's child imports them with trl

    try:
        import fastdpo.training as ft
    except ImportError:  # fastdpo before commit "One structure...": the loop lived in fastdpo/train.py
        import fastdpo.train as ft
    from fastdpo.config import build_config

    saved = {"s": 0.0}
    if hasattr(ft, "save_final"):
        original = ft.save_final

        def timed_save(*a, **kw):
            t = time.perf_counter()
            original(*a, **kw)
            saved["s"] += time.perf_counter() - t

        ft.save_final = timed_save
    flags = train_flags(spec)
    if spec.get("ref_cache"):
        flags += ["--ref_cache_dir", spec["ref_cache"]]
    import_model_code()
    start = time.perf_counter()
    ft.train(build_config(flags))
    wall = time.perf_counter() - start - saved["s"]
    rates = []
    with open(os.path.join(spec["out"], "metrics.jsonl"), encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            if "pairs_per_second" in rec:
                rates.append(rec["pairs_per_second"])
    steady = statistics.median(rates[1:]) if len(rates) > 1 else None
    return {"wall_s": wall, "steady_pairs_per_s": steady, "steps": len(rates), "final_save_s": saved["s"],
            "flags": flags}


def child_main(spec_path: str) -> None:
    """Entry point of a child process: run one spec, write its result (with peak memory) as JSON."""
    with open(spec_path, encoding="utf-8") as f:
        spec = json.load(f)
    result = {"trl": child_trl, "fastdpo": child_fastdpo, "fastdpo-eval": child_fastdpo_eval}[spec["tool"]](spec)
    result.update(peak_rss())
    with open(spec["result"], "w", encoding="utf-8") as f:
        json.dump(result, f)


def cpu_snapshot() -> tuple[float, float, float]:
    """(time, busy CPU seconds of the whole machine, CPU seconds of this process and its waited-for children)."""
    import resource

    import psutil

    t = psutil.cpu_times()
    busy = t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0) + getattr(t, "steal", 0)
    ours = sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for f in ("ru_utime", "ru_stime"))
    return time.perf_counter(), busy, ours


def wait_idle(max_wait: float) -> None:
    """Wait (up to max_wait s) until other processes use under 0.15 cores over a 3 s window: a shared 2-core
    machine distorts the timings badly (torch's threads then wait on each other)."""
    deadline = time.perf_counter() + max_wait
    while max_wait > 0:
        a = cpu_snapshot()
        time.sleep(3)
        b = cpu_snapshot()
        load = ((b[1] - a[1]) - (b[2] - a[2])) / (b[0] - a[0])
        if load < 0.15 or time.perf_counter() > deadline:
            log(f"other load {load:.2f} cores" + ("" if load < 0.15 else "; starting anyway (--wait-idle expired)"))
            return


def run_child(spec: dict, workdir: str, timeout: float, idle_wait: float = 0) -> dict:
    """Run one spec in a fresh Python process; on failure or timeout return {'error': ...} with the log's tail."""
    wait_idle(idle_wait)
    run_dir = tempfile.mkdtemp(dir=workdir, prefix=f"run-{spec['tool']}-{spec['precision']}-")
    spec = dict(spec, out=os.path.join(run_dir, "out"), result=os.path.join(run_dir, "result.json"))
    spec_path, log_path = os.path.join(run_dir, "spec.json"), os.path.join(run_dir, "log.txt")
    with open(spec_path, "w", encoding="utf-8") as f:
        json.dump(spec, f)
    # Fresh caches per run: neither TRL's cached reference log-probs (datasets cache) nor fastdpo's (XDG cache)
    # may carry over from an earlier run or repeat.
    env = dict(os.environ, HF_DATASETS_CACHE=os.path.join(run_dir, "hf-datasets"),
               XDG_CACHE_HOME=os.path.join(run_dir, "cache"), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               TQDM_DISABLE="1")
    before = cpu_snapshot()
    try:
        with open(log_path, "w") as logf:
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--_child", spec_path], env=env,
                                  stdout=logf, stderr=subprocess.STDOUT, timeout=timeout)
        if proc.returncode != 0 or not os.path.exists(spec["result"]):
            with open(log_path, encoding="utf-8", errors="replace") as f:
                tail = f.read().strip().splitlines()[-6:]
            return {"error": f"exit code {proc.returncode}: " + " | ".join(tail)}
        with open(spec["result"], encoding="utf-8") as f:
            result = json.load(f)
        after = cpu_snapshot()
        other = (after[1] - before[1]) - (after[2] - before[2])  # busy CPU seconds that were not ours
        result["other_load_cores"] = max(0.0, other / (after[0] - before[0]))
        return result
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    finally:
        shutil.rmtree(spec["out"], ignore_errors=True)  # the saved models; the log and result stay


# --- report --------------------------------------------------------------------------------------------------------


def machine_info() -> dict:
    """CPU model, cores, library versions."""
    import torch
    import transformers
    import trl

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "trl": trl.__version__}


def summarize(runs: list[dict], pairs: int, tokens: int, flops: float, peak_gflops: float) -> dict:
    """Median over repeats of the figures of one tool at one precision."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"error": runs[-1]["error"]}
    wall = statistics.median(r["wall_s"] for r in ok)
    steady = [r["steady_pairs_per_s"] for r in ok if r.get("steady_pairs_per_s")]
    return {"pairs_per_s": pairs / wall, "steady_pairs_per_s": statistics.median(steady) if steady else None,
            "tokens_per_s": tokens / wall, "mfu_pct": 100 * flops / wall / (peak_gflops * 1e9),
            "peak_rss_gib": statistics.median(r["peak_rss_gib"] for r in ok), "wall_s": wall,
            "other_load_cores": max(r["other_load_cores"] for r in ok), "runs": runs}


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_main_table(results: dict, peaks: dict, trl_notes: dict) -> None:
    """Per precision: one line per tool and the fastdpo/TRL ratios."""
    for precision, tools in results.items():
        print(f"\nprecision {precision}   matmul peak {peaks[precision]['peak_gflops']:.1f} GFLOP/s "
              f"({', '.join(f'{n}: {g:.1f}' for n, g in peaks[precision]['gflops_per_size'].items())})")
        print(f"  TRL config: {trl_notes[precision]}")
        print(f"  {'tool':<9}{'pairs/s':>9}{'steady':>9}{'tokens/s':>10}{'MFU %':>8}{'peak GiB':>10}{'wall s':>8}{'other':>7}")
        for tool, s in tools.items():
            if "error" in s:
                print(f"  {tool:<9} FAILED: {s['error'][:300]}")
                continue
            print(f"  {tool:<9}{s['pairs_per_s']:>9.2f}{fmt(s['steady_pairs_per_s'], '.2f'):>9}"
                  f"{s['tokens_per_s']:>10.0f}{s['mfu_pct']:>8.2f}{s['peak_rss_gib']:>10.2f}{s['wall_s']:>8.1f}"
                  f"{s['other_load_cores']:>7.2f}" + ("  ! shared CPU" if s["other_load_cores"] > 0.1 else ""))
        t = tools.get("TRL", {})
        for name in ("fastdpo", "fastdpo*"):
            f = tools.get(name, {})
            if "pairs_per_s" in t and "pairs_per_s" in f:
                steady = (f["steady_pairs_per_s"] / t["steady_pairs_per_s"]
                          if f["steady_pairs_per_s"] and t["steady_pairs_per_s"] else None)
                print(f"  {name + '/TRL:':<13} speed x{f['pairs_per_s'] / t['pairs_per_s']:.2f} (steady "
                      f"x{fmt(steady, '.2f')}), memory x{f['peak_rss_gib'] / t['peak_rss_gib']:.2f} "
                      "(fastdpo peak / TRL peak)")
        print("  fastdpo* = the same run again: the reference log-probs come from the cache the run above wrote "
              "(a re-run on the same data and model)")


def print_curve(curve: dict) -> None:
    """Peak resident memory against sequence length, both tools."""
    print("\nmemory curve: peak RSS GiB, one optimizer step, 1 pair, fp32, prompt = response = L/2 tokens")
    print(f"  {'L':>6}{'TRL':>10}{'fastdpo':>10}{'ratio':>8}")
    for length, tools in curve.items():
        cells = [fmt(tools[t].get("peak_rss_gib"), ".2f") if "error" not in tools[t] else "FAIL"
                 for t in ("TRL", "fastdpo") if t in tools] if "TRL" in tools else ["-", fmt(
                     tools["fastdpo"].get("peak_rss_gib"), ".2f") if "error" not in tools["fastdpo"] else "FAIL"]
        ratio = (tools["fastdpo"]["peak_rss_gib"] / tools["TRL"]["peak_rss_gib"]
                 if "TRL" in tools and all("peak_rss_gib" in tools[t] for t in tools) else None)
        print(f"  {length:>6}{cells[0]:>10}{cells[1]:>10}{fmt(ratio, '.2f'):>8}")
        for tool in tools:
            if "error" in tools[tool]:
                print(f"         {tool} failed: {tools[tool]['error'][:300]}")


def run_processes(args, base: dict, workdir: str, precisions: list[str]) -> dict:
    """fastdpo pairs/s with 1, 2, ... data-parallel processes (torchrun, gloo on CPU), each run `repeats` times.

    Each run is the CLI in its own process tree, timed from launch to exit (imports and start-up included, the
    same for every process count); one process uses every core's thread, N processes one thread each."""
    counts = [int(n) for n in args.processes.split(",")]
    out = {}
    for precision in precisions:
        out[precision] = {}
        for n in counts:
            runs = []
            for rep in range(args.repeats):
                wait_idle(args.wait_idle)
                dest = tempfile.mkdtemp(prefix=f"procs{n}-{precision}-", dir=workdir)
                spec = dict(base, precision=precision, out=os.path.join(dest, "out"))
                cmd = ["-m", "fastdpo", "train", *train_flags(spec), "--ref_cache_dir", "off"]
                env = dict(os.environ)
                if n > 1:
                    cmd = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n)] + cmd
                    env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or n) // n))
                log(f"fastdpo {precision}, {n} process(es), run {rep + 1}/{args.repeats}")
                start = time.perf_counter()
                proc = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, env=env,
                                      timeout=args.timeout)
                wall = time.perf_counter() - start
                if proc.returncode:
                    runs.append({"error": proc.stderr[-500:]})
                    log("  -> FAILED: " + proc.stderr[-300:])
                    continue
                with open(os.path.join(dest, "out", "metrics.jsonl"), encoding="utf-8") as f:
                    rates = [json.loads(line)["pairs_per_second"] for line in f if "pairs_per_second" in line]
                runs.append({"wall_s": wall, "steady": statistics.median(rates[1:])})
                log(f"  -> {wall:.1f} s, steady {runs[-1]['steady']:.2f} pairs/s")
            ok = [r for r in runs if "error" not in r]
            out[precision][n] = {"pairs_per_s": args.pairs / statistics.median(r["wall_s"] for r in ok),
                                 "steady": statistics.median(r["steady"] for r in ok), "runs": runs} if ok else \
                {"runs": runs}
        print(f"\ndata-parallel processes, {precision}: whole CLI run (launch to exit), median of {args.repeats}")
        print(f"  {'processes':>10}{'pairs/s':>10}{'steady':>10}{'speed-up':>10}")
        first = out[precision].get(counts[0], {})
        for n in counts:
            r = out[precision][n]
            up = r["pairs_per_s"] / first["pairs_per_s"] if "pairs_per_s" in r and "pairs_per_s" in first else None
            print(f"  {n:>10}{fmt(r.get('pairs_per_s'), '.2f'):>10}{fmt(r.get('steady'), '.2f'):>10}"
                  f"{fmt(up, '.2f'):>10}")
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=96, help="training pairs in the fixture (default 96)")
    p.add_argument("--arch", default=None, help="change the fixture's model, e.g. hidden=1024,intermediate=2752,"
                   "layers=8,heads=16 (keys of ARCH)")
    p.add_argument("--precisions", default="fp32,bf16", help="comma list of fp32, bf16")
    p.add_argument("--repeats", type=int, default=1, help="runs per tool and precision; the median is reported")
    p.add_argument("--skip-trl", action="store_true", help="run fastdpo only (debugging)")
    p.add_argument("--skip-main", action="store_true", help="skip the throughput runs (e.g. memory curve only)")
    p.add_argument("--fastdpo-flags", default=None, help="replace FASTDPO_FAST_FLAGS, e.g. \"--packing true\"")
    p.add_argument("--memory-curve", action="store_true", help="also measure peak RSS against sequence length")
    p.add_argument("--processes", default=None, help="also time fastdpo with these numbers of data-parallel "
                   "processes, e.g. 1,2 (torchrun; CPU: gloo)")
    p.add_argument("--curve-lengths", default="512,1024,2048,4096,8192", help="sequence lengths of the curve")
    p.add_argument("--timeout", type=float, default=900, help="seconds per child run (default 900)")
    p.add_argument("--wait-idle", type=float, default=0, help="before each run, wait up to this many seconds"
                   " for other processes to leave the CPU (default 0: no waiting)")
    p.add_argument("--peak-sizes", default="1024,2048,4096", help="matmul sizes; the peak is the best median")
    p.add_argument("--workdir", default=None, help="where the fixture and run logs go (default: a temp dir, removed)")
    p.add_argument("--seed", type=int, default=0, help="fixture seed")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def prepare(args, workdir: str, report: dict) -> dict:
    """Build the fixture and its token and FLOP counts; print the header of the report."""
    log(f"building the fixture in {workdir}")
    model_dir, data_file = os.path.join(workdir, "model"), os.path.join(workdir, "pairs.jsonl")
    build_model(model_dir, args.seed)
    write_pairs(data_file, args.pairs, args.seed)
    n_body, n_head = param_counts(model_dir)
    counts = token_counts(model_dir, data_file)
    fx = dict(model=model_dir, data=data_file, pairs=len(counts), tokens=sum(2 * p + c + r for p, c, r in counts),
              flops=pair_flops(counts, n_body, n_head), non_embedding_params_without_lm_head=n_body,
              lm_head_params=n_head)
    report["fixture"].update(fx)
    m = report["machine"]
    print(f"fastdpo benchmark  {report['date']}\ncommand: {report['command']}\n"
          f"machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), python {m['python']},"
          f" torch {m['torch']}, transformers {m['transformers']}, trl {m['trl']}\n"
          f"fixture: Llama {ARCH['layers']} layers, hidden {ARCH['hidden']}, intermediate {ARCH['intermediate']},"
          f" {ARCH['heads']} heads, vocab {ARCH['vocab']} (untied lm_head); N = {n_body:,}, H = {n_head:,};"
          f" {fx['pairs']} pairs, {fx['tokens']:,} tokens per epoch (prompt+chosen and prompt+rejected, with"
          f" BOS/EOS)\nfastdpo flags: {' '.join(report['fastdpo_fast_flags']) or '(none)'}"
          f"  (FASTDPO_FAST_FLAGS in bench/bench.py)\n"
          f"model FLOPs: {fx['flops'] / fx['pairs'] / 1e9:.2f} GFLOP per pair; {FLOPS_FORMULA}\n"
          "pairs/s = pairs / wall time from constructing the trainer (TRL, incl. reading the data, tokenization,"
          " reference precompute) or calling train() (fastdpo, excl. its final model save) to the end of"
          " training;\nsteady = median over optimizer steps after the first; MFU = model FLOPs / wall time /"
          " matmul peak; peak GiB = VmHWM of the child process;\nother = CPU cores used by other processes"
          " during the run (above ~0.1 the machine was shared and the timings are unreliable)")
    return fx


def run_main(args, fx: dict, base: dict, workdir: str, precisions: list[str], peaks: dict) -> dict:
    """The throughput runs: per precision, each tool `repeats` times (interleaved), medians and ratios."""
    tools = (["fastdpo"] if args.skip_trl else ["TRL", "fastdpo"]) + ["fastdpo*"]
    results, trl_notes = {}, {}
    for precision in precisions:
        runs = {tool: [] for tool in tools}
        for rep in range(args.repeats):
            # "fastdpo" starts from an empty reference cache and fills it; "fastdpo*" is the re-run that reads it
            cache = os.path.join(workdir, f"refcache-{precision}")
            shutil.rmtree(cache, ignore_errors=True)
            for tool in tools:
                log(f"{tool} {precision} run {rep + 1}/{args.repeats}")
                kind = "trl" if tool == "TRL" else "fastdpo"
                r = run_child(dict(base, tool=kind, precision=precision, ref_cache=cache), workdir, args.timeout,
                              args.wait_idle)
                log("  -> " + (r.get("error") or f"{r['wall_s']:.1f} s, peak {r['peak_rss_gib']:.2f} GiB"))
                runs[tool].append(r)
        results[precision] = {t: summarize(runs[t], fx["pairs"], fx["tokens"], fx["flops"],
                                           peaks[precision]["peak_gflops"]) for t in tools}
        ok = [r for r in runs.get("TRL", []) if "error" not in r]
        trl_notes[precision] = (f"precompute_ref_log_probs={ok[0]['precompute_ref_log_probs']}, gradient_checkpointing="
                                f"{ok[0]['gradient_checkpointing']}, bf16={ok[0]['bf16']}" if ok else "not run")
        if precision == "bf16":
            trl_notes[precision] += "  (TRL 1.16 DPOConfig defaults: gradient_checkpointing=True, no precompute)"
    print_main_table(results, peaks, trl_notes)
    return results


def run_curve(args, base: dict, workdir: str) -> dict:
    """Peak RSS of one optimizer step on one pair of L-token sequences, per L and tool, fp32."""
    curve = {}
    for length in [int(x) for x in args.curve_lengths.split(",")]:
        path = os.path.join(workdir, f"curve-{length}.jsonl")
        write_curve_pair(path, length, args.seed)
        curve[length] = {}
        for tool in ("fastdpo",) if args.skip_trl else ("TRL", "fastdpo"):
            log(f"memory curve: {tool} L={length}")
            # the prompt is L/2 tokens: nothing is cut (fastdpo wants a prompt limit below the length limit)
            spec = dict(base, data=path, batch=1, max_length=length, max_prompt_length=length - 1,
                        tool=tool.lower(), precision="fp32")
            curve[length][tool] = run_child(spec, workdir, args.timeout, args.wait_idle)
            r = curve[length][tool]
            log("  -> " + (r.get("error") or f"peak {r['peak_rss_gib']:.2f} GiB"))
    print_curve(curve)
    return curve


def main(argv=None) -> None:
    args = parse_args(argv)
    if args._child:
        return child_main(args._child)
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    if any(p not in ("fp32", "bf16") for p in precisions):
        sys.exit(f"bench: --precisions takes fp32 and/or bf16, got {args.precisions!r}")
    fast_flags = shlex.split(args.fastdpo_flags) if args.fastdpo_flags is not None else list(FASTDPO_FAST_FLAGS)
    for item in (args.arch or "").split(","):
        if item:
            key, value = item.split("=")
            if key not in ARCH:
                sys.exit(f"bench: --arch {key}: not one of {', '.join(ARCH)}")
            ARCH[key] = int(value)
    workdir = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="fastdpo-bench-"))
    os.makedirs(workdir, exist_ok=True)
    report = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "command": shlex.join([sys.executable] + sys.argv), "machine": machine_info(),
              "fixture": dict(ARCH, seed=args.seed), "fastdpo_fast_flags": fast_flags, "flops_formula": FLOPS_FORMULA}
    try:
        fx = prepare(args, workdir, report)
        base = dict(model=fx["model"], data=fx["data"], batch=BATCH, max_length=1024, max_prompt_length=512,
                    fast_flags=fast_flags)
        if not args.skip_main:
            peaks = {}
            for precision in precisions:
                wait_idle(args.wait_idle)
                log(f"matmul peak at {precision}")
                peaks[precision] = matmul_peak(precision, [int(s) for s in args.peak_sizes.split(",")])
            report["matmul_peak"] = peaks
            report["results"] = run_main(args, fx, base, workdir, precisions, peaks)
        if args.memory_curve:
            report["memory_curve"] = run_curve(args, base, workdir)
        if args.processes:
            report["processes"] = run_processes(args, base, workdir, precisions)
    finally:
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(report, f, indent=1, default=str)
            log(f"wrote {args.json}")
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
