"""Binary code reward: the last ```python block after </think>, run against all tests in the sandbox.

Test formats:
- LiveCodeBench rows, as real code-RL data ships them: a list (or its JSON text) of
  {"input": str, "output": str, "testtype": "stdin" | "functional"}, plus "fn_name" for functional tests
  (input: one JSON value per line, one line per argument; output: the JSON of the expected return).
- HumanEval-style `check(candidate)` test code (`CheckTests`), used for the HumanEval problems.

All of a problem's tests run in ONE sandboxed process (the start-up is paid once); the run stops at the first
failing test. Expected outputs never enter the sandbox: stdout and JSON return values come out and are judged
here (function results cross as repr() text, rebuilt with ast.literal_eval), so a program can neither read
the answers nor return an object that claims to equal everything.
"""

from __future__ import annotations

import ast
import json
import math
from dataclasses import dataclass, field
from typing import Any

from megatron_rl.rewards.math_grader import final_answer_region
from megatron_rl.rewards.sandbox import RunResult, Sandbox

DEFAULT_TEST_TIMEOUT = 6.0  # seconds per test (LiveCodeBench's default)
START_ALLOWANCE = 5.0  # seconds for sandbox + interpreter start-up and loading the solution, per program
MAX_PROGRAM_SECONDS = 120.0  # wall-clock cap for one problem's whole run, however many tests it has

_FENCE = "```"
_PYTHON_TAGS = ("python", "python3", "py")


def extract_code(response: str) -> str | None:
    """The last ```python fenced block after </think> (in the whole response if there is no </think>).

    Fences are paired in order (opening, closing, opening, ...), one linear pass: a regex search would go
    quadratic on a response full of unclosed fences. An unclosed last block (a truncated response) is no code.
    """
    region = final_answer_region(response)
    fences = []
    i = region.find(_FENCE)
    while i >= 0:
        fences.append(i)
        i = region.find(_FENCE, i + len(_FENCE))
    code = None
    for start, end in zip(fences[0::2], fences[1::2], strict=False):  # an odd last fence is unclosed
        header_end = region.find("\n", start, end)
        if header_end >= 0 and region[start + len(_FENCE) : header_end].strip().lower() in _PYTHON_TAGS:
            code = region[header_end + 1 : end]
    return code if code and code.strip() else None


@dataclass(frozen=True)
class IOTests:
    """LiveCodeBench-style tests of one problem."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    functional: bool
    fn_name: str | None = None
    float_tolerance: float | None = None  # abs-or-relative error the problem statement allows, if any


@dataclass(frozen=True)
class CheckTests:
    """HumanEval-style tests: trusted `test` code defining check(candidate), run against `entry_point`."""

    test: str
    entry_point: str
    prelude: str = ""  # trusted code the test needs (HumanEval: the prompt, with its helper functions)


@dataclass
class CodeResult:
    reward: float
    passed: int = 0
    total: int = 0
    why: str = ""  # ok, no_code, bad_tests, wrong_answer, runtime_error, timeout, sandbox_error
    detail: str = ""
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


def parse_tests(tests: Any, fn_name: str | None = None, float_tolerance: float | None = None) -> IOTests:
    """LiveCodeBench test cases (a list, or its JSON text) -> IOTests. Raises ValueError on malformed rows."""
    if isinstance(tests, (str, bytes)):
        tests = json.loads(tests)
    if isinstance(tests, dict) and "inputs" in tests:  # the {"inputs": [...], "outputs": [...]} variant
        tests = [{"input": i, "output": o} for i, o in zip(tests["inputs"], tests["outputs"], strict=True)]
    if not isinstance(tests, list) or not tests:
        raise ValueError("tests must be a non-empty list")
    kinds = set()
    inputs, outputs = [], []
    for t in tests:
        if (
            not isinstance(t, dict)
            or not isinstance(t.get("input"), str)
            or not isinstance(t.get("output"), str)
        ):
            raise ValueError(f"malformed test case: {str(t)[:200]}")
        kind = t.get("testtype") or ("functional" if fn_name or t.get("fn_name") else "stdin")
        if kind not in ("stdin", "functional"):
            raise ValueError(f"unknown testtype {kind!r}")
        kinds.add(kind)
        fn_name = fn_name or t.get("fn_name")
        inputs.append(t["input"])
        outputs.append(t["output"])
    if len(kinds) != 1:
        raise ValueError("a problem mixes stdin and functional tests")
    functional = kinds == {"functional"}
    if functional and not fn_name:
        raise ValueError("functional tests need fn_name")
    return IOTests(
        tuple(inputs), tuple(outputs), functional, fn_name if functional else None, float_tolerance
    )


# --------------------------------------------------------------------------------------------------
# judging, outside the sandbox


def _float_close(a: str, b: str, tol: float) -> bool:
    try:
        x, y = float(a), float(b)
    except ValueError:
        return False
    if math.isnan(x) or math.isnan(y):
        return False
    return abs(x - y) <= tol * max(1.0, abs(y))


def stdout_matches(got: str, expected: str, float_tolerance: float | None = None) -> bool:
    """Token-wise comparison: whitespace (trailing spaces, final newline, line breaks) does not matter;
    numbers may differ by the problem's float tolerance when it states one."""
    a, b = got.split(), expected.split()
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if x != y and not (float_tolerance is not None and _float_close(x, y, float_tolerance)):
            return False
    return True


