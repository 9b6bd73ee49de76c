"""Configs and datasets: a bad key, type, file or row is a clear one-line error or a counted skip."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from megatron_rl.config import ConfigError, load_config
from megatron_rl.data.arithmetic import ArithmeticTask, addition_trace
from megatron_rl.data.dataset import DatasetError, load_prompt_dataset


def test_default_config_loads_and_overrides_apply():
    cfg = load_config(None, ["rollout.temperature=0.7", "run.steps=3"])
    assert cfg.rollout.temperature == 0.7 and cfg.run.steps == 3
    assert cfg.rollout.group_size == 8


@pytest.mark.parametrize(
    "override,message",
    [
        ("rollout.temprature=0.7", "unknown config key 'rollout.temprature'"),
        ("run.steps=many", "config key 'run.steps'"),
        ("rollout.temperature=-1", "config key 'rollout.temperature'"),
        ("nonsense", "must look like section.key=value"),
        ("grpo.max_tokens_per_microbatch=1000", "config key 'grpo.max_tokens_per_microbatch': 1000 is below"),
        ("rollout.staleness=2", "config key 'rollout.staleness'"),
    ],
)
def test_bad_config_names_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        load_config(None, [override])


def test_staleness_one_is_refused_where_engines_cannot_sample_during_the_update(monkeypatch, caplog):
    """Engines on every rank take part in the trainer's collectives; a colocated GPU engine sleeps while the
    policy trains: neither can sample beside the update. Without any correction it runs, with a warning."""
    from megatron_rl.train import rl

    cfg = load_config(None, ["rollout.staleness=1", "rollout.engine_ranks=all"])
    monkeypatch.setattr(rl, "engines_everywhere", lambda cfg: cfg.rollout.engine_ranks == "all")
    with pytest.raises(ConfigError, match="config key 'rollout.staleness'.*engine_ranks='all'"):
        rl.check_staleness(cfg)
    cfg = load_config(None, ["rollout.staleness=1"])
    monkeypatch.setattr(rl.torch.cuda, "is_available", lambda: True)
    with pytest.raises(ConfigError, match="colocated engine shares the trainer's GPUs"):
        rl.check_staleness(cfg)
    rl.check_staleness(load_config(None, ["rollout.staleness=1", "rollout.placement=separate"]))
    assert "without an importance correction" in caplog.text
    rl.check_staleness(load_config(None, ["rollout.staleness=0", "rollout.engine_ranks=all"]))


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/x.yaml")


def test_cli_bad_config_is_one_line():
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_rl.cli", "train", "grpo.clip_eps=0.3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error:")
    assert "unknown config key 'grpo.clip_eps'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_rows_are_counted_and_named(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(
        b'{"prompt": "1+1=", "answer": "2"}\n'
        b'{"prompt": "2+2="}\n'
        b"not json\n"
        b'{"prompt": "", "answer": "0"}\n'
        b'\xff\xfe{"prompt": "x", "answer": "y"}\n'
        b'{"prompt": "3+3=", "answer": 6}\n'
    )
    data = load_prompt_dataset(path)
    assert [p.prompt for p in data.problems] == ["1+1=", "3+3="]
    assert data.problems[1].answer == "6"
    assert len(data.skipped) == 4
    assert f"{path}:2: missing field 'answer'" in data.skipped
    assert any(s.startswith(f"{path}:3: not valid JSON") for s in data.skipped)
    assert any(s.startswith(f"{path}:5:") for s in data.skipped)


def test_missing_dataset_file(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_prompt_dataset(tmp_path / "nope.jsonl")


def test_arithmetic_task_is_deterministic_and_held_out():
    task = ArithmeticTask(seed=0)
    assert addition_trace(964, 494) == "4+4+0=8,6+9+0=15,9+4+1=14"
    p = task.train_problem(0)
    assert task.sft_response(p).endswith(f"\\boxed{{{p.answer}}}")
    assert task.train_problem(5) == ArithmeticTask(seed=0).train_problem(5)
    held = {q.prompt for q in task.eval_set()}
    assert not held & {task.train_problem(i).prompt for i in range(2000)}


def test_code_rows_load_and_score_through_the_stage_reward(tmp_path):
    """data.reward=code: rows carry tests; the stage's reward runs them in the real sandboxed pool."""
    from megatron_rl.rewards import RewardPool
    from megatron_rl.train.rollouts import score

    path = tmp_path / "code.jsonl"
    tests = [{"input": "2 3\n", "output": "5\n", "testtype": "stdin"}]
    path.write_text(
        json.dumps({"prompt": "Add two numbers.", "tests": tests}) + "\n"
        + json.dumps({"prompt": "No tests here.", "answer": "1"}) + "\n"
    )  # fmt: skip
    data = load_prompt_dataset(path, "code")
    assert len(data) == 1 and data.skipped == [f"{path}:2: missing field 'tests'"]
    cfg = load_config(None, ["data.reward=code"])
    solve = "<think>read, add</think>```python\na, b = map(int, input().split())\nprint(a + b)\n```"
    wrong = "<think>oops</think>```python\nprint(0)\n```"
    with RewardPool(workers=1) as pool:
        samples = [_sample(solve), _sample(wrong), _sample(solve.replace("</think>", ""), "length")]
        # The third was cut off before </think>: its code block is a draft, not an answer.
        assert score(pool, samples, [data.problems[0]] * 3, cfg) == [1.0, 0.0, 0.0]


