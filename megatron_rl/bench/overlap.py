"""Overlap benchmark: RL steps per minute at rollout.staleness 0 and 1, the engine in a process of its own.

    python -m megatron_rl.bench.overlap          # or: megatron-rl bench overlap [--models tiny 150m]

For each model (the tiny one and the ~150M-parameter Qwen2 shape, random weights, built locally) this runs
`megatron-rl train` with rollout.placement=separate against one `megatron-rl serve-rollout` engine server on
this machine, without SFT or held-out evaluations between steps: first at staleness 0 (each step samples, then
updates, then syncs), then at staleness 1 (the engine samples the next step's batch while the trainer updates),
same prompts, seeds and settings (grpo.tis_cap=2 in both, so the loss does the same work). The baseline is the
staleness-0 run of the same model in the same invocation.

Per run: the median over steps 2..N (step 1 has nothing to overlap with) of the step's wall time and of its
phases as the trainer logs them: time_rollout_s (sampling; at staleness 1 it runs beside the update),
time_reward_s, time_train_s, time_sync_s and, at staleness 1, time_rollout_wait_s (sampling that outlasted the
update and held the trainer up). Two processes share this machine's cores: whatever overlap shows is bounded by
what the cores can run at once, so the load average and core count are printed with the figures.

Prints the device, a markdown table and, last, one JSON line with the results.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from megatron_rl.bench.common import announce_device, load_average
from megatron_rl.model.tiny import QWEN2_145M, TinyShape

# model -> (shape, the train overrides that size its step)
MODELS: dict[str, tuple[TinyShape, list[str]]] = {
    "tiny": (TinyShape(), ["rollout.prompts_per_step=32", "rollout.group_size=8", "rollout.max_response_tokens=48"]),
    "150m": (QWEN2_145M, ["rollout.prompts_per_step=8", "rollout.group_size=4", "rollout.max_response_tokens=64"]),
}  # fmt: skip
PHASES = ("time_rollout_s", "time_reward_s", "time_train_s", "time_sync_s", "time_rollout_wait_s")


def train_with_engine_server(train_args: Sequence[str], rendezvous: Path, timeout: float, env=None):
    """`megatron-rl train ARGS rollout.placement=separate` against one engine server started here (it exits
    when the trainer shuts it down). Returns the trainer's CompletedProcess (stdout and stderr captured)."""
    cli = [sys.executable, "-m", "megatron_rl.cli"]
    with open(rendezvous.parent / f"{rendezvous.name}.server.log", "w") as server_log:
        server = subprocess.Popen(
            [*cli, "serve-rollout", "--rendezvous", str(rendezvous), "--index", "0"],
            stdout=server_log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        try:
            separate = [
                "rollout.placement=separate",
                "rollout.num_engines=1",
                f"rollout.engine_rendezvous={rendezvous}",
            ]
            trainer = subprocess.run(
                [*cli, "train", *train_args, *separate],
                capture_output=True,
                text=True,
                timeout=timeout,
                env=env,
            )
            server.wait(timeout=120)
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()
    return trainer


def phase_medians(metrics_file: Path) -> dict[str, float]:
    """Medians over steps 2..N of time_step_s and the phases in PHASES (those the run logged)."""
    records = {}
    for line in metrics_file.read_text().splitlines():
        record = json.loads(line)
        records[record["step"]] = record
    later = [records[s] for s in sorted(records) if s >= 2]
    if not later:
        raise RuntimeError(f"{metrics_file}: fewer than 2 steps logged")
    keys = ("time_step_s", *(k for k in PHASES if k in later[0]))
    return {k: statistics.median(r[k] for r in later) for k in keys}


def run_model(name: str, steps: int, workdir: Path) -> dict:
    from megatron_rl.model.tiny import write_tiny_checkpoint

    shape, sizing = MODELS[name]
    model_dir = write_tiny_checkpoint(workdir / f"{name}_model", shape, seed=0)
    result = {}
    for staleness in (0, 1):
        run = f"{name}_staleness{staleness}"
        args = [
            f"run.output_dir={workdir}", f"run.name={run}", f"run.steps={steps}", f"model.path={model_dir}",
            "run.checkpoint_every=0", "run.tensorboard=false", "run.reward_workers=1", "sft.enabled=false",
            "eval.every=0", "eval.samples_per_problem=1", "data.synthetic_eval_size=8", "grpo.tis_cap=2",
            f"rollout.staleness={staleness}", *sizing,
        ]  # fmt: skip
        proc = train_with_engine_server(args, workdir / f"{run}_engines", timeout=3600)
        if proc.returncode != 0:
            raise RuntimeError(f"{run} failed:\n{proc.stderr[-3000:]}")
        result[f"staleness{staleness}"] = phase_medians(workdir / run / "metrics.jsonl")
    s0, s1 = result["staleness0"]["time_step_s"], result["staleness1"]["time_step_s"]
    result["step_time_ratio"] = s1 / s0
    result["steps_per_min"] = {"staleness0": 60 / s0, "staleness1": 60 / s1}
    return result


def table(results: dict[str, dict]) -> str:
    rows = [
        "| model | staleness | s/step | steps/min | rollout s | reward s | train s | sync s | wait s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        for s in (0, 1):
            m = r[f"staleness{s}"]
            wait = f"{m['time_rollout_wait_s']:.3f}" if "time_rollout_wait_s" in m else "-"
            rows.append(
                f"| {name} | {s} | {m['time_step_s']:.3f} | {60 / m['time_step_s']:.1f} | "
                f"{m['time_rollout_s']:.3f} | {m['time_reward_s']:.3f} | {m['time_train_s']:.3f} | "
                f"{m['time_sync_s']:.3f} | {wait} |"
            )
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megatron-rl bench overlap", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=sorted(MODELS), choices=sorted(MODELS))
    parser.add_argument("--steps", type=int, default=8, help="RL steps per run (medians over steps 2..N)")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2 (step 1 has nothing to overlap with)")
    device, load = announce_device()
    print(f"cores: {os.cpu_count()}; trainer and engine server share them", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        results = {name: run_model(name, args.steps, Path(tmp)) for name in args.models}
    print(table(results))
    print(json.dumps({"results": results, "steps": args.steps, "device": device,
                      "load_average": [load, load_average()]}))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
