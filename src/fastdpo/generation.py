"""Samples from a policy, scored exactly: `fastdpo generate`, and the samples of an evaluation during training.

Sampling is transformers' `generate`, configured from fastdpo's options alone: by default temperature 1 and no
top-k or top-p, i.e. the policy itself, whatever the model's generation_config says (transformers' default top-k
of 50 would bias the KL estimate). A sample keeps what the model produced: through its EOS if it produced one,
and no EOS appended to a sample cut at `max_new_tokens`. Each sample's sequence log-probability under the
policy and under the reference is then computed by the layouts and log-prob code of training (logps.py), so
`policy_logps - reference_logps` is the per-sample estimate of KL(π‖π_ref) (its mean over samples from π is
unbiased for it), and `beta` times it is the implicit reward `r(x, y)` of Eq 9 without `β log Z(x)`, which
cancels between responses to the same prompt.
"""

from __future__ import annotations

import contextlib
import math
import sys
from dataclasses import dataclass, field

import torch

from fastdpo.attention import set_per_segment
from fastdpo.config import Config
from fastdpo.data import Fields, load_prompts
from fastdpo.errors import UserError
from fastdpo.evaluation import pair_logps, start_scoring
from fastdpo.logps import LogpsModule, choose_layout
from fastdpo.models import Inputs, attention_implementation, policy_and_reference, set_attention
from fastdpo.runtime import Runtime
from fastdpo.tokenize import TokenizedPair, encode_prompt


@dataclass
class Sample:
    prompt_index: int
    sample_index: int
    prompt_ids: list[int]
    response_ids: list[int]  # as generated: through its EOS if it produced one, nothing appended
    ended: bool  # it produced an EOS (else it was cut at max_new_tokens)


@dataclass
class GenerateResult:
    summary: dict  # samples, prompts, mean tokens, EOS rate, mean log-probs, mean KL and its standard error
    rows: list[dict] = field(default_factory=list)  # one per sample


def stop_ids(model, tokenizer) -> list[int]:
    """The tokens that end a sample: the tokenizer's EOS and the model's generation_config's (a chat model may
    list several, e.g. ChatML's <|im_end|>)."""
    ids = [tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)]
    flat = [i for x in ids for i in (x if isinstance(x, (list, tuple)) else [x]) if i is not None]
    return list(dict.fromkeys(flat))


@contextlib.contextmanager
def neutral_defaults(model):
    """`generate` fills what its config leaves unset from the model's generation_config (a checkpoint's
    repetition_penalty, min_p, bad words ...; transformers 4 even its temperature and top_p): while sampling, the
    model's is transformers' neutral one, so the samples are π's under fastdpo's options alone."""
    from transformers import GenerationConfig

    target = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft model's HF model
    saved = getattr(target, "generation_config", None)
    target.generation_config = GenerationConfig()
    try:
        yield
    finally:
        target.generation_config = saved


@torch.no_grad()
def sample(model, prompts: list[list[int]], cfg: Config, pad_token_id: int, stops: list[int], device,
           batch_size: int | None = None) -> list[Sample]:
    """`cfg.num_samples` samples for each prompt, `batch_size` (default `cfg.batch_size`) prompts a `generate`
    call (left-padded)."""
    batch_size = batch_size or cfg.batch_size
    from transformers import GenerationConfig

    greedy = cfg.temperature == 0
    generation = GenerationConfig(
        do_sample=not greedy, temperature=None if greedy else cfg.temperature, top_p=None if greedy else cfg.top_p,
        top_k=None if greedy else cfg.top_k, max_new_tokens=cfg.max_new_tokens,
        num_return_sequences=cfg.num_samples, pad_token_id=pad_token_id, eos_token_id=stops)
    samples = []
    for start_at in range(0, len(prompts), batch_size):
        chunk = prompts[start_at : start_at + batch_size]
        width = max(len(p) for p in chunk)
        input_ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)  # (B, T), left-padded
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, p in enumerate(chunk):
            input_ids[i, width - len(p):] = torch.tensor(p)
            attention_mask[i, width - len(p):] = 1
        with neutral_defaults(model):
            out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                 generation_config=generation)  # (B * N, T + new)
        for row, tokens in enumerate(out[:, width:].tolist()):
            b, k = divmod(row, cfg.num_samples)
            ends = [j for j, t in enumerate(tokens) if t in stops]
            response = tokens[: ends[0] + 1] if ends else tokens
            samples.append(Sample(start_at + b, k, chunk[b], response, bool(ends)))
    return samples


