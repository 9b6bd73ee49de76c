"""End-to-end RL runs on the tiny config with real vLLM, real megatron-core and real math-verify.

One short SFT (1-digit addition, so some sampled answers are right and advantages are non-zero), then GRPO.
The kill/resume pair trains with the policy split into two pipeline stages (two ranks, gloo), at a rollout
temperature chosen for a target entropy (`rollout.temperature: auto`).
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
    "time_rollout_s", "time_reward_s", "time_train_s", "time_sync_s", "temperature",
}  # fmt: skip


def _args(out: Path, name: str, steps: int) -> list[str]:
    return [
        sys.executable, "-m", "megatron_rl.cli", "train",
        f"run.output_dir={out}", f"run.name={name}", f"run.steps={steps}", "run.checkpoint_every=2",
        "run.reward_workers=1", "sft.max_steps=40", "sft.eval_after=40", "sft.eval_every=40",
        "sft.stop_at_accuracy=0", "data.synthetic_digits=1", "data.synthetic_eval_size=40",
        "rollout.prompts_per_step=8", "rollout.max_response_tokens=24", "eval.samples_per_problem=2",
    ]  # fmt: skip


def torchrun(ranks: int) -> list[str]:
    """The launcher of a `ranks`-process run on this machine, on a free port."""
    from megatron_rl.distributed import free_port

    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={ranks}",
        f"--master_port={free_port()}",
    ]


# The temperature is chosen for the default target entropy (0.3) before step 1 and again before step 4: a run
# resumed from its step-2 checkpoint continues at step 3 with the saved choice.
AUTO_TEMPERATURE = ["rollout.temperature=auto", "rollout.auto_temperature.every=3"]
TARGET_ENTROPY = 0.3


# Both ranks score a share of every batch (distributed scoring, two scorers on this one machine)
DISTRIBUTED_SCORING = ["run.reward_scoring=distributed", "run.reward_scoring_ranks=[0,1]"]


def _pipeline_args(out: Path, name: str, steps: int) -> list[str]:
    """`_args` as a two-rank run with the policy in two pipeline stages (the engine on rank 0), with the rollout
    temperature chosen for a target entropy and the rewards scored by both ranks."""
    args = _args(out, name, steps)  # args[1:4]: "-m megatron_rl.cli train"
    return [
        *torchrun(2),
        *args[1:],
        "model.pipeline_parallel_size=2",
        *AUTO_TEMPERATURE,
        *DISTRIBUTED_SCORING,
    ]


def kill_run(pid: int) -> None:
    """SIGKILL a run we started: the launcher's session and those of its descendants (torchrun starts each rank
    in a session of its own), never this test's own group."""
    import psutil

    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    groups = set()
    for proc in procs:
        try:
            groups.add(os.getpgid(proc.pid))
        except ProcessLookupError:
            pass
    for group in groups - {os.getpgid(0), 0, 1}:
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass


PIPELINE_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # two ranks on a small machine: one thread each


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
def two_runs(tmp_path_factory):
    """The same 4-step config twice at once (PP=2, two ranks each), so that each competes with the other for
    the CPU: "full" runs to the end; "killed" gets SIGKILL as soon as its step-2 checkpoint is written. Returns
    (full run dir, its result line, its stderr, killed run dir)."""
    out = tmp_path_factory.mktemp("runs")
    with open(out / "full.out", "w") as stdout, open(out / "full.err", "w") as stderr:
        full = subprocess.Popen(
            _pipeline_args(out, "full", 4), stdout=stdout, stderr=stderr, env=PIPELINE_ENV
        )
    killed = subprocess.Popen(_pipeline_args(out, "killed", 4), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True, env=PIPELINE_ENV)  # fmt: skip
    latest = out / "killed" / "checkpoints" / "latest"
    deadline = time.time() + 900
    try:
        while not latest.is_file() and killed.poll() is None and time.time() < deadline:
            time.sleep(0.2)
    finally:
        kill_run(killed.pid)
        killed.wait()
    assert full.wait(timeout=900) == 0, (out / "full.err").read_text()[-4000:]
    result = json.loads((out / "full.out").read_text().strip().splitlines()[-1])
    return out / "full", result, (out / "full.err").read_text(), out / "killed"


