"""Process groups and Megatron parallel state, CPU and GPU alike.

The one place that picks NCCL or gloo and patches the megatron-core calls that assume CUDA.
"""

from __future__ import annotations

import os
import socket
import types
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_rl.config import PlacementError

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
    # dist_checkpointing waits for device copies before writing; on the CPU there is nothing to wait for.
    torch.cuda.synchronize = lambda *args, **kwargs: None  # type: ignore[assignment]
    # With tied embeddings split over pipeline stages, Megatron moves the last stage's copy with `.cuda()`
    # before summing it with the first stage's: on a CPU-only torch that raises; here it stays put.
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[assignment]
    # The forward-backward schedules count tokens in `torch.zeros([], device="cuda")`: give them a torch whose
    # zeros land on the CPU (the module's other uses of torch are untouched).
    from megatron.core.pipeline_parallel import schedules

    schedules.torch = _TorchOnCpu("torch")  # type: ignore[attr-defined]
    _CPU_SHIM_APPLIED = True


class _TorchOnCpu(types.ModuleType):
    """torch, except that zeros(..., device="cuda") makes a CPU tensor."""

    def __getattr__(self, name: str):
        return getattr(torch, name)

    @staticmethod
    def zeros(*args, device=None, **kwargs):
        return torch.zeros(*args, device="cpu" if device == "cuda" else device, **kwargs)


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


def first_slurm_host(nodelist: str) -> str:
    """The first host of a Slurm node list: 'gpu[07-09,12],cpu1' -> 'gpu07', 'rack1-n[3-4]-ib' -> 'rack1-n3-ib'."""
    head = nodelist.strip()
    depth = 0
    for i, ch in enumerate(head):  # the first comma outside brackets ends the first entry
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            head = head[:i]
            break
    if "[" not in head:
        return head
    prefix, rest = head.split("[", 1)
    ranges, suffix = rest.split("]", 1)
    return prefix + ranges.split(",")[0].split("-")[0] + suffix


def slurm_rendezvous(env: dict[str, str] | None = None) -> dict[str, str]:
    """RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT for a process started by `srun` (one task per GPU).

    Empty outside an srun step (SLURM_STEP_ID unset): a batch script itself also sees SLURM_PROCID=0 and
    SLURM_NTASKS, and must not wait for ranks that will never come. MASTER_ADDR is the first host of the job,
    MASTER_PORT a port derived from the job id (the same on every node, different for concurrent jobs).
    """
    env = os.environ if env is None else env
    if "SLURM_STEP_ID" not in env or "SLURM_PROCID" not in env:
        return {}
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
    return {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS", "1"),
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "MASTER_ADDR": first_slurm_host(nodelist),
        "MASTER_PORT": str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000),
    }


def launcher_rank(env: dict[str, str] | None = None) -> int:
    """This process's rank as its launcher (torchrun, srun) gave it, before or after torch.distributed: the
    one to print a run's result line is rank 0."""
    env = os.environ if env is None else env
    return int(env.get("RANK") or slurm_rendezvous(env).get("RANK") or 0)


def init_distributed(layout: ParallelLayout, rank: int | None = None, world_size: int | None = None) -> None:
    """Start torch.distributed (if not already) and Megatron's parallel state for `layout`.

    Rank and world size come from the arguments, from the usual env vars (RANK/WORLD_SIZE, set by torchrun), or
    when those are unset from Slurm's (SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID inside an srun step, see
    slurm_rendezvous); a single process with no env gets a private one-rank group on a free port.
    """
    from megatron.core import parallel_state

    apply_cpu_shim()
    if not dist.is_initialized():
        env = dict(os.environ)
        if "RANK" not in env and "WORLD_SIZE" not in env:
            env = {**slurm_rendezvous(), **env}  # MASTER_ADDR/PORT exported by the batch script win
            for key in ("MASTER_ADDR", "MASTER_PORT"):  # the env:// rendezvous reads these two
                if key in env:
                    os.environ[key] = env[key]
        rank = int(env.get("RANK", 0)) if rank is None else rank
        world_size = int(env.get("WORLD_SIZE", 1)) if world_size is None else world_size
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            if world_size > 1:
                raise RuntimeError("MASTER_PORT must be set when WORLD_SIZE > 1")
            os.environ["MASTER_PORT"] = str(free_port())
        if use_cuda():
            torch.cuda.set_device(int(env.get("LOCAL_RANK", rank % torch.cuda.device_count())))
        dist.init_process_group("nccl" if use_cuda() else "gloo", rank=rank, world_size=world_size)
    world = dist.get_world_size()
    if world % layout.model_parallel_size:
        raise PlacementError(
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
