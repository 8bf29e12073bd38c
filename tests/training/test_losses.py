"""SmPO / Diffusion-DPO / SFT losses against closed-form values on hand-built tensors."""

import math

import pytest
import torch

from smpo_cli.errors import UsageError
from smpo_cli.training.losses import (
    PreferenceLossOutput,
    diffusion_dpo_loss,
    per_sample_mse,
    preference_loss,
    sft_loss,
    smpo_loss,
)

LOG2 = math.log(2.0)


def nll_sigmoid(x: float) -> float:
    """-log sigmoid(x), written out."""
    return -math.log(1.0 / (1.0 + math.exp(-x)))


def img(*values: float) -> torch.Tensor:
    """A (1, 1, 2, 2) tensor from four numbers."""
    return torch.tensor(values, dtype=torch.float32).reshape(1, 1, 2, 2)


def hand_pair():
    """One pair with exactly known MSEs: model 1 / ref 4 on the winner, model 1 / ref 0 on the loser.

    d_w = 1 - 4 = -3, d_l = 1 - 0 = 1, d_w - d_l = -4: the model moved towards the winner.
    """
    target_w, target_l = img(0, 0, 0, 0), img(1, 1, 1, 1)
    model_w, ref_w = img(1, 1, 1, 1), img(2, 2, 2, 2)
    model_l, ref_l = img(1, 1, 1, 3), img(1, 1, 1, 1)
    return model_w, model_l, ref_w, ref_l, target_w, target_l


def random_batch(pairs=3, seed=0, shape=(4, 2, 2)):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn((pairs, *shape), generator=gen) for _ in range(6)]


def test_per_sample_mse_is_mean_over_non_batch_dims():
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]], [[[0.0, 0.0], [0.0, 2.0]]]])  # (2, 1, 2, 2)
    out = per_sample_mse(pred, torch.zeros_like(pred))
    assert out.shape == (2,)
    assert out.tolist() == [(1 + 4 + 9 + 16) / 4, 4 / 4]


def test_dpo_closed_form():
    out = diffusion_dpo_loss(*hand_pair(), beta=0.5)
    d_w, d_l = 1 - 4, 1 - 0
    inside = -0.5 * 0.5 * (d_w - d_l)  # = 1.0
    assert isinstance(out, PreferenceLossOutput)
    assert out.loss.shape == () and out.per_pair_loss.shape == (1,)
    assert out.loss.item() == pytest.approx(nll_sigmoid(inside), rel=1e-6)
    assert out.inside.item() == pytest.approx(inside)
    assert [out.model_mse_w.item(), out.ref_mse_w.item(), out.model_mse_l.item(), out.ref_mse_l.item()] == [
        1,
        4,
        1,
        0,
    ]
    assert out.reward_margin.item() == pytest.approx(4.0)
    assert out.coef.item() == 0.5
    assert out.implicit_acc.item() == 1.0


def test_dpo_beta_one_closed_form_per_pair_and_mean():
    # pair 0: the hand pair (d_w - d_l = -4); pair 1: winner/loser swapped roles (d_w - d_l = +4)
    a = hand_pair()
    b = (a[1], a[0], a[3], a[2], a[5], a[4])
    batch = [torch.cat([x, y]) for x, y in zip(a, b, strict=True)]
    out = diffusion_dpo_loss(*batch, beta=1.0)
    expected = [nll_sigmoid(2.0), nll_sigmoid(-2.0)]
    assert out.per_pair_loss.tolist() == pytest.approx(expected, rel=1e-6)
    assert out.loss.item() == pytest.approx(sum(expected) / 2, rel=1e-6)
    assert out.reward_margin.tolist() == [4.0, -4.0]
    assert out.implicit_acc.item() == 0.5