def values_equal(got: Any, expected: Any, float_tolerance: float | None = None) -> bool:
    """Structural equality of two JSON values. Both sides are plain JSON here (the program's return value was
    serialised inside the sandbox), so no __eq__ of the program's runs. bool is not a number; int and float
    compare numerically (2 == 2.0), within the float tolerance when the problem gives one."""
    if isinstance(expected, bool) or isinstance(got, bool):
        return type(got) is type(expected) and got == expected
    if isinstance(expected, (int, float)) and isinstance(got, (int, float)):
        if float_tolerance is not None and (isinstance(got, float) or isinstance(expected, float)):
            if math.isnan(got) or math.isnan(expected):
                return False
            return abs(got - expected) <= float_tolerance * max(1.0, abs(expected))
        return got == expected
    if isinstance(expected, list) and isinstance(got, list):
        return len(got) == len(expected) and all(
            values_equal(g, e, float_tolerance) for g, e in zip(got, expected, strict=True)
        )
    if isinstance(expected, dict) and isinstance(got, dict):
        return got.keys() == expected.keys() and all(
            values_equal(got[k], expected[k], float_tolerance) for k in expected
        )
    return type(got) is type(expected) and got == expected


def _expected_json(text: str) -> Any:
    return json.loads(text)


def _json_args(text: str) -> list[Any]:
    """LiveCodeBench functional input: one JSON value per line, one line per argument."""
    return [json.loads(line) for line in text.split("\n") if line.strip()]


def _as_json_shape(value: Any) -> Any:
    """A returned value in the shapes JSON has: tuples become lists (the expected outputs are JSON)."""
    if isinstance(value, (list, tuple)):
        return [_as_json_shape(v) for v in value]
    if isinstance(value, dict):
        return {k: _as_json_shape(v) for k, v in value.items()}
    return value


def parse_returned(text: Any) -> Any:
    """Rebuild a value the sandbox serialised with repr(): literals only, never code (ast.literal_eval)."""
    if not isinstance(text, str):
        raise ValueError("no result")
    return _as_json_shape(ast.literal_eval(text))


# --------------------------------------------------------------------------------------------------


def _wall_timeout(n_tests: int, per_test: float) -> float:
    return min(START_ALLOWANCE + n_tests * (per_test + 0.2), MAX_PROGRAM_SECONDS)


