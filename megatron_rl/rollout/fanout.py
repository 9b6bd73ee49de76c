"""Several rollout engines behind the one-engine interface the trainer uses (engines on separate nodes).

Each step's prompts are cut into contiguous slices, one per engine, generated concurrently and put back in
prompt order; a prompt samples with the same seed whichever engine gets it (`index_offset`). Weights are pushed
to every engine bucket by bucket and verified by each.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from megatron_rl.rollout.base import RolloutSample, SyncReport
from megatron_rl.rollout.weight_sync import WeightStream, as_stream, push_stream


def slices(count: int, parts: int) -> list[tuple[int, int]]:
    """[lo, hi) of each part: contiguous, sizes differing by at most one, in order."""
    return [(i * count // parts, (i + 1) * count // parts) for i in range(parts)]


class EngineFanout:
    def __init__(self, engines: Sequence):
        if not engines:
            raise ValueError("EngineFanout needs at least one engine")
        self.engines = list(engines)
        self.tokenizer = self.engines[0].tokenizer
        self.pool = ThreadPoolExecutor(max_workers=len(self.engines), thread_name_prefix="mrl-engine")

    @property
    def num_engines(self) -> int:
        return len(self.engines)

    def generate(self, prompts: Sequence, seed: int | None = None, **sampling) -> list[RolloutSample]:
        cuts = slices(len(prompts), len(self.engines))
        futures = [
            self.pool.submit(e.generate, list(prompts[lo:hi]), seed=seed, index_offset=lo, **sampling)
            for e, (lo, hi) in zip(self.engines, cuts, strict=True)
            if hi > lo
        ]
        return [s for f in futures for s in f.result()]

    def update_weights(
        self, buckets: Iterable[list[tuple[str, torch.Tensor]]] | WeightStream, transport: str | None = None
    ) -> SyncReport:
        """Every engine gets the whole model, streamed: each bucket goes to all engines at once (each verifies
        it by checksums) before the next is produced. The report is the first engine's with the total time."""
        start = time.perf_counter()
        pushes = [e.start_push(transport) for e in self.engines]
        reports = push_stream(pushes, as_stream(buckets), self.pool)
        first = reports[0]
        first.seconds = time.perf_counter() - start
        first.reload_seconds = sum(r.reload_seconds for r in reports)
        return first

    def sleep(self) -> None:
        for e in self.engines:
            e.sleep()

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        for e in self.engines:
            e.wake_up(tags)

    def shutdown(self) -> None:
        errors = []
        for e in self.engines:
            try:
                e.shutdown()
            except Exception as err:  # shut the others down all the same
                errors.append(err)
        self.pool.shutdown(wait=False)
        if errors:
            raise errors[0]
