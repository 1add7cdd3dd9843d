"""Score a policy against a reference over preference pairs: the in-loop evaluation and the `eval` command."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch

from fastdpo.attention import set_per_segment
from fastdpo.batching import Layout
from fastdpo.config import Config
from fastdpo.data import Fields
from fastdpo.errors import UserError
from fastdpo.logps import LogpsModule, choose_layout, split_pairs
from fastdpo.losses import REFERENCE_FREE
from fastdpo.metrics import on_host, pooled_means
from fastdpo.models import (Inputs, attention_implementation, check_models, in_torch_dtype, is_lora, load_model,
                            policy_tokenizer, reference_weights, set_attention, weights_dtype)
from fastdpo.reference import Reference, build_reference
from fastdpo.runtime import Processes, Runtime, start
from fastdpo.step import score_batch
from fastdpo.prepare import data_cache_dir, load_pairs
from fastdpo.tokenize import PairSet

@dataclass
class EvalResult:
    metrics: dict  # the means over all pairs, with their count as `pairs`
    rows: list[dict] = field(default_factory=list)  # one per pair: log-probs, rewards, loss, token counts


@torch.no_grad()
def evaluate_pairs(policy, reference: Reference, pairs: PairSet, cfg: Config, layout: Layout,
                   pad_token_id: int, batch_size: int, runtime: Runtime, share: Processes = Processes(),
                   progress: bool = False) -> EvalResult:
    """Means of the per-pair metrics over `pairs`, and one row per pair, batches taken in data order.

    With `share` several processes each score their shard and the means are pooled; the rows are this process's.
    Sharded weights (FSDP, ZeRO-3) need every process in every forward: there each scores them all. `progress`:
    a progress bar on stderr."""
    from tqdm.auto import tqdm

    positions = share.shard(list(range(len(pairs))))
    values: dict[str, list[torch.Tensor]] = {}
    rows = []
    bar = tqdm(total=len(positions), desc="evaluating", unit=" pairs", disable=not progress, leave=False,
               file=sys.stderr)
    for start_at in range(0, len(positions), batch_size):
        chunk = positions[start_at : start_at + batch_size]
        batch = layout.collate([pairs[i] for i in chunk], pad_token_id).to(runtime.device)
        with runtime.autocast():
            scored = score_batch(policy, reference, batch, chunk, cfg)
        host = on_host({**scored.metrics, "ref_chosen": scored.reference_chosen,  # one transfer a batch
                        "ref_rejected": scored.reference_rejected})
        ref_chosen, ref_rejected = host.pop("ref_chosen"), host.pop("ref_rejected")
        for key, value in host.items():
            values.setdefault(key, []).append(value)
        rows += per_pair_rows(batch.indices, host, ref_chosen, ref_rejected)
        bar.update(len(chunk))
    bar.close()
    metrics = {key: torch.cat(parts).mean().item() for key, parts in values.items()}
    metrics["pairs"] = len(positions)
    if share.world > 1:
        metrics = pooled_means(share.gather(metrics))
    return EvalResult(metrics, rows)


def start_scoring(cfg: Config, inputs: Inputs, command: str, log=None):
    """The set-up `generate`, `score` and `rank` share: the runtime (one process), the policy's tokenizer, and the
    config as the models' checks leave it. Returns (runtime, tokenizer, cfg, log)."""
    runtime = start(cfg)
    log = log or runtime.log
    if runtime.processes.world > 1:
        raise UserError(f"fastdpo {command} runs in one process; launch it without torchrun / accelerate launch",
                        exit_code=2)
    tokenizer = policy_tokenizer(cfg, inputs)
    return runtime, tokenizer, check_models(cfg, inputs, tokenizer, log), log


@torch.no_grad()
def pair_logps(models: dict, layout: Layout, pairs: list, pad_token_id: int, batch_size: int,
               runtime: Runtime) -> dict[str, list[tuple[float, float]]]:
    """Each pair's (chosen, rejected) summed log-probs under each model (name -> LogpsModule), `batch_size`
    pairs a forward in the run's layout: what `generate`, `score` and `rank` read."""
    out = {}
    for name, module in models.items():
        per_pair = []
        for start_at in range(0, len(pairs), batch_size):
            batch = layout.collate(pairs[start_at : start_at + batch_size], pad_token_id).to(runtime.device)
            with runtime.autocast():
                logps, _ = module(batch)  # (2B,)
            chosen, rejected = split_pairs(logps.float().cpu())
            per_pair += list(zip(chosen.tolist(), rejected.tolist()))
        out[name] = per_pair
    return out