def _sample(text: str, finish_reason: str = "stop"):
    from megatron_rl.rollout.base import RolloutSample

    return RolloutSample(
        prompt_index=0, prompt_ids=[1], token_ids=[2], logprobs=[0.0], finish_reason=finish_reason, text=text
    )


def test_a_response_cut_off_mid_reasoning_scores_zero():
    """Math: a boxed guess made before </think> in a response the length limit cut off earns nothing; the same
    box after </think>, or in a response that finished without a <think> block, counts."""
    from megatron_rl.data.dataset import Problem
    from megatron_rl.rewards import RewardPool
    from megatron_rl.train.rollouts import score

    guess = "<think>n(n+1)/2 at n=2... maybe \\boxed{5}, but wait, let me recheck the case n="
    samples = [
        _sample(guess, "length"),
        _sample("<think>1+4=5</think>\\boxed{5} and then some more", "length"),
        _sample("\\boxed{5}"),
    ]
    with RewardPool(workers=1) as pool:
        assert score(pool, samples, [Problem(prompt="?", answer="5")] * 3, load_config(None)) == [
            0.0,
            1.0,
            1.0,
        ]


@pytest.mark.parametrize("case", ["missing dataset", "separate placement"])
def test_cli_run_setup_errors_are_one_line(tmp_path, case):
    """Errors found after the trainer started (distributed set up) still end in one line, no traceback."""
    missing = tmp_path / "nope.jsonl"
    overrides, message = {
        "missing dataset": (
            ["data.source=file", f"data.train_path={missing}"],
            f"error: dataset file '{missing}' does not exist",
        ),
        "separate placement": (
            ["rollout.placement=separate"],
            "error: config key 'rollout.num_engines': placement is 'separate' and rollout.engine_nodes * "
            "cluster.gpus_per_node = 0 GPU(s) cannot hold one engine",
        ),
    }[case]
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_rl.cli", "train", *overrides, f"run.output_dir={tmp_path}"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(message)
    assert "Traceback" not in proc.stderr


def test_prompts_longer_than_max_prompt_tokens_are_skipped_and_counted(tiny_ckpt):
    from transformers import AutoTokenizer

    from megatron_rl.data.dataset import Problem, PromptDataset
    from megatron_rl.train.rollouts import fitting_prompts, next_problems

    tokenizer = AutoTokenizer.from_pretrained(tiny_ckpt)
    cfg = load_config(None, ["data.prompt_template=raw", "rollout.max_prompt_tokens=4"])
    data = PromptDataset([Problem("1+1=", "2"), Problem("12+13=", "25"), Problem("2+2=", "4")], "mem")
    problems, position, skipped, rows = next_problems(data, 0, 2, tokenizer, cfg)
    assert [p.prompt for p in problems] == ["1+1=", "2+2="] and (position, skipped, rows) == (3, 1, [0, 2])
    assert fitting_prompts(data.problems, tokenizer, cfg, "eval set") == [data.problems[0], data.problems[2]]
    tight = load_config(None, ["rollout.max_prompt_tokens=2"])
    with pytest.raises(ValueError, match="max_prompt_tokens=2"):
        next_problems(data, 0, 1, tokenizer, tight)


def test_cli_verify_sync_unknown_transport_is_one_line(tiny_ckpt):
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_rl.cli", "verify-sync", "--model", tiny_ckpt, "--transport", "shm,nccl"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert (
        proc.stderr.strip().splitlines()[-1].startswith("error: --transport: 'nccl' is not one of auto, shm")
    )
