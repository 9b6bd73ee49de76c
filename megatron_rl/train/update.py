"""The policy update for one rollout batch: the GRPO loss over packed micro-batches, optimizer step(s).

The loss of every token is divided by the number of trained response tokens in the whole batch (all
micro-batches, all data-parallel ranks), so the micro-batch losses add up to the batch's token-level mean
whatever the packing or the number of ranks. Metrics are the whole batch's too (`Policy.batch_totals`).
"""

from __future__ import annotations

import torch

from megatron_rl.algo.grpo import clipped_pg_loss, mismatch_metrics, mismatch_partials, rollout_correction
from megatron_rl.algo.packing import pack_microbatches, pack_values, unpack_to_samples
from megatron_rl.train.optimizer import lr_at


def trained_tokens(batch) -> float:
    """The loss normaliser: response tokens of the samples that are trained on (at least 1)."""
    return max(1.0, sum(len(r) * float(t) for r, t in zip(batch.responses, batch.trained, strict=True)))


def policy_update(policy, optimizer, batch, cfg, step: int) -> dict[str, float]:
    """GRPO update of RL step `step` (1-based) on `batch` (identical on every rank): cfg.grpo.micro_steps
    optimizer steps, all at lr_at(step, cfg). Returns the loss, entropy, mismatch and gradient metrics of the
    first of them (whole-batch figures, the same on every rank), and that lr."""
    lr = lr_at(step, cfg)
    for group in optimizer.param_groups:  # a function of the RL step only, so a resumed run continues exactly
        group["lr"] = lr
    policy.train()
    temperature, g = batch.temperature, cfg.grpo  # the batch's: a batch sampled ahead keeps its own
    microbatches = pack_microbatches(
        batch.prompts,
        batch.responses,
        cfg.grpo.max_tokens_per_microbatch,
        dp_size=policy.dp_size,
        dp_rank=policy.dp_rank,
    )
    trained = [float(t) for t in batch.trained]
    num_tokens = trained_tokens(batch)
    old_logprobs: dict[int, torch.Tensor] = {}
    if cfg.grpo.micro_steps > 1:  # several updates per batch: freeze the behaviour policy's logprobs first
        values = [lp for lp, _ in policy.forward_logprobs(microbatches, temperature)]
        old_logprobs = unpack_to_samples(values, microbatches) if values else {}

    def loss_fn(mb, logprobs: torch.Tensor, entropy: torch.Tensor):
        dev = logprobs.device
        scored = mb.loss_mask.to(dev)
        rollout = pack_values(batch.rollout_logprobs, mb).to(dev)
        old = pack_values(old_logprobs, mb).to(dev) if old_logprobs else logprobs.detach()
        # Masked samples still count in num_tokens: they weigh in like samples with a zero advantage.
        weights, keep, correction = rollout_correction(
            old, rollout, mb.response_spans, g.tis_cap, g.mask_token_ratio, g.mask_sequence_ratio
        )
        loss, stats = clipped_pg_loss(
            logprobs,
            old,
            advantages=pack_values(batch.advantages, mb).to(dev),
            mask=pack_values(trained, mb).to(dev) * scored * keep,
            num_tokens=num_tokens,
            clip_eps_low=g.clip_eps_low,
            clip_eps_high=g.clip_eps_high,
            weights=weights,
        )
        sums, maxima = mismatch_partials(logprobs, rollout, scored)
        stats = {
            "loss": float(loss.detach()),
            "entropy_sum": float((entropy.detach() * scored).sum()),
            "clipped_tokens": stats["clipped_tokens"],
            **correction,
            **sums,
            **maxima,
        }
        return loss, stats

    metrics: dict[str, float] = {}
    for micro_step in range(cfg.grpo.micro_steps):
        policy.zero_grads()
        per_microbatch = policy.forward_backward(microbatches, temperature, loss_fn)
        norm = policy.clip_grads(cfg.optim.grad_clip)
        optimizer.step()
        if micro_step == 0:
            metrics = summarise(policy, microbatches, per_microbatch, num_tokens, norm, g)
    metrics["lr"] = lr
    return metrics


SUMMED = (
    "loss",
    "entropy_sum",
    "clipped_tokens",
    "mismatch_k3_sum",
    "mismatch_tokens",
    "tis_clipped_tokens",
    "masked_sequences",
    "sequences",
)
MAXIMISED = ("mismatch_max_abs_diff", "mismatch_ratio_p99")


def summarise(policy, microbatches, per_microbatch: list[dict], num_tokens: float, norm: float, grpo):
    """The logged metrics of one update from this rank's per-micro-batch stats (present on the last pipeline
    stage only), totalled over the batch."""
    sums = {key: sum(s[key] for s in per_microbatch) for key in SUMMED}
    sums["scored_tokens"] = float(sum(mb.num_response_tokens for mb in microbatches))
    sums["packed_tokens"] = float(sum(mb.num_tokens for mb in microbatches))
    sums["microbatches"] = float(len(microbatches))
    if not policy.is_last_stage:  # the stats live on the last stage; counts are added once, from there
        sums = dict.fromkeys(sums, 0.0)
    worst = {key: max((s[key] for s in per_microbatch), default=0.0) for key in MAXIMISED}
    totals = policy.batch_totals(sums, worst)
    metrics = {
        "loss": totals["loss"],
        "entropy_mean": totals["entropy_sum"] / max(1.0, totals["scored_tokens"]),
        "clip_fraction": totals["clipped_tokens"] / num_tokens,
        "grad_norm": norm,
        "microbatches": totals["microbatches"],
        "packed_tokens": totals["packed_tokens"],
        **mismatch_metrics(totals, totals),
    }
    if grpo.tis_cap:
        metrics["tis_clipped_fraction"] = totals["tis_clipped_tokens"] / max(1.0, totals["scored_tokens"])
    if grpo.mask_token_ratio or grpo.mask_sequence_ratio:
        metrics["masked_sequence_fraction"] = totals["masked_sequences"] / max(1.0, totals["sequences"])
    return metrics
