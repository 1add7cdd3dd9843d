"""Attention for the prefix-shared and packed layouts, one segment at a time.

With SDPA a 4-D mask makes attention compute every (query, key) block of an `(L, L)` row, the masked ones too,
and keeps the `(R, 1, L, L)` mask until backward. Per segment it needs far less: `[prompt | chosen]` is plain
causal attention, and the rejected tokens attend to the prompt's keys and their own, causally (a lower-right
causal mask over `prompt + rejected` keys); a segment of the packed layout without prefix sharing is causal as a
whole. So each part is one causal SDPA call, which skips the blocks above the diagonal (on CUDA in its flash
kernels), and no `(L, L)` mask exists. The numbers are SDPA's with the dense mask, to float rounding (the
start-up check compares them with the plain path's, `logps.check_layout`).

It runs as the attention function of transformers' attention interface under the name `NAME`: with a batch's
segments passed as the `fastdpo_segments` keyword (which transformers' models hand on to their attention
function) it attends per segment; without, it is transformers' own SDPA. So a model keeps this one
implementation through forward and any recomputation in backward (gradient checkpointing), and batches of short
segments, where many small calls could cost more than one masked call over the row, still use the dense
mask (`worth_it`).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

NAME = "fastdpo_sdpa"  # the attention implementation fastdpo gives a model that runs SDPA
# batches whose segments average at least this many tokens attend per segment. On 2 CPU cores it is as fast or
# faster at every length measured (x1.05 at 96-token pairs packed ten a row, x1.46 at 4.6k tokens a pair:
# `python bench/segment_attention.py`); the floor bounds the number of small calls (two per segment per layer),
# whose launch costs count on a GPU
MIN_SEGMENT = 128


class Segment(NamedTuple):
    """One segment of a row: columns [start, start + causal) are causal attention over themselves (a prompt and
    its chosen response, or a whole unshared sequence), then `rejected` columns that see the first `prompt`
    columns of the segment and themselves, causally."""

    start: int
    prompt: int
    causal: int
    rejected: int


def worth_it(segments: Sequence[Sequence[Segment]] | None) -> bool:
    """Whether a batch with these segments (per row) attends per segment rather than through one dense mask."""
    if not segments:
        return False
    count = sum(len(row) for row in segments)
    tokens = sum(s.causal + s.rejected for row in segments for s in row)
    return count > 0 and tokens >= MIN_SEGMENT * count


def flex_available() -> bool:
    """Whether this torch builds fastdpo's FlexAttention BlockMask (`BlockMask.from_kv_blocks` with
    `seq_lengths`, torch >= 2.6)."""
    import inspect

    try:
        from torch.nn.attention.flex_attention import BlockMask
    except ImportError:
        return False
    return "seq_lengths" in inspect.signature(BlockMask.from_kv_blocks).parameters


def register() -> None:
    """Adds `NAME` to transformers' attention functions, with SDPA's mask builder (what a model builds from a 2-D
    padding mask or none). Idempotent; a new name, so no model's attention changes until it is set to it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    if NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(NAME, segment_attention)
        AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def segment_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask, scaling: float | None = None, dropout: float = 0.0,
                      fastdpo_segments: Sequence[Sequence[Segment]] | None = None, **kwargs):
    """transformers' attention-function signature: query (R, H, L, D), key and value (R, H_kv, L, D) -> output
    (R, L, H, D), None. Without `fastdpo_segments`: transformers' SDPA with `attention_mask`."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if fastdpo_segments is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    if kwargs.get("position_bias") is not None or kwargs.get("s_aux") is not None or \
            not getattr(module, "is_causal", True):
        raise ValueError("per-segment attention takes causal attention without a position bias or sinks")
    R, H, L, D = query.shape
    if key.shape[1] != H:  # grouped-query attention: each K/V head serves H / H_kv query heads
        key, value = (t.repeat_interleave(H // t.shape[1], dim=1) for t in (key, value))
    attend = lambda q, k, v, **mask: F.scaled_dot_product_attention(  # noqa: E731
        q, k, v, dropout_p=dropout, scale=scaling, **mask)
    rows = []
    for r, segments in enumerate(fastdpo_segments):
        q, k, v = query[r : r + 1], key[r : r + 1], value[r : r + 1]  # (1, H, L, D)
        parts, end = [], 0
        for s in segments:
            a, b = s.start + s.causal, s.start + s.causal + s.rejected
            parts.append(attend(q[:, :, s.start : a], k[:, :, s.start : a], v[:, :, s.start : a], is_causal=True))
            if s.rejected:
                keys = torch.cat([k[:, :, s.start : s.start + s.prompt], k[:, :, a:b]], dim=2)  # (1, H, P + N, D)
                values = torch.cat([v[:, :, s.start : s.start + s.prompt], v[:, :, a:b]], dim=2)
                parts.append(attend(q[:, :, a:b], keys, values, attn_mask=_lower_right(s.rejected, keys.shape[2],
                                                                                        q.device)))
            end = b
        if end < L:  # padding: attends to nothing, is never scored
            parts.append(q.new_zeros(1, H, L - end, D))
        rows.append(torch.cat(parts, dim=2))  # (1, H, L, D)
    return torch.cat(rows, dim=0).transpose(1, 2).contiguous(), None  # (R, L, H, D)


def varlen(segments: Sequence[Sequence[Segment]], rows: int, width: int, device) -> dict:
    """flash-attention's varlen keywords for a packed batch without prefix sharing: its (rows, width) tokens as
    one flattened sequence cut at every segment and at each row's padding (one piece, never scored), so each
    segment attends causally to itself alone. Transformers' flash integration takes them as they are (no device
    synchronisation to infer them from the position ids). Shapes: cumulative lengths (P + 1,) int32."""
    bounds, longest = [0], 0
    for r, row in enumerate(segments):
        end = r * width
        for s in row:
            assert not s.rejected, "flash-attention's varlen kernels cannot share a prompt"
            end += s.causal
            bounds.append(end)
            longest = max(longest, s.causal)
        if end < (r + 1) * width:
            bounds.append((r + 1) * width)
            longest = max(longest, (r + 1) * width - end)
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
    return dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)


def _lower_right(queries: int, keys: int, device) -> torch.Tensor:
    """(queries, keys) bool: query i sees keys up to keys - queries + i (the rejected tokens: every prompt key,
    then their own causally). A boolean of the rejected part's size only; SDPA computes in the query's dtype."""
    i = torch.arange(queries, device=device)[:, None]
    j = torch.arange(keys, device=device)[None, :]
    return j <= i + (keys - queries)


def set_per_segment(models, on: bool) -> None:
    """Each model (or None) that runs SDPA attends through `segment_attention` (on), or back through transformers'
    SDPA (off). Models with another attention implementation are left as they are."""
    if on:
        register()
    for model in models:
        current = getattr(getattr(model, "config", None), "_attn_implementation", None)
        if current == ("sdpa" if on else NAME):
            model.set_attn_implementation(NAME if on else "sdpa")
