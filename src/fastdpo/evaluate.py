"""Score a policy against a reference over preference pairs: the `eval` command and the in-loop evaluation."""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass

import torch

from fastdpo.config import Config
from fastdpo.errors import UserError
from fastdpo.logps import Scorer, split_pairs
from fastdpo.losses import pair_metrics, preference_loss
from fastdpo.tokenize import TokenizedPair


def loss_kwargs(cfg: Config) -> dict:
    """The loss parameters of a config, as keywords for `preference_loss`."""
    return dict(beta=cfg.beta, label_smoothing=cfg.label_smoothing, simpo_gamma=cfg.simpo_gamma,
                discopop_tau=cfg.discopop_tau, rpo_alpha=cfg.rpo_alpha)


def precision_name(cfg: Config) -> str:
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[cfg.precision]


def make_accelerator(cfg: Config):
    """An Accelerator with the config's mixed precision. accelerate keeps one process-wide state; a library user
    who calls `train` twice with different precisions gets its precision part reset (the process group stays)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs

    # DDP need not broadcast buffers (rotary tables and the like are constants): without that broadcast a forward
    # involves no other process, so processes may run different numbers of no-grad forwards (eval shards)
    handlers = [DistributedDataParallelKwargs(broadcast_buffers=False)]
    world, device = int(os.environ.get("WORLD_SIZE", "1")), _has_accelerator_device()
    if world > 1 and not device and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        raise UserError("FSDP: accelerate runs FSDP on GPUs only; on CPU use configs/accelerate/ddp.yaml (or torchrun)",
                        exit_code=2)
    # under a bare `torchrun` accelerate treats several processes without a GPU as one unless told they are CPU
    # processes
    kwargs = dict(mixed_precision=precision_name(cfg), kwargs_handlers=handlers, cpu=world > 1 and not device)
    try:
        accelerator = Accelerator(**kwargs)
    except ValueError:
        AcceleratorState._reset_state(reset_partial_state=False)
        accelerator = Accelerator(**kwargs)
    if accelerator.num_processes != world:  # they would each train alone and overwrite each other's output
        raise UserError(f"{world} processes were launched but accelerate set up {accelerator.num_processes} "
                        f"({accelerator.distributed_type.value}); launch with torchrun or a config of "
                        "configs/accelerate/", exit_code=2)
    return accelerator


def _has_accelerator_device() -> bool:
    if hasattr(torch, "accelerator"):  # torch >= 2.6: CUDA, XPU, MPS, ...
        return torch.accelerator.is_available()
    return torch.cuda.is_available()


def make_scorer(model, cfg: Config, pad_token_id: int, sample: list[TokenizedPair], device, log=None) -> Scorer:
    """A scorer with the config's layout, checked against the plain path on `sample` (falls back if not exact)."""
    scorer = Scorer(model, pad_token_id, share_prompt=cfg.prefix_sharing, pack=cfg.packing,
                    head="chunked" if cfg.logits_chunk_size else "full", chunk_size=cfg.logits_chunk_size or 1,
                    row_length=cfg.pack_length)
    return scorer.check(sample, device, notice=log or (lambda text: print(text, file=sys.stderr)))


def check_sample(pairs: list[TokenizedPair]) -> list[TokenizedPair]:
    """For the exactness checks: the shortest pair and the longest (padding and packing both exercised), then the
    pair with the longest single sequence if that is another (what an attention window is measured against)."""
    if len(pairs) < 2:
        return pairs[:1]
    shortest, longest = min(pairs, key=lambda p: p.shared_length), max(pairs, key=lambda p: p.shared_length)
    longest_sequence = max(pairs, key=lambda p: p.longest_sequence)
    extra = [longest_sequence] if longest_sequence.longest_sequence > longest.longest_sequence else []
    return [shortest, longest] + extra


def reference_logps(reference: Scorer | None, policy: Scorer, batch, pairs, device, like: torch.Tensor):
    """(2B,) reference log-probs: precomputed, from the reference model, or zeros (reference-free)."""
    if batch.reference_logps is not None:
        return batch.reference_logps
    if reference is None:
        return torch.zeros_like(like)
    with torch.no_grad():
        ref_batch = batch if reference.layout == policy.layout else reference.collate(pairs).to(device)
        return reference(ref_batch)[0]


