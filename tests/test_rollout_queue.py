"""The rollout queue: which weights sample which step's batch, and that staleness 1 overlaps the update.

The batches here come from a recording function (the queue's own logic is under test; the end-to-end runs with
vLLM are in test_train_run.py)."""

from __future__ import annotations

import threading
import time

import pytest

from megatron_rl.train.rollout_queue import RolloutQueue, batch_from_state
from megatron_rl.train.rollouts import RolloutBatch


class Recorder:
    """collect(step, position): a two-sample batch whose prompts name the step; records each call and the
    version of the 'engine weights' (set by the test as its sync would) at the moment sampling started."""

    def __init__(self, seconds: float = 0.0, fail_at: int | None = None):
        self.seconds, self.fail_at = seconds, fail_at
        self.weights = 0
        self.calls: list[tuple[int, int, int, str]] = []

    def __call__(self, step: int, position: int, cfg) -> RolloutBatch:
        self.calls.append((step, position, self.weights, threading.current_thread().name))
        time.sleep(self.seconds)
        if step == self.fail_at:
            raise RuntimeError(f"engine failed at step {step}")
        return RolloutBatch(
            prompts=[[step], [step]],
            responses=[[1, 2], [3]],
            rollout_logprobs=[[-0.5, -0.25], [-1.0]],
            rewards=[1.0, 0.0],
            truncated=[False, True],
            advantages=[0.7, -0.7],
            trained=[True, False],
            temperature=cfg,  # the tests pass a temperature as the config
            texts=["a", "b"],
            data_position=position + 2,
            stats={"reward_mean": 0.5},
        )


def run_loop(queue: RolloutQueue, recorder: Recorder, steps: int, train_s: float = 0.0) -> list:
    """The step loop's use of the queue (rl.py): take, start the next, update, wait, sync."""
    position, seen = 0, []
    for step in range(1, steps + 1):
        batch = queue.take(step, position, 1.0 + step / 10)
        queue.start_next(step, batch.data_position, steps, 1.0 + step / 10)
        time.sleep(train_s)  # the update
        waited = queue.wait()
        recorder.weights = step  # the sync: the engines now hold step `step`'s weights
        position = batch.data_position
        seen.append((step, batch, waited))
    queue.close()
    return seen


def test_staleness_zero_samples_each_batch_when_asked_with_the_last_steps_weights():
    recorder = Recorder()
    seen = run_loop(RolloutQueue(recorder, staleness=0), recorder, steps=3)
    main = threading.current_thread().name
    assert recorder.calls == [(1, 0, 0, main), (2, 2, 1, main), (3, 4, 2, main)]
    for step, batch, waited in seen:
        assert batch.prompts == [[step], [step]] and batch.policy_versions == [step - 1] * 2
        assert batch.stats["staleness_max"] == batch.stats["staleness_mean"] == 0.0
        assert waited == {}


def test_staleness_one_samples_the_next_batch_during_the_update_with_the_weights_before_it():
    recorder = Recorder(seconds=0.3)
    seen = run_loop(RolloutQueue(recorder, staleness=1), recorder, steps=4, train_s=0.3)
    # Step 1 samples at once (nothing ran ahead); step n+1's batch starts while step n trains, on step n-1's
    # weights, from the prompt after step n's batch.
    assert [c[:3] for c in recorder.calls] == [(1, 0, 0), (2, 2, 0), (3, 4, 1), (4, 6, 2)]
    assert recorder.calls[0][3] == threading.current_thread().name
    assert all(c[3].startswith("rollout-ahead") for c in recorder.calls[1:])
    assert [b.stats["staleness_max"] for _, b, _ in seen] == [0.0, 1.0, 1.0, 1.0]
    assert [b.policy_versions for _, b, _ in seen] == [[0, 0], [0, 0], [1, 1], [2, 2]]
    # A batch sampled ahead keeps the temperature of the step that started it (the loss uses the batch's).
    assert [b.temperature for _, b, _ in seen] == [1.1, 1.1, 1.2, 1.3]
    # Sampling (0.3 s) ran beside the update (0.3 s): the trainer waited well under the sampling time.
    waits = [w["time_rollout_wait_s"] for _, _, w in seen[:-1]]
    assert max(waits) < 0.2, waits
    assert seen[-1][2]["time_rollout_wait_s"] < 0.05  # nothing sampled after the last step


def test_a_failure_while_sampling_ahead_is_raised_when_the_step_waits():
    recorder = Recorder(fail_at=2)
    queue = RolloutQueue(recorder, staleness=1)
    batch = queue.take(1, 0, 1.0)
    queue.start_next(1, batch.data_position, 3, 1.0)
    with pytest.raises(RuntimeError, match="engine failed at step 2"):
        queue.wait()
    queue.close()


def test_the_batch_sampled_ahead_survives_a_checkpoint_and_is_handed_out_first():
    recorder = Recorder()
    queue = RolloutQueue(recorder, staleness=1)
    assert queue.pending_state() is None
    batch = queue.take(1, 0, 1.0)
    queue.start_next(1, batch.data_position, 5, 1.0)
    queue.wait()
    saved = queue.pending_state()  # what the checkpoint after step 1 holds
    queue.close()
    assert saved["prompts"] == [[2], [2]] and saved["policy_versions"] == [0, 0]

    resumed_recorder = Recorder()
    resumed = RolloutQueue(resumed_recorder, staleness=1, pending=batch_from_state(saved))
    again = resumed.take(2, batch.data_position, 2.0)
    assert resumed_recorder.calls == []  # not sampled again
    assert again.prompts == [[2], [2]] and again.stats["staleness_max"] == 1.0 and again.temperature == 1.0
    resumed.close()
