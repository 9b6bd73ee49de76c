"""Where each RL step's rollout batch comes from, and how old the weights that sampled it are.

rollout.staleness 0: a step's batch is sampled when the step asks for it, with the weights of the step before
(strictly on-policy). rollout.staleness 1: while the trainer updates on step n's batch, a background thread
samples step n+1's batch with the weights the engines hold then (step n-1's), so generation overlaps training;
the step waits for it before the engines take step n's weights. Every sample records the weight version it was
sampled with (`RolloutBatch.policy_versions`: the step after which those weights were synced, 0 = the start).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from typing import Any

from megatron_rl.train.rollouts import RolloutBatch

# collect(step, data_position, cfg) -> the batch of RL step `step`, starting at prompt `data_position`, sampled
# with cfg's rollout settings (its temperature may be the one `temperature: auto` chose for that step)
Collect = Callable[[int, int, Any], RolloutBatch]


class RolloutQueue:
    """The rollout batches of a run's steps, sampled on demand (staleness 0) or one step ahead (staleness 1)."""

    def __init__(self, collect: Collect, staleness: int, pending: RolloutBatch | None = None):
        """`pending`: a batch sampled ahead before a checkpoint (from `pending_state`), handed out first."""
        self._collect = collect
        self.staleness = staleness
        self._pending = pending
        self._future: Future | None = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="rollout-ahead") if staleness else None

    def take(self, step: int, data_position: int, cfg: Any) -> RolloutBatch:
        """Step `step`'s batch: the one sampled ahead, or one sampled now with the engines' current weights
        (step - 1's) and `cfg`'s rollout settings. Its stats carry staleness_max / staleness_mean (updates between its weights and the
        trainer's)."""
        self.wait()
        if self._pending is not None:
            batch, self._pending = self._pending, None
        else:
            batch = self._sample(step, data_position, step - 1, cfg)
        staleness = [step - 1 - v for v in batch.policy_versions]
        batch.stats["staleness_max"] = float(max(staleness))
        batch.stats["staleness_mean"] = sum(staleness) / len(staleness)
        return batch

    def start_next(self, step: int, data_position: int, last_step: int, cfg: Any) -> None:
        """At staleness 1, start sampling step + 1's batch from `data_position` on, with the weights the
        engines hold now (step - 1's) and `cfg`'s rollout settings (this step's temperature: the batch keeps
        it, and the loss uses it); nothing after the last step or at staleness 0."""
        if self._thread is not None and step < last_step:
            self._future = self._thread.submit(self._sample, step + 1, data_position, step - 1, cfg)

    def wait(self) -> dict[str, float]:
        """Block until the batch being sampled ahead (if any) is done: the engines are idle afterwards and may
        take new weights. A failure while sampling is raised here. Returns, at staleness 1,
        time_rollout_wait_s: how long the trainer waited (sampling that outlasted the update)."""
        start = time.perf_counter()
        if self._future is not None:
            future, self._future = self._future, None
            self._pending = future.result()
        return {"time_rollout_wait_s": time.perf_counter() - start} if self.staleness else {}

    def pending_state(self) -> dict | None:
        """The batch sampled ahead and not yet trained on, as plain data for a checkpoint (None if there is
        none); call after `wait`."""
        return asdict(self._pending) if self._pending is not None else None

    def close(self) -> None:
        """Wait for the sampling in flight (if any), then end the background thread."""
        if self._thread is not None:
            try:
                self.wait()
            finally:
                self._thread.shutdown()

    def _sample(self, step: int, data_position: int, version: int, cfg: Any) -> RolloutBatch:
        batch = self._collect(step, data_position, cfg)
        batch.policy_versions = [version] * len(batch.responses)
        return batch


def batch_from_state(state: dict | None) -> RolloutBatch | None:
    """The batch `RolloutQueue.pending_state` saved, or None."""
    return RolloutBatch(**state) if state else None