def test_short_run_logs_every_metric(two_runs):
    run_dir, result, stderr, _ = two_runs
    assert set(result) == {"sft_accuracy", "rl_accuracy", "minutes", "run_dir"}
    records = _last_per_step(run_dir)
    assert sorted(records) == [1, 2, 3, 4]
    for r in records.values():
        assert REQUIRED_METRICS <= set(r), REQUIRED_METRICS - set(r)
        # distributed scoring: both ranks scored a share of every batch
        assert r["time_reward_s_node0"] > 0 and r["time_reward_s_node1"] > 0
    # The trainer's recompute through two pipeline stages == vLLM's sampling log-probs (fp32).
    assert records[1]["mismatch_max_abs_diff"] < 1e-5
    assert any(r["grad_norm"] > 0 for r in records.values())  # some groups had a learning signal
    assert (run_dir / "tensorboard").is_dir() and (run_dir / "sft_model" / "model.safetensors").is_file()
    final = run_dir / "final_model"
    assert (final / "model.safetensors").is_file() and (final / "config.json").is_file()  # next stage's model
    assert "step 4/4 reward" in stderr  # off a terminal, one plain progress line per step


def test_auto_temperature_lands_near_the_target_entropy(two_runs):
    """The temperature chosen before steps 1 and 4 (every probe sampled through vLLM, its entropy measured by
    both pipeline stages) gives that step's own rollouts, a fresh sample on other prompts, a mean entropy within
    0.05 of the target; steps 2 and 3 keep the step-1 choice and probe nothing."""
    run_dir, _, stderr, _ = two_runs
    records = _last_per_step(run_dir)
    for step in (1, 4):
        r = records[step]
        assert 1 <= r["temperature_probes"] <= 6 and 0.6 <= r["temperature"] <= 1.2, r
        assert abs(r["temperature_probe_entropy"] - TARGET_ENTROPY) < 0.05, r
        assert abs(r["entropy_mean"] - TARGET_ENTROPY) < 0.05, r  # the fresh measurement
        assert stderr.count(f"temperature probe before step {step}:") == r["temperature_probes"]
    assert records[1]["temperature"] == records[2]["temperature"] == records[3]["temperature"]
    assert not {"temperature_probes", "temperature_probe_entropy"} & (set(records[2]) | set(records[3]))


