"""Code reward: extraction, judging, the LiveCodeBench test styles in the real bubblewrap sandbox, the pool,
the unsafe flag and the `reward` command."""

from __future__ import annotations

import json
import logging
import time

import pytest

from megatron_rl.rewards import (
    CheckTests,
    RewardPool,
    Sandbox,
    SandboxUnavailable,
    extract_code,
    parse_tests,
    stdout_matches,
    values_equal,
)
from megatron_rl.rewards.cli import reward_main


def fenced(code: str, think: bool = True) -> str:
    return ("<think>plan</think>" if think else "") + f"Here it is:\n```python\n{code}\n```\n"


SUM_STDIN = "n = int(input())\nprint(sum(map(int, input().split())))\n"
SUM_TESTS = [
    {"input": "3\n1 2 3\n", "output": "6\n", "testtype": "stdin"},
    {"input": "1\n-5\n", "output": "-5", "testtype": "stdin"},
]
TWO_SUM = """
class Solution:
    def twoSum(self, nums: list[int], target: int) -> list[int]:
        seen = {}
        for i, x in enumerate(nums):
            if target - x in seen:
                return [seen[target - x], i]
            seen[x] = i
"""
TWO_SUM_TESTS = [
    {"input": "[2, 7, 11, 15]\n9", "output": "[0, 1]", "testtype": "functional"},
    {"input": "[3, 2, 4]\n6", "output": "[1, 2]", "testtype": "functional"},
]


@pytest.fixture(scope="module")
def pool():
    with RewardPool(workers=2, code_timeout=3.0) as p:
        yield p


# -- extraction and judging (no sandbox) ---------------------------------------------------------------------


def test_extract_code() -> None:
    assert extract_code(fenced("print(1)")) == "print(1)\n"
    two = "```python\nprint(1)\n```\n</think>\n```python\nprint(2)\n```\n```python\nprint(3)\n```"
    assert extract_code(two) == "print(3)\n"
    assert extract_code("```python\nprint(1)\n```\n</think> no code after thinking") is None
    assert extract_code("</think>```py\nx = 1\n```") == "x = 1\n"
    assert extract_code("</think>```cpp\nint main(){}\n```") is None
    assert extract_code("</think>```python\nprint(1)\n") is None  # unterminated: truncated response
    assert extract_code("</think>```\nplain\n```\n```Python \nx = 2\n```") == "x = 2\n"
    start = time.monotonic()
    assert extract_code("</think>" + "```python\n" * 100_000) is None  # linear, even with 100k open fences
    assert time.monotonic() - start < 10.0  # ~0.1 s quiet; quadratic would take minutes


def test_stdout_matching() -> None:
    assert stdout_matches("1 2\n3  \n\n", "1 2\n3")
    assert not stdout_matches("1 2 3", "1 2")
    assert not stdout_matches("0.3333", "0.333333333")
    assert stdout_matches("0.3333334", "0.333333333", float_tolerance=1e-6)
    assert not stdout_matches("0.3334", "0.333333333", float_tolerance=1e-6)
    assert not stdout_matches("YES", "yes")


def test_value_equality() -> None:
    assert values_equal([0, 1], [0, 1])
    assert values_equal(2.0, 2)
    assert not values_equal(True, 1)
    assert not values_equal(1, True)
    assert not values_equal([1, 2], [1, 2, 3])
    assert values_equal({"a": [1.0000001]}, {"a": [1.0]}, float_tolerance=1e-6)
    assert not values_equal({"a": [1.0000001]}, {"a": [1.0]})
    assert not values_equal(None, 0)
    assert not values_equal("1", 1)


def test_parse_tests_formats() -> None:
    t = parse_tests(json.dumps(TWO_SUM_TESTS), "twoSum")
    assert t.functional and t.fn_name == "twoSum" and len(t.inputs) == 2
    t = parse_tests(SUM_TESTS)
    assert not t.functional and t.outputs[0] == "6\n"
    with pytest.raises(ValueError):
        parse_tests(TWO_SUM_TESTS)  # functional without fn_name
    with pytest.raises(ValueError):
        parse_tests([SUM_TESTS[0], {**TWO_SUM_TESTS[0]}], "twoSum")  # mixed styles
    with pytest.raises(ValueError):
        parse_tests([])


# -- the two LiveCodeBench styles in the sandbox -------------------------------------------------------------


