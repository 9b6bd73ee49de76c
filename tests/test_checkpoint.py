"""Checkpoints in Megatron's distributed format: exact restore, resharding across TP sizes, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_rl.distributed import ParallelLayout, init_distributed, shutdown
from tests.distributed_helpers import run_distributed


def _perturb(name: str, tensor: torch.Tensor) -> torch.Tensor:
    return tensor + 0.01 * torch.sin(torch.arange(tensor.numel(), dtype=tensor.dtype)).view_as(tensor)


def optim_config():
    from megatron_rl.config import load_config

    return load_config(None, ["optim.lr=1e-3"]).optim


def _hf_tensors(policy) -> dict[str, torch.Tensor]:
    return {name: t.clone() for bucket in policy.hf_buckets() for name, t in bucket}


def _save_then_restore(rank: int, world: int, model_dir: str, out: str) -> None:
    """Save a trained-a-little TP=`world` policy, restore into a fresh one; weights and Adam state equal."""
    from megatron_rl.model.policy import Policy
    from megatron_rl.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
    from megatron_rl.train.optimizer import build_optimizer

    init_distributed(ParallelLayout(tp=world), rank=rank, world_size=world)
    try:
        policy = Policy.from_hf(model_dir, transform=_perturb)
        optimizer = build_optimizer(policy, optim_config())
        ids = torch.arange(12).view(1, 12) % 100
        policy.model(ids, torch.arange(12).view(1, 12), None).float().pow(2).mean().backward()
        optimizer.step()  # from the fp32 main grads the backward accumulated
        assert optimizer.state
        save_checkpoint(Path(out), 7, policy, optimizer, {"step": 7, "data_position": 224}, keep=2)
        expected = _hf_tensors(policy)

        fresh = Policy.from_hf(model_dir)
        fresh_opt = build_optimizer(fresh, optim_config())
        state = load_checkpoint(latest_checkpoint(Path(out)), fresh, fresh_opt)
        assert state == {"step": 7, "data_position": 224}
        got = _hf_tensors(fresh)
        for name, tensor in expected.items():
            assert torch.equal(got[name], tensor), name
        for a, b in zip(optimizer.state.values(), fresh_opt.state.values(), strict=True):
            assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
        if rank == 0:
            torch.save(expected, Path(out) / "expected_hf.pt")
    finally:
        shutdown()


def _reshard(rank: int, world: int, model_dir: str, out: str) -> None:
    """Load a TP=2 checkpoint into a TP=1 policy: the same HF weights come out."""
    from megatron_rl.model.policy import Policy
    from megatron_rl.train.checkpoint import latest_checkpoint, load_checkpoint
    from megatron_rl.train.optimizer import build_optimizer

    init_distributed(ParallelLayout(tp=world), rank=rank, world_size=world)
    try:
        policy = Policy.from_hf(model_dir)
        optimizer = build_optimizer(policy, optim_config())
        state = load_checkpoint(latest_checkpoint(Path(out)), policy, optimizer)
        assert state["step"] == 7
        assert not optimizer.state  # a different layout: the optimizer starts afresh (with a warning)
        expected = torch.load(Path(out) / "expected_hf.pt")
        got = _hf_tensors(policy)
        assert set(got) == set(expected)
        for name, tensor in expected.items():
            assert torch.equal(got[name], tensor), name
    finally:
        shutdown()


def test_tp2_checkpoint_restores_exactly_and_reshards_to_tp1(tiny_ckpt, tmp_path):
    out = str(tmp_path / "checkpoints")
    run_distributed(_save_then_restore, 2, tiny_ckpt, out)
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_000007"
    assert {p.name for p in (tmp_path / "checkpoints" / "step_000007").iterdir()} >= {
        "model", "rank_0000.pt", "rank_0001.pt",
    }  # fmt: skip
    run_distributed(_reshard, 1, tiny_ckpt, out)


def _load_incomplete(rank: int, world: int, model_dir: str, ckpt: str) -> None:
    from megatron_rl.model.policy import Policy
    from megatron_rl.train.checkpoint import CheckpointError, load_checkpoint
    from megatron_rl.train.optimizer import build_optimizer

    init_distributed(ParallelLayout(), rank=rank, world_size=world)
    try:
        policy = Policy.from_hf(model_dir)
        with pytest.raises(CheckpointError, match="step_000003.*model/"):
            load_checkpoint(Path(ckpt), policy, build_optimizer(policy, optim_config()))
    finally:
        shutdown()


def test_incomplete_checkpoint_is_named(tiny_ckpt, tmp_path):
    ckpt = tmp_path / "step_000003"
    ckpt.mkdir()
    run_distributed(_load_incomplete, 1, tiny_ckpt, str(ckpt))
