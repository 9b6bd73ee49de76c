"""The policy update for one rollout batch: packed forward/backward of the GRPO loss, optimizer step(s)."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_rl.algo.grpo import clipped_pg_loss, logprob_mismatch
from megatron_rl.algo.packing import (
    pack_microbatches,
    pack_values,
    packed_forward_logprobs,
    unpack_to_samples,
)
from megatron_rl.train.optimizer import lr_at


def grad_norm_and_clip(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """Global L2 norm of the gradients across tensor-parallel shards (split parameters counted once per
    shard, replicated ones once), then clip in place."""
    split_sq = torch.zeros((), dtype=torch.float64)
    replicated_sq = torch.zeros((), dtype=torch.float64)
    for p in params:
        if p.grad is None:
            continue
        sq = p.grad.detach().double().pow(2).sum().cpu()
        if getattr(p, "tensor_model_parallel", False):
            split_sq += sq
        else:
            replicated_sq += sq
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(split_sq, group=parallel_state.get_tensor_model_parallel_group())
    norm = math.sqrt(float(split_sq + replicated_sq))
    if max_norm > 0 and norm > max_norm:
        for p in params:
            if p.grad is not None:
                p.grad.mul_(max_norm / (norm + 1e-6))
    return norm


def all_reduce_data_parallel_grads(params: list[torch.nn.Parameter]) -> None:
    dp = parallel_state.get_data_parallel_world_size()
    if dp == 1:
        return
    group = parallel_state.get_data_parallel_group()
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, group=group)  # loss is already normalised by the global token count


def finish_gradients(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """Sum gradients over data-parallel ranks, then clip by the global norm; returns the norm before clipping."""
    all_reduce_data_parallel_grads(params)
    return grad_norm_and_clip(params, max_norm)


def policy_update(policy, optimizer, batch, cfg, step: int) -> dict[str, float]:
    """GRPO update of RL step `step` (1-based) on `batch` (identical on every rank): cfg.grpo.micro_steps
    optimizer steps, all at lr_at(step, cfg). Returns loss, entropy, mismatch and grad metrics, and that lr."""
    lr = lr_at(step, cfg)
    for group in optimizer.param_groups:  # a function of the RL step only, so a resumed run continues exactly
        group["lr"] = lr
    model = policy.model
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    temperature = cfg.rollout.temperature
    dp = parallel_state.get_data_parallel_world_size()
    microbatches = pack_microbatches(
        batch.prompts,
        batch.responses,
        cfg.grpo.max_tokens_per_microbatch,
        dp_size=dp,
        dp_rank=parallel_state.get_data_parallel_rank(),
    )
    trained = [float(t) for t in batch.trained]
    num_tokens = max(1.0, sum(len(r) * t for r, t in zip(batch.responses, trained, strict=True)))
    old_logprobs: dict[int, torch.Tensor] = {}
    if cfg.grpo.micro_steps > 1:  # several updates per batch: freeze the behaviour policy's logprobs first
        with torch.no_grad():
            values = [
                packed_forward_logprobs(model, mb, temperature, policy.tp_group)[0] for mb in microbatches
            ]
        old_logprobs = unpack_to_samples(values, microbatches)

    metrics: dict[str, float] = {}
    for micro_step in range(cfg.grpo.micro_steps):
        optimizer.zero_grad(set_to_none=True)
        totals = {"loss": 0.0, "entropy_sum": 0.0, "clipped_tokens": 0.0, "kl_ref": 0.0}
        train_lp, rollout_lp, masks = [], [], []
        for mb in microbatches:
            logprobs, entropy = packed_forward_logprobs(model, mb, temperature, policy.tp_group)
            device = logprobs.device
            mask = pack_values(trained, mb).to(device) * mb.loss_mask.to(device)
            advantages = pack_values(batch.advantages, mb).to(device)
            rollout = pack_values(batch.rollout_logprobs, mb).to(device)
            old = pack_values(old_logprobs, mb).to(device) if old_logprobs else logprobs.detach()
            loss, stats = clipped_pg_loss(
                logprobs,
                old,
                advantages,
                mask,
                num_tokens,
                cfg.grpo.clip_eps_low,
                cfg.grpo.clip_eps_high,
                cfg.grpo.kl_coef,
                ref_logprobs=rollout if cfg.grpo.kl_coef > 0 else None,
            )
            loss.backward()
            totals["loss"] += float(loss.detach())
            totals["entropy_sum"] += float((entropy.detach() * mb.loss_mask.to(device)).sum())
            totals["clipped_tokens"] += stats["clipped_tokens"]
            totals["kl_ref"] += stats.get("kl_ref", 0.0)
            if micro_step == 0:
                train_lp.append(logprobs.detach())
                rollout_lp.append(rollout)
                masks.append(mb.loss_mask.to(device))
        norm = finish_gradients(params, cfg.optim.grad_clip)
        optimizer.step()
        if micro_step == 0:
            scored = sum(mb.num_response_tokens for mb in microbatches)
            metrics = {
                "loss": totals["loss"],
                "entropy_mean": totals["entropy_sum"] / max(1, scored),
                "clip_fraction": totals["clipped_tokens"] / num_tokens,
                "grad_norm": norm,
                "microbatches": float(len(microbatches)),
                "packed_tokens": float(sum(mb.num_tokens for mb in microbatches)),
                **logprob_mismatch(torch.cat(train_lp), torch.cat(rollout_lp), torch.cat(masks)),
            }
            if cfg.grpo.kl_coef > 0:
                metrics["kl_ref"] = totals["kl_ref"] / num_tokens
            if dp > 1:  # each rank scored its own share of the batch: log the worst rank's mismatch
                worst = torch.tensor([metrics["mismatch_max_abs_diff"]], dtype=torch.float64)
                dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=parallel_state.get_data_parallel_group())
                metrics["mismatch_max_abs_diff_local"] = metrics["mismatch_max_abs_diff"]
                metrics["mismatch_max_abs_diff"] = float(worst)
    metrics["lr"] = lr
    return metrics