def run_io_tests(
    sandbox: Sandbox, program: str, tests: IOTests, timeout: float = DEFAULT_TEST_TIMEOUT
) -> CodeResult:
    """Run all tests of one problem in one sandbox run; stop at the first failure."""
    n = len(tests.inputs)
    state = {"passed": 0, "why": "", "detail": ""}
    expected_values: list[Any] = []
    inputs: list[Any] = list(tests.inputs)
    if tests.functional:
        try:
            expected_values = [_expected_json(o) for o in tests.outputs]
            inputs = [_json_args(i) for i in tests.inputs]  # sent as plain values: no JSON inside the sandbox
        except ValueError as e:
            return CodeResult(0.0, 0, n, "bad_tests", f"test case is not JSON: {e}")

    def judge(record: dict) -> bool:
        if record.get("done"):
            return True
        i = record.get("i")
        if not isinstance(i, int) or i != state["passed"]:
            state.update(why="sandbox_error", detail=f"out-of-order result {str(record)[:200]}")
            return False
        if not record.get("ok"):
            why = str(record.get("why", ""))
            err = str(record.get("stderr", "")).strip().splitlines()
            detail = f"test {i}: {why}" + (f" ({err[-1][:200]})" if err else "")
            state.update(why="timeout" if why == "timeout" else "runtime_error", detail=detail)
            return False
        if tests.functional:
            try:
                got = parse_returned(record.get("ret"))
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                state.update(why="wrong_answer", detail=f"test {i}: the result is not a plain value")
                return False
            ok = values_equal(got, expected_values[i], tests.float_tolerance)
        else:
            out = record.get("out")
            ok = isinstance(out, str) and stdout_matches(out, tests.outputs[i], tests.float_tolerance)
        if not ok:
            state.update(why="wrong_answer", detail=f"test {i}: wrong answer")
            return False
        state["passed"] += 1
        return True

    spec: dict[str, Any] = {"timeout": float(timeout), "cpu_seconds": int(math.ceil(timeout)) + 1}
    spec["inputs"] = inputs
    if tests.functional:
        spec["fn_name"] = tests.fn_name
    run = sandbox.run(
        "functional" if tests.functional else "stdin", program, spec, _wall_timeout(n, timeout), judge
    )
    return _result(run, state, n)


def run_check_tests(sandbox: Sandbox, program: str, tests: CheckTests, timeout: float = 10.0) -> CodeResult:
    """Run HumanEval-style check(candidate) code against program (one test: the whole check)."""
    state = {"passed": 0, "why": "", "detail": ""}

    def judge(record: dict) -> bool:
        if record.get("done"):
            return True
        if record.get("check") is True:
            state["passed"] = 1
            return True
        why = str(record.get("why", ""))
        state.update(why="timeout" if "TimeoutError" in why else "wrong_answer", detail=why)
        return False

    spec = {"timeout": float(timeout), "entry_point": tests.entry_point, "prelude": tests.prelude}
    run = sandbox.run("check", program, spec, _wall_timeout(1, timeout), judge, secret={"test": tests.test})
    return _result(run, state, 1)


def _result(run: RunResult, state: dict, n: int) -> CodeResult:
    passed = state["passed"]
    if passed == n and not state["why"] and not run.timed_out and not run.error:
        if any(r.get("done") for r in run.records):
            return CodeResult(1.0, passed, n, "ok", seconds=run.seconds)
    why, detail = state["why"], state["detail"]
    if not why:
        if run.timed_out:
            why, detail = "timeout", "the whole run exceeded its wall-clock limit"
        elif run.error:
            why, detail = "sandbox_error", run.error
        elif run.ended:
            why, detail = "runtime_error", run.ended
        else:
            why, detail = (
                "runtime_error",
                f"the driver ended early (exit {run.exit_status}): {run.stderr[-300:]}",
            )
    return CodeResult(0.0, passed, n, why, detail, run.seconds)


def score_program(
    sandbox: Sandbox,
    program: str | None,
    tests: IOTests | CheckTests,
    timeout: float = DEFAULT_TEST_TIMEOUT,
) -> CodeResult:
    if program is None:
        return CodeResult(0.0, 0, 0, "no_code", "no ```python block after </think>")
    if isinstance(tests, CheckTests):
        return run_check_tests(sandbox, program, tests, timeout)
    return run_io_tests(sandbox, program, tests, timeout)
