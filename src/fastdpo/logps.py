"""Model + batch -> per-sequence log-probabilities of the response tokens.

`logps[i] = sum_t mask[i, t+1] * log p(x[i, t+1] | x[i, :t+1])`: position t predicts token t+1, so the first
response token is scored from the last prompt position and neither prompt nor padding tokens count.
The log-softmax always runs in float32, whatever the model's precision.
"""

from __future__ import annotations

import torch

from fastdpo.batching import Batch


def sequence_logps(model, batch: Batch, head_only_responses: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs and response token counts per row. Shape: (2B,), (2B,).

    With `head_only_responses` the lm_head runs on response positions only (the (2B, T, V) logits are never
    built); otherwise the model's full logits are used. Both give the same numbers; `head_path_is_exact`
    checks that for a given model before the fast path is trusted.
    """
    labels = batch.input_ids[:, 1:]  # (2B, T-1)
    mask = batch.response_mask[:, 1:].bool()  # (2B, T-1)
    if head_only_responses:
        hidden = backbone(model)(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                 use_cache=False).last_hidden_state  # (2B, T, H)
        rows, cols = mask.nonzero(as_tuple=True)  # (M,), (M,) response positions
        logits = model.get_output_embeddings()(hidden[rows, cols])  # (M, V)
        token_logps = _gather_logps(logits, labels[rows, cols])  # (M,)
        logps = torch.zeros(mask.shape[0], dtype=torch.float32, device=logits.device)
        logps = logps.index_add(0, rows, token_logps)  # (2B,)
    else:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       use_cache=False).logits[:, :-1]  # (2B, T-1, V)
        token_logps = _gather_logps(logits, labels)  # (2B, T-1)
        logps = (token_logps * mask).sum(-1)  # (2B,)
    return logps, mask.sum(-1)


def _gather_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[label], in float32. Shape: logits (..., V), labels (...) -> (...)."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def backbone(model):
    """The transformer body of a causal LM (its forward returns `last_hidden_state`)."""
    return getattr(model, model.base_model_prefix)


@torch.no_grad()
def head_path_is_exact(model, batch: Batch, atol: float = 1e-4) -> bool:
    """True when the response-only lm_head path reproduces the model's own logits on `batch`.

    Models that scale or soft-cap their logits after the lm_head (Gemma 2, Cohere, Granite, ...) fail this check
    and are scored through their full logits instead.
    """
    try:
        fast, _ = sequence_logps(model, batch, head_only_responses=True)
    except (AttributeError, TypeError):
        return False
    plain, _ = sequence_logps(model, batch, head_only_responses=False)
    return bool(torch.allclose(fast, plain, atol=atol, rtol=1e-5))


def split_pairs(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(2B,) -> chosen (B,), rejected (B,)."""
    half = values.shape[0] // 2
    return values[:half], values[half:]