def test_eval_of_the_final_model_reproduces_the_runs_held_out_accuracy(two_runs, tmp_path):
    """`megatron-rl eval` on RUN_DIR/final_model with the run's eval problems, sample count and temperature
    samples what the trainer's last held-out evaluation sampled: the same accuracy, not just a close one."""
    from megatron_rl.config import load_config
    from megatron_rl.data.arithmetic import ArithmeticTask

    run_dir, result, _, _ = two_runs
    cfg = load_config(run_dir / "config.yaml")
    task = ArithmeticTask(cfg.data.seed, cfg.data.synthetic_digits, cfg.data.synthetic_eval_size)
    data = tmp_path / "heldout.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": p.prompt, "answer": p.answer}) + "\n" for p in task.eval_set())
    )
    k = cfg.eval.samples_per_problem
    args = [
        sys.executable, "-m", "megatron_rl.cli", "eval", "--model", str(run_dir / "final_model"),
        "--data", str(data), "--k", str(k), "--temperature", str(cfg.eval.temperature), "--top-p", "1.0",
        "--out", str(tmp_path / "eval"),
    ]  # fmt: skip
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])["results"]["heldout.jsonl"]
    assert report["problems"] == cfg.data.synthetic_eval_size and report["k"] == k
    assert round(report["avg@k"], 4) == result["rl_accuracy"]
    rows = [
        json.loads(line) for line in (tmp_path / "eval" / "heldout.problems.jsonl").read_text().splitlines()
    ]
    assert sum(r["correct"] for r in rows) / (len(rows) * k) == pytest.approx(report["avg@k"])
    assert (
        report["pass@k"]["1"] == pytest.approx(report["avg@k"])
        and report["pass@k"][str(k)] >= report["avg@k"]
    )
    protocol = report["protocol"]
    assert protocol["temperature"] == cfg.eval.temperature and protocol["samples_per_problem"] == k
    assert protocol["prompt_template"] == "raw" and protocol["config"] == str(run_dir / "config.yaml")

    bad = subprocess.run(
        [*args[:6], "--data", str(tmp_path / "missing.jsonl")], capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 2 and "missing.jsonl' does not exist" in bad.stderr

    # Difficulty grading through the same sampling path: with every fifth answer made impossible, those rows are
    # never solved, and the filter removes and keeps what its counts say (exact duplicates go first).
    problems = [json.loads(line) for line in data.read_text().splitlines()]
    for i in range(0, len(problems), 5):
        problems[i]["answer"] = "-1"  # a sum of two digits the model never writes
    graded = tmp_path / "graded.jsonl"
    graded.write_text("".join(json.dumps(p) + "\n" for p in problems))
    curated = subprocess.run(
        [
            sys.executable, "-m", "megatron_rl.cli", "curate", str(graded), "--out", str(tmp_path / "curated"),
            "--difficulty", "--model", str(run_dir / "final_model"), "--k", str(k),
            "--temperature", str(cfg.eval.temperature), "--max-pass-rate", "0.5", "--drop-unsolved",
        ],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert curated.returncode == 0, curated.stderr[-4000:]
    counts = json.loads(curated.stdout.strip().splitlines()[-1])
    removed = [json.loads(line) for line in (tmp_path / "curated" / "removed.jsonl").read_text().splitlines()]
    kept = [json.loads(line) for line in (tmp_path / "curated" / "curated.jsonl").read_text().splitlines()]
    reasons = [r["removed"]["reason"] for r in removed]
    assert (
        reasons.count("duplicate")
        == counts["duplicates"]
        == len(problems) - len({p["prompt"] for p in problems})
    )
    wrong = {(p["prompt"], p["answer"]) for i, p in enumerate(problems) if i % 5 == 0}
    for r in removed:
        if (r["row"]["prompt"], r["row"]["answer"]) in wrong and r["removed"]["reason"] != "duplicate":
            assert r["removed"] == {**r["removed"], "reason": "unsolved", "solved": f"0/{k}"}
    graded_rows = len(problems) - counts["duplicates"]
    assert (
        sum(counts["solved_histogram"].values())
        == graded_rows
        == counts["kept"] + counts["too_easy"] + counts["unsolved"]
    )
    assert counts["unsolved"] == counts["solved_histogram"].get(f"0/{k}", 0) >= 1
    assert len(kept) == counts["kept"] and all(0 < r["pass_rate"] <= 0.5 for r in kept)
    easy = [r["removed"]["solved"] for r in removed if r["removed"]["reason"] == "too_easy"]
    assert len(easy) == counts["too_easy"] and all(int(s.split("/")[0]) / k > 0.5 for s in easy)


def _deterministic(record: dict) -> dict:
    """A metrics line without the wall-clock figures (times and throughputs), which are all that may differ
    between two runs of the same config and seed."""
    return {k: v for k, v in record.items() if not (k.startswith("time_") or k.endswith("_per_s"))}


def test_kill_and_resume_matches_uninterrupted(two_runs):
    """Two runs of the same config and seed that competed for the CPU log the same metrics line for line (same
    seed -> same figures, whatever the load); the second, killed with SIGKILL after its step-2 checkpoint and
    resumed, continues exactly like the uninterrupted run."""
    run_dir_full, _, _, killed_dir = two_runs
    assert (killed_dir / "checkpoints" / "latest").read_text().strip() == "step_000002"
    full, killed = _last_per_step(run_dir_full), _last_per_step(killed_dir)
    assert {1, 2} <= set(killed)
    for step in (1, 2):
        assert _deterministic(killed[step]) == _deterministic(full[step]), step
    sft_record = json.loads((killed_dir / "sft.json").read_text())
    assert sft_record == json.loads((run_dir_full / "sft.json").read_text())

    resumed = subprocess.run(
        [*_pipeline_args(killed_dir.parent, killed_dir.name, 4), "--resume"],
        capture_output=True,
        text=True,
        timeout=900,
        env=PIPELINE_ENV,
    )
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    again = _last_per_step(killed_dir)
    for step in (3, 4):
        expected, got = _deterministic(full[step]), _deterministic(again[step])
        assert got.keys() == expected.keys(), step
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-9), (step, key)
    a, b = _weights(run_dir_full, 4), _weights(killed_dir, 4)
    assert a and set(a) == set(b)
    for key, value in a.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, b[key]), key


