"""The chunked lm_head: `log_softmax(hidden @ W.T + b)[label]` for the scored rows, without the (M, V) logits.

`ChunkedHeadLogps` runs `chunk` rows at a time inside a custom autograd function and recomputes each chunk's
logits in backward, so memory is O(chunk x V). Matmuls run in the autocast dtype when autocast is on (as
nn.Linear would); the softmax arithmetic is float32. Branches that exist for torch's CPU kernels are marked
`# CPU:`; on CUDA they are skipped or harmless.
"""

from __future__ import annotations

import torch


def gather_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[label], in float32. Shape: logits (..., V), labels (...) -> (...)."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def head_logps(head, hidden: torch.Tensor, labels: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """log softmax(head(hidden))[labels] per row, chunked. Shape: (M, H), (M,) -> (M,).

    An lm_head that is an FSDP2 unit of its own holds only its shard between forwards: there the chunked head runs
    as that unit's `chunked_logps` method, which FSDP treats as a forward (`runtime.Runtime._fully_shard`), so the
    weight is gathered for it and its gradient reduce-scattered after backward."""
    if plain_linear(head):
        method = getattr(head, "chunked_logps", None)
        return method(hidden, labels, chunk_size) if method else chunked_logps(head, hidden, labels, chunk_size)
    return gather_logps(head(hidden), labels)  # a wrapped head (e.g. LoRA on lm_head): not chunked


def chunked_logps(head: torch.nn.Linear, hidden: torch.Tensor, labels: torch.Tensor, chunk_size: int):
    """The chunked head of one nn.Linear, with the weight it holds now. Shape: (M, H), (M,) -> (M,)."""
    return ChunkedHeadLogps.apply(hidden, head.weight, head.bias, labels, chunk_size)


def plain_linear(head) -> bool:
    """`head` computes `hidden @ W.T + b` and nothing else: an nn.Linear (not a subclass, whose forward may differ,
    nor a wrapper such as LoRA's), or FSDP2's unit of one (its class `FSDPLinear(FSDPModule, Linear)`)."""
    cls = type(head)
    if cls is torch.nn.Linear:
        return True
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch built without distributed
        return False
    return cls.__bases__ == (FSDPModule, torch.nn.Linear)


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
        # its dtype (CPU matmuls cannot write another dtype), which is added in float32.
        # CPU: the kernels would cast it into a new (V, H) temporary at every chunk, so it goes through one float32
        # staging buffer (CUDA casts inside the kernel and needs none)
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
                # CPU: index_put_, not scatter_ (the CPU bf16 scatter_ copies the whole block in and out)
                rows = torch.arange(c, device=p.device)
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


