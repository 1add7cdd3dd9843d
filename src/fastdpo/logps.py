"""Model + batch -> per-sequence log-probabilities of the response tokens, and the start-up check that chooses the
layout a model can take exactly.

`logps[s] = sum over the scored tokens k of sequence s of log p(label_k | hidden[row_k, col_k])`: each response
token is scored from the hidden state that precedes it in its own sequence (see batching.py), so neither prompt
nor padding tokens count. The log-softmax always runs in float32, whatever the model's precision.

Two ways to get there, equal to float rounding:
- `head="full"`: the model's own logits `(R, L, V)`, gathered at the scored positions (the plain path);
- `head="chunked"`: the transformer body only, then the chunked lm_head at the scored positions (head.py). The
  `(R, L, V)` logits are never built and memory is O(chunk_size x V).
"""

from __future__ import annotations

import sys
from dataclasses import replace
from typing import Sequence

import torch
import torch.distributed as dist

from fastdpo import attention
from fastdpo.batching import Batch, Layout, collate_concatenated, model_position_ids
from fastdpo.config import Config
from fastdpo.errors import UserError
from fastdpo.head import gather_logps, head_logps
from fastdpo.tokenize import PairSet, TokenizedPair


class NoChunkedHead(Exception):
    """The model is not built as a transformer body then a plain lm_head, so the chunked head cannot run on it."""


