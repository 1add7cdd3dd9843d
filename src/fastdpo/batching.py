"""Tokenized pairs -> model-ready batches, in one of three layouts that give the same log-probs.

Every layout lists the *scored tokens* explicitly: for each response token, the row and column whose hidden state
predicts it (`score_rows`, `score_cols`), the token (`score_labels`) and the sequence it belongs to (`score_seq`:
`b` for pair b's chosen response, `B + b` for its rejected one). The log-prob code then never needs to know the
layout.

- concatenated (the plain path): rows `[prompt | chosen]` for every pair, then `[prompt | rejected]`,
  right-padded, with a 2-D padding mask.
- prefix-shared: one segment per pair, `[prompt | chosen | rejected]`; the rejected tokens do not see the chosen
  ones, and their positions restart right after the prompt, so the prompt is computed once. Exact DPO.
- packed: several segments per row, each attending only to itself (block-diagonal), with positions restarting
  per segment. Rows are no longer than the longest segment of the batch (or `row_length`), so a row never pays a
  dense attention mask much larger than one long pair's. Their width is rounded up to one of 8 sizes per power of
  two (at most 1/8 padding), so a run meets few distinct shapes: kernels are chosen and cached per shape (torch's
  bf16 CPU kernels keep MBs of heap for each shape they have seen, for the life of the process).

Prefix-shared and packed segments need a 4-D mask `(R, 1, L, L)`; a batch carries it as two `(R, L)` vectors (each
slot's segment, and whether it is a chosen or rejected token of a prefix-shared segment), from which the mask is
built on the device once per forward (`Batch.additive_mask`), so the host never builds or copies the `(L, L)`
blocks.

A run's choice among them, and of the lm_head path, is one immutable `Layout`, chosen once by the start-up
exactness check (`logps.check_layout`) and passed to everything that collates or scores.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Literal, Sequence

import torch

from fastdpo.attention import MIN_SEGMENT, Segment
from fastdpo.tokenize import TokenizedPair

FLEX_BLOCK = 128  # FlexAttention's block size, a side


@dataclass(frozen=True)
class Layout:
    """How pairs become model rows, and how the lm_head runs over them."""

    share_prompt: bool = True  # one [prompt | chosen | rejected] segment per pair
    pack: bool = True  # several segments per row, block-diagonal attention
    head: Literal["chunked", "full"] = "chunked"  # response-only chunked lm_head, or the model's full logits
    chunk_size: int = 256  # response positions per lm_head chunk
    row_length: int = 0  # tokens per packed row (0: the longest segment of the batch)
    segments: bool = True  # under SDPA, long segments attend one at a time (attention.py), not by a dense mask

    @property
    def concatenated(self) -> bool:
        """The plain layout: [prompt | response] rows with a 2-D padding mask (no 4-D mask needed)."""
        return not (self.share_prompt or self.pack)

    def describe(self) -> str:
        rows = ("prefix-shared pairs" if self.share_prompt else "one row per sequence" if not self.pack
                else "sequences") + (", packed" if self.pack else "")
        head = f"chunked lm_head ({self.chunk_size} positions a chunk)" if self.head == "chunked" else \
            "the model's full logits"
        attention = f"; attention per segment where segments average {MIN_SEGMENT}+ tokens" if self.per_segment else ""
        return f"{rows}; {head}{attention}"

    @property
    def per_segment(self) -> bool:
        return self.segments and not self.concatenated

    def without_mask(self) -> "Layout":
        return replace(self, share_prompt=False, pack=False, segments=False)

    def collate(self, pairs: Sequence[TokenizedPair], pad_token_id: int) -> "Batch":
        if self.concatenated:
            return collate_concatenated(pairs, pad_token_id)
        return collate_packed(pairs, pad_token_id, self.share_prompt, self.pack, self.row_length)


@dataclass
class Batch:
    input_ids: torch.Tensor  # (R, L)
    padding_mask: torch.Tensor | None  # (R, L), 1 for real tokens: the concatenated layout's mask; None otherwise
    position_ids: torch.Tensor | None  # (R, L), -1 on padding; None for the concatenated layout
    # The prefix-shared and packed layouts' attention, as two (R, L) vectors rather than an (R, 1, L, L) mask:
    segment_ids: torch.Tensor | None  # (R, L) int32: a slot's segment in its row; each padding slot one of its own
    sides: torch.Tensor | None  # (R, L) int8: 1 chosen, 2 rejected in a prefix-shared segment, else 0
    score_rows: torch.Tensor  # (M,) row of the hidden state that predicts each response token
    score_cols: torch.Tensor  # (M,) its column
    score_labels: torch.Tensor  # (M,) the response token
    score_seq: torch.Tensor  # (M,) sequence index in [0, 2B): chosen of pair b -> b, rejected -> B + b
    score_counts: torch.Tensor  # (2B,) scored tokens per sequence, counted on the host
    indices: list[int]  # record index of each pair, (B,)
    real_tokens: int  # the (R, L) slots that are not padding, counted on the host
    segments: tuple[tuple[Segment, ...], ...] | None = None  # per row, its segments (attention.py); host-side

    @property
    def num_pairs(self) -> int:
        return len(self.indices)

    @property
    def padding_share(self) -> float:
        """Share of the (R, L) token slots that are padding."""
        return 1.0 - self.real_tokens / self.input_ids.numel()

    @property
    def attention_mask(self) -> torch.Tensor:
        """The padding mask (R, L) of the concatenated layout, else the boolean mask (R, 1, L, L), True where a
        query (row) may attend to a key (column): `dense_mask`."""
        return self.padding_mask if self.segment_ids is None else self.dense_mask()

    def dense_mask(self) -> torch.Tensor:
        """(R, 1, L, L) bool, built on the batch's device from the (R, L) vectors: a query sees the keys at or
        before it in its own segment, except a rejected token the chosen ones."""
        seg, side = self.segment_ids, self.sides
        cols = torch.arange(seg.shape[1], device=seg.device)
        allowed = (cols[None, :, None] >= cols[None, None, :]) & (seg[:, :, None] == seg[:, None, :])  # (R, L, L)
        allowed &= ~((side[:, :, None] == 2) & (side[:, None, :] == 1))
        return allowed[:, None]

    def additive_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """`dense_mask` as the scores' additive mask (0 where allowed, the dtype's lowest value elsewhere), in the
        dtype the attention computes in: one tensor per forward, shared by every layer, which neither SDPA nor
        eager attention converts again. Shape: (R, 1, L, L)."""
        zero = torch.zeros((), dtype=dtype, device=self.input_ids.device)
        return torch.where(self.dense_mask(), zero, torch.finfo(dtype).min)

    def block_mask(self, rows_per_pass: int = 1024):
        """`dense_mask` as FlexAttention's BlockMask, on the device: which 128 x 128 blocks are empty, full or
        partial, and the rule as a function of (row, query, key) for the partial ones; attention skips the empty
        blocks. The blocks are classified `rows_per_pass` queries at a time, so the transient is
        (R, rows_per_pass, L) booleans, never the (L, L) grid. The layers share the BlockMask."""
        from torch.nn.attention.flex_attention import BlockMask

        seg, side = self.segment_ids, self.sides
        R, L = seg.shape
        n = -(-L // FLEX_BLOCK)  # blocks a side; the last one padded with slots nothing attends to or from
        seg_padded = torch.nn.functional.pad(seg, (0, n * FLEX_BLOCK - L), value=torch.iinfo(seg.dtype).min)
        side_padded = torch.nn.functional.pad(side, (0, n * FLEX_BLOCK - L))
        cols = torch.arange(n * FLEX_BLOCK, device=seg.device)
        step = max(1, rows_per_pass // FLEX_BLOCK) * FLEX_BLOCK
        partial, full = [], []
        for q0 in range(0, n * FLEX_BLOCK, step):
            q = cols[q0 : q0 + step]
            allowed = (q[None, :, None] >= cols) & (seg_padded[:, q0 : q0 + step, None] == seg_padded[:, None])
            allowed &= ~((side_padded[:, q0 : q0 + step, None] == 2) & (side_padded[:, None] == 1))
            allowed &= (q < L)[None, :, None]
            blocks = allowed.view(R, -1, FLEX_BLOCK, n, FLEX_BLOCK)  # (R, q blocks, 128, kv blocks, 128)
            some, every = blocks.any(4).any(2), blocks.all(4).all(2)  # (R, q blocks, kv blocks)
            partial.append(some & ~every)
            full.append(every)

        def listed(blocks):  # (R, Q, KV) bool -> the count and the indices (listed ones first) per query block
            count = blocks.sum(-1, dtype=torch.int32)[:, None]  # (R, 1, Q)
            order = torch.argsort((~blocks).to(torch.int8), dim=-1, stable=True).to(torch.int32)[:, None]
            return count, order  # (R, 1, Q, KV)

        def rule(b, h, q, k):
            return (q >= k) & (seg[b, q] == seg[b, k]) & ~((side[b, q] == 2) & (side[b, k] == 1))

        return BlockMask.from_kv_blocks(*listed(torch.cat(partial, 1)), *listed(torch.cat(full, 1)),
                                        BLOCK_SIZE=FLEX_BLOCK, mask_mod=rule, seq_lengths=(L, L))

    def to(self, device) -> "Batch":
        move = lambda t: t.to(device) if t is not None else None  # noqa: E731
        return Batch(move(self.input_ids), move(self.padding_mask), move(self.position_ids), move(self.segment_ids),
                     move(self.sides), move(self.score_rows), move(self.score_cols), move(self.score_labels),
                     move(self.score_seq), move(self.score_counts), self.indices, self.real_tokens, self.segments)


def collate_concatenated(pairs: Sequence[TokenizedPair], pad_token_id: int) -> Batch:
    """Stack `[prompt | chosen]` rows then `[prompt | rejected]` rows, right-padded with `pad_token_id`."""
    B = len(pairs)
    rows = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    width = max(len(prompt) + len(response) for prompt, response in rows)
    input_ids = torch.full((2 * B, width), pad_token_id, dtype=torch.long)  # (2B, T)
    attention_mask = torch.zeros((2 * B, width), dtype=torch.long)  # (2B, T)
    score = ([], [], [], [])
    for i, (prompt, response) in enumerate(rows):
        n, m = len(prompt), len(response)
        input_ids[i, : n + m] = torch.tensor(prompt + response, dtype=torch.long)
        attention_mask[i, : n + m] = 1
        _add_scores(score, row=i, cols=range(n - 1, n + m - 1), labels=response, seqs=[i] * m)
    real = sum(len(prompt) + len(response) for prompt, response in rows)
    return Batch(input_ids, attention_mask, None, None, None, *_score_tensors(score, 2 * B),
                 [p.index for p in pairs], real)


def collate_packed(pairs: Sequence[TokenizedPair], pad_token_id: int, share_prompt: bool = True,
                   pack: bool = True, row_length: int = 0) -> Batch:
    """Prefix-shared and/or packed layout (see the module docstring).

    `share_prompt`: one `[prompt | chosen | rejected]` segment per pair (else two segments, `[prompt | chosen]`
    and `[prompt | rejected]`). `pack`: first-fit several segments into a row of at most
    `max(row_length, longest segment)` tokens (else one segment per row).
    """
    B = len(pairs)
    segments = []  # (ids, positions, sides, (cols, labels, seqs), (prompt, causal, rejected)) per segment
    for b, p in enumerate(pairs):
        if share_prompt:
            segments.append(_shared_segment(p, b, B))
        else:
            segments.append(_plain_segment(p.prompt_ids, p.chosen_ids, seq=b))
            segments.append(_plain_segment(p.prompt_ids, p.rejected_ids, seq=B + b))
    width = max(row_length, max(len(s[0]) for s in segments))
    rows = _first_fit([len(s[0]) for s in segments], width) if pack else [[i] for i in range(len(segments))]
    width = bucket_width(max(sum(len(segments[i][0]) for i in row) for row in rows), row_length)
    R = len(rows)
    input_ids = torch.full((R, width), pad_token_id, dtype=torch.long)  # (R, L)
    position_ids = torch.full((R, width), -1, dtype=torch.long)  # (R, L), -1 marks padding until the end
    # padding slots each in a segment of their own (-1 - column): a padding query attends to itself only, so no
    # row of the mask is empty (NaN in softmax)
    segment_ids = (-1 - torch.arange(width, dtype=torch.int32)).repeat(R, 1)  # (R, L)
    sides = torch.zeros((R, width), dtype=torch.int8)  # (R, L)
    score = ([], [], [], [])
    plan = tuple([] for _ in rows)
    for r, row in enumerate(rows):
        offset = 0
        for k, i in enumerate(row):
            ids, positions, seg_sides, (cols, labels, seqs), parts = segments[i]
            plan[r].append(Segment(offset, *parts))
            n = len(ids)
            input_ids[r, offset : offset + n] = torch.tensor(ids, dtype=torch.long)
            position_ids[r, offset : offset + n] = torch.tensor(positions, dtype=torch.long)
            segment_ids[r, offset : offset + n] = k
            sides[r, offset : offset + n] = torch.tensor(seg_sides, dtype=torch.int8)
            _add_scores(score, row=r, cols=[c + offset for c in cols], labels=labels, seqs=seqs)
            offset += n
    real = sum(len(s[0]) for s in segments)
    return Batch(input_ids, None, position_ids, segment_ids, sides, *_score_tensors(score, 2 * B),
                 [p.index for p in pairs], real, tuple(tuple(row) for row in plan))


def bucket_width(width: int, row_length: int = 0) -> int:
    """`width` rounded up to a multiple of 2**(bits - 4), i.e. one of 8 sizes per power of two, never past a
    `row_length` that holds it. 237 -> 240, 1000 -> 1024, 1025 -> 1152."""
    step = 1 << max(0, width.bit_length() - 4)
    rounded = -(-width // step) * step
    return min(rounded, row_length) if width <= row_length else rounded


def model_position_ids(batch: Batch) -> torch.Tensor | None:
    """Position ids for the model: padding slots (-1) get 0; they are masked and never scored."""
    return batch.position_ids.clamp(min=0) if batch.position_ids is not None else None


def _plain_segment(prompt: list[int], response: list[int], seq: int):
    """`[prompt | response]`, causal."""
    ids = prompt + response
    n = len(ids)
    cols = list(range(len(prompt) - 1, n - 1))
    return ids, list(range(n)), [0] * n, (cols, response, [seq] * len(response)), (n, n, 0)


def _shared_segment(p: TokenizedPair, b: int, B: int):
    """`[prompt | chosen | rejected]`: rejected sees the prompt and itself, not the chosen tokens (sides 1, 2)."""
    n, c, r = len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)
    ids = p.prompt_ids + p.chosen_ids + p.rejected_ids
    positions = list(range(n + c)) + list(range(n, n + r))
    sides = [0] * n + [1] * c + [2] * r
    chosen_cols = list(range(n - 1, n + c - 1))
    rejected_cols = [n - 1] + list(range(n + c, n + c + r - 1))  # first rejected token: from the last prompt token
    cols = chosen_cols + rejected_cols
    labels = p.chosen_ids + p.rejected_ids
    seqs = [b] * c + [B + b] * r
    return ids, positions, sides, (cols, labels, seqs), (n, n + c, r)


def _first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    rows, room = [], []
    for i, n in enumerate(lengths):
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(capacity - n)
    return rows


def _add_scores(score, row: int, cols, labels, seqs) -> None:
    """Append scored tokens (all in one row) to the (rows, cols, labels, seqs) lists."""
    cols = list(cols)
    score[0].extend([row] * len(cols))
    score[1].extend(cols)
    score[2].extend(labels)
    score[3].extend(seqs)


def _score_tensors(score, num_seqs: int) -> tuple[torch.Tensor, ...]:
    """The (rows, cols, labels, seqs) lists as tensors, and the scored tokens per sequence. Shapes: 4 x (M,), (2B,)."""
    counts = [0] * num_seqs
    for seq in score[3]:
        counts[seq] += 1
    return (*(torch.tensor(values, dtype=torch.long) for values in score), torch.tensor(counts, dtype=torch.long))


def batch_order(num_pairs: int, batch_size: int, shuffle: bool, seed: int, epoch: int = 0,
                lengths: list[int] | None = None) -> list[list[int]]:
    """Split pair positions into batches of `batch_size` (the last one may be short); shuffled per epoch.

    With `lengths` (length grouping), the shuffled order is cut into groups of 64 batches, each group sorted by
    length before it is cut into batches, and the batches are shuffled again: batches hold pairs of similar length.
    """
    order = list(range(num_pairs))
    rng = random.Random(seed * 1_000_003 + epoch)
    if shuffle:
        rng.shuffle(order)
    if lengths is not None:
        group = 64 * batch_size
        order = [i for s in range(0, num_pairs, group)
                 for i in sorted(order[s : s + group], key=lambda i: lengths[i])]
    batches = [order[i : i + batch_size] for i in range(0, num_pairs, batch_size)]
    if lengths is not None and shuffle:
        rng.shuffle(batches)
    return batches