def samples_logps(models: dict, layout, items: list[tuple[list[int], list[int]]], pad_token_id: int,
                  batch_size: int, runtime: Runtime) -> dict[str, list[float]]:
    """The summed log-prob of each (prompt ids, response ids) under each model (name -> LogpsModule), through
    the run's layout. Responses to the same prompt in a row are scored two at a time as a pair (prefix sharing
    computes their prompt once); one left over is paired with itself."""
    pairs, slots = [], []  # slots[i]: (pair, side) of item i
    i = 0
    while i < len(items):
        prompt, first = items[i]
        second = items[i + 1][1] if i + 1 < len(items) and items[i + 1][0] == prompt else None
        pairs.append(TokenizedPair(prompt, first, second if second is not None else first, index=len(pairs)))
        slots.append((len(pairs) - 1, 0))
        if second is not None:
            slots.append((len(pairs) - 1, 1))
        i += 2 if second is not None else 1
    scored = pair_logps(models, layout, pairs, pad_token_id, batch_size, runtime)
    return {name: [per_pair[p][side] for p, side in slots] for name, per_pair in scored.items()}


def summarize(rows: list[dict]) -> dict:
    """Means over the samples; the KL's standard error (samples of one prompt counted as independent)."""
    n = len(rows)
    summary = {"samples": n, "prompts": len({r["prompt_index"] for r in rows}),
               "mean_tokens": sum(r["tokens"] for r in rows) / n,
               "eos_rate": sum(r["ended_with_eos"] for r in rows) / n,
               "policy_logps": sum(r["policy_logps"] for r in rows) / n}
    if rows and "kl" in rows[0]:
        kl = [r["kl"] for r in rows]
        mean = sum(kl) / n
        spread = math.sqrt(sum((x - mean) ** 2 for x in kl) / (n - 1)) if n > 1 else float("nan")
        summary.update(kl=mean, kl_stderr=spread / math.sqrt(n), reward=sum(r["reward"] for r in rows) / n)
    return summary


def run_generate(cfg: Config, inputs: Inputs | None = None, log=None) -> GenerateResult:
    """The `generate` command: sample from the policy for every prompt of `--data`, and score each sample under
    the policy and (with `--ref_model`) the reference."""
    inputs = inputs or Inputs()
    if inputs.model is None and not cfg.model:
        raise UserError("--model: generate needs the policy to sample from (a model directory, hub id or adapter "
                        "directory)", exit_code=2)
    if inputs.data is None and not cfg.data:
        raise UserError("--data: generate needs prompts (a .jsonl of {\"prompt\": ...} records, or preference "
                        "data)", exit_code=2)
    runtime, tokenizer, cfg, log = start_scoring(cfg, inputs, "generate", log)
    found = load_prompts(inputs.data if inputs.data is not None else cfg.data, cfg.data_split,
                         Fields(cfg.prompt_field, cfg.chosen_field, cfg.rejected_field))
    encoded = [encode_prompt(prompt, tokenizer, where, cfg.max_prompt_length) for where, prompt in found]
    cut = sum(c for _, c in encoded)
    log(f"fastdpo: {len(found)} prompts" + (f", {cut} cut to their last --max_prompt_length "
                                              f"{cfg.max_prompt_length} tokens" if cut else ""))
    policy, reference = policy_and_reference(cfg, inputs, runtime.device)
    attention = set_attention([policy, reference], attention_implementation(cfg, runtime.device),
                              cfg.attn_implementation != "auto")
    log(f"fastdpo: attention: {attention}")
    from accelerate.utils import set_seed

    set_seed(cfg.seed)
    stops = stop_ids(policy, tokenizer)
    samples = sample(policy, [ids for ids, _ in encoded], cfg, tokenizer.pad_token_id, stops, runtime.device)
    return score_samples(cfg, samples, [p for _, p in found], policy, reference, tokenizer, runtime, log)


