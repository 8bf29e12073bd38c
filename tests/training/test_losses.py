"""SmPO / Diffusion-DPO / SFT losses against closed-form values on hand-built tensors."""

import math

import pytest
import torch

from smpo_cli.errors import UsageError
from smpo_cli.training.losses import diffusion_dpo_loss, per_sample_mse, preference_loss, sft_loss, smpo_loss


def nll_sigmoid(x: float) -> float:
    return -math.log(1.0 / (1.0 + math.exp(-x)))


def pair(values):
    """(1, 1, 2, 2) tensor from four numbers."""
    return torch.tensor(values, dtype=torch.float32).reshape(1, 1, 2, 2)


def test_per_sample_mse():
    assert per_sample_mse(pair([1, 2, 3, 4]), pair([0, 0, 0, 0])).item() == pytest.approx((1 + 4 + 9 + 16) / 4)


def test_dpo_closed_form():
    target_w, target_l = pair([0, 0, 0, 0]), pair([1, 1, 1, 1])
    model_w, ref_w = pair([1, 1, 1, 1]), pair([2, 2, 2, 2])  # model MSE 1, ref MSE 4 on the winner
    model_l, ref_l = pair([1, 1, 1, 3]), pair([1, 1, 1, 1])  # model MSE 1, ref MSE 0 on the loser
    out = diffusion_dpo_loss(model_w, model_l, ref_w, ref_l, target_w, target_l, beta=0.5)
    d_w, d_l = 1 - 4, 1 - 0
    expected = nll_sigmoid(-0.5 * 0.5 * (d_w - d_l))
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    assert out.inside.item() == pytest.approx(-0.25 * (d_w - d_l))
    assert (out.model_mse_w.item(), out.ref_mse_w.item(), out.model_mse_l.item(), out.ref_mse_l.item()) == (1, 4, 1, 0)
    assert out.implicit_acc.item() == 1.0 and out.reward_margin.item() == pytest.approx(4.0)
    assert out.loss.item() < math.log(2)  # closer to the winner's target than the reference: below log 2


def test_smpo_closed_form_and_per_pair_p():
    torch.manual_seed(0)
    shape = (3, 4, 2, 2)
    mw, ml, rw, rl, tw, tl = (torch.randn(shape) for _ in range(6))
    p = torch.tensor([0.9, 0.5, 0.6])
    out = smpo_loss(mw, ml, rw, rl, tw, tl, beta=2.0, gamma=3.0, p=p)
    for i in range(3):
        d_w = per_sample_mse(mw[i : i + 1], tw[i : i + 1]) - per_sample_mse(rw[i : i + 1], tw[i : i + 1])
        d_l = per_sample_mse(ml[i : i + 1], tl[i : i + 1]) - per_sample_mse(rl[i : i + 1], tl[i : i + 1])
        coef = 2.0 * 3.0 * (2 * p[i].item() - 1)
        assert out.per_pair_loss[i].item() == pytest.approx(nll_sigmoid(-0.5 * coef * (d_w - d_l).item()), rel=1e-5)
        single = smpo_loss(mw[i : i + 1], ml[i : i + 1], rw[i : i + 1], rl[i : i + 1], tw[i : i + 1], tl[i : i + 1],
                           beta=2.0, gamma=3.0, p=p[i : i + 1])  # fmt: skip
        assert single.loss.item() == pytest.approx(out.per_pair_loss[i].item(), rel=1e-6)
    assert out.per_pair_loss[1].item() == pytest.approx(math.log(2))


def test_p_one_half_gives_exactly_zero_gradient():
    mw, ml = (torch.randn(2, 4, 2, 2, requires_grad=True) for _ in range(2))
    rw, rl, tw, tl = (torch.randn(2, 4, 2, 2) for _ in range(4))
    out = smpo_loss(mw, ml, rw, rl, tw, tl, beta=5000.0, gamma=10.0, p=torch.tensor([0.5, 0.5]))
    out.loss.backward()
    assert out.loss.item() == pytest.approx(math.log(2))
    assert torch.count_nonzero(mw.grad) == 0 and torch.count_nonzero(ml.grad) == 0


def test_smpo_with_p_one_and_gamma_one_is_dpo():
    args = [torch.randn(2, 4, 2, 2) for _ in range(6)]
    a = smpo_loss(*args, beta=7.0, gamma=1.0, p=torch.ones(2))
    b = diffusion_dpo_loss(*args, beta=7.0)
    assert torch.allclose(a.per_pair_loss, b.per_pair_loss)


def test_large_magnitudes_are_stable_and_fp16_gives_fp32():
    args = [torch.randn(2, 4, 2, 2).half() * 100 for _ in range(6)]
    out = diffusion_dpo_loss(*args, beta=5000.0)
    assert torch.isfinite(out.loss) and out.loss.dtype == torch.float32


def test_sft_and_dispatch_and_errors():
    pred, target = pair([1, 1, 1, 1]), pair([0, 0, 0, 0])
    assert sft_loss(pred, target).item() == 1.0
    args = [torch.randn(1, 4, 2, 2) for _ in range(6)]
    assert preference_loss("dpo", *args, beta=1.0, gamma=3.0, p=torch.ones(1)).loss.item() == pytest.approx(
        diffusion_dpo_loss(*args, beta=1.0).loss.item()
    )
    with pytest.raises(UsageError, match="one shape"):
        diffusion_dpo_loss(torch.zeros(2, 4, 2, 2), *args[1:], beta=1.0)
    with pytest.raises(UsageError, match=r"\[0, 1\]"):
        smpo_loss(*args, beta=1.0, gamma=1.0, p=torch.tensor([1.5]))
    with pytest.raises(UsageError, match="one p per pair"):
        smpo_loss(*args, beta=1.0, gamma=1.0, p=torch.tensor([0.6, 0.7]))
    with pytest.raises(UsageError):
        preference_loss("ppo", *args, beta=1.0)
