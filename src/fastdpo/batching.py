"""Tokenized pairs -> model-ready batches.

The plain layout is the concatenated one: the chosen sequences of a micro-batch, then the rejected ones, each
`prompt + response`, right-padded to the longest, so one forward pass scores both (rows `[0, B)` chosen, rows
`[B, 2B)` rejected).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from fastdpo.tokenize import TokenizedPair


@dataclass
class Batch:
    input_ids: torch.Tensor  # (2B, T)
    attention_mask: torch.Tensor  # (2B, T) 1 on real tokens
    response_mask: torch.Tensor  # (2B, T) 1 on response tokens: the ones whose log-prob is summed
    indices: list[int]  # record index of each pair, (B,)

    @property
    def num_pairs(self) -> int:
        return len(self.indices)

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.response_mask.to(device),
                     self.indices)


def collate_concatenated(pairs: list[TokenizedPair], pad_token_id: int) -> Batch:
    """Stack `[prompt | chosen]` rows then `[prompt | rejected]` rows, right-padded with `pad_token_id`."""
    rows = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    width = max(len(prompt) + len(response) for prompt, response in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)  # (2B, T)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # (2B, T)
    response_mask = torch.zeros((len(rows), width), dtype=torch.long)  # (2B, T)
    for i, (prompt, response) in enumerate(rows):
        n, m = len(prompt), len(response)
        input_ids[i, : n + m] = torch.tensor(prompt + response, dtype=torch.long)
        attention_mask[i, : n + m] = 1
        response_mask[i, n : n + m] = 1
    return Batch(input_ids, attention_mask, response_mask, [p.index for p in pairs])


def batch_order(num_pairs: int, batch_size: int, shuffle: bool, seed: int, epoch: int = 0) -> list[list[int]]:
    """Split pair positions into batches of `batch_size` (the last one may be short); shuffled per epoch."""
    order = list(range(num_pairs))
    if shuffle:
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return [order[i : i + batch_size] for i in range(0, num_pairs, batch_size)]
