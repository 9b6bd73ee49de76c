"""GRPO math against hand-computed examples, and the loss gradient against an fp64 autograd reference."""

from __future__ import annotations

import torch

from megatron_rl.algo.grpo import (
    clipped_pg_loss,
    group_advantages,
    informative_groups,
    logprob_mismatch,
    loss_mask,
    rollout_correction,
)


def test_group_advantages_hand_computed():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    adv = group_advantages(rewards, group_size=4)
    # group 1: mean 0.5, sample std (n-1) = 0.57735 -> +-0.866025; group 2: all equal -> 0
    expected = torch.tensor([0.866025, -0.866025, -0.866025, 0.866025, 0, 0, 0, 0])
    assert torch.allclose(adv, expected, atol=1e-5)
    centered_only = group_advantages(rewards, group_size=4, normalize_std=False)
    assert torch.allclose(centered_only, torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))


def test_informative_groups_and_overlong_mask():
    assert informative_groups([1, 1, 0, 1, 0, 0], group_size=2) == [1]
    assert loss_mask([5, 7, 0], [False, True, False], overlong_filtering=True) == [True, False, False]
    assert loss_mask([5, 7], [False, True], overlong_filtering=False) == [True, True]


def test_clipping_hand_computed():
    # ratio = exp(lp - old): 1.5 (A>0: clipped at 1.28), 0.5 (A<0: clipped at 0.8), 1.1 (inside), 2.0 (A<0: not
    # clipped since min picks the larger penalty), masked token ignored.
    old = torch.zeros(5)
    lp = torch.log(torch.tensor([1.5, 0.5, 1.1, 2.0, 3.0]))
    adv = torch.tensor([1.0, -1.0, 2.0, -1.0, 5.0])
    mask = torch.tensor([1, 1, 1, 1, 0])
    loss, stats = clipped_pg_loss(lp, old, adv, mask, num_tokens=10.0, clip_eps_low=0.2, clip_eps_high=0.28)
    per_token = [-1.28, 0.8, -2.2, 2.0]  # -min(r*A, clip(r)*A)
    assert abs(loss.item() - sum(per_token) / 10.0) < 1e-6
    assert stats["clipped_tokens"] == 2.0


def test_token_level_aggregation_weights_every_token_equally():
    # Two samples (3 tokens and 1 token) in one batch: token-level mean over 4 tokens, not a mean of means.
    lp = torch.zeros(4, requires_grad=True)
    adv = torch.tensor([1.0, 1.0, 1.0, -1.0])
    loss, _ = clipped_pg_loss(
        lp, lp.detach(), adv, torch.ones(4), num_tokens=4.0, clip_eps_low=0.2, clip_eps_high=0.2
    )
    loss.backward()
    assert torch.allclose(lp.grad, torch.tensor([-0.25, -0.25, -0.25, 0.25]))


def test_loss_gradient_matches_fp64_reference():
    gen = torch.Generator().manual_seed(0)
    n = 64
    lp32 = (torch.randn(n, generator=gen) * 0.3 - 2).requires_grad_()
    old = lp32.detach() + torch.randn(n, generator=gen) * 0.2
    weights = torch.rand(n, generator=gen) * 2  # e.g. truncated importance weights
    adv = torch.randn(n, generator=gen)
    mask = (torch.rand(n, generator=gen) > 0.2).float()
    args = dict(num_tokens=float(mask.sum()), clip_eps_low=0.2, clip_eps_high=0.28)
    loss32, _ = clipped_pg_loss(lp32, old, adv, mask, weights=weights, **args)
    loss32.backward()

    lp64 = lp32.detach().double().requires_grad_()
    ratio = torch.exp(lp64 - old.double())
    a = adv.double()
    pg = -torch.minimum(ratio * a, torch.clamp(ratio, 0.8, 1.28) * a)
    loss64 = (weights.double() * pg * mask.double()).sum() / mask.sum().double()
    loss64.backward()
    assert abs(loss32.item() - loss64.item()) < 1e-5
    assert torch.allclose(lp32.grad.double(), lp64.grad, atol=1e-6)
    assert lp32.grad.abs().sum() > 0


