"""The learning rate is a function of the RL step: the same for every micro-step of a step, logged as used, and
continued exactly by a resumed run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_rl.config import load_config
from megatron_rl.distributed import ParallelLayout, init_distributed, shutdown
from tests.distributed_helpers import run_distributed

# warmup over 2 RL steps, then cosine over the other 2 down to 0.1 of optim.lr; two optimizer steps per RL step
SCHEDULE = [
    "optim.lr=1e-2",
    "optim.warmup_steps=2",
    "optim.schedule=cosine",
    "optim.min_lr_ratio=0.1",
    "run.steps=4",
    "grpo.micro_steps=2",
]


def test_lr_at_warmup_then_cosine():
    from megatron_rl.train.optimizer import lr_at

    cfg = load_config(None, SCHEDULE)
    # steps 1, 2: warmup 1/2, 2/2; steps 3, 4: cosine at progress 1/2, 2/2 (min_lr_ratio at the last step)
    expected = [0.5e-2, 1e-2, 0.55e-2, 0.1e-2]
    assert [lr_at(s, cfg) for s in (1, 2, 3, 4)] == pytest.approx(expected, rel=1e-12)


def test_lr_at_constant_after_warmup():
    from megatron_rl.train.optimizer import lr_at

    cfg = load_config(None, ["optim.lr=2.0", "optim.warmup_steps=4", "optim.schedule=constant"])
    assert [lr_at(s, cfg) for s in range(1, 7)] == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0]
    assert lr_at(1, load_config(None, ["optim.lr=2.0"])) == 2.0  # no warmup: the full lr from step 1


def _batch():
    from megatron_rl.train.rollouts import RolloutBatch

    responses = [[8, 9, 10, 11], [12, 13, 14]]
    return RolloutBatch(
        prompts=[[3, 4, 5], [6, 7]],
        responses=responses,
        rollout_logprobs=[[-1.0] * len(r) for r in responses],
        rewards=[1.0, 0.0],
        truncated=[False, False],
        advantages=[1.0, -1.0],
        trained=[True, True],
        temperature=1.0,
    )


def _recording(optimizer) -> list[float]:
    """The lr of each optimizer step taken from now on, as the inner AdamW sees it when it steps (not through
    PolicyOptimizer.param_groups: after a resume those once were a stale copy that AdamW no longer read)."""
    seen: list[float] = []
    adamw, step = optimizer.inner, optimizer.inner.step

    def recording_step(closure=None):
        seen.extend({g["lr"] for g in adamw.param_groups})  # one value unless the groups disagree
        return step()

    adamw.step = recording_step
    return seen


def _lr_per_step_and_resume(rank: int, world: int, model_dir: str, out: str) -> None:
    from megatron_rl.model.policy import Policy
    from megatron_rl.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
    from megatron_rl.train.optimizer import build_optimizer, lr_at
    from megatron_rl.train.update import policy_update

    init_distributed(ParallelLayout(), rank=rank, world_size=world)
    try:
        cfg = load_config(None, SCHEDULE)
        batch = _batch()
        policy = Policy.from_hf(model_dir)
        optimizer = build_optimizer(policy, cfg.optim)
        seen = _recording(optimizer)
        for step in (1, 2, 3):
            seen.clear()
            metrics = policy_update(policy, optimizer, batch, cfg, step)
            assert seen == [lr_at(step, cfg)] * 2, (step, seen)  # both micro-steps at this step's lr
            assert metrics["lr"] == lr_at(step, cfg)  # the lr the update used, not the next step's
            if step == 2:
                save_checkpoint(Path(out), 2, policy, optimizer, {"step": 2, "data_position": 0}, 1)
        uninterrupted = [p.detach().clone() for p in policy.model.parameters()]

        resumed = Policy.from_hf(model_dir)
        resumed_opt = build_optimizer(resumed, cfg.optim)
        state = load_checkpoint(latest_checkpoint(Path(out)), resumed, resumed_opt)
        seen = _recording(resumed_opt)
        metrics = policy_update(resumed, resumed_opt, batch, cfg, state["step"] + 1)
        assert seen == [lr_at(3, cfg)] * 2 and metrics["lr"] == lr_at(3, cfg), seen
        for a, b in zip(resumed.model.parameters(), uninterrupted, strict=True):
            assert torch.equal(a, b)  # same lr and Adam state: the resumed step 3 is the uninterrupted one
    finally:
        shutdown()


def test_lr_per_rl_step_with_micro_steps_and_after_resume(tiny_ckpt, tmp_path):
    run_distributed(_lr_per_step_and_resume, 1, tiny_ckpt, str(tmp_path / "checkpoints"))
