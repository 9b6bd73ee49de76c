"""Epoch-wise easy-prompt removal (data.drop_solved_each_epoch): which prompts leave, when, and that a run
resumed from the checkpoint's loop state draws the same prompts as one that never stopped.

The rollout loop is driven by a scripted engine (the loop's bookkeeping is under test; vLLM end to end is in
test_train_run.py) whose answers are scored by the real reward pool."""

from __future__ import annotations

import io
import logging
import random

import pytest
import torch

from megatron_rl.config import ConfigError, load_config
from megatron_rl.data.dataset import DatasetError, Problem, PromptDataset
from megatron_rl.data.epochs import AllPromptsSolved, SolvedPromptRemoval
from megatron_rl.rewards import RewardPool
from megatron_rl.rollout.base import RolloutSample
from megatron_rl.train.rollouts import collect_rollouts, next_problems


def test_rows_solved_by_every_sample_leave_at_the_epoch_end(caplog):
    caplog.set_level(logging.INFO, "megatron_rl.data.epochs")
    removal = SolvedPromptRemoval(5)
    assert [removal.row(p) for p in range(5)] == [0, 1, 2, 3, 4]
    removal.record(0, [1.0, 1.0])  # solved by all: leaves
    removal.record(1, [1.0, 0.0])
    removal.record(3, [1.0, 1.0, 1.0])  # leaves
    # row 2 was never scored (e.g. too long) and row 4 scored all 0: both stay
    removal.record(4, [0.0, 0.0])
    with pytest.raises(IndexError, match="outside epoch 0"):
        removal.row(5)
    removal.next_epoch()
    assert (removal.epoch, removal.start, removal.end) == (1, 5, 8)
    assert [removal.row(p) for p in range(5, 8)] == [1, 2, 4]
    assert removal.stats() == {"epoch": 1.0, "prompts_remaining": 3.0}
    assert "epoch 0 ends: 2 prompts solved by every sample leave, 3 of 5 remain for epoch 1" in caplog.text
    for row in (1, 2, 4):
        removal.record(row, [1.0])
    with pytest.raises(AllPromptsSolved, match="every one of the 3 remaining training prompts"):
        removal.next_epoch()


def test_state_round_trip_and_a_different_dataset_is_refused():
    removal = SolvedPromptRemoval(4)
    removal.record(2, [1.0])
    removal.next_epoch()
    removal.record(3, [1.0])
    again = SolvedPromptRemoval(4, removal.state())
    assert (
        again.state()
        == removal.state()
        == {
            "size": 4,
            "epoch": 1,
            "start": 4,
            "removed": [2],
            "solved": [3],
        }
    )
    again.next_epoch()
    assert again.rows == [0, 1]
    with pytest.raises(DatasetError, match="dataset of 4 rows, this run's has 5"):
        SolvedPromptRemoval(5, removal.state())
    # Turned on when a run is resumed: its first epoch starts where the run stands.
    late = SolvedPromptRemoval(3, None, start=10)
    assert [late.row(p) for p in (10, 11, 12)] == [0, 1, 2] and late.end == 13


def test_only_file_data_has_epochs():
    with pytest.raises(ConfigError, match="'data.drop_solved_each_epoch' needs data.source 'file'"):
        load_config(None, ["data.drop_solved_each_epoch=true"])
    assert load_config(
        None, ["data.source=file", "data.drop_solved_each_epoch=true"]
    ).data.drop_solved_each_epoch


class CharTokenizer:
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) for c in text]


class ScriptedEngine:
    """Answers `\\boxed{...}` per sample: problem i is answered correctly with probability SKILL[i], drawn
    from the request's seed, so the same request gets the same answers (as vLLM with seeds does)."""

    SKILL = [1.0, 0.0, 0.9, 1.0, 0.5, 0.95, 1.0]

    def __init__(self):
        self.requests: list[list[str]] = []

    def generate(self, prompt_ids, n, temperature, top_p, max_tokens, seed):
        prompts = ["".join(map(chr, ids)) for ids in prompt_ids]
        self.requests.append(prompts)
        samples = []
        for i, (ids, prompt) in enumerate(zip(prompt_ids, prompts, strict=True)):
            row = int(prompt.removeprefix("q"))
            for j in range(n):
                right = random.Random(f"{seed + i}:{j}").random() < self.SKILL[row]
                answer = row if right else row + 100
                text = f"<think>{prompt}</think>\\boxed{{{answer}}}"
                samples.append(RolloutSample(i, list(ids), [1, 2], [-0.1, -0.2], "stop", text))
        return samples


