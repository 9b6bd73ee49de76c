"""Stop cleanly when the job is about to be preempted or to hit its time limit.

A stop is requested in either of two ways:
- SIGUSR1 or SIGTERM delivered to a trainer process (the handlers installed by `install` set a flag; a second
  signal of the same kind gets the default action, so a stuck process can still be killed);
- the file named by $MEGATRON_RL_STOP_FILE appears. slurm/common.sh uses this one: Slurm delivers a signal
  sent to a job step to every process of the step, and vLLM's engine process and the reward workers would die
  of a SIGUSR1 before the step could finish, so the batch script writes the file instead.

The step loop calls `stop_requested()` after each completed step; all ranks agree through one all-reduce, so they
stop at the same step, save a checkpoint and exit with EXIT_PREEMPTED. The batch script requeues the job on
that exit code and the requeued job resumes (`megatron-rl train --resume`) from the checkpoint.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger("megatron_rl")

EXIT_PREEMPTED = 85  # distinct from 0 (done), 1 (crash), 2 (bad config) and 128+N (killed by a signal)
STOP_FILE_ENV = "MEGATRON_RL_STOP_FILE"
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

_received: list[int] = []


def _on_signal(signum, frame) -> None:
    if signum in _received:  # asked twice: stop waiting for the step to end
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    _received.append(signum)
    log.warning("received %s: will checkpoint and stop after the current step", signal.Signals(signum).name)


def install() -> None:
    """Catch SIGUSR1/SIGTERM in this process (only the main thread can; elsewhere the stop file still works)."""
    _received.clear()
    if threading.current_thread() is not threading.main_thread():
        log.debug("preemption: not the main thread, no signal handlers (the stop file still works)")
        return
    for sig in SIGNALS:
        signal.signal(sig, _on_signal)


def _local_request() -> bool:
    stop_file = os.environ.get(STOP_FILE_ENV)
    return bool(_received) or bool(stop_file and Path(stop_file).exists())


def stop_requested() -> bool:
    """True on every rank when any rank was asked to stop (a collective: call it on all ranks)."""
    flag = _local_request()
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    from megatron_rl.distributed import device

    box = torch.tensor([int(flag)], dtype=torch.int32, device=device())
    dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return bool(box.item())


def exit_preempted(step: int, ckpt_root: Path, close=()) -> None:
    """Log the stop, close the given resources (metrics, engine, reward pool; None skipped), end distributed, exit."""
    from megatron_rl.distributed import shutdown
    from megatron_rl.train.checkpoint import latest_checkpoint

    log.warning(
        "preempted: stopped after step %d, checkpoint %s; exiting with code %d (resume with --resume)",
        step,
        latest_checkpoint(ckpt_root),
        EXIT_PREEMPTED,
    )
    for resource in close:
        if resource is not None:
            (getattr(resource, "shutdown", None) or resource.close)()
    shutdown()
    raise SystemExit(EXIT_PREEMPTED)
