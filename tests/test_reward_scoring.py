"""Distributed reward scoring (run.reward_scoring: distributed): with two gloo ranks each scoring its share on
its own reward pool, every sample is scored exactly once and the rewards gathered to rank 0 equal the
driver-only path's on the same batch (real math-verify; code in the real sandbox)."""

from __future__ import annotations

import threading

import pytest
import torch.distributed as dist

from megatron_rl.config import ConfigError, load_config
from megatron_rl.data.dataset import Problem
from megatron_rl.rollout.base import RolloutSample
from megatron_rl.train.reward_scoring import scoring_ranks
from tests.distributed_helpers import run_distributed

SUM_TESTS = [{"input": "3\n1 2 3\n", "output": "6\n", "testtype": "stdin"}]


def test_one_scorer_per_host_and_the_config_key():
    assert scoring_ranks(["a", "a", "b", "b", "c"]) == [0, 2, 4]
    assert scoring_ranks(["a", "b", "a", "b"]) == [0, 1]
    assert scoring_ranks(["n0"] * 8) == [0]
    assert load_config(None, ["run.reward_scoring=distributed"]).run.reward_scoring == "distributed"
    with pytest.raises(ConfigError, match="run.reward_scoring"):
        load_config(None, ["run.reward_scoring=everywhere"])


def math_batch() -> tuple[list[RolloutSample], list[Problem]]:
    """21 samples: right and wrong answers in several forms, and an unfinished one (scored 0, never sent)."""
    samples, problems = [], []
    for i in range(21):
        answer = str(i + 1)
        text = {
            0: f"<think>adding</think>The answer is \\boxed{{{answer}}}.",
            1: f"<think>hmm</think>\\boxed{{{i + 2}}}",
            2: f"<think>so</think>\\boxed{{\\frac{{{2 * (i + 1)}}}{{2}}}}",
        }[i % 3]
        finish = "length" if i == 3 else "stop"
        if i == 3:
            text = f"<think>maybe \\boxed{{{answer}}}, but wait"
        samples.append(RolloutSample(i, [1], [2], [-0.1], finish, text))
        problems.append(Problem(prompt=f"p{i}", answer=answer))
    return samples, problems


def code_batch() -> tuple[list[RolloutSample], list[Problem]]:
    programs = [
        "n = int(input())\nprint(sum(map(int, input().split())))",
        "print(0)",
        "import sys\nprint(sum(map(int, sys.stdin.read().split()[1:])))",
    ]
    samples = [
        RolloutSample(i, [1], [2], [-0.1], "stop", f"<think>ok</think>```python\n{p}\n```")
        for i, p in enumerate(programs)
    ]
    return samples, [Problem(prompt="sum", tests=str(SUM_TESTS).replace("'", '"'))] * 3


def _score_both_ways(rank: int, world: int, out) -> None:
    from megatron_rl.train.reward_scoring import start_scoring
    from megatron_rl.train.rollouts import node_reward_times, score

    dist.init_process_group("gloo", rank=rank, world_size=world)
    scorer = start_scoring("distributed", 1, 5.0, ranks=[0, 1])
    result: dict = {}
    if rank == 0:
        math_cfg = load_config(None, [])
        code_cfg = load_config(None, ["data.source=synthetic_code", "data.reward=code"])

        def score_batches() -> None:
            # From a thread of its own, as rank 0 scores at rollout.staleness 1: the trainer's collectives on
            # the default group go on meanwhile (below), on both ranks.
            result["math"] = score(scorer, *math_batch(), math_cfg)
            result["code"] = score(scorer, *code_batch(), code_cfg)
            result["seconds"] = scorer.take_node_seconds()

        scoring = threading.Thread(target=score_batches)
        scoring.start()
        dist.barrier()  # the trainer's collective, while scoring runs
        scoring.join()
        # The driver-only path on the same batches: rank 0's reward pool scores them whole.
        result["driver_math"] = score(scorer.pool, *math_batch(), math_cfg)
        result["driver_code"] = score(scorer.pool, *code_batch(), code_cfg)
        result["metrics"] = node_reward_times(result["seconds"])
        dist.barrier()
    else:
        dist.barrier()  # the main thread is in a collective; the scorer's own thread serves rank 0
        dist.barrier()  # rank 0 is done scoring: the counts are final
    counts: list = [None] * world
    dist.all_gather_object(counts, scorer.items_scored)
    # A scorer that fails (here: its pool is gone) fails rank 0's call, naming the rank, and keeps serving.
    if rank == 1:
        scorer.pool.close()
    dist.barrier()
    if rank == 0:
        try:
            score(scorer, *math_batch(), math_cfg)
        except RuntimeError as e:
            result["error"] = str(e)
    dist.barrier()
    if rank == 1:
        assert scorer._thread.is_alive()  # it answered with the error and waits for the next batch
    scorer.close()
    if rank == 0:
        result["counts"] = counts
        out.put(result)
    dist.destroy_process_group()


def test_two_ranks_score_each_sample_once_and_agree_with_the_driver():
    import torch.multiprocessing as mp

    out = mp.get_context("spawn").SimpleQueue()
    run_distributed(_score_both_ways, 2, out)
    result = out.get()
    # The unfinished sample is not sent: 20 math samples split 10/10, then 3 programs split 1/2.
    assert result["counts"] == [10 + 1, 10 + 2]
    assert result["error"] == "reward scoring failed on rank 1: RuntimeError: the RewardPool is closed"
    assert result["math"] == result["driver_math"]
    assert result["code"] == result["driver_code"] == [1.0, 0.0, 1.0]
    assert result["math"].count(1.0) == 13 and result["math"][3] == 0.0
    assert len(result["seconds"]) == 2 and min(result["seconds"]) > 0
    assert set(result["metrics"]) == {
        "time_reward_s_node0",
        "time_reward_s_node1",
        "time_reward_s_node_max",
        "time_reward_s_node_min",
    }