DATASET = PromptDataset([Problem(prompt=f"q{i}", answer=str(i)) for i in range(7)], path="scripted")
STEPS = 8


def run_steps(pool, cfg, first: int, last: int, position: int, state: dict | None):
    """Steps first..last of the rollout loop as rl.py runs it; returns each step's prompts, the final data
    position and the removal state (the checkpoint's loop state)."""
    engine, removal = ScriptedEngine(), SolvedPromptRemoval(len(DATASET), state)
    drawn, stats = [], []
    for step in range(first, last + 1):
        batch = collect_rollouts(engine, pool, DATASET, CharTokenizer(), cfg, position, 1000 * step, removal)
        position = batch.data_position
        drawn.append(["".join(map(chr, p)) for p in batch.prompts[:: cfg.rollout.group_size]])
        stats.append((batch.stats["epoch"], batch.stats["prompts_remaining"]))
    return drawn, stats, position, removal.state(), engine.requests


@pytest.fixture(scope="module")
def pool():
    with RewardPool(workers=1) as pool:
        yield pool


@pytest.mark.parametrize("dynamic", [False, True])
def test_the_loop_removes_solved_prompts_and_a_resume_continues_identically(pool, dynamic):
    cfg = load_config(
        None,
        [
            "data.source=file",
            "data.drop_solved_each_epoch=true",
            "rollout.prompts_per_step=3",
            "rollout.group_size=4",
            f"grpo.dynamic_sampling={str(dynamic).lower()}",
        ],
    )
    drawn, stats, position, state, requests = run_steps(pool, cfg, 1, STEPS, 0, None)
    # Epoch 0 is every row in order; the 7th row ends it, so the round that reaches it samples q6 alone, and
    # the next round draws from epoch 1, without the rows every sample solved (q0, q3 and q6 always are).
    requested = [p for batch in requests for p in batch]
    assert requested[:7] == [f"q{i}" for i in range(7)] and requests[2] == ["q6"]
    assert set(requested[7:]).isdisjoint({"q0", "q3", "q6"})
    assert {0, 3, 6} <= set(state["removed"]) and 1 not in state["removed"]  # q1 is never solved
    if not dynamic:
        assert drawn[:2] == [["q0", "q1", "q2"], ["q3", "q4", "q5"]] and drawn[2][0] == "q6"
        assert stats[0] == stats[1] == (0.0, 7.0) and stats[2][0] == 1.0
    else:  # q1's groups (all 0) are sampled in every epoch, and dropped while refills last
        assert requested.count("q1") > STEPS
    assert stats[-1] == (state["epoch"], 7 - len(state["removed"]))

    # Stopped after step 3, its loop state saved as checkpoints do (torch.save), resumed: the same prompts.
    head, _, middle, saved, _ = run_steps(pool, cfg, 1, 3, 0, None)
    buffer = io.BytesIO()
    torch.save({"train": {"data_position": middle, "prompt_removal": saved}}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)["train"]
    tail, _, end, final, _ = run_steps(pool, cfg, 4, STEPS, loaded["data_position"], loaded["prompt_removal"])
    assert head + tail == drawn
    assert (end, final) == (position, state)


def test_all_solved_stops_the_loop_with_one_clear_error(pool):
    cfg = load_config(None, ["data.source=file", "data.drop_solved_each_epoch=true", "rollout.group_size=2"])
    easy = PromptDataset([Problem(prompt=f"q{i}", answer=str(i)) for i in (0, 3)], path="easy")
    removal = SolvedPromptRemoval(2)
    assert next_problems(easy, 0, 5, CharTokenizer(), cfg, removal).rows == [0, 1]  # stops at the epoch's end
    with pytest.raises(AllPromptsSolved, match="none would remain for epoch 1"):
        collect_rollouts(ScriptedEngine(), pool, easy, CharTokenizer(), cfg, 0, 0, removal)
