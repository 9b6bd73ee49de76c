"""The `megatron-rl` command: one subcommand per job, each a thin call into the module that does it."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    no_args_is_help=True, add_completion=False, help="GRPO for reasoning LLMs on Megatron + vLLM."
)
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks (each prints its device and a baseline).")
app.add_typer(bench_app, name="bench")


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@app.command("init-tiny")
def init_tiny(
    out_dir: Path,
    hidden_size: int = 128,
    layers: int = 2,
    heads: int = 2,
    kv_heads: int = 1,
    intermediate_size: int = 512,
    tie_word_embeddings: bool = False,
    init_std: float = 0.02,
    seed: int = 0,
) -> None:
    """Write a tiny Qwen2 checkpoint with a character-level tokenizer and chat template to OUT_DIR."""
    from megatron_rl.model.tiny import TinyShape, write_tiny_checkpoint

    shape = TinyShape(
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=intermediate_size,
        tie_word_embeddings=tie_word_embeddings,
        initializer_range=init_std,
    )
    path = write_tiny_checkpoint(out_dir, shape, seed=seed)
    typer.echo(json.dumps({"model_dir": str(path)}))


@app.command("verify-sync")
def verify_sync_cmd(
    model: Annotated[Path, typer.Option("--model", help="HF checkpoint directory")],
    tp: Annotated[int, typer.Option("--tp", help="Megatron tensor-parallel size")] = 1,
    bucket_mb: float = 64.0,
    max_tokens: int = 24,
    seed: int = 0,
    transport: Annotated[
        str, typer.Option("--transport", help="comma-separated: auto, shm, ipc, broadcast, rpc")
    ] = "auto",
) -> None:
    """Push perturbed Megatron weights into vLLM and check that sampled-token logprobs match (fp32, 1e-5)."""
    from megatron_rl.model.hf_config import ModelConfigError, load_hf_config
    from megatron_rl.verify_sync import TOLERANCE, verify_sync

    try:
        load_hf_config(model).check_parallel(tp, 1)
    except ModelConfigError as e:
        _fail(str(e))
    from megatron_rl.rollout.transport import TRANSPORTS

    transports = tuple(t.strip() for t in transport.split(",") if t.strip())
    unknown = [t for t in transports if t not in TRANSPORTS] or ([] if transports else [transport])
    if unknown:
        _fail(f"--transport: '{unknown[0]}' is not one of {', '.join(TRANSPORTS)}")
    result = verify_sync(
        str(model), tp=tp, bucket_mb=bucket_mb, max_tokens=max_tokens, seed=seed, transports=transports
    )
    typer.echo(json.dumps(result))
    if not result["max_abs_logprob_diff"] <= TOLERANCE:  # NaN fails too
        raise typer.Exit(1)


def _run_training(config: Path | None, overrides: list[str], resume: bool) -> None:
    import logging

    from megatron_rl.config import ConfigError, load_config
    from megatron_rl.data.dataset import DatasetError
    from megatron_rl.model.hf_config import ModelConfigError
    from megatron_rl.train.checkpoint import CheckpointError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(config, overrides)
    except ConfigError as e:
        _fail(str(e))
    from megatron_rl.train.rl import train

    # The project's own errors are messages for the user (one line); any other error keeps its traceback.
    try:
        result = train(cfg, resume=resume)
    except (CheckpointError, ConfigError, DatasetError, ModelConfigError) as e:
        _fail(str(e))
    from megatron_rl.distributed import launcher_rank

    if launcher_rank() == 0:  # one result line per run, not one per rank
        typer.echo(json.dumps(result))


@app.command("train", context_settings={"allow_extra_args": True})
def train_cmd(
    ctx: typer.Context,
    config: Annotated[
        Path | None, typer.Option("--config", help="YAML config (default: configs/tiny_math.yaml)")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="continue from the run's latest checkpoint")
    ] = False,
) -> None:
    """Run an RL stage (SFT warm start first when the config enables it); extra args are key=value overrides."""
    _run_training(config, list(ctx.args), resume)


@app.command("sft", context_settings={"allow_extra_args": True})
def sft_cmd(
    ctx: typer.Context,
    config: Annotated[Path | None, typer.Option("--config")] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="continue a preempted SFT from RUN_DIR/sft_checkpoints")
    ] = False,
) -> None:
    """Only the SFT warm start of a config (RL steps = 0); writes RUN_DIR/sft_model."""
    _run_training(config, ["sft.enabled=true", "run.steps=0", *ctx.args], resume)


@app.command("plot")
def plot_cmd(run_dir: Path, out: Path | None = None) -> None:
    """Write a PNG of reward, accuracy, entropy and response length against step."""
    from megatron_rl.train.plot import plot_run

    if not (run_dir / "metrics.jsonl").is_file():
        _fail(f"{run_dir}: no metrics.jsonl (is this a run directory?)")
    typer.echo(str(plot_run(run_dir, out)))


@app.command("plan", context_settings={"allow_extra_args": True})
def plan_cmd(
    ctx: typer.Context,
    config: Annotated[Path, typer.Argument(help="YAML config")],
    as_json: Annotated[bool, typer.Option("--json", help="one JSON line instead of the table")] = False,
) -> None:
    """Memory per GPU that CONFIG needs (no GPU, no weights); exit 1 when it does not fit. Extra args: overrides."""
    from megatron_rl.config import ConfigError, load_config
    from megatron_rl.plan import PlanError, format_plan, make_plan

    try:
        plan = make_plan(load_config(config, list(ctx.args)), str(config))
    except (ConfigError, PlanError) as e:
        _fail(str(e))
    typer.echo(plan.to_json() if as_json else format_plan(plan))
    if not plan.fits:
        raise typer.Exit(1)


@app.command("serve-rollout")
def serve_rollout_cmd(
    rendezvous: Annotated[
        Path, typer.Option("--rendezvous", help="shared directory: writes engine_INDEX.json there")
    ],
    host: Annotated[
        str | None, typer.Option("--host", help="address to listen on (default: all, advertise hostname)")
    ] = None,
    index: Annotated[
        int | None, typer.Option("--index", help="engine index (default: $SLURM_PROCID or 0)")
    ] = None,
) -> None:
    """Serve one vLLM rollout engine to a trainer on another node (rollout.placement=separate)."""
    import logging

    from megatron_rl.rollout.remote import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    raise typer.Exit(serve(rendezvous, host=host, index=index))


@app.command("reward")
def reward_cmd(
    kind: Annotated[str, typer.Argument(help="math, code, or doctor (what this node offers the sandbox)")],
    input_path: Annotated[Path | None, typer.Argument(help="JSONL rows to score (math, code)")] = None,
    workers: int | None = None,
    timeout: float | None = None,
    unsafe_no_sandbox: Annotated[bool, typer.Option("--unsafe-no-sandbox")] = False,
    require_think: Annotated[
        bool,
        typer.Option("--require-think", help="a response without </think> scores 0 (thinking templates)"),
    ] = False,
) -> None:
    """Score a JSONL file of responses: one JSON line per row, then a summary line. A row may carry
    "finish_reason": "length"; cut off before any </think>, it scores 0 as in training. `reward doctor` prints
    what this node offers the code sandbox and exits non-zero where code could not be sandboxed."""
    from megatron_rl.rewards.cli import reward_main

    if kind == "doctor":
        from megatron_rl.rewards.doctor import doctor_main

        raise typer.Exit(doctor_main(workers))
    if kind not in ("math", "code"):
        _fail(f"KIND must be 'math', 'code' or 'doctor', got '{kind}'")
    if input_path is None:
        _fail(f"reward {kind} needs INPUT_PATH, a JSONL file of rows")
    raise typer.Exit(reward_main(kind, str(input_path), workers, timeout, unsafe_no_sandbox, require_think))


@app.command("eval", context_settings={"allow_extra_args": True})
def eval_cmd(
    ctx: typer.Context,
    model: Annotated[Path, typer.Option("--model", help="HF model directory, e.g. RUN_DIR/final_model")],
    data: Annotated[
        list[Path], typer.Option("--data", help="JSONL or Parquet problems; repeat for more files")
    ],
    k: Annotated[int, typer.Option("--k", help="samples per problem (avg@K, pass@k up to K)")] = 8,
    temperature: Annotated[float, typer.Option("--temperature")] = 0.6,
    top_p: Annotated[float, typer.Option("--top-p")] = 0.95,
    max_tokens: Annotated[
        int | None, typer.Option("--max-tokens", help="response length limit (default: the config's)")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="problem i samples with seed + i")] = 12345,
    out: Annotated[
        Path | None, typer.Option("--out", help="write NAME.problems.jsonl and results.json here")
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option("--config", help="prompt template and reward settings (default: the model's run)"),
    ] = None,
    tensor_parallel_size: Annotated[int, typer.Option("--tensor-parallel-size", help="each engine's TP")] = 1,
) -> None:
    """Sample K responses per problem, score them, print avg@K and unbiased pass@k per file with the protocol
    (last stdout line: one JSON object). Extra key=value arguments override the config. Under torchrun every
    rank hosts an engine."""
    import logging

    from megatron_rl.config import ConfigError
    from megatron_rl.data.dataset import DatasetError
    from megatron_rl.evaluation.run import run_eval

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        result = run_eval(
            model,
            data,
            k,
            temperature,
            top_p,
            max_tokens,
            seed,
            out,
            config,
            list(ctx.args),
            tensor_parallel_size,
        )
    except (ConfigError, DatasetError) as e:
        _fail(str(e))
    if result:
        print(json.dumps(result), flush=True)


@app.command("recipe", context_settings={"allow_extra_args": True})
def recipe_cmd(
    ctx: typer.Context,
    recipe: Annotated[Path, typer.Argument(help="recipe YAML: stages and filter steps in order")],
    resume: Annotated[bool, typer.Option("--resume", help="continue the stage that was running")] = False,
    nproc: Annotated[int, typer.Option("--nproc", help="ranks per stage on this machine (torchrun)")] = 1,
    step: Annotated[
        str | None,
        typer.Option("--step", help="run only this step (the steps before it must have finished)"),
    ] = None,
) -> None:
    """Run a recipe's stages in order, each from the previous stage's final model, with hard-prompt filtering
    between them; extra key=value arguments apply to every stage. Last stdout line: one JSON summary (with
    --step: that step's result, a stage's result.json or a filter's report)."""
    import logging

    from megatron_rl.config import ConfigError
    from megatron_rl.recipe import RecipeRun, RecipeStepFailed

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        summary = RecipeRun(recipe, list(ctx.args), resume, nproc).run(only=step)
    except ConfigError as e:
        _fail(str(e))
    except RecipeStepFailed as e:
        _fail(str(e), code=1)
    print(json.dumps(summary), flush=True)


@app.command("curate")
def curate_cmd(
    input_path: Annotated[Path, typer.Argument(help="training rows, JSONL or Parquet")],
    out: Annotated[Path, typer.Option("--out", help="writes curated.jsonl and removed.jsonl here")],
    decontaminate: Annotated[
        list[Path] | None, typer.Option("--decontaminate", help="benchmark file; repeat for more")
    ] = None,
    ngram: Annotated[
        int | None, typer.Option("--ngram", help="overlap length in words (math 9, code 14)")
    ] = None,
    kind: Annotated[
        str | None, typer.Option("--kind", help="math or code (default: by the rows' fields)")
    ] = None,
    difficulty: Annotated[
        bool, typer.Option("--difficulty", help="grade rows by --model's pass rate")
    ] = False,
    model: Annotated[Path | None, typer.Option("--model", help="HF model directory for --difficulty")] = None,
    k: Annotated[int, typer.Option("--k", help="samples per row for --difficulty")] = 8,
    temperature: Annotated[float, typer.Option("--temperature")] = 0.6,
    max_pass_rate: Annotated[
        float | None, typer.Option("--max-pass-rate", help="remove rows solved more often than this")
    ] = None,
    drop_unsolved: Annotated[
        bool, typer.Option("--drop-unsolved", help="remove rows no sample solved")
    ] = False,
    config: Annotated[
        Path | None, typer.Option("--config", help="settings for --difficulty's sampling")
    ] = None,
) -> None:
    """Remove rows that share a word N-gram with a benchmark row, then exact duplicates, then with --difficulty
    rows --model finds too easy (--max-pass-rate) or never solves (--drop-unsolved); one JSON line of counts."""
    import logging
    from dataclasses import asdict

    from megatron_rl.config import ConfigError
    from megatron_rl.data.curate import Difficulty, curate
    from megatron_rl.evaluation.run import reward_kind

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        kind = kind or reward_kind(input_path)
        if kind not in ("math", "code"):
            raise ConfigError(f"--kind must be 'math' or 'code', got '{kind}'")
        grading = None
        if difficulty:
            if model is None:
                raise ConfigError("--difficulty needs --model")
            grading = Difficulty(model, k, temperature, max_pass_rate, drop_unsolved, config)
        elif model is not None or max_pass_rate is not None or drop_unsolved:
            raise ConfigError("--model, --max-pass-rate and --drop-unsolved go with --difficulty")
        report = curate(input_path, out, kind, decontaminate or [], ngram, grading)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        _fail(str(e))
    print(json.dumps({**asdict(report), "kind": kind}), flush=True)


# `megatron-rl bench NAME ARGS...` runs main(ARGS) of megatron_rl.bench.NAME; each parses its own arguments
# (`megatron-rl bench NAME --help` lists them).
BENCHMARKS: dict[str, str] = {
    "kernels": "Fused log-prob/entropy kernels (logits, and fused output layer) vs chunked baselines (CUDA GPU).",
    "kernel_memory": "Peak CPU memory per token of log-probs from hidden states, fused vs unfused output layer.",
    "gpu_check": "`make gpu-check`: compiled-kernel tests + both kernel benchmarks on one GPU, one JSON file.",
    "rewards": "Sandboxed code execution vs plain python3, and math-verify throughput.",
    "sync": "Weight sync Megatron -> vLLM: ms and MB/s for the tiny and a ~150M-parameter model.",
    "packing": "Training-step tokens/s, packed vs padded-to-longest, tiny and ~150M models.",
    "update": "One policy-update step: Megatron schedule + DDP buckets vs per-parameter reduction, ~150M model.",
    "parity": "Log-probs of vLLM's samples: vLLM vs the trainer's recomputation, each vs a float64 reference.",
    "curate": "Decontamination and dedup of a 100k-row file vs reading and writing it.",
    "overlap": "RL steps per minute, rollout.staleness 0 vs 1, engine server in its own process.",
    "memory": "Peak memory per phase of a colocated 2-rank step (engine in each rank) beside the plan's prediction.",
}


def _add_benchmark(name: str, help_text: str) -> None:
    def run(ctx: typer.Context) -> None:
        import importlib

        raise typer.Exit(importlib.import_module(f"megatron_rl.bench.{name}").main(list(ctx.args)))

    settings = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}
    bench_app.command(name, help=help_text, context_settings=settings)(run)


for _name, _help in BENCHMARKS.items():
    _add_benchmark(_name, _help)


def main() -> None:
    # vLLM spawns worker processes that re-import __main__; keep all work under this guard.
    app(prog_name="megatron-rl")


if __name__ == "__main__":
    sys.exit(main())
