"""`megatron-rl eval`: K samples per problem from a model, scored with the stage's reward, reported as avg@K
and unbiased pass@k per data file, with the protocol that produced them.

Prompts are rendered, sampled and scored exactly as the trainer's held-out evaluation does
(train/rollouts.sample_and_score: the same prompt template, per-prompt seeds `seed + i`, a response cut off
before `</think>` scoring 0). The prompt template, instruction and reward timeout come from the model's run
when --model is RUN_DIR/final_model or RUN_DIR/sft_model (RUN_DIR/config.yaml), else from --config, else from
the defaults. Launched with torchrun, every rank hosts an engine (vLLM's external launcher) and each samples a
slice of the problems; rank 0 scores and writes.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch.distributed as dist

from megatron_rl.config import Config, ConfigError, load_config
from megatron_rl.data.dataset import Problem, _read_rows, load_prompt_dataset
from megatron_rl.evaluation.passk import summarise

log = logging.getLogger("megatron_rl")

DEFAULT_SEED = 12345  # the trainer's held-out evaluation seed (train/evaluate.py)


@dataclass
class ProblemResult:
    index: int  # the problem's position among the file's usable rows
    prompt: str
    answer: str
    samples: int
    correct: int
    lengths: list[int]  # response tokens of each sample
    truncated: int  # samples cut at the length limit
    unfinished: int  # of those, cut before </think> (scored 0 without grading)


def eval_config(
    model_dir: Path, config_path: Path | None, overrides: Sequence[str] = ()
) -> tuple[Config, str]:
    """The config whose data and reward settings the evaluation uses, and where it came from."""
    if config_path is not None:
        return load_config(config_path, list(overrides)), str(config_path)
    run_config = model_dir.parent / "config.yaml"
    if (model_dir / "config.json").is_file() and run_config.is_file():
        return load_config(run_config, list(overrides)), str(run_config)
    return load_config(None, list(overrides)), "the defaults (configs/tiny_math.yaml)"


def reward_kind(path: Path) -> str:
    """ "code" when the file's first readable row has a `tests` field, else "math"."""
    if not path.is_file():
        raise ConfigError(f"--data: file '{path}' does not exist")
    for _, row in _read_rows(path):
        if isinstance(row, dict):
            return "code" if "tests" in row else "math"
    raise ConfigError(f"--data: '{path}' has no readable row")


def per_problem(
    problems: Sequence[Problem], samples, rewards: Sequence[float], k: int
) -> list[ProblemResult]:
    from megatron_rl.train.rollouts import unfinished

    results = [ProblemResult(i, p.prompt, p.answer, k, 0, [], 0, 0) for i, p in enumerate(problems)]
    for sample, reward in zip(samples, rewards, strict=True):
        r = results[sample.prompt_index]
        r.correct += reward > 0.5
        r.lengths.append(len(sample.token_ids))
        r.truncated += sample.finish_reason == "length"
        r.unfinished += unfinished(sample)
    return results


def evaluate_file(engine, pool, tokenizer, cfg: Config, path: Path, k: int, temperature: float, seed: int):
    """(the usable problems, their ProblemResults, prompts skipped as too long) for one data file; a collective
    when every rank hosts an engine."""
    from megatron_rl.train.rollouts import prompt_fits, sample_and_score

    dataset = load_prompt_dataset(path, cfg.data.reward)
    problems = [p for p in dataset.problems if prompt_fits(p, tokenizer, cfg)]
    too_long = len(dataset.problems) - len(problems)
    if not problems:
        raise ConfigError(
            f"--data '{path}': no prompt fits rollout.max_prompt_tokens={cfg.rollout.max_prompt_tokens}"
        )
    samples, rewards, _, _ = sample_and_score(engine, pool, problems, tokenizer, cfg, seed, k, temperature)
    return problems, per_problem(problems, samples, rewards, k), too_long, len(dataset.skipped)


