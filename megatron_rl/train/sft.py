"""Supervised warm start on (prompt, response) pairs with the same Megatron policy and packing.

Stops when held-out accuracy (through the vLLM engine, after a weight sync) reaches `stop_at_accuracy`: on a
tiny model a fixed step count lands anywhere between 0% and 85%.
"""

from __future__ import annotations

import logging
from pathlib import Path

from megatron_rl.algo.packing import pack_microbatches
from megatron_rl.train import preemption
from megatron_rl.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from megatron_rl.train.optimizer import build_optimizer

log = logging.getLogger(__name__)


def sft_step(
    policy, optimizer, prompts: list[list[int]], responses: list[list[int]], max_tokens: int
) -> float:
    """One optimizer step of mean token negative log-likelihood over the responses; returns that mean."""
    policy.train()
    policy.zero_grads()
    total = max(1, sum(len(r) for r in responses))

    def nll(mb, logprobs, entropy):
        loss = -(logprobs * mb.loss_mask.to(logprobs.device)).sum() / total
        return loss, {"loss": float(loss.detach())}

    microbatches = pack_microbatches(
        prompts, responses, max_tokens, dp_size=policy.dp_size, dp_rank=policy.dp_rank
    )
    stats = policy.forward_backward(microbatches, 1.0, nll)
    policy.clip_grads(1.0)
    optimizer.step()
    return policy.batch_totals({"loss": sum(s["loss"] for s in stats)})["loss"]


def run_sft(
    policy, pairs_for_step, evaluate_now, cfg, ckpt_root: Path | None = None, resume: bool = False, close=()
) -> tuple[int, float]:
    """Train until held-out accuracy reaches the target (or max_steps). Returns (steps, accuracy).

    With `ckpt_root`, a preemption request (train/preemption.py) saves a checkpoint there after the current
    step, closes `close` (engine, reward pool) and exits for a requeue; a call with `resume` continues from it
    (the batches depend only on the step).
    """
    optim_cfg = cfg.optim.model_copy(update={"lr": cfg.sft.lr, "weight_decay": 0.0})
    optimizer = build_optimizer(policy, optim_cfg)
    start, accuracy = 1, 0.0
    resume_from = latest_checkpoint(ckpt_root) if ckpt_root is not None and resume else None
    if resume_from is not None:
        state = load_checkpoint(resume_from, policy, optimizer)
        start, accuracy = state["step"] + 1, state["accuracy"]
        log.info("SFT resumed from %s at step %d", resume_from, state["step"])
    every = cfg.sft.eval_every
    for step in range(start, cfg.sft.max_steps + 1):
        prompts, responses = pairs_for_step(step)
        loss = sft_step(policy, optimizer, prompts, responses, cfg.grpo.max_tokens_per_microbatch)
        log.debug("SFT step %d: loss %.4f", step, loss)
        if every and step >= cfg.sft.eval_after and step % every == 0:
            accuracy = evaluate_now()
            log.info("SFT step %d: loss %.4f, held-out accuracy %.3f", step, loss, accuracy)
            if accuracy >= cfg.sft.stop_at_accuracy:
                return step, accuracy
        if ckpt_root is not None and step < cfg.sft.max_steps and preemption.stop_requested():
            save_checkpoint(ckpt_root, step, policy, optimizer, {"step": step, "accuracy": accuracy}, 1)
            preemption.exit_preempted(step, ckpt_root, close)
    if not every:
        accuracy = evaluate_now()
        log.info("SFT done after %d steps: held-out accuracy %.3f", cfg.sft.max_steps, accuracy)
    return cfg.sft.max_steps, accuracy
