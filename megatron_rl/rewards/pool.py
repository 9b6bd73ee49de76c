"""A pool of reward worker processes that scores batches in parallel, with a hard deadline per item.

Why our own pool and not multiprocessing.Pool: a task that hangs (SymPy stuck in C code, which no signal
interrupts) must cost one sample, not the batch. Here every item has a deadline; a worker that overruns is
SIGKILLed and replaced, the item scores 0, and the rest of its chunk goes back to the queue. A worker that
crashes is treated the same way. Workers are plain subprocesses (`python -m megatron_rl.rewards.worker`), so
starting one does not re-import the trainer's __main__ or fork a process holding CUDA state; they are started
once and reused for every batch (the trainer scores a batch each step).

When running as root, each worker slot leases a uid of its own for its sandbox (see sandbox.py). Otherwise the
first code batch probes how this node can cap a sandbox's processes (confinement.py), logs the mechanism, and
refuses with one line when none is safe.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import pickle
import selectors
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_rl.rewards.code_reward import (
    DEFAULT_TEST_TIMEOUT,
    CheckTests,
    CodeResult,
    IOTests,
    _wall_timeout,
    parse_tests,
)
from megatron_rl.rewards.confinement import UID_TASK_CAP, ProcessCap, choose_process_cap, log_choice
from megatron_rl.rewards.math_grader import DEFAULT_MATH_TIMEOUT
from megatron_rl.rewards.sandbox import (
    INSTALL_HINT,
    SandboxLimits,
    SandboxUnavailable,
    UidLease,
    find_bwrap,
    is_root,
    kill_uid_processes,
)

logger = logging.getLogger(__name__)

KILL_MARGIN = 3.0  # seconds past an item's own limit before the pool kills its worker
# Extra time for a worker's first item: importing math-verify and SymPy (done outside the per-sample deadline)
# or compiling the sandbox driver takes a second or more, and must not get a fresh worker killed.
FIRST_ITEM_ALLOWANCE = 15.0
PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


@dataclass
class _Worker:
    slot: int
    proc: subprocess.Popen
    buf: bytearray = field(default_factory=bytearray)
    chunk: list[int] = field(default_factory=list)  # item indices sent, not yet answered
    deadline: float = math.inf
    fresh: bool = True  # has not answered yet


class RewardPool:
    """Scores math and code samples in parallel worker processes. Reusable across batches; close() when done.

    >>> with RewardPool(workers=2) as pool:
    ...     pool.score_math(["</think> \\\\boxed{1/2}"], ["\\\\frac12"])
    [1.0]
    """

    def __init__(
        self,
        workers: int | None = None,
        *,
        allow_unsandboxed: bool = False,
        limits: SandboxLimits | None = None,
        math_timeout: float = DEFAULT_MATH_TIMEOUT,
        code_timeout: float = DEFAULT_TEST_TIMEOUT,
        sandbox_python: str = "/usr/bin/python3",
    ) -> None:
        self.n_workers = workers or default_workers()
        self.allow_unsandboxed = allow_unsandboxed
        self.limits = limits or SandboxLimits()
        self.math_timeout = math_timeout
        self.code_timeout = code_timeout
        self.sandbox_python = sandbox_python
        self.root_dir = tempfile.mkdtemp(prefix="megatron-rl-sandbox-")
        os.chmod(self.root_dir, 0o711)  # workers' dirs inside can be reached by their own uid, not listed
        self._leases: list[UidLease | None] = []
        self._workers: list[_Worker] = []
        self._sel = selectors.DefaultSelector()
        self.restarts = 0
        self._closed = False
        self.process_cap: ProcessCap | None = None  # chosen by the first code batch
        try:
            for slot in range(self.n_workers):
                self._leases.append(UidLease.acquire() if is_root() else None)
                self._workers.append(self._spawn(slot))
        except BaseException:
            self.close()
            raise

    # -- lifecycle ---------------------------------------------------------------------------------

    @property
    def uids(self) -> list[int]:
        """The sandbox uids this pool leased (empty when not running as root)."""
        return [lease.uid for lease in self._leases if lease is not None]

    def _spawn(self, slot: int) -> _Worker:
        env = dict(os.environ)
        env["PYTHONPATH"] = PACKAGE_ROOT + os.pathsep + env.get("PYTHONPATH", "")
        proc = subprocess.Popen(
            [sys.executable, "-m", "megatron_rl.rewards.worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            close_fds=True,
        )
        lease = self._leases[slot]
        config = {
            "slot": slot,
            "uid": lease.uid if lease is not None else None,
            "root_dir": self.root_dir,
            "limits": self.limits,
            "allow_unsandboxed": self.allow_unsandboxed,
            "sandbox_python": self.sandbox_python,
        }
        worker = _Worker(slot, proc)
        self._send(worker, config)
        os.set_blocking(proc.stdout.fileno(), False)
        self._sel.register(proc.stdout.fileno(), selectors.EVENT_READ, worker)
        return worker

    def _send(self, worker: _Worker, obj: Any) -> bool:
        body = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            worker.proc.stdin.write(len(body).to_bytes(8, "little") + body)
            worker.proc.stdin.flush()
            return True
        except (BrokenPipeError, OSError):
            return False

    def _kill(self, worker: _Worker) -> None:
        try:
            self._sel.unregister(worker.proc.stdout.fileno())
        except (KeyError, ValueError):
            pass
        if worker.proc.poll() is None:
            worker.proc.kill()  # SIGKILL to the worker's own pid; its sandboxes die with it (die-with-parent)
        worker.proc.wait()
        for stream in (worker.proc.stdin, worker.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass

    def _replace(self, worker: _Worker) -> _Worker:
        self._kill(worker)
        self.restarts += 1
        lease = self._leases[worker.slot]
        if lease is not None:
            kill_uid_processes(lease.uid)
        fresh = self._spawn(worker.slot)
        self._workers[worker.slot] = fresh
        return fresh

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for worker in self._workers:
            try:
                worker.proc.stdin.close()  # EOF: the worker exits by itself
            except OSError:
                pass
        deadline = time.monotonic() + 2.0
        for worker in self._workers:
            try:
                worker.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            self._kill(worker)
        for lease in self._leases:
            if lease is not None:
                kill_uid_processes(lease.uid)
                lease.release()
        self._sel.close()
        shutil.rmtree(self.root_dir, ignore_errors=True)

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # -- scheduling --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _batch(self) -> Iterator[None]:
        """Guards one batch: refuses a closed pool, and leaves no worker busy with it when interrupted."""
        if self._closed:
            raise RuntimeError("the RewardPool is closed")
        try:
            yield
        except BaseException:
            # Interrupted mid-batch (KeyboardInterrupt, a fatal sandbox error): workers still busy with this
            # batch would answer the next one with stale results. Replace them.
            for worker in list(self._workers):
                if worker.chunk:
                    worker.chunk = []
                    self._replace(worker)
            raise

    def _run(
        self,
        kind: str,
        payloads: Sequence[Any],
        opts: dict,
        item_limits: Sequence[float],
        chunk_size: int,
        failure: Any,
    ) -> list[Any]:
        """Score payloads; item i may take item_limits[i] seconds (+ a margin) before its worker is killed."""
        with self._batch():
            n = len(payloads)
            results: list[Any] = [None] * n
            queue: collections.deque[list[int]] = collections.deque(
                list(range(i, min(i + chunk_size, n))) for i in range(0, n, chunk_size)
            )
            remaining = n
            idle = [w for w in self._workers]
            fatal: str | None = None

            def item_deadline(worker: _Worker) -> float:
                # When the pool kills the worker if its current item (its chunk's first) has not answered.
                return time.monotonic() + item_limits[worker.chunk[0]] + KILL_MARGIN

            def requeue(worker: _Worker, items: list[int]) -> _Worker:
                # `items` go back to the head of the queue; a fresh worker replaces the dead or killed one.
                if items:
                    queue.appendleft(items)
                worker.chunk = []
                return self._replace(worker)

            def give_up(worker: _Worker, why: str) -> _Worker:
                # The item in progress scores 0; the rest of the chunk goes back to the queue.
                nonlocal remaining
                results[worker.chunk[0]] = failure(why)
                remaining -= 1
                return requeue(worker, worker.chunk[1:])

            while remaining > 0:
                while idle and queue and fatal is None:
                    worker = idle.pop()
                    chunk = queue.popleft()
                    worker.chunk = list(chunk)
                    worker.deadline = item_deadline(worker)
                    if worker.fresh:
                        worker.deadline += FIRST_ITEM_ALLOWANCE
                    if not self._send(worker, (kind, [(i, payloads[i]) for i in chunk], opts)):
                        # The worker was dead before it got the chunk: not its items' fault.
                        idle.append(requeue(worker, chunk))
                busy = [w for w in self._workers if w.chunk]
                if not busy:
                    if fatal is not None:
                        raise SandboxUnavailable(fatal)
                    break
                timeout = max(0.0, min(w.deadline for w in busy) - time.monotonic())
                for key, _ in self._sel.select(timeout):
                    worker = key.data
                    try:
                        data = os.read(key.fd, 1 << 20)
                    except BlockingIOError:
                        continue
                    if not worker.chunk:  # an idle worker: it can only have died (EOF); swap in a fresh one
                        if not data:
                            fresh = self._replace(worker)
                            idle = [fresh if w is worker else w for w in idle]
                        continue
                    if not data:
                        idle.append(give_up(worker, "worker_crash"))
                        continue
                    worker.buf += data
                    while len(worker.buf) >= 8:
                        size = int.from_bytes(worker.buf[:8], "little")
                        if len(worker.buf) < 8 + size:
                            break
                        frame = pickle.loads(bytes(worker.buf[8 : 8 + size]))
                        del worker.buf[: 8 + size]
                        if frame[0] == "fatal":
                            fatal = frame[2]
                            index = frame[1]
                            results[index] = failure("sandbox_error")
                        else:
                            index, results[index] = frame
                        remaining -= 1
                        worker.fresh = False
                        worker.chunk.remove(index)
                        if worker.chunk:
                            worker.deadline = item_deadline(worker)
                        else:
                            idle.append(worker)
                now = time.monotonic()
                for worker in list(self._workers):
                    if worker.chunk and now > worker.deadline:
                        idle.append(give_up(worker, "timeout"))
            if fatal is not None:
                raise SandboxUnavailable(fatal)
            return results

    # -- public API --------------------------------------------------------------------------------

    def score_math_detailed(
        self, responses: Sequence[str | bytes], answers: Sequence[str], timeout: float | None = None
    ) -> list[tuple[float, str]]:
        """[(reward, why)] for each (response, reference answer); why as in math_reward_detail."""
        if len(responses) != len(answers):
            raise ValueError("responses and answers differ in length")
        timeout = self.math_timeout if timeout is None else timeout
        n = len(responses)
        # Chunks amortise the pipe round trip (a sample takes ~1-5 ms); several per worker even out the load.
        chunk = max(1, min(64, n // (4 * self.n_workers)))
        raw = self._run(
            "math",
            list(zip(responses, answers, strict=True)),
            {"timeout": timeout},
            [timeout] * n,
            chunk,
            lambda why: (False, why),
        )
        return [(1.0 if ok else 0.0, why) for ok, why in raw]

    def score_math(
        self, responses: Sequence[str | bytes], answers: Sequence[str], timeout: float | None = None
    ) -> list[float]:
        return [r for r, _ in self.score_math_detailed(responses, answers, timeout)]

    def _check_sandbox(self) -> None:
        if find_bwrap() is None:
            if not self.allow_unsandboxed:
                raise SandboxUnavailable(INSTALL_HINT)
            logger.warning("WARNING: bubblewrap is missing: the code reward runs programs WITHOUT a sandbox")
            self.process_cap = ProcessCap(UID_TASK_CAP, "no sandbox: launch cap only")
        if self.process_cap is None:
            self.process_cap = choose_process_cap(
                self.root_dir, self.limits.processes, self.n_workers, self.sandbox_python
            )
            log_choice(self.process_cap)

    def run_programs(
        self,
        programs: Sequence[str | None],
        tests: Sequence[IOTests | CheckTests],
        timeout: float | None = None,
        extracted: bool = True,
    ) -> list[CodeResult]:
        """Score programs (or, with extracted=False, raw responses) against parsed tests, one problem each."""
        if len(programs) != len(tests):
            raise ValueError("programs and tests differ in length")
        self._check_sandbox()
        timeout = self.code_timeout if timeout is None else timeout
        limits = [
            _wall_timeout(1 if isinstance(t, CheckTests) else len(t.inputs), timeout) + 2.0 for t in tests
        ]
        return self._run(
            "code",
            list(zip(programs, tests, strict=True)),
            {
                "timeout": timeout,
                "extracted": extracted,
                "process_cap": self.process_cap,
                "concurrency": self.n_workers,
            },
            limits,
            1,
            lambda why: CodeResult(0.0, why=why, detail=f"the reward worker was lost ({why})"),
        )

    def score_code_detailed(
        self,
        responses: Sequence[str | bytes],
        tests: Sequence[Any],
        fn_names: Sequence[str | None] | None = None,
        timeout: float | None = None,
        float_tolerances: Sequence[float | None] | None = None,
    ) -> list[CodeResult]:
        """Score model responses against LiveCodeBench-style tests (list or JSON text per problem)."""
        n = len(responses)
        fn_names = fn_names if fn_names is not None else [None] * n
        float_tolerances = float_tolerances if float_tolerances is not None else [None] * n
        parsed: list[IOTests | CheckTests | None] = []
        for t, fn, tol in zip(tests, fn_names, float_tolerances, strict=True):
            if isinstance(t, (IOTests, CheckTests)):
                parsed.append(t)
                continue
            try:
                parsed.append(parse_tests(t, fn, tol))
            except (ValueError, TypeError) as e:
                logger.warning("unusable tests: %s", e)
                parsed.append(None)
        todo = [i for i, p in enumerate(parsed) if p is not None]
        texts = [
            r.decode("utf-8", errors="replace") if isinstance(r, (bytes, bytearray)) else r for r in responses
        ]
        results: list[CodeResult] = [CodeResult(0.0, why="bad_tests", detail="malformed test cases")] * n
        if todo:
            scored = self.run_programs([texts[i] for i in todo], [parsed[i] for i in todo], timeout, False)
            for i, res in zip(todo, scored, strict=True):
                results[i] = res
        return results

    def score_code(
        self,
        responses: Sequence[str | bytes],
        tests: Sequence[Any],
        fn_names: Sequence[str | None] | None = None,
        timeout: float | None = None,
        float_tolerances: Sequence[float | None] | None = None,
    ) -> list[float]:
        return [
            r.reward for r in self.score_code_detailed(responses, tests, fn_names, timeout, float_tolerances)
        ]


def score_math_batch(
    responses: Sequence[str | bytes],
    answers: Sequence[str],
    workers: int | None = None,
    timeout: float = DEFAULT_MATH_TIMEOUT,
) -> list[float]:
    """One-off batch scoring. A trainer should keep one RewardPool instead (workers start once)."""
    with RewardPool(workers) as pool:
        return pool.score_math(responses, answers, timeout)


def score_code_batch(
    responses: Sequence[str | bytes],
    tests_list: Sequence[Any],
    fn_names: Sequence[str | None] | None = None,
    workers: int | None = None,
    timeout: float = DEFAULT_TEST_TIMEOUT,
    allow_unsandboxed: bool = False,
) -> list[float]:
    """One-off batch scoring of code responses. A trainer should keep one RewardPool instead."""
    with RewardPool(workers, allow_unsandboxed=allow_unsandboxed) as pool:
        return pool.score_code(responses, tests_list, fn_names, timeout)