def test_sign_conventions():
    """Model closer to the winner's target than the reference: loss < log 2, counted as accurate."""
    target = torch.zeros(1, 1, 2, 2)
    ref = torch.ones(1, 1, 2, 2)
    better_w = 0.5 * torch.ones(1, 1, 2, 2)
    out = diffusion_dpo_loss(better_w, ref, ref, ref, target, target, beta=1.0)  # loser unchanged
    assert out.loss.item() < LOG2 and out.implicit_acc.item() == 1.0 and out.reward_margin.item() > 0
    # the model moving towards the loser instead: loss > log 2, not accurate
    out = diffusion_dpo_loss(ref, better_w, ref, ref, target, target, beta=1.0)
    assert out.loss.item() > LOG2 and out.implicit_acc.item() == 0.0 and out.reward_margin.item() < 0
    # SmPO with p > 0.5 agrees with DPO's direction; p < 0.5 flips it
    out = smpo_loss(better_w, ref, ref, ref, target, target, beta=1.0, gamma=1.0, p=torch.tensor([0.8]))
    assert out.loss.item() < LOG2
    out = smpo_loss(better_w, ref, ref, ref, target, target, beta=1.0, gamma=1.0, p=torch.tensor([0.2]))
    assert out.loss.item() > LOG2
    # the gradient of the winner's prediction pulls it towards its target
    pred_w = better_w.clone().requires_grad_(True)
    diffusion_dpo_loss(pred_w, ref, ref, ref, target, target, beta=1.0).loss.backward()
    assert bool((pred_w.grad > 0).all())  # pred_w - target > 0, so descent lowers it towards 0


def test_exact_tie_counts_zero_as_the_official_code():
    x = torch.ones(2, 1, 2, 2)
    out = diffusion_dpo_loss(x, x, x, x, torch.zeros_like(x), torch.zeros_like(x), beta=5000.0)
    assert out.implicit_acc.item() == 0.0  # official: (inside_term > 0).sum() / n
    assert out.per_pair_loss.tolist() == pytest.approx([LOG2, LOG2])


def test_implicit_accuracy_is_the_official_inside_positive_per_pair():
    """implicit_acc = mean over pairs of (inside > 0): a p = 0.5 pair counts 0 whatever the model does, and a
    pair whose p < 0.5 counts when the model moved towards the *loser* (the reward's preferred image)."""
    a = hand_pair()  # d_w - d_l = -4: the model moved towards the winner
    batch = [torch.cat([x] * 3) for x in a]
    out = smpo_loss(*batch, beta=1.0, gamma=1.0, p=torch.tensor([0.9, 0.5, 0.2]))
    assert out.inside.tolist() == pytest.approx([1.6, 0.0, -1.2])
    assert out.implicit_acc.item() == pytest.approx(1 / 3)
    swapped = [torch.cat([x] * 2) for x in (a[1], a[0], a[3], a[2], a[5], a[4])]  # d_w - d_l = +4
    out = smpo_loss(*swapped, beta=1.0, gamma=1.0, p=torch.tensor([0.2, 0.5]))
    assert out.inside.tolist() == pytest.approx([1.2, 0.0]) and out.implicit_acc.item() == 0.5
    dpo = diffusion_dpo_loss(*[torch.cat([x, y[:1]]) for x, y in zip(a, swapped, strict=True)], beta=1.0)
    assert dpo.inside.tolist() == pytest.approx([2.0, -2.0]) and dpo.implicit_acc.item() == 0.5


def test_smpo_closed_form_hand_pair():
    out = smpo_loss(*hand_pair(), beta=2.0, gamma=3.0, p=torch.tensor([0.75]))
    coef = 2.0 * 3.0 * (2 * 0.75 - 1)  # = 3
    assert out.coef.item() == pytest.approx(coef)
    assert out.inside.item() == pytest.approx(-0.5 * coef * -4.0)  # = 6
    assert out.loss.item() == pytest.approx(nll_sigmoid(6.0), rel=1e-5)


