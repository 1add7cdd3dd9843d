"""The DPO loss family as pure tensor functions, and the table that selects one.

Every loss takes the summed response log-probs of the policy and the reference, `Shape: (B,)` each, `beta`, and
the keyword parameters its table row names, and returns the per-pair loss, `Shape: (B,)`. `LOSSES` maps a name
to a `Loss` row: its function, its parameters (each a config field of the same name), whether it reads the
reference log-probs and whether it reads the response lengths. The config, the `eval` flags and the option
reference in docs/ all read this table, so adding a variant is one function and one row.

Notation: `chosen_logratios = policy_chosen_logps - reference_chosen_logps` (likewise rejected) and
`logits = chosen_logratios - rejected_logratios`. Each function computes what TRL 1.16's `loss_type` of the same
name computes (checked by tests/test_trl_parity.py), except where its docstring says otherwise.

torch is not imported at module level: the config validates a loss name and its parameters from this table
without loading torch. The functions use tensor methods, and `_logsigmoid` imports the one function they need.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from torch import Tensor


def _logsigmoid(x: Tensor) -> Tensor:
    """log σ(x), stable for large |x|."""
    from torch.nn.functional import logsigmoid

    return logsigmoid(x)


def _logratios(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor) -> tuple[Tensor, Tensor]:
    return pc - rc, pr - rr


def sigmoid(pc, pr, rc, rr, *, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """DPO, Eq 7 of arXiv:2305.18290: `-log σ(β·logits)`.

    With `label_smoothing = ε > 0` this is conservative DPO (cDPO, Mitchell 2023): the labels are flipped with
    probability ε, `-(1-ε)·log σ(β·logits) - ε·log σ(-β·logits)`. (TRL 1.16's `sigmoid` ignores label
    smoothing; at ε = 0 the two are identical.)
    """
    cl, rl = _logratios(pc, pr, rc, rr)
    logits = beta * (cl - rl)
    return -(1 - label_smoothing) * _logsigmoid(logits) - label_smoothing * _logsigmoid(-logits)


def hinge(pc, pr, rc, rr, *, beta: float) -> Tensor:
    """SLiC hinge loss, arXiv:2305.10425: `relu(1 - β·logits)`."""
    cl, rl = _logratios(pc, pr, rc, rr)
    return (1 - beta * (cl - rl)).relu()


def ipo(pc, pr, rc, rr, *, beta: float, chosen_tokens: Tensor, rejected_tokens: Tensor) -> Tensor:
    """IPO, Eq 17 of arXiv:2310.12036: `(logits - 1/(2β))²` with β as the paper's τ.

    The log-ratios are averaged per response token (divided by each response's length) before the difference,
    as TRL does and as the IPO authors confirmed their results were computed; the paper writes sequence sums.
    """
    cl, rl = _logratios(pc, pr, rc, rr)
    delta = cl / chosen_tokens.clamp(min=1) - rl / rejected_tokens.clamp(min=1)
    return (delta - 1 / (2 * beta)) ** 2


def robust(pc, pr, rc, rr, *, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """Robust DPO, Eq 21 of arXiv:2403.00409: an unbiased loss under label-flip rate ε = label_smoothing < 0.5,
    `(-(1-ε)·log σ(β·logits) + ε·log σ(-β·logits)) / (1 - 2ε)`."""
    cl, rl = _logratios(pc, pr, rc, rr)
    logits = beta * (cl - rl)
    eps = label_smoothing
    return (-(1 - eps) * _logsigmoid(logits) + eps * _logsigmoid(-logits)) / (1 - 2 * eps)


def exo_pair(pc, pr, rc, rr, *, beta: float, label_smoothing: float = 1e-3) -> Tensor:
    """EXO, Eq 16 of arXiv:2402.00856, K = 2: `KL(q || p)` with `q = softmax(β·[cl, rl])` and the smoothed
    labels `p = [1-ε, ε]` (ε = label_smoothing > 0; the paper suggests 1e-3)."""
    cl, rl = _logratios(pc, pr, rc, rr)
    logits = beta * (cl - rl)
    qw, ql = logits.sigmoid(), (-logits).sigmoid()
    eps = label_smoothing
    return qw * (_logsigmoid(logits) - math.log1p(-eps)) + ql * (_logsigmoid(-logits) - math.log(eps))


def nca_pair(pc, pr, rc, rr, *, beta: float) -> Tensor:
    """NCA, arXiv:2402.05369 (pairwise form): `-log σ(r_w) - ½ log σ(-r_w) - ½ log σ(-r_l)`, r = β·logratio."""
    cl, rl = _logratios(pc, pr, rc, rr)
    rw, rlo = beta * cl, beta * rl
    return -_logsigmoid(rw) - 0.5 * _logsigmoid(-rw) - 0.5 * _logsigmoid(-rlo)


def bco_pair(pc, pr, rc, rr, *, beta: float) -> Tensor:
    """BCO, arXiv:2404.04656 (pairwise, without the running reward shift, as TRL 1.16):
    `-log σ(β·cl) - log σ(-β·rl)`."""
    cl, rl = _logratios(pc, pr, rc, rr)
    return -_logsigmoid(beta * cl) - _logsigmoid(-beta * rl)


def sppo_hard(pc, pr, rc, rr, *, beta: float) -> Tensor:
    """SPPO, Eq 4.7 of arXiv:2405.00675 with hard win probabilities (1 for chosen, 0 for rejected):
    `(cl - 1/(2β))² + (rl + 1/(2β))²`."""
    cl, rl = _logratios(pc, pr, rc, rr)
    return (cl - 0.5 / beta) ** 2 + (rl + 0.5 / beta) ** 2


def _smoothed_logsigmoid(delta: Tensor, label_smoothing: float) -> Tensor:
    return -_logsigmoid(delta) * (1 - label_smoothing) - _logsigmoid(-delta) * label_smoothing


def aot(pc, pr, rc, rr, *, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """AOT (paired), arXiv:2406.05882: DPO's loss on the batch-sorted policy log-ratios (chosen - rejected)
    against the batch-sorted reference ones, enforcing first-order stochastic dominance across the batch.
    The i-th loss belongs to the i-th quantile, not to pair i."""
    policy_sorted = (pc - pr).sort(dim=0).values
    reference_sorted = (rc - rr).sort(dim=0).values
    return _smoothed_logsigmoid(beta * (policy_sorted - reference_sorted), label_smoothing)


def aot_unpaired(pc, pr, rc, rr, *, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """AOT (unpaired), arXiv:2406.05882: batch-sorted chosen log-ratios against batch-sorted rejected ones."""
    cl, rl = _logratios(pc, pr, rc, rr)
    chosen_sorted, rejected_sorted = cl.sort(dim=0).values, rl.sort(dim=0).values
    return _smoothed_logsigmoid(beta * (chosen_sorted - rejected_sorted), label_smoothing)


def apo_zero(pc, pr, rc, rr, *, beta: float) -> Tensor:
    """APO-zero, Eq 7 of arXiv:2408.06266 (chosen better than the model's outputs): raise chosen, lower rejected,
    `1 - σ(β·cl) + σ(β·rl)`."""
    cl, rl = _logratios(pc, pr, rc, rr)
    return 1 - (beta * cl).sigmoid() + (beta * rl).sigmoid()


def apo_down(pc, pr, rc, rr, *, beta: float) -> Tensor:
    """APO-down, Eq 8 of arXiv:2408.06266 (chosen worse than the model's outputs): lower both, rejected more,
    `σ(β·cl) + 1 - σ(β·(cl - rl))`."""
    cl, rl = _logratios(pc, pr, rc, rr)
    return (beta * cl).sigmoid() + 1 - (beta * (cl - rl)).sigmoid()


def discopop(pc, pr, rc, rr, *, beta: float, discopop_tau: float = 0.05) -> Tensor:
    """DiscoPOP, Eq 5 of arXiv:2406.08414: a log-ratio-modulated blend of the logistic and exponential losses,
    `(1 - σ(β·logits/τ))·(-log σ(β·logits)) + σ(β·logits/τ)·exp(-β·logits)`."""
    cl, rl = _logratios(pc, pr, rc, rr)
    logits = beta * (cl - rl)
    mix = (logits / discopop_tau).sigmoid()
    return -_logsigmoid(logits) * (1 - mix) + (-logits).exp() * mix


def sigmoid_norm(pc, pr, rc, rr, *, beta: float, chosen_tokens: Tensor, rejected_tokens: Tensor) -> Tensor:
    """Length-normalised DPO (as TRL's `sigmoid_norm`): `-log σ(β·(cl/|y_w| - rl/|y_l|))`."""
    cl, rl = _logratios(pc, pr, rc, rr)
    return -_logsigmoid(beta * (cl / chosen_tokens.clamp(min=1) - rl / rejected_tokens.clamp(min=1)))


def simpo(pc, pr, rc, rr, *, beta: float, simpo_gamma: float = 0.5, chosen_tokens: Tensor,
          rejected_tokens: Tensor) -> Tensor:
    """SimPO, Eq 6 of arXiv:2405.14734 (reference-free): `-log σ(β·(pc/|y_w| - pr/|y_l|) - γ)`.

    γ (`simpo_gamma`) is the paper's target reward margin; TRL's CPO trainer takes γ/β instead
    (`cpo_alpha=0, simpo_gamma=γ/β`). The paper's settings use β around 2 to 10."""
    avg_chosen = pc / chosen_tokens.clamp(min=1)
    avg_rejected = pr / rejected_tokens.clamp(min=1)
    return -_logsigmoid(beta * (avg_chosen - avg_rejected) - simpo_gamma)


def orpo(pc, pr, rc, rr, *, beta: float, chosen_tokens: Tensor, rejected_tokens: Tensor) -> Tensor:
    """ORPO, Eq 6-7 of arXiv:2403.07691 (reference-free): the chosen NLL per token plus λ·(-log σ(log odds
    ratio)), with λ = β and `odds(y) = p/(1-p)`, p the per-token average probability of the response.

    The NLL term is averaged per pair (each chosen response's mean token NLL) rather than over the batch's tokens
    as TRL's ORPOTrainer does; the two agree when chosen responses have equal lengths."""
    avg_chosen = pc / chosen_tokens.clamp(min=1)
    avg_rejected = pr / rejected_tokens.clamp(min=1)
    log_odds = (avg_chosen - avg_rejected) - (_log1mexp(avg_chosen) - _log1mexp(avg_rejected))
    return -avg_chosen - beta * _logsigmoid(log_odds)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, stable near 0 (Mächler 2012)."""
    x = x.clamp(max=-1e-7)
    return (-x.expm1()).log().where(x > -math.log(2), (-x.exp()).log1p())


# --- the table ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Loss:
    """One loss variant: its function and what it reads. Calling the row calls the function with the keywords
    it takes; a parameter it does not take is an error (so a misspelled one never goes unnoticed)."""

    fn: Callable[..., Tensor]
    params: tuple[str, ...] = ()  # keyword parameters besides beta, each a config field of the same name
    reference: bool = True  # False: reference-free, the reference log-probs are never read
    lengths: bool = False  # reads the response token counts (chosen_tokens, rejected_tokens)

    def __call__(self, pc, pr, rc, rr, *, beta: float, chosen_tokens=None, rejected_tokens=None,
                 **params) -> Tensor:
        unknown = sorted(set(params) - set(self.params))
        if unknown:
            raise TypeError(f"loss {self.fn.__name__!r} takes no parameter {unknown[0]!r} (its parameters: "
                            f"{', '.join(('beta', *self.params))})")
        if self.lengths:
            params.update(chosen_tokens=chosen_tokens, rejected_tokens=rejected_tokens)
        return self.fn(pc, pr, rc, rr, beta=beta, **params)


LOSSES: dict[str, Loss] = {
    "sigmoid": Loss(sigmoid, ("label_smoothing",)),
    "ipo": Loss(ipo, lengths=True),
    "hinge": Loss(hinge),
    "robust": Loss(robust, ("label_smoothing",)),
    "exo_pair": Loss(exo_pair, ("label_smoothing",)),
    "nca_pair": Loss(nca_pair),
    "bco_pair": Loss(bco_pair),
    "sppo_hard": Loss(sppo_hard),
    "aot": Loss(aot, ("label_smoothing",)),
    "aot_unpaired": Loss(aot_unpaired, ("label_smoothing",)),
    "apo_zero": Loss(apo_zero),
    "apo_down": Loss(apo_down),
    "discopop": Loss(discopop, ("discopop_tau",)),
    "sigmoid_norm": Loss(sigmoid_norm, lengths=True),
    "simpo": Loss(simpo, ("simpo_gamma",), reference=False, lengths=True),
    "orpo": Loss(orpo, reference=False, lengths=True),
}
REFERENCE_FREE = frozenset(name for name, row in LOSSES.items() if not row.reference)
PARAMETERS = tuple(dict.fromkeys(p for row in LOSSES.values() for p in row.params))  # every loss parameter, once


def users_of(param: str) -> list[str]:
    """The losses that take `param`."""
    return [name for name, row in LOSSES.items() if param in row.params]


def preference_loss(
    loss: str,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float,
    chosen_tokens: Tensor,
    rejected_tokens: Tensor,
    rpo_alpha: float = 0.0,
    **params,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair losses and implicit rewards. Shape: (B,) each.

    `params` are loss parameters (`PARAMETERS`); those of other losses are not passed on, and a keyword that is no
    loss's parameter is an error. `rewards = β·(policy_logps - reference_logps)`, detached (for reference-free
    losses the reference log-probs are zeros, so the reward is β·policy_logps). `rpo_alpha > 0` adds the chosen
    response's mean token NLL times α (RPO, arXiv:2404.19733).
    """
    unknown = sorted(set(params) - set(PARAMETERS))
    if unknown:
        raise TypeError(f"preference_loss() got {unknown[0]!r}, which is no loss's parameter "
                        f"(parameters: {', '.join(PARAMETERS)})")
    row = LOSSES[loss]
    losses = row(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                 beta=beta, chosen_tokens=chosen_tokens, rejected_tokens=rejected_tokens,
                 **{k: v for k, v in params.items() if k in row.params})
    if rpo_alpha:
        losses = losses + rpo_alpha * (-policy_chosen_logps / chosen_tokens.clamp(min=1))
    chosen_rewards = beta * (policy_chosen_logps - reference_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - reference_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


def pair_metrics(losses, chosen_rewards, rejected_rewards, policy_chosen_logps, policy_rejected_logps,
                 chosen_tokens, rejected_tokens) -> dict[str, Tensor]:
    """Per-pair metric values with TRL's names; their means are the reported metrics. Shape: (B,) each."""
    return {
        "loss": losses.detach().float(),
        "rewards/chosen": chosen_rewards.float(),
        "rewards/rejected": rejected_rewards.float(),
        "rewards/margins": (chosen_rewards - rejected_rewards).float(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
        "logps/chosen": policy_chosen_logps.detach().float(),
        "logps/rejected": policy_rejected_logps.detach().float(),
        "tokens/chosen": chosen_tokens.float(),
        "tokens/rejected": rejected_tokens.float(),
    }