def per_pair_rows(indices: list[int], m: dict[str, torch.Tensor], ref_chosen: torch.Tensor,
                  ref_rejected: torch.Tensor) -> list[dict]:
    """One `--per_pair_out` row per pair of a batch (its per-pair metrics `m` and reference log-probs, on the
    CPU)."""
    column = {key: value.tolist() for key, value in m.items()}
    ref_chosen, ref_rejected = ref_chosen.tolist(), ref_rejected.tolist()
    return [{"index": index,
             "policy_chosen_logps": column["logps/chosen"][i], "policy_rejected_logps": column["logps/rejected"][i],
             "reference_chosen_logps": ref_chosen[i], "reference_rejected_logps": ref_rejected[i],
             "chosen_reward": column["rewards/chosen"][i], "rejected_reward": column["rewards/rejected"][i],
             "loss": column["loss"][i], "chosen_tokens": int(column["tokens/chosen"][i]),
             "rejected_tokens": int(column["tokens/rejected"][i])} for i, index in enumerate(indices)]


def run_eval(cfg: Config, inputs: Inputs | None = None) -> EvalResult:
    """The `eval` command: load the policy, the reference and the data; score every pair. Under several processes
    each scores every pair (batches stay in data order; the main process reports)."""
    inputs = inputs or Inputs()
    if inputs.model is None and not cfg.model:
        raise UserError("--model: eval needs the policy to score (a model directory, hub id or adapter directory)",
                        exit_code=2)
    if inputs.data is None and not cfg.data:
        raise UserError("--data: eval needs preference data (--data PATH)", exit_code=2)
    if cfg.reference != "none" and inputs.ref_model is None and not cfg.ref_model:
        raise UserError(f"--ref_model: eval with --loss {cfg.loss} needs a reference model (only "
                        f"{', '.join(sorted(REFERENCE_FREE))} run without one)", exit_code=2)
    runtime = start(cfg)
    tokenizer = policy_tokenizer(cfg, inputs)
    cfg = check_models(cfg, inputs, tokenizer, runtime.log)
    pairs, stats = load_pairs(
        inputs.data if inputs.data is not None else cfg.data, cfg.data_split, tokenizer,
        fields=Fields(cfg.prompt_field, cfg.chosen_field, cfg.rejected_field),
        max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length, on_bad_record=cfg.on_bad_record,
        cache_dir=data_cache_dir(cfg), progress=runtime.main and sys.stderr.isatty(), log=runtime.log)
    runtime.log(stats.summary())
    if inputs.model is not None:
        policy = in_torch_dtype(cfg, inputs.model)
    else:
        policy = load_model(cfg.model, cfg.seed, cfg.trust_remote_code, dtype=weights_dtype(cfg, cfg.model))
    policy = policy.eval().to(runtime.device)
    body = policy.get_base_model() if is_lora(policy) else policy  # a peft model scores with its adapters on
    weights = reference_weights(cfg, policy, inputs, runtime.device)
    attention = set_attention([body, weights.model], attention_implementation(cfg, runtime.device),
                              cfg.attn_implementation != "auto")
    runtime.log(f"fastdpo: attention: {attention}")
    pad = tokenizer.pad_token_id
    layout = choose_layout(cfg, [body, weights.model] if weights.kind == "model" else [body], [pairs], pad,
                           runtime.device, runtime.log)
    set_per_segment([body, weights.model], layout.per_segment)
    runtime.log(f"fastdpo: layout: {layout.describe()}")
    module = LogpsModule(body, layout)
    reference = build_reference(cfg, policy, module, weights, layout, pad, {"eval": pairs}, runtime)["eval"]
    return evaluate_pairs(module, reference, pairs, cfg, layout, pad, cfg.batch_size, runtime,
                          progress=runtime.main and sys.stderr.isatty())
