"""GRPO as AceReason uses it: group-normalised advantages, token-level clipped policy-gradient loss.

All functions are pure torch and shape-documented; the trainer wires them to rollouts and the policy.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def group_advantages(rewards: torch.Tensor, group_size: int, normalize_std: bool = True, eps: float = 1e-6):
    """rewards [N] ordered as consecutive groups of `group_size` samples of one prompt -> advantages [N].

    A = (r - mean_group) / (std_group + eps); a group whose rewards are all equal gets A = 0 (no signal).
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.double().view(-1, group_size)
    centered = grouped - grouped.mean(dim=1, keepdim=True)
    if normalize_std and group_size > 1:
        centered = centered / (grouped.std(dim=1, keepdim=True) + eps)
    return centered.view(-1).to(rewards.dtype)


def informative_groups(rewards: Sequence[float], group_size: int) -> list[int]:
    """Indices of groups whose rewards are not all equal (dynamic sampling keeps only these)."""
    return [
        g
        for g in range(len(rewards) // group_size)
        if len(set(rewards[g * group_size : (g + 1) * group_size])) > 1
    ]


def loss_mask(
    response_lengths: Sequence[int], truncated: Sequence[bool], overlong_filtering: bool
) -> list[bool]:
    """Per sample: does it contribute to the loss? Overlong filtering drops responses cut at max length."""
    return [
        not (overlong_filtering and cut) and n > 0 for n, cut in zip(response_lengths, truncated, strict=True)
    ]


def clipped_pg_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    num_tokens: float,
    clip_eps_low: float,
    clip_eps_high: float,
    kl_coef: float = 0.0,
    ref_logprobs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Token-level PPO-clip loss summed over tokens and divided by `num_tokens` (the whole batch's count,
    so micro-batches add up to the batch loss). All tensors [T]; mask is 0/1.

    loss_t = -min(r_t A_t, clip(r_t, 1 - eps_low, 1 + eps_high) A_t) [+ kl_coef * k3_t],  r_t = exp(lp - lp_old)
    """
    mask = mask.to(logprobs.dtype)
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_eps_low, 1.0 + clip_eps_high) * advantages
    per_token = -torch.minimum(unclipped, clipped)
    stats: dict[str, float] = {}
    if kl_coef > 0.0:
        if ref_logprobs is None:
            raise ValueError("kl_coef > 0 needs ref_logprobs")
        delta = ref_logprobs - logprobs
        k3 = torch.exp(delta) - 1.0 - delta  # unbiased, non-negative estimator of KL(policy || ref)
        per_token = per_token + kl_coef * k3
        stats["kl_ref"] = float((k3.detach() * mask).sum())
    loss = (per_token * mask).sum() / num_tokens
    with torch.no_grad():  # tokens whose gradient the clip switched off
        active = ((ratio > 1.0 + clip_eps_high) & (advantages > 0)) | (
            (ratio < 1.0 - clip_eps_low) & (advantages < 0)
        )
        stats["clipped_tokens"] = float((active.to(mask.dtype) * mask).sum())
    return loss, stats


def mismatch_partials(
    train_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor
) -> tuple[dict[str, float], dict[str, float]]:
    """The trainer/rollout log-prob mismatch of some tokens, as parts that add up over micro-batches and
    ranks: (sums, maxima) for `mismatch_metrics`."""
    mask = mask.bool()
    d = (train_logprobs.detach() - rollout_logprobs)[mask].double()
    k3 = torch.exp(d) - 1.0 - d
    sums = {"mismatch_k3_sum": float(k3.sum()), "mismatch_tokens": float(mask.sum())}
    return sums, {"mismatch_max_abs_diff": float(d.abs().max()) if d.numel() else 0.0}


def mismatch_metrics(sums: dict[str, float], maxima: dict[str, float]) -> dict[str, float]:
    """kl: mean k3 estimate of KL(rollout || train) over the tokens; max_abs_diff: the worst token."""
    tokens = sums["mismatch_tokens"]
    return {
        "mismatch_kl": sums["mismatch_k3_sum"] / tokens if tokens else 0.0,
        "mismatch_max_abs_diff": maxima["mismatch_max_abs_diff"],
    }


def logprob_mismatch(
    train_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor
) -> dict[str, float]:
    """How far the trainer's recomputed logprobs are from the ones vLLM sampled with (same tokens)."""
    return mismatch_metrics(*mismatch_partials(train_logprobs, rollout_logprobs, mask))