def test_stdin_and_functional_styles(pool: RewardPool) -> None:
    float_tests = [{"input": "3\n", "output": "0.333333333\n", "testtype": "stdin"}]
    rows = [
        (fenced(SUM_STDIN), SUM_TESTS, None, None, 1.0),
        (
            fenced("print(sum(map(int, open(0).read().split()[1:])), end='   \\n\\n')"),
            SUM_TESTS,
            None,
            None,
            1.0,
        ),
        (
            fenced("import sys\ndata = sys.stdin.buffer.read().split()\nprint(sum(map(int, data[1:])))"),
            SUM_TESTS,
            None,
            None,
            1.0,
        ),
        (fenced("n = int(input())\nprint(n)"), SUM_TESTS, None, None, 0.0),
        (fenced("print(1 / int(input()))"), float_tests, None, 1e-6, 1.0),
        (fenced("print(round(1 / int(input()), 4))"), float_tests, None, None, 0.0),
        (fenced(TWO_SUM), TWO_SUM_TESTS, "twoSum", None, 1.0),
        (
            fenced("def twoSum(nums, target):\n    return [0, 1] if target == 9 else [1, 2]"),
            TWO_SUM_TESTS,
            "twoSum",
            None,
            1.0,
        ),  # a top-level function works too
        (
            fenced(TWO_SUM.replace("[seen[target - x], i]", "[i, seen[target - x]]")),
            TWO_SUM_TESTS,
            "twoSum",
            None,
            0.0,
        ),
        (fenced(TWO_SUM, think=False), TWO_SUM_TESTS, "twoSum", None, 1.0),
        (
            fenced(TWO_SUM.replace("[seen[target - x], i]", "(seen[target - x], i)")),
            TWO_SUM_TESTS,
            "twoSum",
            None,
            1.0,
        ),  # a tuple is returned as the JSON list it is
        ("<think>```python\n" + TWO_SUM + "```</think> I give up.", TWO_SUM_TESTS, "twoSum", None, 0.0),
        (
            fenced(
                "import threading, sys\nsys.setrecursionlimit(10**6)\nthreading.stack_size(1 << 26)\n"
                "def main():\n    input()\n    print(sum(map(int, input().split())))\n"
                "threading.Thread(target=main).start()"
            ),
            SUM_TESTS,
            None,
            None,
            1.0,
        ),
        (fenced("import sys\nprint(6)\nsys.exit(0)"), SUM_TESTS[:1], None, None, 1.0),
        (fenced("print(6)\nraise SystemExit(3)"), SUM_TESTS[:1], None, None, 0.0),
    ]
    results = pool.score_code_detailed(
        [r[0] for r in rows],
        [r[1] for r in rows],
        [r[2] for r in rows],
        float_tolerances=[r[3] for r in rows],
    )
    for row, res in zip(rows, results, strict=True):
        assert res.reward == row[4], (row[0], res)


def test_stop_at_first_failure_and_time_limits(pool: RewardPool) -> None:
    prog = "import time\nx = int(input())\nif x == 3: time.sleep(100)\nprint(x)"
    tests = [{"input": str(i), "output": "1" if i == 2 else str(i), "testtype": "stdin"} for i in range(1, 5)]
    start = time.monotonic()
    res = pool.score_code_detailed([fenced(prog)], [tests])[0]
    assert (res.reward, res.passed, res.why) == (0.0, 1, "wrong_answer")
    assert time.monotonic() - start < 8.0  # test 3 (sleeps 100 s) never ran
    res = pool.score_code_detailed([fenced("import time\ntime.sleep(100)")], [SUM_TESTS], timeout=1.0)[0]
    assert (res.reward, res.why) == (0.0, "timeout") and res.seconds < 5.0
    slow_fn = "class Solution:\n    def twoSum(self, nums, target):\n        while True: pass"
    res = pool.score_code_detailed([fenced(slow_fn)], [TWO_SUM_TESTS], ["twoSum"], timeout=1.0)[0]
    assert (res.reward, res.why) == (0.0, "timeout") and res.seconds < 5.0
    res = pool.score_code_detailed([fenced("x = bytearray(2 << 30)\nprint(6)")], [SUM_TESTS[:1]])[0]
    assert (res.reward, res.why) == (0.0, "runtime_error"), res


