"""The policy's optimizer: AdamW on fp32 master weights, optionally sharded over data-parallel ranks (ZeRO-1).

- Gradients come from the policy's fp32 main-grad buffers (`param.main_grad`, already summed over data-parallel
  ranks by Megatron's DDP and clipped by the policy), whatever the parameters' dtype.
- Low-precision (bf16) parameters get fp32 master copies: AdamW updates the masters and the model receives them
  rounded. Without them an RL-sized step (lr 1e-6) is mostly below bf16's resolution and is lost.
- With `optim.distributed_optimizer: true` each data-parallel rank owns a share of the parameters (balanced by
  size): only it keeps their fp32 masters and Adam moments, steps them, and broadcasts the updated weights to
  the other ranks. Memory per parameter: the model's weights and gradients plus (4 + 8) / DP bytes.

megatron-core 0.16.1's distributed optimizer allocates buffers with device="cuda" and asserts CUDA gradient
types, and its gradient reduce-scatter has no gloo implementation, so it cannot run on the CPU where the tests
run (docs/architecture.md); this one is the same code on CPU (gloo) and GPU (NCCL). Checkpoints hold each rank's own share (`state_dict` is local), so a resume with
the same layout continues exactly; under another layout the optimizer starts afresh from the loaded weights.

The learning rate is a function of the RL step alone (`lr_at`), set on the param groups by the update at the
start of each step, so no scheduler state is saved and a resumed run uses the lr the uninterrupted one did.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from megatron_rl.config import Config, OptimCfg


class OptimizerStateMismatch(ValueError):
    """A saved optimizer state whose parameter ownership differs from this run's."""


def lr_at(step: int, cfg: Config) -> float:
    """The lr of every optimizer step of RL step `step` (1-based): optim.lr times a linear warmup over the
    first optim.warmup_steps steps, then either constant or a cosine decay over the remaining steps that
    reaches optim.min_lr_ratio at the last step (run.steps)."""
    o, index = cfg.optim, step - 1
    if index < o.warmup_steps:
        return o.lr * (index + 1) / o.warmup_steps
    if o.schedule == "cosine":
        decay_steps = max(1, cfg.run.steps - o.warmup_steps)
        progress = min(1.0, (index - o.warmup_steps + 1) / decay_steps)
        return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
    return o.lr


def balanced_owners(sizes: list[int], ranks: int) -> list[int]:
    """Owner rank of each parameter: largest first, each to the least-loaded rank (deterministic)."""
    load = [0] * ranks
    owners = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        rank = min(range(ranks), key=lambda r: (load[r], r))
        owners[i] = rank
        load[rank] += sizes[i]
    return owners


class PolicyOptimizer(torch.optim.Optimizer):
    """AdamW over the fp32 masters of the parameters this rank owns; its param_groups (where the update sets
    the lr) and state are the inner AdamW's."""

    def __init__(self, params: list[torch.nn.Parameter], cfg: OptimCfg, group=None):
        """`group`: the data-parallel group to shard over (ZeRO-1), or None to keep everything on every rank."""
        self.model_params = list(params)
        self.group = group
        ranks = dist.get_world_size(group) if group is not None else 1
        rank = dist.get_rank(group) if group is not None else 0
        self.owners = balanced_owners([p.numel() for p in self.model_params], ranks)
        self.src = [dist.get_global_rank(group, o) if group is not None else 0 for o in self.owners]
        self.owned = [i for i, o in enumerate(self.owners) if o == rank]
        # fp32 parameters are their own masters; others get an fp32 copy.
        self.master = {
            i: p if p.dtype == torch.float32 else torch.nn.Parameter(p.detach().float().clone())
            for i, p in ((i, self.model_params[i]) for i in self.owned)
        }
        self.inner = torch.optim.AdamW(
            list(self.master.values()) or [torch.nn.Parameter(torch.zeros(0))],  # a rank may own nothing
            lr=cfg.lr,
            betas=cfg.betas,
            weight_decay=cfg.weight_decay,
        )
        # Not Optimizer.__init__: the inner AdamW owns groups and state (read through the properties below).
        self._optimizer_step_pre_hooks, self._optimizer_step_post_hooks = {}, {}

    # Properties, not copies: AdamW.load_state_dict replaces its param_groups and state with new objects, and a
    # copy taken here would then be stale (an lr set on it after a resume would never reach AdamW).
    @property
    def param_groups(self) -> list[dict]:
        return self.inner.param_groups

    @property
    def state(self) -> dict:
        return self.inner.state

    @property
    def defaults(self) -> dict:
        return self.inner.defaults

    @torch.no_grad()
    def step(self, closure=None) -> None:
        for i, m in self.master.items():
            m.grad = self.model_params[i].main_grad  # the policy's fp32 buffer (a view, no copy)
        self.inner.step()
        for i, m in self.master.items():
            if m is not self.model_params[i]:
                self.model_params[i].copy_(m)
            m.grad = None
        if self.group is not None:
            for p, src in zip(self.model_params, self.src, strict=True):
                dist.broadcast(p.data, src=src, group=self.group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Gradients live in the policy's buffers: `Policy.zero_grads` clears them."""

    @torch.no_grad()
    def refresh_from_model(self) -> None:
        """Masters := the model's current weights (after the model was loaded from elsewhere)."""
        for i, m in self._copies().items():
            m.copy_(self.model_params[i])

    def _copies(self) -> dict[int, torch.Tensor]:
        return {i: m for i, m in self.master.items() if m is not self.model_params[i]}

    def state_dict(self) -> dict:
        """This rank's share: Adam moments and fp32 master copies of the parameters it owns (no collective)."""
        return {
            "owned": self.owned,
            "inner": self.inner.state_dict(),
            "master": {i: m.detach().clone() for i, m in self._copies().items()},
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        if state["owned"] != self.owned or set(state["master"]) != set(self._copies()):
            raise OptimizerStateMismatch(
                "the optimizer state was saved for another parameter sharding (optim.distributed_optimizer or "
                "the data-parallel size differs from the run that saved it)"
            )
        self.inner.load_state_dict(state["inner"])
        for i, saved in state["master"].items():
            self.master[i].copy_(saved)
            self.model_params[i].copy_(saved)
        if self.group is not None:  # every rank's weights from their owners' masters
            for p, src in zip(self.model_params, self.src, strict=True):
                dist.broadcast(p.data, src=src, group=self.group)


def build_optimizer(policy, cfg: OptimCfg) -> PolicyOptimizer:
    """The optimizer of `policy`'s trainable parameters (sharded over its data-parallel group when
    optim.distributed_optimizer is set and there is more than one data-parallel rank)."""
    shard = cfg.distributed_optimizer and policy.dp_size > 1
    return PolicyOptimizer(policy.parameters(), cfg, policy.dp_group if shard else None)
