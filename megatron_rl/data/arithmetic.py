"""A synthetic math task the tiny model can learn on a CPU: n-digit addition with a column-by-column trace.

Prompt `964+494=`; SFT target `<think>4+4+0=8,6+9+0=15,9+4+1=14</think>\\boxed{1458}`; answer `1458`.
Problem i is a pure function of (seed, i), so a data position is just an index and resume is exact.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from megatron_rl.data.dataset import Problem


def _operands(seed: int, index: int, digits: int) -> tuple[int, int]:
    rng = random.Random(seed * 1_000_003 + index)
    low, high = 10 ** (digits - 1), 10**digits - 1
    return rng.randint(low, high), rng.randint(low, high)


def addition_trace(a: int, b: int) -> str:
    """The column-by-column reasoning, least significant digit first, with carries."""
    steps, carry = [], 0
    da, db = str(a)[::-1], str(b)[::-1]
    for i in range(max(len(da), len(db))):
        x, y = int(da[i]) if i < len(da) else 0, int(db[i]) if i < len(db) else 0
        total = x + y + carry
        steps.append(f"{x}+{y}+{carry}={total}")
        carry = total // 10
    return ",".join(steps)


@dataclass(frozen=True)
class ArithmeticTask:
    seed: int = 0
    digits: int = 3
    eval_size: int = 200

    def _problem(self, a: int, b: int) -> Problem:
        return Problem(prompt=f"{a}+{b}=", answer=str(a + b))

    def eval_set(self) -> list[Problem]:
        # Held-out problems come from a different seed stream and are excluded from training.
        return [self._problem(*_operands(self.seed + 7919, i, self.digits)) for i in range(self.eval_size)]

    def train_problem(self, index: int) -> Problem:
        held_out = self._held_out()
        j = index
        while True:
            a, b = _operands(self.seed, j, self.digits)
            if (a, b) not in held_out:
                return self._problem(a, b)
            j += 1_000_000_007  # deterministic skip past a held-out pair

    def _held_out(self) -> frozenset[tuple[int, int]]:
        cached = getattr(self, "_held_out_cache", None)
        if cached is None:
            cached = frozenset(_operands(self.seed + 7919, i, self.digits) for i in range(self.eval_size))
            object.__setattr__(self, "_held_out_cache", cached)
        return cached

    @staticmethod
    def sft_response(problem: Problem) -> str:
        a, b = (int(x) for x in problem.prompt.rstrip("=").split("+"))
        return f"<think>{addition_trace(a, b)}</think>\\boxed{{{problem.answer}}}"
