"""GRPO as AceReason uses it: group-normalised advantages, token-level clipped policy-gradient loss.

All functions are pure torch and shape-documented; the trainer wires them to rollouts and the policy.
"""

from __future__ import annotations

import math
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
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Token-level PPO-clip loss summed over tokens and divided by `num_tokens` (the whole batch's count,
    so micro-batches add up to the batch loss). All tensors [T]; mask is 0/1; `weights` (optional, no
    gradient) scale each token's term, e.g. the truncated importance weights of `rollout_correction`.

    loss_t = -w_t min(r_t A_t, clip(r_t, 1 - eps_low, 1 + eps_high) A_t),  r_t = exp(lp - lp_old)
    """
    mask = mask.to(logprobs.dtype)
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_eps_low, 1.0 + clip_eps_high) * advantages
    per_token = -torch.minimum(unclipped, clipped)
    if weights is not None:
        per_token = per_token * weights.detach()
    loss = (per_token * mask).sum() / num_tokens
    with torch.no_grad():  # tokens whose gradient the clip switched off
        active = ((ratio > 1.0 + clip_eps_high) & (advantages > 0)) | (
            (ratio < 1.0 - clip_eps_low) & (advantages < 0)
        )
        stats = {"clipped_tokens": float((active.to(mask.dtype) * mask).sum())}
    return loss, stats


def rollout_correction(
    old_logprobs: torch.Tensor,
    rollout_logprobs: torch.Tensor,
    spans: Sequence[tuple[int, int]],
    tis_cap: float = 0.0,
    mask_token_ratio: float = 0.0,
    mask_sequence_ratio: float = 0.0,
) -> tuple[torch.Tensor | None, torch.Tensor, dict[str, float]]:
    """Off-policy correction for the gap between the policy vLLM sampled from and the trainer's.

    `old_logprobs` [T] are the trainer's log-probs before the update, `rollout_logprobs` [T] vLLM's, for the
    response tokens at `spans` ([start, end) per sample). With rho_t = p_trainer / p_rollout:

    - weights [T]: min(rho_t, tis_cap) (truncated importance sampling), or None when tis_cap is 0;
    - keep [T] 0/1: 0 over a whole sample when any of its tokens has rho_t outside [1/b, b] with
      b = mask_token_ratio, or when the geometric mean of its rho_t is outside [1/b, b] with
      b = mask_sequence_ratio (0 turns a rule off);
    - stats: tis_clipped_tokens (rho_t > tis_cap), masked_sequences, sequences.

    With equal log-probs on both sides every rho_t is 1: the weights are exactly 1 and nothing is masked.
    """
    log_rho = (old_logprobs - rollout_logprobs).detach()
    keep = torch.ones_like(log_rho)
    masked = 0
    for start, end in spans:
        if end <= start:
            continue
        span = log_rho[start:end]
        too_far = (mask_token_ratio and bool(span.abs().max() > math.log(mask_token_ratio))) or (
            mask_sequence_ratio and bool(span.mean().abs() > math.log(mask_sequence_ratio))
        )
        if too_far:
            keep[start:end] = 0.0
            masked += 1
    stats = {"masked_sequences": float(masked), "sequences": float(len(spans)), "tis_clipped_tokens": 0.0}
    weights = None
    if tis_cap:
        rho = torch.exp(log_rho)
        weights = torch.clamp(rho, max=tis_cap)
        scored = torch.zeros_like(log_rho, dtype=torch.bool)
        for start, end in spans:
            scored[start:end] = True
        stats["tis_clipped_tokens"] = float(((rho > tis_cap) & scored).sum())
    return weights, keep, stats


def mismatch_partials(
    train_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor
) -> tuple[dict[str, float], dict[str, float]]:
    """The trainer/rollout log-prob mismatch of some tokens, as parts that add up over micro-batches and
    ranks: (sums, maxima) for `mismatch_metrics`."""
    mask = mask.bool()
    d = (train_logprobs.detach() - rollout_logprobs)[mask].double()
    k3 = torch.exp(d) - 1.0 - d
    sums = {"mismatch_k3_sum": float(k3.sum()), "mismatch_tokens": float(mask.sum())}
    # p99 of this part's token ratios max(rho, 1/rho); mismatch_metrics reports the largest part's.
    p99 = float(torch.quantile(d.abs(), 0.99).exp()) if d.numel() else 1.0
    return sums, {
        "mismatch_max_abs_diff": float(d.abs().max()) if d.numel() else 0.0,
        "mismatch_ratio_p99": p99,
    }


def mismatch_metrics(sums: dict[str, float], maxima: dict[str, float]) -> dict[str, float]:
    """kl: mean k3 estimate of KL(rollout || train) over the tokens; max_abs_diff: the worst token's log-ratio;
    ratio_max: the worst token's ratio max(rho, 1/rho); ratio_p99: the largest of the parts' (micro-batches')
    99th percentiles of it."""
    tokens = sums["mismatch_tokens"]
    return {
        "mismatch_kl": sums["mismatch_k3_sum"] / tokens if tokens else 0.0,
        "mismatch_max_abs_diff": maxima["mismatch_max_abs_diff"],
        "mismatch_ratio_max": math.exp(maxima["mismatch_max_abs_diff"]),
        "mismatch_ratio_p99": maxima.get("mismatch_ratio_p99", 1.0),
    }


def logprob_mismatch(
    train_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor
) -> dict[str, float]:
    """How far the trainer's recomputed logprobs are from the ones vLLM sampled with (same tokens)."""
    return mismatch_metrics(*mismatch_partials(train_logprobs, rollout_logprobs, mask))
