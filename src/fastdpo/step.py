"""The step's forward: policy and reference log-probs of one batch -> per-pair losses and metrics; and the one
layout every batch of a run is collated in.

The training loop, the in-loop evaluation and `fastdpo eval` all score batches through `score_batch`, so the
numbers a run logs are the numbers it trains on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from fastdpo.batching import Batch, Layout
from fastdpo.config import Config
from fastdpo.logps import check_layout, check_sample, split_pairs
from fastdpo.losses import pair_metrics, preference_loss
from fastdpo.reference import Reference
from fastdpo.tokenize import TokenizedPair


@dataclass
class ScoredBatch:
    losses: torch.Tensor  # (B,) per-pair loss, with grad when the policy had it
    metrics: dict[str, torch.Tensor]  # per-pair metric values, (B,) each
    reference_chosen: torch.Tensor  # (B,)
    reference_rejected: torch.Tensor  # (B,)


def score_batch(policy, reference: Reference, batch: Batch, positions: Sequence[int], cfg: Config) -> ScoredBatch:
    """`policy`: the policy's LogpsModule (or its strategy wrapper); `positions`: the batch's pairs' positions in
    their data set, for a precomputed reference."""
    logps, tokens = policy(batch)  # (2B,), (2B,)
    ref_logps = reference.logps(batch, positions).to(logps.device)  # (2B,)
    pc, pr = split_pairs(logps)
    rc, rr = split_pairs(ref_logps)
    ct, rt = split_pairs(tokens)
    losses, chosen_rewards, rejected_rewards = preference_loss(
        cfg.loss, pc, pr, rc, rr, beta=cfg.beta, chosen_tokens=ct, rejected_tokens=rt, **cfg.loss_params())
    return ScoredBatch(losses, pair_metrics(losses, chosen_rewards, rejected_rewards, pc, pr, ct, rt), rc, rr)


def requested_layout(cfg: Config, zero3: bool = False) -> Layout:
    """The layout the config asks for. Under DeepSpeed ZeRO-3 the lm_head's weight is gathered only inside its own
    forward, so the model's full logits are used there."""
    chunked = cfg.logits_chunk_size > 0 and not zero3
    return Layout(share_prompt=cfg.prefix_sharing, pack=cfg.packing, head="chunked" if chunked else "full",
                  chunk_size=cfg.logits_chunk_size or 1, row_length=cfg.pack_length)


def choose_layout(cfg: Config, models: Sequence, pairs: Sequence[TokenizedPair], pad_token_id: int, runtime
                  ) -> Layout:
    """The one layout of a run: the requested one, narrowed by the start-up check until it is exact for every
    model that scores batches (the policy and a live reference model)."""
    layout, sample = requested_layout(cfg, runtime.zero3), check_sample(pairs)
    for model in dict.fromkeys(m for m in models if m is not None):  # each distinct model once
        layout = check_layout(model, layout, sample, pad_token_id, runtime.device, notice=runtime.log)
    return layout
