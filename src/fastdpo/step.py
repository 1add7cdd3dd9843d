"""The step's forward: policy and reference log-probs of one batch -> per-pair losses and metrics.

The training loop, the in-loop evaluation and `fastdpo eval` all score batches through `score_batch`, so the
numbers a run logs are the numbers it trains on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from fastdpo.batching import Batch
from fastdpo.config import Config
from fastdpo.logps import split_pairs
from fastdpo.losses import pair_metrics, preference_loss
from fastdpo.reference import Reference


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

