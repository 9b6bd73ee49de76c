"""The policy's optimizer: AdamW with fp32 master weights for bf16 models, optionally sharded over data parallel.

- bf16 parameters get fp32 master copies: the optimizer updates the masters and the model receives them rounded
  to bf16. Without them an RL-sized step (lr 1e-6) is mostly below bf16's resolution and is lost.
- `optim.distributed_optimizer: true` uses torch's ZeroRedundancyOptimizer over Megatron's data-parallel group:
  each rank keeps the Adam moments of its share of the parameters only and broadcasts its updated share after
  the step (ZeRO stage 1). megatron-core's own optimizer cannot run on the CPU in 0.16.1 (see
  docs/architecture.md); this one gives the same memory saving with the same code on CPU and GPU.

Checkpoints hold each rank's own optimizer state (`local_state_dict`), so a resume needs the same layout.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from megatron.core import parallel_state
from torch.distributed.optim import ZeroRedundancyOptimizer

from megatron_rl.config import OptimCfg


class FP32MasterWeights(torch.optim.Optimizer):
    """Steps an inner optimizer over fp32 copies of low-precision parameters and copies the result back.

    Looks like the inner optimizer to LR schedulers (it shares its param_groups), so schedules apply as usual.
    """

    def __init__(self, params: list[torch.nn.Parameter], make_inner: Callable[[list], torch.optim.Optimizer]):
        self.model_params = list(params)
        self.master = [torch.nn.Parameter(p.detach().float().clone()) for p in self.model_params]
        self.inner = make_inner(self.master)
        # Not Optimizer.__init__: the inner optimizer owns the groups and the state; we share them.
        self.defaults, self.param_groups, self.state = (
            self.inner.defaults,
            self.inner.param_groups,
            self.inner.state,
        )
        self._optimizer_step_pre_hooks, self._optimizer_step_post_hooks = {}, {}

    @torch.no_grad()
    def step(self, closure=None):
        for p, m in zip(self.model_params, self.master, strict=True):
            m.grad = None if p.grad is None else p.grad.float()
        self.inner.step()
        for p, m in zip(self.model_params, self.master, strict=True):
            p.copy_(m)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.model_params + self.master:
            p.grad = None

    @torch.no_grad()
    def refresh_from_model(self) -> None:
        """Masters := the model's current weights (after the model was loaded from elsewhere)."""
        for p, m in zip(self.model_params, self.master, strict=True):
            m.copy_(p)

    def state_dict(self) -> dict:
        return {"inner": local_state_dict(self.inner), "master": [m.detach().clone() for m in self.master]}

    def load_state_dict(self, state: dict) -> None:
        load_local_state_dict(self.inner, state["inner"])
        with torch.no_grad():
            for p, m, saved in zip(self.model_params, self.master, state["master"], strict=True):
                m.copy_(saved)
                p.copy_(saved)


def build_optimizer(params: list[torch.nn.Parameter], cfg: OptimCfg) -> torch.optim.Optimizer:
    options = {"lr": cfg.lr, "betas": cfg.betas, "weight_decay": cfg.weight_decay}

    def adamw(group: list) -> torch.optim.Optimizer:
        if cfg.distributed_optimizer and parallel_state.get_data_parallel_world_size() > 1:
            return ZeroRedundancyOptimizer(
                group,
                optimizer_class=torch.optim.AdamW,
                process_group=parallel_state.get_data_parallel_group(),
                **options,
            )
        return torch.optim.AdamW(group, **options)

    if any(p.dtype != torch.float32 for p in params):
        return FP32MasterWeights(params, adamw)
    return adamw(params)


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