def test_smpo_uses_each_pairs_own_p():
    batch = random_batch(pairs=4)
    p = torch.tensor([0.9, 0.5, 0.6, 0.1])
    out = smpo_loss(*batch, beta=2.0, gamma=3.0, p=p)
    for i in range(4):
        rows = [x[i : i + 1] for x in batch]
        single = smpo_loss(*rows, beta=2.0, gamma=3.0, p=p[i : i + 1])
        assert single.loss.item() == pytest.approx(out.per_pair_loss[i].item(), rel=1e-6)
        assert single.inside.item() == pytest.approx(out.inside[i].item(), rel=1e-6)
        mw, ml, rw, rl, tw, tl = rows
        diff = (per_sample_mse(mw, tw) - per_sample_mse(rw, tw)) - (
            per_sample_mse(ml, tl) - per_sample_mse(rl, tl)
        )
        coef = 2.0 * 3.0 * (2 * p[i].item() - 1)
        assert out.per_pair_loss[i].item() == pytest.approx(nll_sigmoid(-0.5 * coef * diff.item()), rel=1e-5)
    assert out.coef.tolist() == pytest.approx([4.8, 0.0, 1.2, -4.8])
    assert out.per_pair_loss[1].item() == pytest.approx(LOG2)
    # the first pair's p applied to the whole batch (the official bug) gives a different loss
    assert not torch.allclose(
        out.per_pair_loss, smpo_loss(*batch, beta=2.0, gamma=3.0, p=p[:1].repeat(4)).per_pair_loss
    )


def test_p_one_half_gives_exactly_zero_gradient():
    batch = random_batch(pairs=2)
    mw, ml = (x.clone().requires_grad_(True) for x in batch[:2])
    out = smpo_loss(mw, ml, *batch[2:], beta=5000.0, gamma=10.0, p=torch.tensor([0.5, 0.5]))
    out.loss.backward()
    assert out.loss.item() == pytest.approx(LOG2, abs=1e-7)
    assert torch.count_nonzero(mw.grad) == 0 and torch.count_nonzero(ml.grad) == 0


def test_mixed_p_zero_gradient_only_for_the_half_pair():
    batch = random_batch(pairs=2)
    mw = batch[0].clone().requires_grad_(True)
    smpo_loss(mw, *batch[1:], beta=1.0, gamma=1.0, p=torch.tensor([0.5, 0.9])).loss.backward()
    assert torch.count_nonzero(mw.grad[0]) == 0 and torch.count_nonzero(mw.grad[1]) > 0


def test_smpo_with_p_one_and_gamma_one_is_dpo():
    batch = random_batch(pairs=3)
    a = smpo_loss(*batch, beta=7.0, gamma=1.0, p=torch.ones(3))
    b = diffusion_dpo_loss(*batch, beta=7.0)
    assert torch.equal(a.per_pair_loss, b.per_pair_loss) and torch.equal(a.coef, b.coef)


