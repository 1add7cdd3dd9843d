"""Data preparation at scale: time to the first training step, cold and cached, and peak memory, for fastdpo and
TRL 1.16 side by side on the same synthetic pairs (CPU; nothing is downloaded).

    python bench/data_bench.py --pairs 50000,500000
    python bench/data_bench.py --pairs 50000 --tokenizer wordlevel --skip-trl

Fixture (built deterministically in --workdir): English text from Python's own documentation (pydoc's topics),
pairs of a question prompt and two answers of 7 sentences each (about 600 tokens a pair); a byte-level BPE tokenizer
of 16,000 tokens trained on that text (or, with --tokenizer wordlevel, a word-level one); a tiny random Llama (2
layers, hidden 64). Each run is its own process:
- fastdpo: `fastdpo.training.train` with --max_steps 1 (batch 8, the copy reference, no eval data), timed from the
  call to its return (one optimizer step and a 0.1 MB final save after the data preparation); cold with an empty
  data cache, then cached (the same command again, the tokenized data read back from the cache);
- TRL: `load_dataset("json")`, `DPOTrainer(...)` (which tokenizes) and `train()` with max_steps 1, TRL 1.16's
  defaults otherwise (one process for its data preparation), timed from `load_dataset` to the end of `train()`.
Peak memory is the child's peak resident set (VmHWM). For fastdpo the bytes held per token are the tokenized
pairs' arrays and the growth of the resident set over the data preparation, per token.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def log(text: str) -> None:
    print(f"[data-bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def sentences() -> list[str]:
    from pydoc_data.topics import topics

    text = " ".join(topics.values())
    return [" ".join(s.split()) for s in re.split(r"(?<=[.!?])\s+", text) if 20 < len(s.strip()) < 400]


def write_pairs(path: str, n: int, seed: int = 1) -> None:
    sents, rng = sentences(), random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            part = lambda: " ".join(rng.choices(sents, k=7))  # noqa: E731
            f.write(json.dumps({"prompt": f"Question {i}: {part()}\nAnswer:", "chosen": " " + part(),
                                "rejected": " " + part()}) + "\n")


def build_model(model_dir: str, kind: str) -> None:
    """The tokenizer (trained on the fixture's sentences) and a tiny random Llama beside it."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|pad|>"]
    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=16000, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:
        tok = Tokenizer(models.WordLevel(unk_token="<|pad|>"))
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
        trainer = trainers.WordLevelTrainer(special_tokens=specials)
    tok.train_from_iterator(sentences(), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|pad|>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=4096, bos_token_id=0, eos_token_id=0, pad_token_id=1))
    model.save_pretrained(model_dir)
    fast.save_pretrained(model_dir)


