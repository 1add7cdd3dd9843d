"""Model + batch -> per-sequence log-probabilities of the response tokens.

`logps[s] = sum over the scored tokens k of sequence s of log p(label_k | hidden[row_k, col_k])`: each response
token is scored from the hidden state that precedes it in its own sequence (see batching.py), so neither prompt
nor padding tokens count. The log-softmax always runs in float32, whatever the model's precision.

Two ways to get there, equal to float rounding:
- `head="full"`: the model's own logits `(R, L, V)`, gathered at the scored positions (the plain path);
- `head="chunked"`: the transformer body only, then the lm_head, log-softmax and gather at the scored positions,
  `chunk_size` rows at a time, inside a custom autograd function that recomputes each chunk's logits in backward.
  The `(R, L, V)` logits are never built and memory is O(chunk_size x V).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from fastdpo.batching import Batch, collate_concatenated, collate_packed, model_position_ids


def sequence_logps(model, batch: Batch, head: str = "chunked", chunk_size: int = 1024
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs and response token counts per sequence. Shape: (2B,), (2B,)."""
    num_seqs = 2 * batch.num_pairs
    mask = attention_mask_for(model, batch)
    if head == "full":
        logits = model(input_ids=batch.input_ids, attention_mask=mask, position_ids=model_position_ids(batch),
                       use_cache=False).logits  # (R, L, V)
        token_logps = _gather_logps(logits[batch.score_rows, batch.score_cols], batch.score_labels)  # (M,)
    else:
        hidden = backbone(model)(input_ids=batch.input_ids, attention_mask=mask,
                                 position_ids=model_position_ids(batch), use_cache=False).last_hidden_state
        hidden = hidden[batch.score_rows, batch.score_cols]  # (M, H)
        token_logps = head_logps(model.get_output_embeddings(), hidden, batch.score_labels, chunk_size)  # (M,)
    logps = torch.zeros(num_seqs, dtype=torch.float32, device=token_logps.device)
    logps = logps.index_add(0, batch.score_seq, token_logps)  # (2B,)
    counts = torch.bincount(batch.score_seq, minlength=num_seqs)  # (2B,)
    return logps, counts


def attention_mask_for(model, batch: Batch) -> torch.Tensor:
    """A 4-D boolean mask as the model's attention implementation wants it: SDPA and flex take booleans
    (True = attend); eager adds the mask to the scores, so it gets 0 / -inf."""
    mask = batch.attention_mask
    if mask.dim() == 4 and getattr(model.config, "_attn_implementation", "sdpa") == "eager":
        return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(
            ~mask, torch.finfo(torch.float32).min)
    return mask


def _gather_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[label], in float32. Shape: logits (..., V), labels (...) -> (...)."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def backbone(model):
    """The transformer body of a causal LM (its forward returns `last_hidden_state`): the module named by
    `base_model_prefix`, else `model.model` (Llama 4's text-only LM keeps its body there while its prefix names the
    multimodal model's attribute)."""
    body = getattr(model, model.base_model_prefix, None)
    return body if isinstance(body, torch.nn.Module) else model.model


