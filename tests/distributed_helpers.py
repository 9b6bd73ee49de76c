"""Run a test body in N gloo processes (real torch.distributed, real megatron-core parallel state)."""

from __future__ import annotations

import os
import traceback

import torch.multiprocessing as mp

from megatron_rl.distributed import free_port


def _entry(rank: int, world: int, port: int, fn, args, errors) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    try:
        fn(rank, world, *args)
    except BaseException:
        errors.put(f"rank {rank}:\n{traceback.format_exc()}")
        raise


def run_distributed(fn, world: int, *args) -> None:
    """Call fn(rank, world, *args) in `world` spawned processes; re-raise the first rank's failure."""
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    try:
        mp.spawn(_entry, args=(world, free_port(), fn, args, errors), nprocs=world, join=True)
    except Exception as e:
        detail = errors.get() if not errors.empty() else str(e)
        raise AssertionError(detail) from None
