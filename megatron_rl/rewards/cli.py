"""`megatron-rl reward math|code INPUT.jsonl`: score a JSONL file, one JSON line out per row, then a summary.
`megatron-rl reward doctor`: what this node offers the code sandbox (doctor.py).

Rows: {"response", "answer"} for math; {"response", "tests", "fn_name"?, "float_tolerance"?} for code, where
tests are LiveCodeBench test cases (a list or its JSON text). A row that cannot be read scores 0 with an
"error" field; it does not stop the run.

The trainer's truncation rule applies: a row with "finish_reason": "length" and no `</think>` in its response
scores 0 ("unfinished") without being graded; with `--require-think`, so does any response without `</think>`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from megatron_rl.rewards.code_reward import parse_tests
from megatron_rl.rewards.math_grader import unfinished_response
from megatron_rl.rewards.pool import RewardPool
from megatron_rl.rewards.sandbox import INSTALL_HINT, SandboxUnavailable, find_bwrap


def _read_rows(path: str) -> list[tuple[dict | None, str | None]]:
    """(row, error) per non-empty line. Bytes that are not UTF-8 are replaced, not fatal."""
    rows: list[tuple[dict | None, str | None]] = []
    with open(path, "rb") as f:
        for raw in f:
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8", errors="replace"))
            except (ValueError, RecursionError) as e:
                rows.append((None, f"not JSON: {str(e)[:100]}"))
                continue
            rows.append((row, None) if isinstance(row, dict) else (None, "not a JSON object"))
    return rows


def _text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # numeric references such as 42 are common in math data
    return None


UNFINISHED = {"reward": 0.0, "why": "unfinished: no </think> (cut at the length limit, or --require-think)"}


def _unfinished(row: dict, require_think: bool) -> bool:
    reason = row.get("finish_reason")
    return unfinished_response(row["response"], reason if isinstance(reason, str) else None, require_think)


def _score_math(
    pool: RewardPool, rows: list, timeout: float | None, require_think: bool = False
) -> list[dict]:
    out: list[dict] = [{} for _ in rows]
    todo, responses, answers = [], [], []
    for i, (row, error) in enumerate(rows):
        response, answer = (_text(row.get("response")), _text(row.get("answer"))) if row else (None, None)
        if error or response is None or answer is None:
            out[i] = {"reward": 0.0, "error": error or "row needs string fields response and answer"}
            continue
        if _unfinished(row, require_think):
            out[i] = dict(UNFINISHED)
            continue
        todo.append(i)
        responses.append(response)
        answers.append(answer)
    for i, (reward, why) in zip(todo, pool.score_math_detailed(responses, answers, timeout), strict=True):
        out[i] = {"reward": reward, "why": why}
    return out


def _score_code(
    pool: RewardPool, rows: list, timeout: float | None, require_think: bool = False
) -> list[dict]:
    out: list[dict] = [{} for _ in rows]
    todo, responses, tests = [], [], []
    for i, (row, error) in enumerate(rows):
        if error is None and not isinstance(row.get("response"), str):
            error = "row needs a string field response"
        if error is None:
            try:
                tol = row.get("float_tolerance")
                tests.append(parse_tests(row.get("tests"), row.get("fn_name"), float(tol) if tol else None))
            except (ValueError, TypeError) as e:
                error = f"bad tests: {str(e)[:200]}"
        if error:
            out[i] = {"reward": 0.0, "error": error}
            continue
        if _unfinished(row, require_think):
            tests.pop()
            out[i] = dict(UNFINISHED)
            continue
        todo.append(i)
        responses.append(row["response"])
    results = pool.score_code_detailed(responses, tests, timeout=timeout) if todo else []
    for i, res in zip(todo, results, strict=True):
        out[i] = {"reward": res.reward, "why": res.why, "passed": res.passed, "total": res.total}
        if res.detail:
            out[i]["detail"] = res.detail[:300]
    return out


def reward_main(
    kind: str,
    input_path: str,
    workers: int | None = None,
    timeout: float | None = None,
    unsafe_no_sandbox: bool = False,
    require_think: bool = False,
) -> int:
    """Score INPUT.jsonl; print one JSON line per row and a summary line. Returns the exit code."""
    if kind not in ("math", "code"):
        print(f"error: unknown reward kind {kind!r} (math or code)", file=sys.stderr)
        return 2
    try:
        rows = _read_rows(input_path)
    except OSError as e:
        print(f"error: cannot read {input_path}: {e}", file=sys.stderr)
        return 2
    if kind == "code" and not unsafe_no_sandbox and find_bwrap() is None:
        print(f"error: {INSTALL_HINT}", file=sys.stderr)
        return 3
    if unsafe_no_sandbox and kind == "code":
        print(
            "WARNING: --unsafe-no-sandbox: if bubblewrap is missing, programs run WITHOUT isolation",
            file=sys.stderr,
        )
    started = time.monotonic()
    try:
        with RewardPool(workers, allow_unsandboxed=unsafe_no_sandbox) as pool:
            scored = (_score_math if kind == "math" else _score_code)(pool, rows, timeout, require_think)
    except SandboxUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    for i, record in enumerate(scored):
        print(json.dumps({"index": i, **record}), flush=False)
    rewards = [r["reward"] for r in scored]
    summary = {
        "summary": True,
        "kind": kind,
        "rows": len(rows),
        "mean_reward": sum(rewards) / len(rewards) if rewards else 0.0,
        "correct": int(sum(rewards)),
        "errors": sum(1 for r in scored if "error" in r),
        "unfinished": sum(1 for r in scored if r.get("why") == UNFINISHED["why"]),
        "seconds": round(time.monotonic() - started, 3),
    }
    print(json.dumps(summary), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_rl.rewards.cli", description=__doc__)
    parser.add_argument("kind", choices=["math", "code", "doctor"])
    parser.add_argument("input", nargs="?", help="JSONL file of rows (math, code)")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=None, help="seconds per math sample / per code test")
    parser.add_argument(
        "--unsafe-no-sandbox", action="store_true", help="run code without bubblewrap if missing"
    )
    parser.add_argument(
        "--require-think",
        action="store_true",
        help="a response without </think> scores 0 (thinking templates)",
    )
    args = parser.parse_args(argv)
    if args.kind == "doctor":
        from megatron_rl.rewards.doctor import doctor_main

        return doctor_main(args.workers)
    if args.input is None:
        parser.error("INPUT is required for math and code")
    return reward_main(
        args.kind, args.input, args.workers, args.timeout, args.unsafe_no_sandbox, args.require_think
    )


if __name__ == "__main__":
    sys.exit(main())