def head_logps(head, hidden: torch.Tensor, labels: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """log softmax(head(hidden))[labels] per row, chunked. Shape: (M, H), (M,) -> (M,)."""
    if type(head) is torch.nn.Linear:
        return ChunkedHeadLogps.apply(hidden, head.weight, head.bias, labels, chunk_size)
    return _gather_logps(head(hidden), labels)  # a wrapped head (e.g. LoRA on lm_head): not chunked


class ChunkedHeadLogps(torch.autograd.Function):
    """`log_softmax(hidden @ W.T + b)[label]` computed `chunk` rows at a time; backward recomputes each chunk.

    d logp / d logits = onehot(label) - softmax(logits), so each chunk's gradient needs only its own recomputed
    logits and the forward's output (M floats). Matmuls run in the autocast dtype when autocast is on (as
    nn.Linear would); the softmax arithmetic is float32. One `(chunk, V)` buffer per pass is reused by every chunk
    and the softmax kernels work in place in it, row by row: no `(chunk, V)` or `(V, H)` temporaries are allocated
    per chunk, which keeps both the memory traffic and the allocator's churn down.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk):
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        w, b = weight.to(dtype), bias.to(dtype) if bias is not None else None  # cast once, not per chunk
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)  # (M,)
        logits = _chunk_buffer(hidden, weight, chunk, dtype)  # (c, V)
        # the log-softmax runs in float32: in place when the matmul is float32, else in a float32 copy
        scratch = logits if dtype == torch.float32 else _chunk_buffer(hidden, weight, chunk, torch.float32)
        with torch.autocast(device, enabled=False):
            for s in range(0, hidden.shape[0], chunk):
                c = min(chunk, hidden.shape[0] - s)
                z = _logits(hidden[s : s + c], w, b, out=logits[:c])  # (c, V)
                z = scratch[:c].copy_(z) if scratch is not logits else z
                torch._log_softmax(z, -1, False, out=z)
                out[s : s + c] = z.gather(-1, labels[s : s + c, None]).squeeze(-1)
        ctx.save_for_backward(hidden, weight, bias, labels, out)
        ctx.chunk, ctx.dtype = chunk, dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, labels, logps = ctx.saved_tensors
        dtype, device = ctx.dtype, hidden.device.type
        w, b = weight.to(dtype), bias.to(dtype) if bias is not None else None
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]  # a frozen lm_head (LoRA) needs no grad
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        alloc = torch.empty if hidden.shape[0] else torch.zeros  # no rows: no chunk writes the weight gradient
        grad_weight = alloc(weight.shape, dtype=torch.float32, device=weight.device) if need_weight \
            else None  # (V, H), summed in float32 over the chunks; the first chunk writes it
        # a float32 matmul accumulates into grad_weight directly; a lower-precision one writes one (V, H) buffer in
        # its dtype (CPU matmuls cannot write another dtype), which is added in float32. CPU kernels would cast it
        # into a new (V, H) temporary at every chunk, so it goes through one float32 staging buffer (CUDA casts
        # inside the kernel and needs none)
        partial = torch.empty(weight.shape, dtype=dtype, device=weight.device) \
            if need_weight and dtype != torch.float32 else None
        stage = torch.empty_like(grad_weight) \
            if partial is not None and weight.device.type == "cpu" and hidden.shape[0] > ctx.chunk else None
        grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_bias else None
        probs = _chunk_buffer(hidden, weight, ctx.chunk, dtype)  # (c, V)
        with torch.autocast(device, enabled=False):
            for s in range(0, hidden.shape[0], ctx.chunk):
                c = min(ctx.chunk, hidden.shape[0] - s)
                h, g, lab = hidden[s : s + c], grad_out[s : s + c, None], labels[s : s + c]
                # d logp / d logits = -(softmax - onehot): the softmax is taken in float32 inside the kernel and
                # stored in the matmul dtype; the label entries are set to p - 1 from the float32 forward output,
                # so a confident prediction's small 1 - p is not lost to rounding. -g scales the (c, H) side.
                p = _logits(h, w, b, out=probs[:c])  # (c, V)
                torch._softmax(p, -1, False, out=p)
                rows = torch.arange(c, device=p.device)  # index_put_, not scatter_ (CPU's bf16 scatter_ copies p twice)
                p.index_put_((rows, lab), (logps[s : s + c].exp() - 1).to(dtype))
                if need_hidden:
                    grad_hidden[s : s + c] = ((p @ w).float() * -g).to(hidden.dtype)  # (c, H)
                if need_weight:
                    hg = (h.float() * -g).to(dtype)  # (c, H)
                    if partial is None and s == 0:  # (V, H)
                        torch.mm(p.t(), hg, out=grad_weight)
                    elif partial is None:
                        grad_weight.addmm_(p.t(), hg)
                    else:
                        torch.mm(p.t(), hg, out=partial)
                        if s == 0:
                            grad_weight.copy_(partial)
                        else:
                            grad_weight.add_(stage.copy_(partial) if stage is not None else partial)
                if need_bias:
                    grad_bias.sub_((g.t().to(dtype) @ p).float().squeeze(0))
        grad_weight = grad_weight.to(weight.dtype) if need_weight else None
        grad_bias = grad_bias.to(bias.dtype) if need_bias else None
        return grad_hidden, grad_weight, grad_bias, None, None


def _chunk_buffer(hidden, weight, chunk: int, dtype) -> torch.Tensor:
    """An uninitialised (min(chunk, M), V) buffer for one chunk's logits."""
    return torch.empty(min(chunk, hidden.shape[0]), weight.shape[0], dtype=dtype, device=hidden.device)


def _logits(hidden, weight, bias, out: torch.Tensor) -> torch.Tensor:
    """hidden @ W.T + b in the weight's dtype, written into `out`. Shape: (c, H) -> (c, V)."""
    if bias is None:
        return torch.mm(hidden.to(weight.dtype), weight.t(), out=out)  # (c, V)
    return torch.addmm(bias, hidden.to(weight.dtype), weight.t(), out=out)


def split_pairs(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(2B,) -> chosen (B,), rejected (B,)."""
    half = values.shape[0] // 2
    return values[:half], values[half:]


# --- choosing the fastest exact path for a model -------------------------------------------------------------------


class Scorer:
    """Sequence log-probs of one model in the fastest layout and head path that are exact for it.

    `check()` compares the requested layout (prefix-shared / packed, chunked head) with the plain path (the
    concatenated layout through the model's full logits) on a few pairs, and falls back, with a one-line notice,
    where they differ: models whose attention cannot take a 4-D mask (FlashAttention-2), or that scale or cap their
    logits after the lm_head (Gemma 2, Cohere, Granite ...).
    """

    def __init__(self, model, pad_token_id: int, share_prompt: bool = True, pack: bool = True,
                 head: str = "chunked", chunk_size: int = 1024, row_length: int = 0):
        self.model, self.pad_token_id = model, pad_token_id
        self.share_prompt, self.pack, self.head = share_prompt, pack, head
        self.chunk_size, self.row_length = chunk_size, row_length
        self.runner = None  # the data-parallel wrapper of `ScorerModule(self)`, once accelerate has prepared it

    @property
    def layout(self) -> tuple:
        return self.share_prompt, self.pack, self.head

    def collate(self, pairs) -> Batch:
        if self.share_prompt or self.pack:
            return collate_packed(pairs, self.pad_token_id, self.share_prompt, self.pack, self.row_length)
        return collate_concatenated(pairs, self.pad_token_id)

    def __call__(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return self.runner(batch) if self.runner is not None else self.score(batch)

    def score(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's own forward in this scorer's layout and head path (what `ScorerModule` runs)."""
        return sequence_logps(self.model, batch, self.head, self.chunk_size)

    @torch.no_grad()
    def check(self, pairs, device, notice=print) -> "Scorer":
        """`pairs`: the data's shortest and longest pairs (`evaluate.check_sample`). The comparisons run on the
        first two cut to 8 and 16 tokens a part (the plain path builds the full (2B, T, V) logits); what only long
        sequences would show is read from the model's config (`length_limit`)."""
        sequence = max(p.longest_sequence for p in pairs)
        segment = max(p.shared_length for p in pairs) if self.share_prompt else sequence
        row = max(segment, self.row_length) if self.pack else segment
        pairs = [replace(p, prompt_ids=p.prompt_ids[:n], chosen_ids=p.chosen_ids[:n], rejected_ids=p.rejected_ids[:n],
                         reference_logps=None) for p, n in zip(pairs, (8, 16))]
        plain, _ = sequence_logps(self.model, collate_concatenated(pairs, self.pad_token_id).to(device), "full")
        if self.head == "chunked" and not _close(self._logps(pairs, device, share=False, pack=False), plain):
            notice("fastdpo: this model's logits are not a plain lm_head; scoring through its full logits")
            self.head = "full"
        if self.share_prompt or self.pack:
            impl = getattr(self.model.config, "_attn_implementation", "sdpa")
            limit = length_limit(self.model.config, sequence, segment, row)
            if limit:
                notice(f"fastdpo: this model has {limit}; prefix sharing and packing are off, using the "
                       "concatenated layout")
                self.share_prompt = self.pack = False
            elif impl.startswith("flash") or not _close(self._logps(pairs, device, self.share_prompt, self.pack),
                                                        plain):
                notice(f"fastdpo: attention '{impl}' cannot take a 4-D mask here; prefix sharing and packing are "
                       "off, using the concatenated layout")
                self.share_prompt = self.pack = False
        return self

    def _logps(self, pairs, device, share: bool, pack: bool) -> torch.Tensor | None:
        """Log-probs of `pairs` in the given layout with this scorer's head; None if the model refuses it."""
        saved = self.share_prompt, self.pack
        self.share_prompt, self.pack = share, pack
        try:
            return self(self.collate(pairs).to(device))[0]
        except (RuntimeError, ValueError, TypeError, AttributeError):
            return None
        finally:
            self.share_prompt, self.pack = saved


def _close(logps: torch.Tensor | None, plain: torch.Tensor) -> bool:
    return logps is not None and bool(torch.allclose(logps, plain, rtol=1e-4, atol=1e-3))


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


class ScorerModule(torch.nn.Module):
    """A scorer's forward as a module's, for accelerate to wrap. Data-parallel wrappers act in the wrapped module's
    forward: DDP arms its gradient all-reduce there, FSDP and DeepSpeed ZeRO-3 gather sharded weights. The scorer
    reaches past the model's own forward (its body, then the chunked head), so the wrapper goes around this."""

    def __init__(self, scorer: Scorer):
        super().__init__()
        self.model = scorer.model  # the only submodule: the parameters are the model's
        self._scorer = (scorer,)  # a tuple, so the scorer is not registered as a submodule
        # FSDP's transformer-based auto-wrap reads the layer classes to wrap from the module it is given
        self._no_split_modules = getattr(scorer.model, "_no_split_modules", None)

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return self._scorer[0].score(batch)
