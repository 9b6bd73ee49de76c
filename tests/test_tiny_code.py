"""The tiny code task: deterministic problems, held-out formulas never trained on, reference programs that pass
their tests in the real sandbox and near-misses that do not."""

from __future__ import annotations

import json

import pytest

from megatron_rl.config import ConfigError, load_config
from megatron_rl.data.dataset import load_prompt_dataset
from megatron_rl.data.synthetic import problem_row, synthetic_task
from megatron_rl.data.tiny_code import TinyCodeTask
from megatron_rl.model.tiny import CHARACTERS


def test_problems_are_deterministic_and_held_out_formulas_never_train():
    task = TinyCodeTask(seed=0, eval_size=50)
    assert [task.train_problem(i) for i in range(20)] == [
        TinyCodeTask(0, 50).train_problem(i) for i in range(20)
    ]
    held_out = {p.prompt for p in task.eval_set()}
    assert len(held_out) == 50
    trained = {task.train_problem(i).prompt for i in range(5000)}
    assert not trained & held_out and len(trained) > 500
    with pytest.raises(ValueError, match="held-out set holds 1 to 891"):
        TinyCodeTask(eval_size=892)


def test_reference_programs_pass_in_the_sandbox_and_near_misses_fail():
    from megatron_rl.rewards import RewardPool

    task = TinyCodeTask(seed=3, eval_size=8)
    problems = [task.train_problem(i) for i in range(6)]
    good = [task.sft_response(p) for p in problems]
    assert all(c in CHARACTERS for text in good for c in text)  # the tiny tokenizer spells every program
    off_by_one = [r.replace("print(", "print(1+") for r in good]
    unfenced = [r.removeprefix("```python") for r in good]
    pool = RewardPool(workers=2)
    try:
        rewards = pool.score_code(good + off_by_one + unfenced, [p.tests for p in problems] * 3, [None] * 18)
        assert rewards == [1.0] * 6 + [0.0] * 12
    finally:
        pool.close()


def test_written_rows_read_back_as_the_same_problems(tmp_path):
    task = synthetic_task(load_config(None, ["data.source=synthetic_code", "data.reward=code"]).data)
    problems = [task.train_problem(i) for i in range(5)]
    path = tmp_path / "code.jsonl"
    path.write_text("".join(problem_row(p) for p in problems))
    loaded = load_prompt_dataset(path, "code").problems
    assert [(p.prompt, json.loads(p.tests)) for p in loaded] == [
        (p.prompt, json.loads(p.tests)) for p in problems
    ]


def test_the_code_task_needs_the_code_reward():
    with pytest.raises(ConfigError, match="config key 'data.reward' must be 'code'"):
        load_config(None, ["data.source=synthetic_code"])
    assert load_config("configs/tiny_code.yaml").data.reward == "code"


def test_the_tiny_checkpoints_tokenizer_keeps_spaces_and_newlines_as_transformers_loads_it(tmp_path):
    """transformers (and so vLLM) loads a qwen2 checkpoint's tokenizer as Qwen2Tokenizer, with Qwen2's byte-level
    pre-tokenizer and decoder: the task's prompts and programs still come back whole, one token per character."""
    from transformers import AutoTokenizer

    from megatron_rl.model.tiny import write_tiny_checkpoint

    tok = AutoTokenizer.from_pretrained(write_tiny_checkpoint(tmp_path / "tiny"))
    task = TinyCodeTask(seed=1, eval_size=4)
    for problem in [task.train_problem(0), *task.eval_set()]:
        for text in (problem.prompt, task.sft_response(problem), "<think>1+2+0=3</think>\\boxed{3}"):
            ids = tok.encode(text, add_special_tokens=False)
            assert tok.decode(ids) == text
            assert len(ids) == len(text) - (len("<think></think>\\boxed{") - 3 if "<think>" in text else 0)