def score_samples(cfg: Config, samples: list[Sample], prompts: list, policy, reference, tokenizer,
                  runtime: Runtime, log) -> GenerateResult:
    """Rows and summary of `samples`: each one's text, token count, EOS, and log-probs (KL and implicit reward
    with a reference)."""
    items = [(s.prompt_ids, s.response_ids) for s in samples]
    check = [TokenizedPair(p, r, r, index=i) for i, (p, r) in enumerate(items)]
    layout = choose_layout(cfg, [m for m in (policy, reference) if m is not None], [check],
                           tokenizer.pad_token_id, runtime.device, log)
    set_per_segment([policy, reference], layout.per_segment)
    modules = {"policy": LogpsModule(policy, layout)} | (
        {"reference": LogpsModule(reference, layout)} if reference is not None else {})
    logps = samples_logps(modules, layout, items, tokenizer.pad_token_id, cfg.batch_size, runtime)
    stops = set(stop_ids(policy, tokenizer))
    rows = []
    for i, s in enumerate(samples):
        text_ids = s.response_ids[:-1] if s.ended and s.response_ids[-1] in stops else s.response_ids
        row = {"prompt_index": s.prompt_index, "sample_index": s.sample_index, "prompt": prompts[s.prompt_index],
               "response": tokenizer.decode(text_ids), "response_ids": s.response_ids, "tokens": len(s.response_ids),
               "ended_with_eos": s.ended,
               "policy_logps": logps["policy"][i]}
        if reference is not None:
            kl = logps["policy"][i] - logps["reference"][i]
            row.update(reference_logps=logps["reference"][i], kl=kl, reward=cfg.beta * kl)
        rows.append(row)
    return GenerateResult(summarize(rows), rows)


def training_samples(policy, scorers: dict, layout, prompts: list[tuple[object, list[int]]], cfg: Config,
                     tokenizer, runtime: Runtime, seed: int, batch_size: int) -> tuple[list[dict], dict]:
    """The samples of an evaluation during training: `cfg.num_samples` for each prompt (object, ids), drawn with
    `seed` in a forked RNG (training's random state is left as it was), scored by `scorers` (name -> callable
    batch -> (2B,) log-probs: the policy's forward and the run's reference), `batch_size` prompts a `generate`
    call and pairs a forward (evaluation's). Returns the rows and their means under `samples/...`."""
    devices = [runtime.device] if runtime.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        samples = sample(policy, [ids for _, ids in prompts], cfg, tokenizer.pad_token_id,
                         stop_ids(policy, tokenizer), runtime.device, batch_size)
    items = [(s.prompt_ids, s.response_ids) for s in samples]
    modules = {name: _Scorer(fn) for name, fn in scorers.items()}
    logps = samples_logps(modules, layout, items, tokenizer.pad_token_id, batch_size, runtime)
    rows = []
    for i, s in enumerate(samples):
        row = {"prompt_index": s.prompt_index, "sample_index": s.sample_index, "prompt": prompts[s.prompt_index][0],
               "response": tokenizer.decode(s.response_ids[:-1] if s.ended else s.response_ids),
               "response_ids": s.response_ids, "tokens": len(s.response_ids), "ended_with_eos": s.ended, "policy_logps": logps["policy"][i]}
        if "reference" in logps:
            kl = logps["policy"][i] - logps["reference"][i]
            row.update(reference_logps=logps["reference"][i], kl=kl, reward=cfg.beta * kl)
        rows.append(row)
    summary = summarize(rows)
    means = {f"samples/{k}": v for k, v in (("tokens", summary["mean_tokens"]), ("eos_rate", summary["eos_rate"]),
                                           ("kl", summary.get("kl")), ("reward", summary.get("reward"))) if v is not None}
    return rows, means


class _Scorer:
    """A callable batch -> (2B,) log-probs as `samples_logps` takes a module (which returns (logps, counts))."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, batch):
        return self.fn(batch), None


def print_summary(summary: dict, file=None) -> None:
    line = (f"fastdpo: {summary['samples']} samples of {summary['prompts']} prompts: mean length "
            f"{summary['mean_tokens']:.1f} tokens, EOS rate {summary['eos_rate']:.2f}")
    if "kl" in summary:
        line += (f", mean KL(π‖π_ref) {summary['kl']:.3f} ± {summary['kl_stderr']:.3f} nats, mean implicit reward "
                 f"{summary['reward']:.3f}")
    print(line, file=file or sys.stderr)