def test_large_magnitudes_are_stable():
    batch = [x * 1e3 for x in random_batch(pairs=4)]
    for out in (
        diffusion_dpo_loss(*batch, beta=5000.0),
        smpo_loss(*batch, beta=5000.0, gamma=10.0, p=torch.tensor([0.0, 1.0, 0.99, 0.3])),
    ):
        assert torch.isfinite(out.per_pair_loss).all() and torch.isfinite(out.inside).all()
        assert (out.per_pair_loss >= 0).all()
        assert out.inside.abs().max() > 100  # far into the saturated range, yet finite
    # gradients stay finite too
    mw = batch[0].clone().requires_grad_(True)
    diffusion_dpo_loss(mw, *batch[1:], beta=5000.0).loss.backward()
    assert torch.isfinite(mw.grad).all()
    # -log sigmoid(x) for very negative x is -x, not inf
    x = img(0, 0, 0, 0)
    far = img(100, 100, 100, 100)
    out = diffusion_dpo_loss(far, x, x, x, x, x, beta=5000.0)  # d_w - d_l = 1e4, inside = -2.5e7
    assert out.loss.item() == pytest.approx(2.5e7, rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_give_float32_outputs(dtype):
    batch = [(x * 100).to(dtype) for x in random_batch(pairs=2)]
    p = torch.tensor([0.7, 0.2], dtype=dtype)
    out = smpo_loss(*batch, beta=5000.0, gamma=10.0, p=p)
    for name in (
        "loss",
        "per_pair_loss",
        "inside",
        "model_mse_w",
        "ref_mse_l",
        "implicit_acc",
        "reward_margin",
        "coef",
    ):
        assert getattr(out, name).dtype == torch.float32, name
    assert torch.isfinite(out.loss)
    # the same numbers as casting the inputs to float32 first (no fp16 overflow in the squares)
    ref = smpo_loss(*[x.float() for x in batch], beta=5000.0, gamma=10.0, p=p.float())
    assert torch.allclose(out.per_pair_loss, ref.per_pair_loss)
    assert sft_loss(batch[0], batch[4]).dtype == torch.float32
    assert per_sample_mse(batch[0], batch[4]).dtype == torch.float32


def test_diagnostics_carry_no_gradient_but_loss_does():
    batch = random_batch(pairs=2)
    mw = batch[0].clone().requires_grad_(True)
    out = diffusion_dpo_loss(mw, *batch[1:], beta=1.0)
    assert out.loss.requires_grad and out.per_pair_loss.requires_grad
    assert not any(
        t.requires_grad for t in (out.inside, out.model_mse_w, out.reward_margin, out.implicit_acc)
    )


def test_sft_loss_closed_form():
    pred = torch.cat([img(1, 1, 1, 1), img(0, 0, 0, 2)])
    assert sft_loss(pred, torch.zeros_like(pred)).item() == pytest.approx((1.0 + 1.0) / 2)
    assert sft_loss(pred, torch.zeros_like(pred)).shape == ()


def test_preference_loss_dispatch():
    batch = random_batch(pairs=2)
    p = torch.tensor([0.8, 0.3])
    smpo = preference_loss("smpo", *batch, beta=2.0, gamma=10.0, p=p)
    assert torch.equal(smpo.per_pair_loss, smpo_loss(*batch, beta=2.0, gamma=10.0, p=p).per_pair_loss)
    dpo = preference_loss("dpo", *batch, beta=2.0, gamma=10.0, p=p)  # gamma and p do not enter DPO
    assert torch.equal(dpo.per_pair_loss, diffusion_dpo_loss(*batch, beta=2.0).per_pair_loss)
    with pytest.raises(UsageError, match="unknown preference loss 'ppo'"):
        preference_loss("ppo", *batch, beta=1.0)
    with pytest.raises(UsageError, match="needs gamma and p"):
        preference_loss("smpo", *batch, beta=1.0)
    with pytest.raises(UsageError, match=r"\[0, 1\]"):
        preference_loss("dpo", *batch, beta=1.0, p=torch.tensor([0.5, -0.1]))


def test_shape_mismatch_names_the_tensors():
    batch = random_batch(pairs=2)
    bad = [batch[0], batch[1], batch[2], batch[3], batch[4], torch.zeros(2, 4, 2, 3)]
    with pytest.raises(UsageError, match=r"target_l \(2, 4, 2, 3\)") as err:
        diffusion_dpo_loss(*bad, beta=1.0)
    assert "model_pred_w (2, 4, 2, 2)" in str(err.value)
    with pytest.raises(UsageError, match=r"model_pred_w \(1, 4, 2, 2\)"):
        preference_loss("smpo", batch[0][:1], *batch[1:], beta=1.0, gamma=1.0, p=torch.ones(2))
    with pytest.raises(UsageError, match="model_pred"):
        sft_loss(torch.zeros(2, 4), torch.zeros(3, 4))
    with pytest.raises(UsageError, match="batch dimension"):
        per_sample_mse(torch.tensor(1.0), torch.tensor(1.0))


@pytest.mark.parametrize("p", [[1.5, 0.5], [0.5, -0.01], [float("nan"), 0.5]])
def test_p_outside_unit_interval_raises(p):
    with pytest.raises(UsageError, match=r"\[0, 1\]"):
        smpo_loss(*random_batch(pairs=2), beta=1.0, gamma=1.0, p=torch.tensor(p))


def test_p_count_and_constants_are_checked():
    batch = random_batch(pairs=2)
    with pytest.raises(UsageError, match="one p per pair"):
        smpo_loss(*batch, beta=1.0, gamma=1.0, p=torch.tensor([0.6, 0.7, 0.8]))
    with pytest.raises(UsageError, match="beta"):
        diffusion_dpo_loss(*batch, beta=float("inf"))
    with pytest.raises(UsageError, match="gamma"):
        smpo_loss(*batch, beta=1.0, gamma=0.0, p=torch.tensor([0.6, 0.7]))