@contextmanager
def samplers(model: Path, base: Config, max_tokens: int, tensor_parallel_size: int = 1) -> Iterator[tuple]:
    """(engine, reward pool or None, rank) for sampling `model` with `base`'s settings: one vLLM engine, or
    under torchrun one per rank (external launcher); the reward pool on rank 0. Shut down on exit."""
    if not (model / "config.json").is_file():
        raise ConfigError(f"--model: '{model}' is not an HF model directory (no config.json)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        from megatron_rl.distributed import ParallelLayout, init_distributed

        init_distributed(ParallelLayout(1, 1))
    rank = dist.get_rank() if dist.is_initialized() else 0

    from megatron_rl.model.hf_config import load_hf_config
    from megatron_rl.rollout.vllm_engine import VLLMEngine

    positions = load_hf_config(model).max_position_embeddings
    engine = VLLMEngine(
        str(model),
        tensor_parallel_size=tensor_parallel_size,
        dtype=base.model.dtype,
        seed=base.run.seed,
        max_model_len=min(base.rollout.max_prompt_tokens + max_tokens, positions),
        gpu_memory_utilization=base.rollout.gpu_memory_utilization,
        cpu_kv_cache_gib=base.rollout.cpu_kv_cache_gib,
        external_launcher=world > 1,
        in_process=True,  # one process alone on the CPU: vLLM's engine core in it
    )
    pool = None
    try:
        if rank == 0:
            from megatron_rl.rewards import RewardPool

            pool = RewardPool(workers=base.run.reward_workers, math_timeout=base.run.reward_timeout)
        yield engine, pool, rank
    finally:
        if pool is not None:
            pool.close()
        engine.shutdown()
        if world > 1:
            from megatron_rl.distributed import shutdown

            shutdown()


def sampling_config(base: Config, kind: str, top_p: float, max_tokens: int) -> Config:
    cfg = base.model_copy(deep=True)
    cfg.data.reward = kind
    cfg.rollout.top_p, cfg.rollout.max_response_tokens = top_p, max_tokens
    return cfg


def check_sampling(k: int, temperature: float, top_p: float) -> None:
    if k < 1:
        raise ConfigError(f"--k must be at least 1, got {k}")
    if not 0 < top_p <= 1 or temperature < 0:
        raise ConfigError(f"--top-p must be in (0, 1] and --temperature >= 0, got {top_p} and {temperature}")


def run_eval(
    model: Path,
    data: Sequence[Path],
    k: int,
    temperature: float,
    top_p: float,
    max_tokens: int | None,
    seed: int = DEFAULT_SEED,
    out: Path | None = None,
    config: Path | None = None,
    overrides: Sequence[str] = (),
    tensor_parallel_size: int = 1,
) -> dict:
    """Evaluate `model` on each file of `data`; returns {"results": {FILE_NAME: {...}}} on rank 0 (an empty
    dict elsewhere) and writes OUT/NAME.problems.jsonl and OUT/results.json."""
    check_sampling(k, temperature, top_p)
    base, config_source = eval_config(model, config, overrides)
    kinds = {path: reward_kind(path) for path in data}
    max_tokens = max_tokens or base.rollout.max_response_tokens
    results: dict = {}
    with samplers(model, base, max_tokens, tensor_parallel_size) as (engine, pool, rank):
        for path in data:
            cfg = sampling_config(base, kinds[path], top_p, max_tokens)
            problems, rows, too_long, bad_rows = evaluate_file(
                engine, pool, engine.tokenizer, cfg, path, k, temperature, seed
            )
            if rank != 0:
                continue
            protocol = {
                "model": str(model),
                "samples_per_problem": k,
                "temperature": temperature,
                "top_p": top_p,
                "max_tokens": max_tokens,
                "seed": f"{seed} + problem index",
                "prompt_template": cfg.data.prompt_template,
                **({"instruction": cfg.data.instruction} if cfg.data.prompt_template == "chat" else {}),
                "reward": cfg.data.reward,
                "unfinished": "a response cut off before </think> scores 0",
                "dtype": cfg.model.dtype,
                "engines": getattr(engine, "num_engines", 1),
                "config": config_source,
            }
            summary = summarise([r.correct for r in rows], k)
            results[path.name] = {
                **summary,
                "skipped_bad_rows": bad_rows,
                "skipped_too_long": too_long,
                "truncated_fraction": sum(r.truncated for r in rows) / (len(rows) * k),
                "protocol": protocol,
            }
            log.info("%s: %d problems, avg@%d %.4f", path.name, len(rows), k, summary["avg@k"])
            if out is not None:
                out.mkdir(parents=True, exist_ok=True)
                with (out / f"{path.stem}.problems.jsonl").open("w") as f:
                    for r in rows:
                        f.write(json.dumps(asdict(r)) + "\n")
        if rank == 0 and out is not None:
            (out / "results.json").write_text(json.dumps({"results": results}, indent=1))
    return {"results": results} if rank == 0 else {}


def pass_counts(
    problems: Sequence[Problem],
    kind: str,
    model: Path,
    k: int,
    temperature: float = 0.6,
    top_p: float = 1.0,
    max_tokens: int | None = None,
    seed: int = DEFAULT_SEED,
    config: Path | None = None,
    overrides: Sequence[str] = (),
) -> tuple[list[ProblemResult | None], dict]:
    """How many of k samples of `model` solve each problem (None for a prompt too long for
    rollout.max_prompt_tokens), and the protocol; what difficulty grading and hard-prompt filtering use."""
    from megatron_rl.train.rollouts import prompt_fits, sample_and_score

    check_sampling(k, temperature, top_p)
    base, config_source = eval_config(model, config, overrides)
    max_tokens = max_tokens or base.rollout.max_response_tokens
    cfg = sampling_config(base, kind, top_p, max_tokens)
    with samplers(model, base, max_tokens) as (engine, pool, _):
        fits = [prompt_fits(p, engine.tokenizer, cfg) for p in problems]
        todo = [p for p, ok in zip(problems, fits, strict=True) if ok]
        rows: list[ProblemResult] = []
        if todo:
            samples, rewards, _, _ = sample_and_score(
                engine, pool, todo, engine.tokenizer, cfg, seed, k, temperature
            )
            rows = per_problem(todo, samples, rewards, k)
    graded = iter(rows)
    protocol = {
        "model": str(model), "samples_per_problem": k, "temperature": temperature, "top_p": top_p,
        "max_tokens": max_tokens, "seed": f"{seed} + problem index", "reward": kind, "config": config_source,
    }  # fmt: skip
    return [next(graded) if ok else None for ok in fits], protocol
