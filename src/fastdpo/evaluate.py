"""Score a policy against a reference over preference pairs: the `eval` command and the in-loop evaluation."""

from __future__ import annotations

import contextlib

import torch

from fastdpo.batching import collate_concatenated
from fastdpo.config import Config
from fastdpo.logps import head_path_is_exact, sequence_logps, split_pairs
from fastdpo.losses import pair_metrics, preference_loss
from fastdpo.tokenize import TokenizedPair


def loss_kwargs(cfg: Config) -> dict:
    """The loss parameters of a config, as keywords for `preference_loss`."""
    return dict(beta=cfg.beta, label_smoothing=cfg.label_smoothing, simpo_gamma=cfg.simpo_gamma,
                discopop_tau=cfg.discopop_tau, rpo_alpha=cfg.rpo_alpha)


class Scorer:
    """Sequence log-probs of one model, through the response-only lm_head path when it is exact for the model."""

    def __init__(self, model, sample_batch=None):
        self.model = model
        self.fast = sample_batch is None or head_path_is_exact(model, sample_batch)

    def __call__(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        return sequence_logps(self.model, batch, head_only_responses=self.fast)


@torch.no_grad()
def evaluate_pairs(policy: Scorer, reference: Scorer | None, pairs: list[TokenizedPair], cfg: Config,
                   batch_size: int, pad_token_id: int, device, autocast=contextlib.nullcontext
                   ) -> tuple[dict, list[dict]]:
    """Means of the per-pair metrics over all pairs, and one row per pair. Batches are taken in data order.

    `autocast` is a factory of the mixed-precision context (`accelerator.autocast`)."""
    values: dict[str, list[torch.Tensor]] = {}
    rows = []
    for start in range(0, len(pairs), batch_size):
        batch = collate_concatenated(pairs[start : start + batch_size], pad_token_id).to(device)
        with autocast():
            logps, tokens = policy(batch)  # (2B,), (2B,)
            ref_logps = reference(batch)[0] if reference is not None else torch.zeros_like(logps)
        pc, pr = split_pairs(logps)
        rc, rr = split_pairs(ref_logps)
        ct, rt = split_pairs(tokens)
        losses, chosen_rewards, rejected_rewards = preference_loss(
            cfg.loss, pc, pr, rc, rr, chosen_tokens=ct, rejected_tokens=rt, **loss_kwargs(cfg))
        for key, value in pair_metrics(losses, chosen_rewards, rejected_rewards, pc, pr, ct, rt).items():
            values.setdefault(key, []).append(value.cpu())
        for i, index in enumerate(batch.indices):
            rows.append({
                "index": index,
                "policy_chosen_logps": pc[i].item(), "policy_rejected_logps": pr[i].item(),
                "reference_chosen_logps": rc[i].item(), "reference_rejected_logps": rr[i].item(),
                "chosen_reward": chosen_rewards[i].item(), "rejected_reward": rejected_rewards[i].item(),
                "loss": losses[i].item(), "chosen_tokens": int(ct[i]), "rejected_tokens": int(rt[i]),
            })
    metrics = {key: torch.cat(parts).mean().item() for key, parts in values.items()}
    metrics["pairs"] = len(pairs)
    return metrics, rows


def precision_name(cfg: Config) -> str:
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[cfg.precision]


def run_eval(cfg: Config) -> tuple[dict, list[dict]]:
    """The `eval` command: load the policy, the reference and the data; score every pair."""
    import sys

    from accelerate import Accelerator

    from fastdpo.data import Fields
    from fastdpo.models import load_model, load_tokenizer, resolve_data
    from fastdpo.tokenize import load_pairs

    accelerator = Accelerator(mixed_precision=precision_name(cfg))
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    pairs, stats = load_pairs(
        resolve_data(cfg.data), cfg.data_split, tokenizer,
        fields=Fields(cfg.prompt_field, cfg.chosen_field, cfg.rejected_field),
        max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length, on_bad_record=cfg.on_bad_record)
    print(stats.summary(), file=sys.stderr)
    sample = collate_concatenated(pairs[: min(2, len(pairs))], tokenizer.pad_token_id).to(accelerator.device)
    policy = load_model(cfg.model, cfg.seed, cfg.trust_remote_code).to(accelerator.device)
    reference = None
    if cfg.reference != "none" and cfg.ref_model:
        ref_model = load_model(cfg.ref_model, cfg.seed, cfg.trust_remote_code, flag="ref_model")
        reference = Scorer(ref_model.to(accelerator.device), sample)
    return evaluate_pairs(Scorer(policy, sample), reference, pairs, cfg, cfg.batch_size,
                          tokenizer.pad_token_id, accelerator.device, accelerator.autocast)
