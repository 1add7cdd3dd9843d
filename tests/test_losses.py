"""Losses: hand-computed values, reward metrics, and each loss's gradient pushing chosen up and rejected down."""

import math

import pytest
import torch

from fastdpo.losses import LOSSES, REFERENCE_FREE, pair_metrics, preference_loss


def zeros(n):
    return torch.zeros(n)


def test_sigmoid_hand_computed():
    """β = 0.1, margins [0, 10, 20]: -log σ(0) = 0.6931, -log σ(1) = 0.3133, -log σ(2) = 0.1269."""
    losses = LOSSES["sigmoid"](torch.tensor([0.0, 10.0, 20.0]), zeros(3), zeros(3), zeros(3), beta=0.1)
    torch.testing.assert_close(losses, torch.tensor([0.6931, 0.3133, 0.1269]), atol=1e-4, rtol=0)


def test_conservative_dpo_label_smoothing():
    """ε = 0.1, β·margin = 1: 0.9·(-log σ(1)) + 0.1·(-log σ(-1)) = 0.9·0.31326 + 0.1·1.31326 = 0.41326."""
    loss = LOSSES["sigmoid"](torch.tensor([10.0]), zeros(1), zeros(1), zeros(1), beta=0.1, label_smoothing=0.1)
    assert abs(loss.item() - 0.41326) < 1e-4


def test_ipo_hinge_sppo_hand_computed():
    """β = 0.5. IPO: log-ratios per token 4/2 - 1/1 = 1, (1 - 1/(2·0.5))² = 0. Hinge: relu(1 - 0.5·3) = 0.
    SPPO: (4 - 1)² + (1 + 1)² = 13."""
    pc, pr = torch.tensor([4.0]), torch.tensor([1.0])
    kw = dict(beta=0.5, chosen_tokens=torch.tensor([2]), rejected_tokens=torch.tensor([1]))
    assert LOSSES["ipo"](pc, pr, zeros(1), zeros(1), **kw).item() == 0.0
    assert LOSSES["hinge"](pc, pr, zeros(1), zeros(1), **kw).item() == 0.0
    assert LOSSES["sppo_hard"](pc, pr, zeros(1), zeros(1), **kw).item() == 13.0


def test_simpo_hand_computed():
    """β = 2, γ = 0.5: avg logps -1/1 and -4/2 → -log σ(2·(−1 + 2) − 0.5) = -log σ(1.5) = 0.20141."""
    loss = LOSSES["simpo"](torch.tensor([-1.0]), torch.tensor([-4.0]), None, None, beta=2.0, simpo_gamma=0.5,
                           chosen_tokens=torch.tensor([1]), rejected_tokens=torch.tensor([2]))
    assert abs(loss.item() - 0.20141) < 1e-4


def test_rewards_margins_and_strict_accuracy():
    pc, pr = torch.tensor([-1.0, -2.0, -3.0]), torch.tensor([-2.0, -2.0, -1.0])
    ref = torch.tensor([-1.5, -2.0, -2.0])
    tokens = torch.tensor([1, 1, 1])
    losses, chosen, rejected = preference_loss("sigmoid", pc, pr, ref, ref, beta=0.5, chosen_tokens=tokens,
                                               rejected_tokens=tokens)
    torch.testing.assert_close(chosen, torch.tensor([0.25, 0.0, -0.5]))
    torch.testing.assert_close(rejected, torch.tensor([-0.25, 0.0, 0.5]))
    metrics = pair_metrics(losses, chosen, rejected, pc, pr, tokens, tokens)
    assert metrics["rewards/accuracies"].tolist() == [1.0, 0.0, 0.0]  # a tie is not a win
    torch.testing.assert_close(metrics["rewards/margins"], torch.tensor([0.5, 0.0, -1.0]))


def test_rpo_adds_the_chosen_mean_token_nll():
    """α = 2: loss + 2·(6/3) = loss + 4."""
    kw = dict(beta=0.1, chosen_tokens=torch.tensor([3]), rejected_tokens=torch.tensor([2]))
    args = (torch.tensor([-6.0]), torch.tensor([-5.0]), torch.tensor([-6.0]), torch.tensor([-5.0]))
    plain, _, _ = preference_loss("sigmoid", *args, **kw)
    rpo, _, _ = preference_loss("sigmoid", *args, rpo_alpha=2.0, **kw)
    assert abs(rpo.item() - plain.item() - 4.0) < 1e-6
    assert abs(plain.item() - math.log(2)) < 1e-6


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_gradient_raises_chosen_and_lowers_rejected(name):
    """At pairs the policy still gets wrong (negative margins). DiscoPOP is non-monotonic for small positive
    margins near zero by design (arXiv:2406.08414), so the check is made where every variant must push."""
    pc = torch.tensor([-12.0, -12.0], requires_grad=True)
    pr = torch.tensor([-9.0, -9.0], requires_grad=True)
    rc, rr = torch.tensor([-10.5, -12.0]), torch.tensor([-11.0, -11.0])
    losses, _, _ = preference_loss(name, pc, pr, rc, rr, beta=0.1, label_smoothing=0.1,
                                   chosen_tokens=torch.tensor([5, 6]), rejected_tokens=torch.tensor([5, 4]))
    losses.sum().backward()
    if name == "apo_down":
        # APO-down lowers both likelihoods, the rejected one more: the margin still grows.
        assert (pc.grad - pr.grad < 0).all()
        assert (pr.grad > 0).all()
    else:
        assert (pc.grad < 0).all(), pc.grad  # gradient descent raises the chosen log-prob
        assert (pr.grad > 0).all(), pr.grad  # and lowers the rejected one


def test_reference_free_losses_ignore_the_reference():
    kw = dict(beta=2.0, chosen_tokens=torch.tensor([3]), rejected_tokens=torch.tensor([2]))
    for name in REFERENCE_FREE:
        a = LOSSES[name](torch.tensor([-3.0]), torch.tensor([-4.0]), torch.tensor([0.0]), torch.tensor([0.0]), **kw)
        b = LOSSES[name](torch.tensor([-3.0]), torch.tensor([-4.0]), torch.tensor([5.0]), torch.tensor([9.0]), **kw)
        assert a.item() == b.item()


def test_a_misspelled_loss_parameter_is_an_error():
    pc, pr, zero = torch.tensor([-1.0]), torch.tensor([-2.0]), zeros(1)
    tokens = torch.tensor([1])
    with pytest.raises(TypeError, match="no loss's parameter"):
        preference_loss("sigmoid", pc, pr, zero, zero, beta=0.1, chosen_tokens=tokens, rejected_tokens=tokens,
                        label_smothing=0.1)
    with pytest.raises(TypeError, match="loss 'hinge' takes no parameter 'label_smoothing'"):
        LOSSES["hinge"](pc, pr, zero, zero, beta=0.1, label_smoothing=0.1)


def test_the_table_knows_each_losss_parameters_and_reference():
    assert REFERENCE_FREE == {"simpo", "orpo"}
    assert LOSSES["discopop"].params == ("discopop_tau",) and LOSSES["simpo"].params == ("simpo_gamma",)
    assert {n for n, row in LOSSES.items() if "label_smoothing" in row.params} == {
        "sigmoid", "robust", "exo_pair", "aot", "aot_unpaired"}  # what TRL 1.16 applies label smoothing to, + cDPO