def sequence_logps(model, batch: Batch, head: str = "chunked", chunk_size: int = 1024
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs and response token counts per sequence. Shape: (2B,), (2B,)."""
    scored = forward_scored(model, batch, head)  # (M, V) logits or (M, H) hidden states
    return sum_per_sequence(token_logps(model, scored, batch, head, chunk_size), batch)


def forward_scored(model, batch: Batch, head: str, per_segment: bool = False) -> torch.Tensor:
    """The model's forward, kept at the scored positions: its logits `(M, V)` for the full head, else the body's
    last hidden states `(M, H)` for the chunked head. `per_segment`: attend per segment whatever the width (the
    start-up check's short rows)."""
    def run():
        inputs = dict(input_ids=batch.input_ids, position_ids=model_position_ids(batch), use_cache=False,
                      **attention_inputs(model, batch, per_segment))
        return model(**inputs).logits if head == "full" else backbone(model)(**inputs)

    try:
        out = run()
    except Exception as e:
        if not flex_compile_failure(model, e):
            raise
        out = run()  # with SDPA, which `flex_compile_failure` set
    if head == "full":
        return out[batch.score_rows, batch.score_cols]  # (R, L, V) -> (M, V)
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None:
        raise NoChunkedHead("its body returns no last_hidden_state")
    return hidden[batch.score_rows, batch.score_cols]  # (M, H)


def flex_compile_failure(model, error: Exception) -> bool:
    """Whether `error` is torch.compile failing to build FlexAttention's kernel for a batch's shape (torch's CPU
    code generator fails for some shapes); if so the model computes attention with SDPA from now on, which gives
    the same numbers, and one line says so (in one process; with several, one line stops the run, since the others
    may be past collectives this process would repeat)."""
    if getattr(model.config, "_attn_implementation", None) != "flex_attention" or \
            not any(type(e).__module__.startswith("torch._inductor") or type(e).__name__ == "InductorError"
                    for e in _causes(error)):
        return False
    first = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # another process may be past this layer's collectives (FSDP, ZeRO-3): no process reruns alone
        raise UserError(f"--attn_implementation flex_attention: its kernel could not be compiled for a batch "
                        f"({first}); use --attn_implementation sdpa") from None
    print(f"fastdpo: FlexAttention's kernel could not be compiled here ({first}); computing attention with sdpa "
          "from now on", file=sys.stderr)
    model.set_attn_implementation("sdpa")
    return True


def _causes(error: BaseException):
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


def token_logps(model, scored: torch.Tensor, batch: Batch, head: str, chunk_size: int) -> torch.Tensor:
    """`forward_scored`'s output -> the log-prob of each scored token. Shape: (M,)."""
    if head == "full":
        return gather_logps(scored, batch.score_labels)
    lm_head = model.get_output_embeddings()
    if not isinstance(lm_head, torch.nn.Module):
        raise NoChunkedHead("it has no output embedding module")
    return head_logps(lm_head, scored, batch.score_labels, chunk_size)


def sum_per_sequence(token_logps: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(M,) token log-probs -> their sums and counts per sequence. Shape: (2B,), (2B,)."""
    num_seqs = 2 * batch.num_pairs
    logps = torch.zeros(num_seqs, dtype=torch.float32, device=token_logps.device)
    logps = logps.index_add(0, batch.score_seq, token_logps)  # (2B,)
    return logps, batch.score_counts  # (2B,), (2B,)


def attention_inputs(model, batch: Batch, per_segment: bool = False) -> dict:
    """The attention keywords of the model's forward: the mask (`attention_mask_for`); for flash-attention, no
    mask but the segments' lengths (`attention.varlen`); for a model set to attend per segment and a batch whose
    segments are long enough (attention.py), the segments and a placeholder mask. The placeholder cannot
    broadcast to any (L, L) scores: a model that does not hand the segments on to its attention function fails
    instead of attending to the whole row."""
    impl = getattr(model.config, "_attn_implementation", None) or ""
    if batch.segments is not None and impl.startswith("flash"):  # packed without prefix sharing: by segment lengths
        return dict(attention_mask=None, **attention.varlen(batch.segments, *batch.input_ids.shape,
                                                            batch.input_ids.device))
    if impl == attention.NAME and \
            (attention.worth_it(batch.segments) or per_segment and batch.segments):
        placeholder = torch.zeros((batch.input_ids.shape[0], 1, 0, 0), dtype=torch.bool, device=batch.input_ids.device)
        return dict(attention_mask=placeholder, fastdpo_segments=batch.segments)
    return dict(attention_mask=attention_mask_for(model, batch))


def attention_mask_for(model, batch: Batch) -> torch.Tensor:
    """The mask the model's attention takes: the concatenated layout's (R, L) padding mask, else the 4-D mask
    built once for this forward on the batch's device: FlexAttention's BlockMask, or for SDPA and eager attention
    additive (0 / lowest) in the dtype the attention computes in (the autocast dtype, else the weights'), which
    they use as it is in every layer."""
    if batch.segment_ids is None:
        return batch.padding_mask
    if getattr(model.config, "_attn_implementation", "sdpa") == "flex_attention":
        return batch.block_mask()
    device = batch.input_ids.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else \
        model.get_input_embeddings().weight.dtype
    return batch.additive_mask(dtype)


def backbone(model):
    """The transformer body of a causal LM (its forward returns `last_hidden_state`): the module named by
    `base_model_prefix`, else `model.model` (Llama 4's text-only LM keeps its body there while its prefix names the
    multimodal model's attribute)."""
    body = getattr(model, model.base_model_prefix, None)
    body = body if isinstance(body, torch.nn.Module) else getattr(model, "model", None)
    if not isinstance(body, torch.nn.Module):
        raise NoChunkedHead("no transformer body was found under its base_model_prefix or .model")
    return body


def split_pairs(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(2B,) -> chosen (B,), rejected (B,)."""
    half = values.shape[0] // 2
    return values[:half], values[half:]


class LogpsModule(torch.nn.Module):
    """`sequence_logps` of one model in one layout, as a module's forward, for accelerate to wrap. Data-parallel
    wrappers act in the wrapped module's forward: DDP arms its gradient all-reduce there, FSDP and DeepSpeed ZeRO-3
    gather sharded weights. fastdpo reaches past the model's own forward (its body, then the chunked head), so
    the wrapper goes around this."""

    def __init__(self, model, layout: Layout):
        super().__init__()
        self.model = model  # the only submodule: the parameters are the model's
        self.layout = layout
        # FSDP's transformer-based auto-wrap reads the layer classes to wrap from the module it is given
        self._no_split_modules = getattr(model, "_no_split_modules", None)

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return sequence_logps(self.model, batch, self.layout.head, self.layout.chunk_size)


# --- the start-up check: the fastest layout that is exact for the model --------------------------------------------

# What a model that cannot take a 4-D attention mask raises from its forward (a shape or a validation error);
# anything else is a bug and surfaces, and so does running out of memory.
MASK_REFUSALS = (RuntimeError, ValueError)


def requested_layout(cfg: Config) -> Layout:
    """The layout the config asks for."""
    chunked = cfg.logits_chunk_size > 0
    return Layout(share_prompt=cfg.prefix_sharing, pack=cfg.packing, head="chunked" if chunked else "full",
                  chunk_size=cfg.logits_chunk_size or 1, row_length=cfg.pack_length)


def choose_layout(cfg: Config, models: Sequence, sets: Sequence, pad_token_id: int, device, notice=print) -> Layout:
    """The one layout of a run: the requested one, narrowed by the start-up check until it is exact for every
    model in `models` (those that score its batches) on the data `sets` (each a PairSet or list of pairs)."""
    layout = requested_layout(cfg)
    sample = check_sample([p for pairs in sets for p in check_sample(pairs)])
    for model in dict.fromkeys(models):  # each distinct model once
        layout = check_layout(model, layout, sample, pad_token_id, device, notice)
    return layout


def check_sample(pairs: Sequence[TokenizedPair] | PairSet) -> list[TokenizedPair]:
    """For the exactness checks: the shortest pair and the longest (padding and packing both exercised), then the
    pair with the longest single sequence if that is another (what an attention window is measured against)."""
    if len(pairs) < 2:
        return list(pairs[:1])
    if isinstance(pairs, PairSet):  # found from the lengths, without building every pair
        n = pairs.lengths()
        shared, sequence = n.sum(axis=1), n[:, 0] + n[:, 1:].max(axis=1)
        pairs = [pairs[int(i)] for i in dict.fromkeys((shared.argmin(), shared.argmax(), sequence.argmax()))]
    shortest, longest = min(pairs, key=lambda p: p.shared_length), max(pairs, key=lambda p: p.shared_length)
    longest_sequence = max(pairs, key=lambda p: p.longest_sequence)
    extra = [longest_sequence] if longest_sequence.longest_sequence > longest.longest_sequence else []
    return [shortest, longest] + extra


@torch.no_grad()
def check_layout(model, requested: Layout, sample: Sequence[TokenizedPair], pad_token_id: int, device,
                 notice=print) -> Layout:
    """The requested layout, or the nearest one that gives this model the plain path's log-probs.

    `sample`: the data's shortest and longest pairs (`check_sample`). The comparisons run on the first two cut to
    8 and 16 tokens a part (the plain path builds the full (2B, T, V) logits); what only long sequences would show
    is read from the model's config (`length_limit`). Each fallback prints one notice saying why."""
    sequence = max(p.longest_sequence for p in sample)
    segment = max(p.shared_length for p in sample) if requested.share_prompt else sequence
    row = max(segment, requested.row_length) if requested.pack else segment
    pairs = [replace(p, prompt_ids=p.prompt_ids[:n], chosen_ids=p.chosen_ids[:n], rejected_ids=p.rejected_ids[:n])
             for p, n in zip(sample, (8, 16))]
    plain_batch = collate_concatenated(pairs, pad_token_id).to(device)
    plain, _ = sequence_logps(model, plain_batch, "full")
    layout = requested
    if layout.head == "chunked":
        reason = _head_problem(model, plain_batch, layout.chunk_size, plain)
        if reason:
            notice(f"fastdpo: {reason}; scoring through its full logits")
            layout = replace(layout, head="full")
    impl = getattr(model.config, "_attn_implementation", None) or ""
    if layout.share_prompt and impl.startswith("flash"):
        notice(f"fastdpo: attention '{impl}' takes no 4-D mask, which prefix sharing needs; " +
               ("packing by segment lengths without it" if layout.pack else "using the concatenated layout"))
        layout = replace(layout, share_prompt=False) if layout.pack else layout.without_mask()
    if not layout.concatenated:
        reason = _mask_problem(model, layout, pairs, pad_token_id, device, plain, (sequence, segment, row))
        if reason:
            notice(f"fastdpo: {reason}; prefix sharing and packing are off, using the concatenated layout")
            layout = layout.without_mask()
    if layout.per_segment:
        reason = _segments_problem(model, layout, pairs, pad_token_id, device, plain)
        if reason:
            notice(f"fastdpo: {reason}; attention takes the dense mask in every row")
        if reason is not None:
            layout = replace(layout, segments=False)
    return layout


def _head_problem(model, batch: Batch, chunk_size: int, plain: torch.Tensor) -> str | None:
    """Why the chunked head does not give this model's own logits' log-probs, or None."""
    try:
        chunked, _ = sequence_logps(model, batch, "chunked", chunk_size)
    except NoChunkedHead as e:
        return f"the chunked lm_head cannot run on this model: {e}"
    if not _close(chunked, plain):
        return f"this model's logits are not a plain lm_head (the chunked head is {_gap(chunked, plain)} apart)"
    return None


def _mask_problem(model, layout: Layout, pairs, pad_token_id: int, device, plain: torch.Tensor,
                  lengths: tuple[int, int, int]) -> str | None:
    """Why this model cannot take the layout's 4-D mask exactly, or None."""
    impl = getattr(model.config, "_attn_implementation", "sdpa")
    limit = length_limit(model.config, *lengths)
    if limit:
        return f"this model has {limit}"
    batch = layout.collate(pairs, pad_token_id).to(device)
    try:
        scored = forward_scored(model, batch, layout.head)
    except torch.cuda.OutOfMemoryError:
        raise
    except MASK_REFUSALS as e:
        first = (str(e).strip().splitlines() or [""])[0][:160]
        return f"the model's forward refused a 4-D attention mask ({type(e).__name__}: {first})"
    logps, _ = sum_per_sequence(token_logps(model, scored, batch, layout.head, layout.chunk_size), batch)
    if not _close(logps, plain):
        return (f"with attention '{impl}' and a 4-D mask this model does not give the plain path's log-probs "
                f"({_gap(logps, plain)} apart)")
    return None


def _segments_problem(model, layout: Layout, pairs, pad_token_id: int, device, plain: torch.Tensor) -> str | None:
    """Why attention per segment (attention.py) does not give this model the plain path's log-probs, which were
    computed with transformers' SDPA; "" where it does not apply (the model does not run SDPA), None where it
    is exact. The model is left running transformers' SDPA."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return ""
    batch = layout.collate(pairs, pad_token_id).to(device)
    attention.set_per_segment([model], True)
    try:
        scored = forward_scored(model, batch, layout.head, per_segment=True)
    except MASK_REFUSALS as e:
        first = (str(e).strip().splitlines() or [""])[0][:160]
        return f"attention per segment cannot run on this model ({type(e).__name__}: {first})"
    finally:
        attention.set_per_segment([model], False)
    logps, _ = sum_per_sequence(token_logps(model, scored, batch, layout.head, layout.chunk_size), batch)
    if not _close(logps, plain):
        return f"attention per segment does not give this model the plain path's log-probs ({_gap(logps, plain)} apart)"
    return None


def _close(logps: torch.Tensor, plain: torch.Tensor) -> bool:
    return bool(torch.allclose(logps, plain, rtol=1e-4, atol=1e-3))


def _gap(logps: torch.Tensor, plain: torch.Tensor) -> str:
    return f"up to {(logps - plain).abs().max().item():.3g} nats"


def length_limit(config, sequence: int, segment: int, row: int) -> str | None:
    """What makes the 4-D mask layouts inexact for this model at these lengths (tokens in the longest sequence,
    prefix-shared segment and row), or None.

    The 4-D mask replaces the model's own, so a window applied through the mask is lost wherever a sequence is
    longer than it: a sliding window (Mistral v0.1, Gemma 2/3, GPT-OSS, Phi-3 ...) or attention chunks (Llama 4).
    GPT-Neo's local window goes by distance in the row, which prefix sharing stretches; Llama 4's attention
    temperature goes by position in the row."""
    config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config  # Gemma 3 nests it
    types = tuple(getattr(config, "layer_types", None) or ())
    if getattr(config, "model_type", "") == "gpt_neo" and "local" in (getattr(config, "attention_layers", ()) or ()):
        if config.window_size < segment:
            return f"local attention windows of {config.window_size} tokens and rows of {segment}"
    chunk = getattr(config, "attention_chunk_size", None)
    if chunk and (not types or "chunked_attention" in types) and chunk < sequence:
        return f"attention chunks of {chunk} tokens and the data sequences of {sequence}"
    floor = getattr(config, "floor_scale", None)
    if getattr(config, "attn_temperature_tuning", False) and floor and row > floor:
        return f"attention temperatures that change at position {floor} and rows of {row}"
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) is not False and window < sequence and (
            not types or any("sliding" in t for t in types)):  # Qwen2 declares a window, off by default
        return f"sliding windows of {window} tokens and the data sequences of {sequence}"
    return None
