"""The policy's optimizer: AdamW, optionally with its state sharded over data-parallel ranks.

`optim.distributed_optimizer: true` uses torch's ZeroRedundancyOptimizer over Megatron's data-parallel group:
each rank keeps the Adam moments of its share of the parameters only and broadcasts its updated share after
the step (ZeRO stage 1). megatron-core's own distributed optimizer cannot run on the CPU in 0.16.1 (see
docs/architecture.md), and this one gives the same memory saving with the same code on CPU and GPU.

Checkpoints hold each rank's own optimizer state (`local_state_dict`), so a resume needs the same layout.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from torch.distributed.optim import ZeroRedundancyOptimizer

from megatron_rl.config import OptimCfg


def build_optimizer(params: list[torch.nn.Parameter], cfg: OptimCfg) -> torch.optim.Optimizer:
    options = {"lr": cfg.lr, "betas": cfg.betas, "weight_decay": cfg.weight_decay}
    if cfg.distributed_optimizer and parallel_state.get_data_parallel_world_size() > 1:
        return ZeroRedundancyOptimizer(
            params,
            optimizer_class=torch.optim.AdamW,
            process_group=parallel_state.get_data_parallel_group(),
            **options,
        )
    return torch.optim.AdamW(params, **options)


def local_state_dict(optimizer: torch.optim.Optimizer) -> dict:
    """This rank's optimizer state (its shard under ZeRO; no collective)."""
    if isinstance(optimizer, ZeroRedundancyOptimizer):
        return optimizer.optim.state_dict()
    return optimizer.state_dict()


def load_local_state_dict(optimizer: torch.optim.Optimizer, state: dict) -> None:
    if isinstance(optimizer, ZeroRedundancyOptimizer):
        optimizer.optim.load_state_dict(state)
    else:
        optimizer.load_state_dict(state)
