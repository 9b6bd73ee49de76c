"""The synthetic tasks the tiny model learns on the CPU, chosen by data.source."""

from __future__ import annotations

import json

from megatron_rl.config import ConfigError, DataCfg
from megatron_rl.data.arithmetic import ArithmeticTask
from megatron_rl.data.dataset import Problem
from megatron_rl.data.tiny_code import TinyCodeTask


def synthetic_task(data: DataCfg) -> ArithmeticTask | TinyCodeTask:
    """data.source synthetic_arithmetic (math reward) or synthetic_code (code reward): its train_problem(i),
    eval_set() and sft_response(problem)."""
    if data.source == "synthetic_code":
        try:
            return TinyCodeTask(seed=data.seed, eval_size=data.synthetic_eval_size)
        except ValueError as e:
            raise ConfigError(f"config key 'data.synthetic_eval_size': {e}") from None
    return ArithmeticTask(seed=data.seed, digits=data.synthetic_digits, eval_size=data.synthetic_eval_size)


def problem_row(problem: Problem) -> str:
    """One JSONL row of a dataset file that `load_prompt_dataset` reads back as `problem`."""
    row = {"prompt": problem.prompt}
    if problem.tests is not None:
        row["tests"] = json.loads(problem.tests)
    else:
        row["answer"] = problem.answer
    return json.dumps(row) + "\n"