def rss() -> tuple[float, float]:
    """(current, peak) resident set of this process in GiB."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM")):
                values[line.split(":")[0]] = int(line.split()[1]) / 2**20
    return values["VmRSS"], values["VmHWM"]


def child_fastdpo(spec: dict) -> dict:
    import accelerate  # noqa: F401  imported before the clock, as TRL's child imports its libraries first
    import transformers  # noqa: F401

    from fastdpo.config import build_config
    from fastdpo.training import fit, setup

    cfg = build_config(["--model", spec["model"], "--data", spec["data"], "--output_dir", spec["out"],
                        "--max_steps", "1", "--batch_size", "8", "--max_length", "2048", "--max_prompt_length",
                        "1024", "--progress", "false", "--data_cache_dir", spec["cache"], "--overwrite"])
    before = rss()[0]
    start = time.perf_counter()
    run = setup(cfg)
    prepared = time.perf_counter() - start
    after = rss()[0]
    fit(run)
    wall = time.perf_counter() - start
    tokens = len(run.pairs.ids)
    held = run.pairs.ids.nbytes + run.pairs.bounds.nbytes + run.pairs.index.nbytes
    return {"wall_s": wall, "setup_s": prepared, "pairs": len(run.pairs), "tokens": tokens,
            "held_bytes_per_token": held / tokens, "rss_growth_bytes_per_token": (after - before) * 2**30 / tokens}


def child_trl(spec: dict) -> dict:
    from datasets import load_dataset
    from trl import DPOConfig, DPOTrainer

    start = time.perf_counter()
    dataset = load_dataset("json", data_files=spec["data"], split="train")
    args = DPOConfig(output_dir=spec["out"], report_to="none", use_cpu=True, max_steps=1, max_length=2048,
                     per_device_train_batch_size=8, disable_tqdm=True, save_strategy="no", bf16=False)
    trainer = DPOTrainer(model=spec["model"], args=args, train_dataset=dataset)
    prepared = time.perf_counter() - start
    trainer.train()
    return {"wall_s": time.perf_counter() - start, "setup_s": prepared, "pairs": len(dataset)}


def child_main(spec_path: str) -> None:
    with open(spec_path, encoding="utf-8") as f:
        spec = json.load(f)
    result = (child_trl if spec["tool"] == "trl" else child_fastdpo)(spec)
    result["peak_rss_gib"] = rss()[1]
    with open(spec["result"], "w", encoding="utf-8") as f:
        json.dump(result, f)


def run_child(spec: dict, workdir: str, timeout: float) -> dict:
    run_dir = tempfile.mkdtemp(dir=workdir, prefix=f"run-{spec['tool']}-")
    spec = dict(spec, out=os.path.join(run_dir, "out"), result=os.path.join(run_dir, "result.json"))
    spec_path = os.path.join(run_dir, "spec.json")
    with open(spec_path, "w", encoding="utf-8") as f:
        json.dump(spec, f)
    env = dict(os.environ, HF_DATASETS_CACHE=os.path.join(run_dir, "hf-datasets"), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TQDM_DISABLE="1")
    with open(os.path.join(run_dir, "log.txt"), "w") as logf:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--_child", spec_path], env=env,
                              stdout=logf, stderr=subprocess.STDOUT, timeout=timeout)
    if proc.returncode != 0 or not os.path.exists(spec["result"]):
        with open(os.path.join(run_dir, "log.txt")) as f:
            return {"error": f.read()[-2000:]}
    with open(spec["result"]) as f:
        return json.load(f)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", default="50000", help="comma list of fixture sizes (default 50000)")
    p.add_argument("--tokenizer", choices=["bpe", "wordlevel"], default="bpe")
    p.add_argument("--repeats", type=int, default=1, help="runs per tool and size; medians are reported")
    p.add_argument("--skip-trl", action="store_true")
    p.add_argument("--workdir", default=None, help="fixture and run directory (default: a temporary one)")
    p.add_argument("--timeout", type=float, default=7200)
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child:
        return child_main(args._child)
    workdir = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="fastdpo-data-bench-"))
    os.makedirs(workdir, exist_ok=True)
    model = os.path.join(workdir, f"model-{args.tokenizer}")
    if not os.path.isdir(model):
        log(f"building the {args.tokenizer} tokenizer and model in {model}")
        build_model(model, args.tokenizer)
    report = {"command": " ".join([sys.executable, *sys.argv]), "tokenizer": args.tokenizer, "results": {}}
    for n in [int(x) for x in args.pairs.split(",")]:
        data = os.path.join(workdir, f"pairs-{n}.jsonl")
        if not os.path.isfile(data):
            log(f"writing {n} pairs to {data}")
            write_pairs(data, n)
        runs = {"TRL": [], "fastdpo cold": [], "fastdpo cached": []}
        for r in range(args.repeats):
            base = {"model": model, "data": data}
            if not args.skip_trl:
                log(f"TRL, {n} pairs (repeat {r + 1})")
                runs["TRL"].append(run_child(dict(base, tool="trl"), workdir, args.timeout))
            cache = tempfile.mkdtemp(dir=workdir, prefix="cache-")
            for name in ("fastdpo cold", "fastdpo cached"):
                log(f"{name}, {n} pairs (repeat {r + 1})")
                runs[name].append(run_child(dict(base, tool="fastdpo", cache=cache), workdir, args.timeout))
        report["results"][n] = runs
        print_table(n, runs)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)


def print_table(n: int, runs: dict) -> None:
    """Times are medians; fastdpo's ratios are against TRL's set-up alone (its data preparation, with its model
    and reference loading), the conservative comparison, and against TRL's time to the first step."""
    def med(results, key):
        values = [r[key] for r in results if key in r]
        return statistics.median(values) if values else None

    print(f"\n{n} pairs      to the first step s   set-up s   peak GiB   held B/token   RSS growth B/token   "
          "vs TRL set-up   vs TRL first step")
    trl_setup, trl_first = med(runs["TRL"], "setup_s"), med(runs["TRL"], "wall_s")
    for name, results in runs.items():
        if not results:
            continue
        errors = [r["error"] for r in results if "error" in r]
        if errors:
            print(f"  {name:<16} FAILED: {errors[0][-400:]}")
            continue
        wall, setup, peak = med(results, "wall_s"), med(results, "setup_s"), med(results, "peak_rss_gib")
        held, growth = med(results, "held_bytes_per_token"), med(results, "rss_growth_bytes_per_token")
        cells = [f"{wall:18.1f}", f"{setup:10.1f}", f"{peak:10.2f}", f"{held:14.2f}" if held else " " * 14,
                 f"{growth:20.2f}" if growth else " " * 20]
        if name != "TRL" and trl_setup:
            cells += [f"{'x%.1f' % (trl_setup / wall):>15}", f"{'x%.1f' % (trl_first / wall):>19}"]
        print(f"  {name:<16}" + " ".join(cells))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
