"""A synthetic code task the tiny model can learn on a CPU: a stdin/stdout program for a two-operation formula.

Prompt `Read a b. Print a*b-7.` -> SFT target

    ```python
    a,b=map(int,input().split())
    print(a*b-7)
    ```

scored like a LiveCodeBench problem: the program runs in the code sandbox on three stdin tests (`Problem.tests`,
the LiveCodeBench JSON format) and earns 1 only if it prints every expected output. A problem is the formula
(the operand order, two operations, a constant 1..99: 1782 formulas); the held-out formulas never appear in
training. Problem i is a pure function of (seed, i), so a data position is an index and resume is exact.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

from megatron_rl.data.dataset import Problem

WORDS = {"plus": "+", "minus": "-", "times": "*"}
READ_LINE = "a,b=map(int,input().split())"
FORMULAS = 2 * len(WORDS) ** 2 * 99


@dataclass(frozen=True)
class Formula:
    first: str  # "a" or "b": the operand the formula starts with
    op1: str  # a word of WORDS
    op2: str
    constant: int

    @property
    def expression(self) -> str:
        second = "b" if self.first == "a" else "a"
        return f"{self.first}{WORDS[self.op1]}{second}{WORDS[self.op2]}{self.constant}"

    def value(self, a: int, b: int) -> int:
        """The formula at (a, b), with Python's precedence (times before plus and minus)."""
        x, y = (a, b) if self.first == "a" else (b, a)
        apply = {"plus": lambda u, v: u + v, "minus": lambda u, v: u - v, "times": lambda u, v: u * v}
        if self.op2 == "times" and self.op1 != "times":
            return apply[self.op1](x, y * self.constant)
        return apply[self.op2](apply[self.op1](x, y), self.constant)

    @property
    def statement(self) -> str:
        return f"Read a b. Print {self.expression}."


def _formula(rng: random.Random) -> Formula:
    words = sorted(WORDS)
    return Formula(rng.choice("ab"), rng.choice(words), rng.choice(words), rng.randint(1, 99))


def _tests(formula: Formula, rng: random.Random, count: int = 3) -> str:
    cases = []
    for _ in range(count):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        cases.append({"input": f"{a} {b}\n", "output": f"{formula.value(a, b)}\n", "testtype": "stdin"})
    return json.dumps(cases)


@dataclass(frozen=True)
class TinyCodeTask:
    seed: int = 0
    eval_size: int = 200

    def __post_init__(self):
        if not 1 <= self.eval_size <= FORMULAS // 2:
            raise ValueError(f"the tiny code task's held-out set holds 1 to {FORMULAS // 2} formulas")

    def _problem(self, formula: Formula, rng: random.Random) -> Problem:
        return Problem(prompt=formula.statement, tests=_tests(formula, rng))

    def _held_out_pairs(self) -> list[tuple[Formula, Problem]]:
        # Held-out formulas come from a different seed stream; training skips every one of them.
        pairs, seen = [], set()
        rng = random.Random(self.seed + 7919)
        while len(pairs) < self.eval_size:
            formula = _formula(rng)
            if formula not in seen:
                seen.add(formula)
                pairs.append((formula, self._problem(formula, rng)))
        return pairs

    def eval_set(self) -> list[Problem]:
        return [problem for _, problem in self._held_out_pairs()]

    def train_problem(self, index: int) -> Problem:
        held_out = self._held_out()
        j = index
        while True:
            rng = random.Random(self.seed * 1_000_003 + j)
            formula = _formula(rng)
            if formula not in held_out:
                return self._problem(formula, rng)
            j += 1_000_000_007  # deterministic skip past a held-out formula

    def _held_out(self) -> frozenset[Formula]:
        cached = getattr(self, "_held_out_cache", None)
        if cached is None:
            cached = frozenset(formula for formula, _ in self._held_out_pairs())
            object.__setattr__(self, "_held_out_cache", cached)
        return cached

    @staticmethod
    def sft_response(problem: Problem) -> str:
        expression = problem.prompt.removeprefix("Read a b. Print ").removesuffix(".")
        return f"```python\n{READ_LINE}\nprint({expression})\n```"