def test_logprob_mismatch_metric():
    train = torch.tensor([-1.0, -2.0, -3.0])
    rollout = torch.tensor([-1.0, -2.5, -9.0])
    m = logprob_mismatch(train, rollout, torch.tensor([1, 1, 0]))
    assert abs(m["mismatch_max_abs_diff"] - 0.5) < 1e-9
    assert m["mismatch_kl"] > 0
    assert abs(m["mismatch_ratio_max"] - 1.6487212707) < 1e-6  # e^0.5
    assert 1.0 < m["mismatch_ratio_p99"] <= m["mismatch_ratio_max"]


def test_rollout_correction_is_the_identity_when_both_sides_agree():
    """Equal log-probs: every weight is exactly 1 and nothing is masked, so the loss and its gradient are
    bit-identical to the uncorrected ones."""
    gen = torch.Generator().manual_seed(1)
    lp = (torch.randn(12, generator=gen) - 2).requires_grad_()
    adv, mask = torch.randn(12, generator=gen), torch.ones(12)
    weights, keep, stats = rollout_correction(
        lp.detach(), lp.detach().clone(), [(0, 5), (5, 12)], 2.0, 1.5, 1.2
    )
    assert torch.equal(weights, torch.ones(12)) and torch.equal(keep, torch.ones(12))
    assert stats == {"masked_sequences": 0.0, "sequences": 2.0, "tis_clipped_tokens": 0.0}
    args = dict(num_tokens=12.0, clip_eps_low=0.2, clip_eps_high=0.28)
    plain, _ = clipped_pg_loss(lp, lp.detach(), adv, mask, **args)
    (plain_grad,) = torch.autograd.grad(plain, lp)
    corrected, _ = clipped_pg_loss(lp, lp.detach(), adv, mask * keep, weights=weights, **args)
    (corrected_grad,) = torch.autograd.grad(corrected, lp)
    assert torch.equal(plain, corrected) and torch.equal(plain_grad, corrected_grad)


def test_rollout_correction_hand_computed():
    """rho = p_trainer / p_rollout per token. Sample A (tokens 0-2): rho = 1, 3, 1/2 -> weights 1, 2 (capped),
    1/2; its largest token ratio max(rho, 1/rho) is 3. Sample B (3-4): rho = 1.2, 1.2: geometric mean 1.2.
    Sample C (5): rho = 1/4."""
    import math

    rollout = torch.full((6,), -2.0)
    rho = torch.tensor([1.0, 3.0, 0.5, 1.2, 1.2, 0.25])
    old = rollout + torch.log(rho)
    spans = [(0, 3), (3, 5), (5, 6)]
    weights, keep, stats = rollout_correction(old, rollout, spans, tis_cap=2.0)
    assert torch.allclose(weights, torch.tensor([1.0, 2.0, 0.5, 1.2, 1.2, 0.25]))
    assert stats["tis_clipped_tokens"] == 1.0 and torch.equal(keep, torch.ones(6))
    # Token rule, bound 2.5: A (a token at 3) and C (a token at 1/4) go, B stays.
    _, keep, stats = rollout_correction(old, rollout, spans, mask_token_ratio=2.5)
    assert keep.tolist() == [0, 0, 0, 1, 1, 0] and stats["masked_sequences"] == 2.0
    # Sequence rule, bound 1.1: A's geometric mean is (1 * 3 * 0.5) ** (1/3) = 1.145 -> out; B's 1.2 -> out;
    # C's 0.25 -> out. Bound 1.16: A stays, B and C go.
    _, keep, _ = rollout_correction(old, rollout, spans, mask_sequence_ratio=1.1)
    assert keep.tolist() == [0, 0, 0, 0, 0, 0]
    assert (1 * 3 * 0.5) ** (1 / 3) < 1.16 < 1.2
    _, keep, _ = rollout_correction(old, rollout, spans, mask_sequence_ratio=1.16)
    assert keep.tolist() == [1, 1, 1, 0, 0, 0]
    assert math.isclose(math.exp(float((old - rollout)[0:3].mean())), 1.5 ** (1 / 3), rel_tol=1e-6)
