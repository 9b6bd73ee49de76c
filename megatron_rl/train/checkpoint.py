"""Checkpoints: model shard, optimizer, RNG states and the loop's position, one file per rank.

Written to a temporary directory and renamed into place, then `latest` is updated, so a crash mid-save never
leaves a checkpoint that resume would pick up half-written.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def save_checkpoint(ckpt_root: Path, step: int, model, optimizer, train_state: dict, keep: int) -> Path:
    rank = dist.get_rank()
    final = ckpt_root / f"step_{step:06d}"
    tmp = ckpt_root / f".step_{step:06d}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "rng": _rng_state(),
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


def load_checkpoint(path: Path, model, optimizer) -> dict:
    """Restore model, optimizer and RNG; returns the saved train state (step, data position, ...)."""
    state = torch.load(path / f"rank_{dist.get_rank():04d}.pt", map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    _set_rng_state(state["rng"])
    return state["train"]
