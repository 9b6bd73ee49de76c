"""Checkpoints: the model in Megatron's distributed checkpoint format, plus per-rank optimizer, RNG and loop state.

    step_000025/
      model/           megatron.core.dist_checkpointing (torch_dist): loads into any TP/PP layout
      rank_0000.pt     optimizer state, RNG states, layout, the loop's position (step, data position)

Written to a temporary directory and renamed into place, then `latest` is updated, so a crash mid-save never
leaves a checkpoint that resume would pick up half-written. A resume under a different parallel layout loads
the weights (resharded by dist_checkpointing) and starts the optimizer afresh, with a warning.
"""

from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megatron_rl.train.optimizer import OptimizerStateMismatch, PolicyOptimizer

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    pass


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def save_checkpoint(ckpt_root: Path, step: int, policy, optimizer, train_state: dict, keep: int) -> Path:
    """A collective: every rank writes its model shards and its own optimizer/RNG file."""
    rank = dist.get_rank()
    final = ckpt_root / f"step_{step:06d}"
    tmp = ckpt_root / f".step_{step:06d}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "model").mkdir(parents=True)
    dist.barrier()
    policy.save_sharded(tmp / "model")
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "rng": _rng_state(),
            "layout": policy.layout(),
            "train": train_state,
        },
        tmp / f"rank_{rank:04d}.pt",
    )
    dist.barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        (ckpt_root / "latest.tmp").write_text(final.name)
        (ckpt_root / "latest.tmp").rename(ckpt_root / "latest")
        old = sorted(p for p in ckpt_root.glob("step_*") if p.is_dir())[:-keep] if keep > 0 else []
        for path in old:
            shutil.rmtree(path, ignore_errors=True)
    dist.barrier()
    return final


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    marker = ckpt_root / "latest"
    if not marker.is_file():
        return None
    path = ckpt_root / marker.read_text().strip()
    return path if path.is_dir() else None


def load_model_weights(path: Path, policy) -> None:
    """Fill `policy` (this rank's shard, any layout) from a checkpoint's distributed model state."""
    if not (path / "model" / "metadata.json").is_file():
        raise CheckpointError(f"checkpoint '{path}' has no model/ distributed checkpoint (incomplete copy?)")
    policy.load_sharded(path / "model")


def _read_rank_file(path: Path, rank: int) -> dict:
    rank_file = path / f"rank_{rank:04d}.pt"
    if not rank_file.is_file():
        raise CheckpointError(f"checkpoint '{path}' has no {rank_file.name} (an incomplete copy?)")
    return torch.load(rank_file, map_location="cpu", weights_only=False)


def load_checkpoint(path: Path, policy, optimizer) -> dict:
    """Restore model, optimizer and RNG; returns the saved train state (step, data position, ...)."""
    load_model_weights(path, policy)
    if isinstance(optimizer, PolicyOptimizer):
        optimizer.refresh_from_model()  # kept only if the layout changed; otherwise the saved masters win
    state = _read_rank_file(path, 0)
    if state["layout"] != policy.layout():
        log.warning(
            "checkpoint %s was saved with layout %s, this run has %s: weights resharded, optimizer state reset",
            path,
            state["layout"],
            policy.layout(),
        )
        return state["train"]  # the loop's position is the same on every rank
    state = _read_rank_file(path, dist.get_rank())
    try:
        optimizer.load_state_dict(state["optimizer"])
    except OptimizerStateMismatch as e:
        raise CheckpointError(f"checkpoint '{path}': {e}") from None
    _set_rng_state(state["rng"])
    return state["train"]