def test_all_tests_share_one_sandboxed_process(pool: RewardPool) -> None:
    # Functional tests are calls into one loaded solution: module state persists between them.
    prog = "import os\ncalls = []\ndef f(x):\n    calls.append(x)\n    return len(calls)"
    tests = [{"input": str(i), "output": str(i + 1), "testtype": "functional"} for i in range(5)]
    assert pool.score_code([fenced(prog)], [tests], ["f"]) == [1.0]


def test_results_are_judged_outside_the_sandbox(pool: RewardPool) -> None:
    liars = [
        "class Any:\n    def __eq__(self, other): return True\n    def __ne__(self, other): return False\n"
        "class Solution:\n    def twoSum(self, nums, target): return Any()",
        "class S(str):\n    def __eq__(self, other): return True\n"
        "class Solution:\n    def twoSum(self, nums, target): return S('nope')",
        "class L(list):\n    def __eq__(self, other): return True\n"
        "class Solution:\n    def twoSum(self, nums, target): return L([9, 9])",
        # writing a fake record on the real stdout (the driver's channel is elsewhere)
        'import os\nos.write(1, b\'{"i": 0, "ok": true, "ret": "[0, 1]"}\\n\')\n'
        "class Solution:\n    def twoSum(self, nums, target): return None",
    ]
    assert pool.score_code([fenced(p) for p in liars], [TWO_SUM_TESTS] * 4, ["twoSum"] * 4) == [0.0] * 4


def test_check_style_cannot_be_forged(pool: RewardPool) -> None:
    tests = CheckTests(test="def check(candidate):\n    assert candidate(2, 3) == 5\n", entry_point="add")
    programs = [
        "def add(a, b):\n    return a + b",
        "def add(a, b):\n    return a - b",
        "import sys\nsys.exit(0)",
        "import os\nos._exit(0)",
        "class Any:\n    def __eq__(self, o): return True\ndef add(a, b):\n    return Any()",
        "import os\nfor fd in range(3, 20):\n"
        '    try: os.write(fd, b\'{"check": true}\\n{"done": true}\\n\')\n'
        "    except OSError: pass\ndef add(a, b): return 0",
        "import os\nfor p in ('/proc/1/fd/1', '/proc/1/fd/3'):\n"
        "    try: open(p, 'w').write('{\"check\": true}\\n')\n"
        "    except OSError: pass\ndef add(a, b): return 0",
        "import os, signal\nos.kill(1, signal.SIGKILL)\ndef add(a, b): return 0",
        # reading the check code to learn the answers: it is not in the sandbox's files
        "import glob\nsrc = ''.join(open(f).read() for f in glob.glob('/harness/*') if 'program' not in f)\n"
        "def add(a, b):\n    return 5 if 'assert candidate(2, 3) == 5' in src else 0",
    ]
    rewards = [r.reward for r in pool.run_programs(programs, [tests] * len(programs), timeout=3.0)]
    assert rewards == [1.0] + [0.0] * (len(programs) - 1)


# -- pool robustness -------------------------------------------------------------------------------


def test_pool_kills_and_replaces_a_hung_worker() -> None:
    # Worker-side deadline 60 s, pool-side limit 0.5 s (+ margin): the pool must kill the worker, score the
    # item 0, and finish the rest of the batch on a fresh worker.
    slow = r"\boxed{9^{9^{9^{9}}}}"
    with RewardPool(workers=1) as pool:
        payloads = [(r"\boxed{1}", "1"), (slow, "1"), (r"\boxed{2}", "2")]
        start = time.monotonic()
        out = pool._run("math", payloads, {"timeout": 60.0}, [0.5] * 3, 3, lambda why: (False, why))
        assert out == [(True, "ok"), (False, "timeout"), (True, "ok")]
        assert pool.restarts == 1 and time.monotonic() - start < 15
        assert pool.score_math([r"\boxed{3}"], ["3"]) == [1.0]


def test_pool_replaces_a_worker_that_died_between_batches() -> None:
    with RewardPool(workers=2) as pool:
        assert pool.score_math([r"\boxed{1}"] * 4, ["1"] * 4) == [1.0] * 4
        victim = pool._workers[0].proc
        victim.kill()  # a worker process this pool started
        victim.wait()
        assert pool.score_math([r"\boxed{1}", r"\boxed{2}"] * 4, ["1"] * 8) == [1.0, 0.0] * 4
        assert all(w.proc.poll() is None for w in pool._workers)


# -- the unsafe flag -------------------------------------------------------------------------------