@dataclass
class ScoredBatch:
    losses: torch.Tensor  # (B,) per-pair loss, with grad when the policy had it
    metrics: dict[str, torch.Tensor]  # per-pair metric values, (B,) each
    reference_chosen: torch.Tensor  # (B,)
    reference_rejected: torch.Tensor  # (B,)


def score_batch(policy: Scorer, reference: Scorer | None, batch, pairs, cfg: Config, device) -> ScoredBatch:
    """Policy and reference log-probs of one batch -> per-pair losses and metrics (the loop and eval share it)."""
    logps, tokens = policy(batch)  # (2B,), (2B,)
    ref_logps = reference_logps(reference, policy, batch, pairs, device, logps).to(logps.device)
    pc, pr = split_pairs(logps)
    rc, rr = split_pairs(ref_logps)
    ct, rt = split_pairs(tokens)
    losses, chosen_rewards, rejected_rewards = preference_loss(
        cfg.loss, pc, pr, rc, rr, chosen_tokens=ct, rejected_tokens=rt, **loss_kwargs(cfg))
    return ScoredBatch(losses, pair_metrics(losses, chosen_rewards, rejected_rewards, pc, pr, ct, rt), rc, rr)


@torch.no_grad()
def evaluate_pairs(policy: Scorer, reference: Scorer | None, pairs: list[TokenizedPair], cfg: Config,
                   batch_size: int, device, autocast=contextlib.nullcontext) -> tuple[dict, list[dict]]:
    """Means of the per-pair metrics over all pairs, and one row per pair. Batches are taken in data order.

    `autocast` is a factory of the mixed-precision context (`accelerator.autocast`)."""
    values: dict[str, list[torch.Tensor]] = {}
    rows = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        batch = policy.collate(chunk).to(device)
        with autocast():
            scored = score_batch(policy, reference, batch, chunk, cfg, device)
        m = scored.metrics
        for key, value in m.items():
            values.setdefault(key, []).append(value.cpu())
        for i, index in enumerate(batch.indices):
            rows.append({
                "index": index,
                "policy_chosen_logps": m["logps/chosen"][i].item(),
                "policy_rejected_logps": m["logps/rejected"][i].item(),
                "reference_chosen_logps": scored.reference_chosen[i].item(),
                "reference_rejected_logps": scored.reference_rejected[i].item(),
                "chosen_reward": m["rewards/chosen"][i].item(), "rejected_reward": m["rewards/rejected"][i].item(),
                "loss": m["loss"][i].item(), "chosen_tokens": int(m["tokens/chosen"][i]),
                "rejected_tokens": int(m["tokens/rejected"][i]),
            })
    metrics = {key: torch.cat(parts).mean().item() for key, parts in values.items()}
    metrics["pairs"] = len(pairs)
    return metrics, rows


def run_eval(cfg: Config) -> tuple[dict, list[dict]]:
    """The `eval` command: load the policy, the reference and the data; score every pair."""
    from fastdpo.data import Fields
    from fastdpo.models import load_model, load_tokenizer, resolve_data
    from fastdpo.tokenize import load_pairs

    accelerator = make_accelerator(cfg)
    device = accelerator.device
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    pairs, stats = load_pairs(
        resolve_data(cfg.data), cfg.data_split, tokenizer,
        fields=Fields(cfg.prompt_field, cfg.chosen_field, cfg.rejected_field),
        max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length, on_bad_record=cfg.on_bad_record)
    print(stats.summary(), file=sys.stderr)
    sample = check_sample(pairs)
    pad = tokenizer.pad_token_id
    policy = make_scorer(load_model(cfg.model, cfg.seed, cfg.trust_remote_code).to(device), cfg, pad, sample,
                         device)
    reference = None
    if cfg.reference != "none" and cfg.ref_model:
        ref_model = load_model(cfg.ref_model, cfg.seed, cfg.trust_remote_code, flag="ref_model").to(device)
        reference = make_scorer(ref_model, cfg, pad, sample, device)
    return evaluate_pairs(policy, reference, pairs, cfg, cfg.batch_size, device, accelerator.autocast)
