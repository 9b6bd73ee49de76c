"""Process groups and Megatron parallel state, CPU and GPU alike.

The one place that picks NCCL or gloo and patches the megatron-core calls that assume CUDA.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

_CPU_SHIM_APPLIED = False


def use_cuda() -> bool:
    return torch.cuda.is_available()


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if use_cuda() else torch.device("cpu")


def apply_cpu_shim() -> None:
    """Let megatron-core run on a machine without CUDA.

    Several megatron-core paths (embedding/linear init, memory buffers, RNG trackers) call
    `torch.cuda.current_device()` only to pick a device; answering "cpu" keeps them on the CPU.
    """
    global _CPU_SHIM_APPLIED
    if _CPU_SHIM_APPLIED or use_cuda():
        return
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    _CPU_SHIM_APPLIED = True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class ParallelLayout:
    tp: int = 1
    pp: int = 1

    @property
    def model_parallel_size(self) -> int:
        return self.tp * self.pp


def init_distributed(layout: ParallelLayout, rank: int | None = None, world_size: int | None = None) -> None:
    """Start torch.distributed (if not already) and Megatron's parallel state for `layout`.

    Rank and world size come from the arguments or from the usual env vars (RANK/WORLD_SIZE, set by torchrun
    or by our Slurm scripts); a single process with no env gets a private one-rank group on a free port.
    """
    from megatron.core import parallel_state

    apply_cpu_shim()
    if not dist.is_initialized():
        rank = int(os.environ.get("RANK", 0)) if rank is None else rank
        world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            if world_size > 1:
                raise RuntimeError("MASTER_PORT must be set when WORLD_SIZE > 1")
            os.environ["MASTER_PORT"] = str(free_port())
        if use_cuda():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count())))
        dist.init_process_group("nccl" if use_cuda() else "gloo", rank=rank, world_size=world_size)
    world = dist.get_world_size()
    if world % layout.model_parallel_size:
        raise ValueError(
            f"world size {world} is not a multiple of tensor_parallel_size * pipeline_parallel_size "
            f"= {layout.tp} * {layout.pp}"
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp
    )
    from megatron.core import tensor_parallel

    # Megatron's RNG tracker is keyed on CUDA; on the CPU the default generator is all we use.
    if use_cuda():
        tensor_parallel.model_parallel_cuda_manual_seed(1234)


def shutdown() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