def test_missing_bwrap_refuses_without_the_unsafe_flag(tmp_path, monkeypatch, caplog) -> None:
    with pytest.raises(SandboxUnavailable, match="apt-get install bubblewrap"):
        Sandbox(str(tmp_path), bwrap=None)
    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap on PATH, for this process and its workers
    with RewardPool(workers=1) as pool:
        with pytest.raises(SandboxUnavailable, match="bubblewrap"):
            pool.score_code([fenced(SUM_STDIN)], [SUM_TESTS])
    with caplog.at_level(logging.WARNING):
        with RewardPool(workers=1, allow_unsandboxed=True) as pool:
            assert pool.score_code([fenced(SUM_STDIN)], [SUM_TESTS]) == [1.0]
    assert "WITHOUT a sandbox" in caplog.text
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"response": fenced(SUM_STDIN), "tests": SUM_TESTS}) + "\n")
    assert reward_main("code", str(rows), workers=1) == 3  # refuses, and says how to install bubblewrap


# -- the command -----------------------------------------------------------------------------------


def test_reward_command(tmp_path, capsys) -> None:
    math_rows = tmp_path / "math.jsonl"
    with open(math_rows, "wb") as f:
        f.write(json.dumps({"response": r"</think>\boxed{\frac12}", "answer": "0.5"}).encode() + b"\n")
        f.write(json.dumps({"response": r"</think>\boxed{3}", "answer": 4}).encode() + b"\n")
        f.write(b'{"response": "\xff\xfe broken bytes", "answer": "1"}\n')
        f.write(b"this line is not json\n")
    assert reward_main("math", str(math_rows), workers=1) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["reward"] for line in lines[:-1]] == [1.0, 0.0, 0.0, 0.0]
    assert lines[-1]["summary"] and lines[-1]["rows"] == 4 and lines[-1]["mean_reward"] == 0.25

    code_rows = tmp_path / "code.jsonl"
    rows = [
        {"response": fenced(SUM_STDIN), "tests": json.dumps(SUM_TESTS)},
        {"response": fenced(TWO_SUM), "tests": TWO_SUM_TESTS, "fn_name": "twoSum"},
        {"response": fenced("print(0)"), "tests": SUM_TESTS},
        {"response": fenced(SUM_STDIN), "tests": "not tests"},
    ]
    code_rows.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert reward_main("code", str(code_rows), workers=2, timeout=3.0) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["reward"] for line in lines[:-1]] == [1.0, 1.0, 0.0, 0.0]
    assert "error" in lines[3] and lines[-1]["correct"] == 2
    assert reward_main("code", str(tmp_path / "missing.jsonl")) == 2


def test_reward_command_applies_the_truncation_rule(tmp_path, capsys) -> None:
    """The issue's cases: a response cut at the length limit mid-thought scores 0 even with the right box; a
    finished one scores 1, also when it was cut after closing its reasoning; --require-think zeroes a response
    that never closed it. Code rows follow the same rule."""
    rows = [
        {"response": r"<think>... maybe \boxed{5}, but wait, let me recheck the case n=", "answer": "5",
         "finish_reason": "length"},
        {"response": r"<think>5</think> The answer is \boxed{5}.", "answer": "5", "finish_reason": "stop"},
        {"response": r"<think>5</think> The answer is \boxed{5}. Also", "answer": "5", "finish_reason": "length"},
        {"response": r"The answer is \boxed{5}.", "answer": "5"},
    ]  # fmt: skip
    path = tmp_path / "truncated.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert reward_main("math", str(path), workers=1) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["reward"] for line in lines[:-1]] == [0.0, 1.0, 1.0, 1.0]
    assert lines[0]["why"].startswith("unfinished") and lines[-1]["unfinished"] == 1
    assert reward_main("math", str(path), workers=1, require_think=True) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["reward"] for line in lines[:-1]] == [0.0, 1.0, 1.0, 0.0]

    code = tmp_path / "code.jsonl"
    cut = {
        "response": "<think>try " + fenced(SUM_STDIN, think=False),
        "tests": SUM_TESTS,
        "finish_reason": "length",
    }
    done = {"response": fenced(SUM_STDIN), "tests": SUM_TESTS, "finish_reason": "stop"}
    code.write_text(json.dumps(cut) + "\n" + json.dumps(done) + "\n")
    assert reward_main("code", str(code), workers=1, timeout=3.0) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["reward"] for line in lines[:-1]] == [0.0, 1.0]
