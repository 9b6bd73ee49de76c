"""A reward worker process: `python -m megatron_rl.rewards.worker`, started and fed by `RewardPool`.

It reads frames (8-byte little-endian length + pickle) from stdin and writes one frame per scored item to its
private copy of stdout; fd 1 itself is pointed at stderr so that a stray print cannot corrupt the stream.
Frames in: first the config dict, then (kind, [(index, payload), ...], opts) chunks. Frames out:
(index, result) per item, or ("fatal", index, message) when the sandbox cannot run at all. Untrusted code
never runs here: code items go to a `Sandbox` (one uid per worker slot). Math items run math-verify in this
process's main thread, where its deadline signal works; the pool kills the whole worker if an item overruns.
"""

from __future__ import annotations

import os
import pickle
import sys
import tempfile
from typing import Any, BinaryIO

from megatron_rl.rewards.code_reward import CodeResult, extract_code, score_program
from megatron_rl.rewards.math_grader import math_reward_detail
from megatron_rl.rewards.sandbox import (
    Sandbox,
    SandboxLimits,
    SandboxUnavailable,
    is_root,
    kill_uid_processes,
    probe_sandbox,
)


def read_frame(stream: BinaryIO) -> Any:
    head = stream.read(8)
    if len(head) < 8:
        return None
    n = int.from_bytes(head, "little")
    body = stream.read(n)
    if len(body) < n:
        return None
    return pickle.loads(body)


def write_frame(stream: BinaryIO, obj: Any) -> None:
    body = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(len(body).to_bytes(8, "little") + body)
    stream.flush()


class Worker:
    def __init__(self, config: dict) -> None:
        self.config = config
        self.sandbox: Sandbox | None = None
        uid = config.get("uid")
        if uid is not None and is_root():
            kill_uid_processes(uid)  # leftovers of a predecessor on this slot that the pool had to kill

    def _sandbox(self, opts: dict) -> Sandbox:
        if self.sandbox is None:
            root = self.config.get("root_dir") or tempfile.mkdtemp(prefix="megatron-rl-sandbox-")
            sandbox = Sandbox(
                root,
                uid=self.config.get("uid"),
                limits=self.config.get("limits") or SandboxLimits(),
                allow_unsandboxed=self.config.get("allow_unsandboxed", False),
                python=self.config.get("sandbox_python") or "/usr/bin/python3",
                process_cap=opts.get("process_cap"),
                concurrency=opts.get("concurrency", 1),
            )
            probe_sandbox(sandbox)
            self.sandbox = sandbox
        return self.sandbox

    def handle(self, kind: str, payload: Any, opts: dict) -> Any:
        if kind == "math":
            response, answer = payload
            return math_reward_detail(response, answer, opts["timeout"])
        if kind == "code":  # payload: (response or program, tests); opts["extracted"]: program given directly
            text, tests = payload
            program = (
                text if opts.get("extracted") else (extract_code(text) if isinstance(text, str) else None)
            )
            return score_program(self._sandbox(opts), program, tests, opts["timeout"])
        raise ValueError(f"unknown reward kind {kind!r}")

    def failure(self, kind: str, why: str, detail: str) -> Any:
        return (False, why) if kind == "math" else CodeResult(0.0, why=why, detail=detail[:500])


def main() -> None:
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    inp = sys.stdin.buffer
    config = read_frame(inp)
    if config is None:
        return
    worker = Worker(config)
    while True:
        msg = read_frame(inp)
        if msg is None:
            break
        kind, items, opts = msg
        for index, payload in items:
            try:
                result = worker.handle(kind, payload, opts)
            except SandboxUnavailable as e:
                write_frame(out, ("fatal", index, str(e)))
                continue
            except Exception as e:  # one bad item must not take the worker down
                result = worker.failure(kind, "error", f"{type(e).__name__}: {e}")
            write_frame(out, (index, result))
    if worker.sandbox is not None:
        worker.sandbox.close()


if __name__ == "__main__":
    main()
