"""Reward scoring spread over the nodes of a multi-node run (`run.reward_scoring: distributed`).

With `driver` scoring (the default) rank 0's reward pool scores every sample on its node's CPUs while the other
nodes' CPUs idle; a code stage's step then waits on one node's sandboxes. With `distributed`, one rank per node
(the lowest rank on each host) starts a reward pool of `run.reward_workers` processes (0: one per core of the
node), and each time rank 0 scores a batch, scorer i scores the i-th contiguous share of it on its own node and
the rewards are gathered back to rank 0, in order, which needs them for the advantages.

The exchange runs on a gloo group of its own (created at startup, with every rank taking part in its creation)
and on the other scorers in a thread of their own that does nothing but wait for rank 0's next batch. Why a
thread: rank 0 scores from wherever it samples, which at rollout.staleness 1 is a background thread while
the trainer's main threads run collectives on the default group; the scorers cannot answer from their main
threads then. Keeping the exchange on its own group, used by exactly one thread per rank (rank 0's callers
take a lock), keeps the sequence of collectives on it the same on every member, so it cannot interleave with
or block the trainer's. The scorers' threads wait between batches (a step, an evaluation, a checkpoint), hence
the group's long timeout.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from megatron_rl.config import ConfigError
from megatron_rl.rewards.pool import RewardPool
from megatron_rl.rewards.sandbox import SandboxUnavailable
from megatron_rl.rollout.fanout import slices

log = logging.getLogger(__name__)

# How long a scorer waits for rank 0's next batch (a whole RL step, evaluation and checkpoint included).
SCORING_TIMEOUT = timedelta(hours=24)
_STOP = ("stop",)


def scoring_ranks(hosts: Sequence[str]) -> list[int]:
    """The ranks that score, given each rank's host name: the lowest rank on each host, in rank order (rank 0
    is always the first)."""
    first: dict[str, int] = {}
    for rank, host in enumerate(hosts):
        first.setdefault(host, rank)
    return sorted(first.values())


def _score(pool: RewardPool, job: tuple) -> list[float]:
    kind, *args = job
    if kind == "math":
        texts, answers, timeout = args
        return pool.score_math(texts, answers, timeout=timeout)
    texts, tests, fn_names, timeout = args
    return pool.score_code(texts, tests, fn_names, timeout=timeout)


def _score_reported(pool: RewardPool, job: tuple) -> tuple[str, Any, float]:
    """(status, rewards or the error's text, seconds): a scorer's failure travels to rank 0 and is raised
    there, instead of ending the scorer's thread and leaving rank 0 waiting for its share."""
    start = time.perf_counter()
    try:
        return "ok", _score(pool, job), time.perf_counter() - start
    except SandboxUnavailable as e:
        return "sandbox", f"rank {dist.get_rank()}: {e}", time.perf_counter() - start
    except Exception as e:  # noqa: BLE001 - any failure must reach rank 0
        return "error", f"rank {dist.get_rank()}: {type(e).__name__}: {e}", time.perf_counter() - start


class DistributedScorer:
    """Rank 0's side: scores like a RewardPool (score_math, score_code), with the batch split over the
    scorer ranks. Its own share is scored by `pool`, on this node."""

    def __init__(self, pool: RewardPool, group: Any, ranks: list[int]) -> None:
        self.pool, self.group, self.ranks = pool, group, ranks
        self._lock = threading.Lock()
        self._node_seconds = [0.0] * len(ranks)
        self.items_scored = 0  # by this rank's own pool, over its life

    def score_math(
        self, responses: Sequence[str], answers: Sequence[str], timeout: float | None = None
    ) -> list[float]:
        if len(responses) != len(answers):
            raise ValueError("responses and answers differ in length")
        return self._scatter(
            len(responses), lambda lo, hi: ("math", list(responses[lo:hi]), list(answers[lo:hi]), timeout)
        )

    def score_code(
        self,
        responses: Sequence[str],
        tests: Sequence[Any],
        fn_names: Sequence[str | None] | None = None,
        timeout: float | None = None,
    ) -> list[float]:
        fn_names = list(fn_names) if fn_names is not None else [None] * len(responses)
        if not len(responses) == len(tests) == len(fn_names):
            raise ValueError("responses, tests and fn_names differ in length")
        return self._scatter(
            len(responses),
            lambda lo, hi: ("code", list(responses[lo:hi]), list(tests[lo:hi]), fn_names[lo:hi], timeout),
        )

    def take_node_seconds(self) -> list[float]:
        """Seconds each node spent scoring its shares since the last call (index: the node's scorer)."""
        with self._lock:
            seconds, self._node_seconds = self._node_seconds, [0.0] * len(self.ranks)
        return seconds

    def _scatter(self, n: int, job) -> list[float]:
        bounds = slices(n, len(self.ranks))
        with self._lock:
            out: list[Any] = [None]
            dist.scatter_object_list(
                out, [job(lo, hi) for lo, hi in bounds], src=self.ranks[0], group=self.group
            )
            mine = _score_reported(self.pool, out[0])
            self.items_scored += bounds[0][1] - bounds[0][0]
            gathered: list[Any] = [None] * len(self.ranks)
            dist.gather_object(mine, gathered, dst=self.ranks[0], group=self.group)
            rewards: list[float] = []
            for i, (status, value, seconds) in enumerate(gathered):
                self._node_seconds[i] += seconds
                if status == "sandbox":
                    raise SandboxUnavailable(value)
                if status != "ok":
                    raise RuntimeError(f"reward scoring failed on {value}")
                rewards.extend(value)
        if len(rewards) != n:
            raise RuntimeError(f"reward scoring returned {len(rewards)} rewards for {n} samples")
        return rewards

    def close(self) -> None:
        """Stop the other scorers' threads, then this node's pool."""
        with self._lock:
            if self.group is not None:
                out: list[Any] = [None]
                dist.scatter_object_list(out, [_STOP] * len(self.ranks), src=self.ranks[0], group=self.group)
                self.group = None
        self.pool.close()


class ScoringServer:
    """Another node's scorer: a thread that scores the shares rank 0 sends, until rank 0 closes."""

    def __init__(self, pool: RewardPool, group: Any, ranks: list[int]) -> None:
        self.pool, self.group, self.ranks = pool, group, ranks
        self.items_scored = 0
        self._thread = threading.Thread(target=self._serve, name="reward-scorer", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            box: list[Any] = [None]
            dist.scatter_object_list(box, None, src=self.ranks[0], group=self.group)
            if box[0] == _STOP:
                return
            result = _score_reported(self.pool, box[0])
            if result[0] == "ok":
                self.items_scored += len(result[1])
            dist.gather_object(result, None, dst=self.ranks[0], group=self.group)

    def close(self, timeout: float = 60.0) -> None:
        """Wait for rank 0's stop (sent when it closes its scorer), then end this node's pool."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("reward scorer thread did not see rank 0's stop within %.0f s", timeout)
        self.pool.close()


def start_scoring(
    mode: str, workers: int, math_timeout: float, ranks: list[int] | None = None
) -> RewardPool | DistributedScorer | ScoringServer | None:
    """This rank's part in reward scoring, started on every rank together (it creates a process group).

    Rank 0 gets what it scores with: a RewardPool (`driver`, or `distributed` with one node) or a
    DistributedScorer. Another node's scorer rank gets its ScoringServer (close it at the end); other ranks
    get None. `ranks` overrides which ranks score (default: the lowest rank of each host)."""
    single = not dist.is_initialized() or dist.get_world_size() == 1
    if mode == "driver" or single:
        return (
            RewardPool(workers=workers, math_timeout=math_timeout) if single or dist.get_rank() == 0 else None
        )
    if ranks is None:
        hosts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(hosts, socket.gethostname())
        ranks = scoring_ranks(hosts)
    if ranks[0] != 0 or ranks[-1] >= dist.get_world_size():
        raise ConfigError(
            f"config key 'run.reward_scoring_ranks': {ranks} must start with rank 0 (it gathers the rewards) "
            f"and name ranks below the world size {dist.get_world_size()}"
        )
    rank = dist.get_rank()
    if len(ranks) == 1:
        log.info("reward scoring: distributed, but all ranks share one node: rank 0 scores alone")
        return RewardPool(workers=workers, math_timeout=math_timeout) if rank == 0 else None
    group = dist.new_group(ranks=ranks, backend="gloo", timeout=SCORING_TIMEOUT)  # every rank calls this
    if rank not in ranks:
        return None
    pool = RewardPool(workers=workers, math_timeout=math_timeout)
    if rank == 0:
        log.info("reward scoring: distributed over %d nodes (scoring ranks %s)", len(ranks), ranks)
        return DistributedScorer(pool, group, ranks)
    return ScoringServer(pool, group, ranks)