def test_staleness_one_trains_on_batches_one_update_old_and_resumes_exactly(two_runs, tmp_path):
    """rollout.staleness=1 with the engine in a server process of its own (placement=separate), sampling from the
    trainer's background thread: step 1's batch is sampled with the starting weights, every later one with the
    weights before the previous update (staleness 1, never more); the importance correction sees the lag. A
    resume from the step-2 checkpoint (which holds the batch sampled ahead for step 3) continues exactly like
    the uninterrupted run. It starts from the module's short run's final model (no SFT of its own)."""
    import shutil

    from megatron_rl.bench.overlap import train_with_engine_server

    def train(name: str, *extra: str):
        args = [
            *_args(tmp_path, name, 4)[4:],
            f"model.path={two_runs[0] / 'final_model'}",
            "sft.enabled=false",
            "rollout.staleness=1",
            "grpo.tis_cap=2",
            "run.keep_checkpoints=0",
        ]
        return train_with_engine_server([*args, *extra], tmp_path / f"{name}_engines", 900, PIPELINE_ENV)

    run = train("ahead")
    assert run.returncode == 0, run.stderr[-4000:]
    full = _last_per_step(tmp_path / "ahead")
    assert [full[s]["staleness_max"] for s in (1, 2, 3, 4)] == [0.0, 1.0, 1.0, 1.0]
    assert all(full[s]["staleness_mean"] == full[s]["staleness_max"] for s in full)
    assert full[1]["mismatch_max_abs_diff"] < 1e-5 < full[2]["mismatch_max_abs_diff"]  # the one-update lag
    assert all("tis_clipped_fraction" in r and "time_rollout_wait_s" in r for r in full.values())

    # The state of a run killed right after its step-2 checkpoint: that checkpoint, metrics up to step 2.
    copy = tmp_path / "resumed"
    shutil.copytree(tmp_path / "ahead", copy)
    (copy / "checkpoints" / "latest").write_text("step_000002")
    for path in (copy / "checkpoints" / "step_000004", copy / "final_model"):
        shutil.rmtree(path)
    lines = (copy / "metrics.jsonl").read_text().splitlines()
    (copy / "metrics.jsonl").write_text(
        "".join(line + "\n" for line in lines if json.loads(line)["step"] <= 2)
    )
    resumed = train(copy.name, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    again = _last_per_step(copy)
    for step in (3, 4):
        assert _deterministic(again[step]) == _deterministic(full[step]), step
    a, b = _weights(tmp_path / "ahead", 4), _weights(copy, 4)
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
    stop_file = tmp_path / "stop"
    stop_file.touch()  # asked to stop from the start: it stops after step 1
    env = {**os.environ, "MEGATRON_RL_STOP_FILE": str(stop_file)}
    # The uninterrupted run and the stopped one at the same time (neither waits for the other's vLLM start).
    with (
        open(tmp_path / "straight.err", "w+") as straight_err,
        open(tmp_path / "stopped.err", "w+") as stopped_err,
    ):
        straight = subprocess.Popen(_sft_args(tmp_path, "straight", pairs), stdout=subprocess.DEVNULL,
                                    stderr=straight_err)  # fmt: skip
        stopped = subprocess.Popen(_sft_args(tmp_path, "stopped", pairs), stdout=subprocess.DEVNULL,
                                   stderr=stopped_err, env=env)  # fmt: skip
        try:
            assert straight.wait(timeout=600) == 0, (tmp_path / "straight.err").read_text()[-3000:]
            assert stopped.wait(timeout=600) == 85, (tmp_path / "stopped.err").read_text()[-3000:]
        finally:
            for proc in (straight, stopped):  # only when an assertion failed: one may still be running
                if proc.poll() is None:
                    proc.kill()  # its own pid
                    proc.wait()
    assert "1 bad rows skipped" in (tmp_path / "straight.err").read_text()
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
