"""End-to-end RL runs on the tiny config with real vLLM, real megatron-core and real math-verify.

One short SFT (1-digit addition, so some sampled answers are right and advantages are non-zero), then GRPO.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REQUIRED_METRICS = {
    "reward_mean", "accuracy", "response_length_mean", "response_length_max", "truncated_fraction",
    "entropy_mean", "mismatch_kl", "mismatch_max_abs_diff", "grad_norm", "lr", "tokens_per_s",
    "time_rollout_s", "time_reward_s", "time_train_s", "time_sync_s",
}  # fmt: skip


def _args(out: Path, name: str, steps: int) -> list[str]:
    return [
        sys.executable, "-m", "megatron_rl.cli", "train",
        f"run.output_dir={out}", f"run.name={name}", f"run.steps={steps}", "run.checkpoint_every=2",
        "run.reward_workers=1", "sft.max_steps=40", "sft.eval_after=40", "sft.eval_every=40",
        "sft.stop_at_accuracy=0", "data.synthetic_digits=1", "data.synthetic_eval_size=40",
        "rollout.prompts_per_step=8", "rollout.max_response_tokens=24", "eval.samples_per_problem=2",
    ]  # fmt: skip


def _last_per_step(run_dir: Path) -> dict[int, dict]:
    records = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        records[r["step"]] = r
    return records


def _weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    """The model tensors of a checkpoint, read from its Megatron distributed checkpoint (no process group)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    plain = run_dir / f"weights_{step}.pt"
    dcp_to_torch_save(run_dir / "checkpoints" / f"step_{step:06d}" / "model", plain)
    return torch.load(plain, weights_only=False)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    proc = subprocess.run(_args(out, "full", 4), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out / "full", json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def test_short_run_logs_every_metric(full_run):
    run_dir, result, stderr = full_run
    assert set(result) == {"sft_accuracy", "rl_accuracy", "minutes", "run_dir"}
    records = _last_per_step(run_dir)
    assert sorted(records) == [1, 2, 3, 4]
    for r in records.values():
        assert REQUIRED_METRICS <= set(r), REQUIRED_METRICS - set(r)
    assert records[1]["mismatch_max_abs_diff"] < 1e-5  # trainer recompute == vLLM's sampling logprobs (fp32)
    assert any(r["grad_norm"] > 0 for r in records.values())  # some groups had a learning signal
    assert (run_dir / "tensorboard").is_dir() and (run_dir / "sft_model" / "model.safetensors").is_file()
    final = run_dir / "final_model"
    assert (final / "model.safetensors").is_file() and (final / "config.json").is_file()  # next stage's model
    assert "step 4/4 reward" in stderr  # off a terminal, one plain progress line per step


def _deterministic(record: dict) -> dict:
    """A metrics line without the wall-clock figures (times and throughputs), which are all that may differ
    between two runs of the same config and seed."""
    return {k: v for k, v in record.items() if not (k.startswith("time_") or k.endswith("_per_s"))}


def test_kill_and_resume_matches_uninterrupted(full_run, tmp_path):
    """A second run of the same config, with another process competing for the CPU, logs the same metrics line
    for line as the first (same seed -> same figures, whatever the load); killed with SIGKILL after its step-2
    checkpoint and resumed, it continues exactly like the uninterrupted run."""
    run_dir_full, _, _ = full_run
    name = "killed"
    # A busy loop at the lowest priority: it takes whatever CPU the run leaves idle and shifts its timing.
    load = subprocess.Popen([sys.executable, "-c", "while True: pass"], preexec_fn=lambda: os.nice(19))
    try:
        proc = subprocess.Popen(_args(tmp_path, name, 4), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)  # fmt: skip
        latest = tmp_path / name / "checkpoints" / "latest"
        deadline = time.time() + 600
        while not latest.is_file() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)  # our own session only: the run and its vLLM/reward workers
        proc.wait()
    finally:
        load.kill()  # its own pid
        load.wait()
    assert latest.read_text().strip() == "step_000002"
    full, killed = _last_per_step(run_dir_full), _last_per_step(tmp_path / name)
    assert {1, 2} <= set(killed)
    for step in (1, 2):
        assert _deterministic(killed[step]) == _deterministic(full[step]), step
    sft_record = json.loads((tmp_path / name / "sft.json").read_text())
    assert sft_record == json.loads((run_dir_full / "sft.json").read_text())

    resumed = subprocess.run(
        [*_args(tmp_path, name, 4), "--resume"], capture_output=True, text=True, timeout=900
    )
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    again = _last_per_step(tmp_path / name)
    for step in (3, 4):
        expected, got = _deterministic(full[step]), _deterministic(again[step])
        assert got.keys() == expected.keys(), step
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-9), (step, key)
    a, b = _weights(run_dir_full, 4), _weights(tmp_path / name, 4)
    assert a and set(a) == set(b)
    for key, value in a.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, b[key]), key


def _sft_args(out: Path, name: str, pairs: Path) -> list[str]:
    return [
        sys.executable, "-m", "megatron_rl.cli", "sft", f"run.output_dir={out}", f"run.name={name}",
        f"sft.train_path={pairs}", "sft.max_steps=4", "sft.batch_size=16", "sft.eval_every=0",
        "data.synthetic_digits=1", "data.synthetic_eval_size=8", "eval.samples_per_problem=1",
        "run.reward_workers=1", "run.tensorboard=false",
    ]  # fmt: skip


def _hf_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(model_dir / "model.safetensors")


def test_sft_from_pairs_stops_on_request_and_resumes_exactly(tmp_path):
    """`megatron-rl sft` on a JSONL of pairs; a stop request checkpoints after the step and exits 85; --resume
    continues, and the SFT model equals an uninterrupted run's."""
    from megatron_rl.data.arithmetic import ArithmeticTask

    task = ArithmeticTask(seed=3, digits=1)
    pairs = tmp_path / "pairs.jsonl"
    rows = [task.train_problem(i) for i in range(40)]
    pairs.write_text(
        "".join(json.dumps({"prompt": p.prompt, "response": task.sft_response(p)}) + "\n" for p in rows)
        + '{"prompt": "1+1="}\n'
    )
    straight = subprocess.run(
        _sft_args(tmp_path, "straight", pairs), capture_output=True, text=True, timeout=600
    )
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert "1 bad rows skipped" in straight.stderr

    stop_file = tmp_path / "stop"
    stop_file.touch()  # asked to stop from the start: it stops after step 1
    env = {**os.environ, "MEGATRON_RL_STOP_FILE": str(stop_file)}
    stopped = subprocess.run(
        _sft_args(tmp_path, "stopped", pairs), capture_output=True, text=True, timeout=600, env=env
    )
    assert stopped.returncode == 85, stopped.stderr[-3000:]
    assert (tmp_path / "stopped" / "sft_checkpoints" / "latest").read_text() == "step_000001"
    assert not (tmp_path / "stopped" / "sft_model").exists()
    stop_file.unlink()
    resumed = subprocess.run(
        [*_sft_args(tmp_path, "stopped", pairs), "--resume"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "SFT resumed from" in resumed.stderr and "at step 1" in resumed.stderr
    a, b = _hf_weights(tmp_path / "straight" / "sft_model"), _hf_weights(tmp_path / "stopped" / "sft_model")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
