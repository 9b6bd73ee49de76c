"""`megatron-rl train`: the RL stage, one step at a time, in the order of the data flow.

prompts -> rollouts (vLLM) -> rewards -> GRPO advantages -> packed policy update -> weight sync -> metrics
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from megatron_rl.config import Config, ConfigError
from megatron_rl.data.dataset import Problem, load_prompt_dataset
from megatron_rl.data.epochs import SolvedPromptRemoval
from megatron_rl.data.synthetic import synthetic_task
from megatron_rl.distributed import ParallelLayout, device, init_distributed, shutdown
from megatron_rl.model.policy import Policy
from megatron_rl.rollout.weight_sync import WeightStream
from megatron_rl.train import preemption
from megatron_rl.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from megatron_rl.train.evaluate import evaluate
from megatron_rl.train.metrics import MetricsLogger
from megatron_rl.train.optimizer import build_optimizer
from megatron_rl.train.reward_scoring import start_scoring
from megatron_rl.train.rollout_queue import RolloutQueue, batch_from_state
from megatron_rl.train.rollouts import collect_rollouts, fitting_prompts
from megatron_rl.train.sft import run_sft
from megatron_rl.train.temperature import RolloutTemperature
from megatron_rl.train.update import policy_update

log = logging.getLogger("megatron_rl")


def is_driver() -> bool:
    """Rank 0 drives the rollout engine and the reward scoring; the others train (with distributed scoring, one
    rank per other node also scores shares of rank 0's batches, from a thread of its own)."""
    return dist.get_rank() == 0


def engines_everywhere(cfg: Config) -> bool:
    """Every rank hosts part of a vLLM engine (rollout.engine_ranks=all, more than one rank)."""
    return cfg.rollout.engine_ranks == "all" and dist.get_world_size() > 1


def broadcast(obj):
    if dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def local_shard_sync(cfg: Config, policy: Policy, engine) -> bool:
    """Whether weight syncs can skip the gather: with an engine on every rank (engine_ranks=all), rollout TP
    equal to the trainer's, one pipeline stage, a model whose shards vLLM splits as Megatron does, and on
    every rank a vLLM worker of the same TP rank as the rank's Megatron shards, each rank pushes its own shards
    to its own worker (`Policy.hf_local_buckets`). Decided by all ranks together (one all-reduce) and logged."""
    if not engines_everywhere(cfg):
        return False
    problem = policy.local_shards_problem(cfg.rollout.tensor_parallel_size, engine.tensor_parallel_rank())
    able = torch.tensor([0 if problem else 1], device=device())
    dist.all_reduce(able, op=dist.ReduceOp.MIN)
    local = bool(able.item())
    if is_driver():
        if local:
            log.info("weight sync: every rank pushes its own shards to its own vLLM worker (no TP gather)")
        else:
            log.info(
                "weight sync: whole tensors gathered over TP on every rank (%s)", problem or "another rank"
            )
    return local


def sync_weights(policy: Policy, engine, bucket_mb: float, local_shards: bool = False) -> dict[str, float]:
    """Push the policy's weights to the rollout engine, streamed: each bucket of at most `bucket_mb` MiB is
    gathered (a collective: every rank takes part), pushed and freed while the next is gathered. Ranks without
    an engine only take part. `local_shards` (local_shard_sync said so): each rank pushes its own shards to
    its own engine worker instead, with no gather. The metric `sync_local_shards` says which it was."""
    start = time.perf_counter()
    bucket_bytes = int(bucket_mb * (1 << 20))
    if local_shards:
        stream = WeightStream(
            policy.hf_local_manifest(), policy.hf_local_buckets(bucket_bytes), policy.tp_shard
        )
    else:
        stream = WeightStream(policy.hf_manifest(), policy.hf_buckets(bucket_bytes))
    report = None
    try:
        if engine is not None:
            report = engine.update_weights(stream)
        else:
            stream.drain()
    except BaseException:
        try:
            stream.drain()  # the other ranks are still gathering: reach the end with them, then fail
        except Exception:
            pass
        raise
    return {
        "time_sync_s": time.perf_counter() - start,
        "sync_mb": (report.bytes / 1e6) if report else 0.0,
        "sync_local_shards": float(local_shards),
    }


def save_hf_checkpoint(policy: Policy, out_dir: Path, bucket_bytes: int = 1 << 30) -> None:
    """The policy as an HF checkpoint directory (tokenizer and config copied from where it started), written
    bucket by bucket as the gather produces them: one model.safetensors, or shards with an index."""
    driver = is_driver()
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if driver:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(policy.model_dir, tmp, ignore=shutil.ignore_patterns("*.safetensors*"))
    weight_map: dict[str, int] = {}
    total_bytes = 0
    for shard, bucket in enumerate(policy.hf_buckets(bucket_bytes), start=1):  # a collective: all ranks
        if driver:
            tensors = {name: t.detach().contiguous().cpu() for name, t in bucket}
            save_file(tensors, tmp / f"shard-{shard}.safetensors", metadata={"format": "pt"})
            weight_map.update((name, shard) for name in tensors)
            total_bytes += sum(t.numel() * t.element_size() for t in tensors.values())
        del bucket
    if not driver:
        return
    shards = max(weight_map.values())
    names = {i: f"model-{i:05d}-of-{shards:05d}.safetensors" for i in range(1, shards + 1)}
    if shards == 1:
        names = {1: "model.safetensors"}
    for i, name in names.items():
        (tmp / f"shard-{i}.safetensors").rename(tmp / name)
    if shards > 1:
        index = {
            "metadata": {"total_size": total_bytes},
            "weight_map": {n: names[i] for n, i in weight_map.items()},
        }
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)


def prepare_base_model(cfg: Config, run_dir: Path) -> Path:
    if cfg.model.path:
        return Path(cfg.model.path)
    base = run_dir / "init_model"
    if is_driver() and not (base / "config.json").is_file():
        from megatron_rl.model.tiny import write_tiny_checkpoint

        write_tiny_checkpoint(base, seed=cfg.model.tiny_init_seed)
    dist.barrier()
    return base


def load_data(cfg: Config):
    if cfg.data.source != "file":
        task = synthetic_task(cfg.data)
        return task, task.eval_set(), task
    kind = cfg.data.reward
    train = load_prompt_dataset(cfg.data.train_path, kind) if cfg.data.train_path else None
    if train is None:
        raise ConfigError("config key 'data.train_path' is required when data.source is 'file'")
    log.info("dataset %s: %d rows, %d bad rows skipped", train.path, len(train), len(train.skipped))
    evalset = (
        load_prompt_dataset(cfg.data.eval_path, kind).problems if cfg.data.eval_path else train.problems[:200]
    )
    return train, evalset, None


def engine_options(cfg: Config, model_dir: Path, max_positions: int) -> dict:
    """How each vLLM engine is built, from the rollout section of the config."""
    options = {"max_num_seqs": cfg.rollout.max_num_seqs} if cfg.rollout.max_num_seqs else {}
    return dict(
        model_dir=str(model_dir),
        tensor_parallel_size=cfg.rollout.tensor_parallel_size,
        dtype=cfg.model.dtype,
        seed=cfg.run.seed,
        max_model_len=min(cfg.rollout.max_prompt_tokens + cfg.rollout.max_response_tokens, max_positions),
        cpu_kv_cache_gib=cfg.rollout.cpu_kv_cache_gib,
        gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
        weight_transport=cfg.rollout.weight_transport,
        broadcast_host=cfg.rollout.broadcast_host,
        **options,
    )


def start_engine(cfg: Config, model_dir: Path, max_positions: int, external_launcher: bool = False):
    """The rollout engine, as the rollout section of the config describes it: on rank 0 only, or (with
    `external_launcher`) a part of one on every rank, all ranks constructing it together."""
    from megatron_rl.rollout.vllm_engine import VLLMEngine

    return VLLMEngine(
        **engine_options(cfg, model_dir, max_positions),
        enable_sleep_mode=torch.cuda.is_available() and cfg.rollout.colocate_sleep,
        external_launcher=external_launcher,
        # On the CPU of a one-rank run, vLLM's engine core in the trainer's process (no second interpreter to
        # start); at staleness 1 it samples during the update, which another process does without the GIL.
        in_process=not cfg.rollout.staleness,
    )


def connect_separate_engines(cfg: Config, run_dir: Path, model_dir: Path, max_positions: int):
    """placement=separate (rank 0 only): the engine servers on their own nodes, found in the rendezvous
    directory, each started with this run's model, behind one engine interface."""
    from megatron_rl.rollout.fanout import EngineFanout
    from megatron_rl.rollout.remote import connect_engines

    count = separate_engine_count(cfg)
    rendezvous = Path(cfg.rollout.engine_rendezvous or run_dir / "engines")
    log.info(
        "waiting for %d rollout engine(s) in %s (up to %.0f s)", count, rendezvous, cfg.rollout.engine_wait_s
    )
    options = engine_options(cfg, model_dir, max_positions)
    engines = connect_engines(rendezvous, count, wait_s=cfg.rollout.engine_wait_s, **options)
    where = ", ".join(f"{e.address[0]}:{e.address[1]}" for e in engines)
    log.info("%d rollout engine(s) started on separate nodes: %s", count, where)
    return EngineFanout(engines)


def separate_engine_count(cfg: Config) -> int:
    if cfg.rollout.num_engines:
        return cfg.rollout.num_engines
    gpus = cfg.rollout.engine_nodes * cfg.cluster.gpus_per_node
    if gpus < cfg.rollout.tensor_parallel_size:
        raise ConfigError(
            "config key 'rollout.num_engines': placement is 'separate' and rollout.engine_nodes * "
            f"cluster.gpus_per_node = {gpus} GPU(s) cannot hold one engine of rollout.tensor_parallel_size "
            f"{cfg.rollout.tensor_parallel_size}; set rollout.engine_nodes or rollout.num_engines"
        )
    return gpus // cfg.rollout.tensor_parallel_size


def check_staleness(cfg: Config) -> None:
    """rollout.staleness 1 samples in a background thread of rank 0 while the policy trains: it needs engines
    that neither sleep during training (a colocated GPU engine does) nor take part in the trainer's
    collectives (engines on every rank do)."""
    if not cfg.rollout.staleness:
        return
    if engines_everywhere(cfg):
        raise ConfigError(
            "config key 'rollout.staleness': 1 samples while the policy trains, which engines on every trainer "
            "rank (rollout.engine_ranks='all') cannot; use rollout.placement='separate' or engine_ranks='driver'"
        )
    if torch.cuda.is_available() and cfg.rollout.placement == "colocated":
        raise ConfigError(
            "config key 'rollout.staleness': 1 samples while the policy trains, but a colocated engine shares "
            "the trainer's GPUs and sleeps during the update; use rollout.placement='separate'"
        )
    if not (cfg.grpo.tis_cap or cfg.grpo.mask_token_ratio or cfg.grpo.mask_sequence_ratio):
        log.warning(
            "rollout.staleness=1 without grpo.tis_cap or grpo.mask_*: batches one update old are trained on "
            "without an importance correction"
        )


def train(cfg: Config, resume: bool = False) -> dict:
    started = time.perf_counter()
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.run.seed)
    init_distributed(ParallelLayout(cfg.model.tensor_parallel_size, cfg.model.pipeline_parallel_size))
    preemption.install()  # SIGUSR1/SIGTERM: checkpoint and stop after the current RL step
    separate = cfg.rollout.placement == "separate"
    if separate and cfg.rollout.engine_ranks == "all":
        raise ConfigError(
            "config key 'rollout.engine_ranks': 'all' puts engines on the trainer's ranks, which "
            "rollout.placement='separate' does not; use engine_ranks='driver' (the default) with it"
        )
    if separate:
        separate_engine_count(cfg)  # a config that cannot hold one engine fails before the model loads
    check_staleness(cfg)
    if is_driver():
        (run_dir / "config.yaml").write_text(json.dumps(cfg.model_dump(), indent=1))
    dataset, eval_problems, sft_task = load_data(cfg)
    base_dir = prepare_base_model(cfg, run_dir)
    dtype = torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32
    policy = Policy.from_hf(
        base_dir,
        params_dtype=dtype,
        recompute=cfg.model.recompute,
        fused_output_layer=cfg.model.fused_output_layer,
    )

    engine = pool = tokenizer = None
    spmd = engines_everywhere(cfg)  # rollouts are then collectives: every rank samples its engine's slice
    max_positions = policy.cfg.max_position_embeddings
    if separate and is_driver():
        engine = connect_separate_engines(cfg, run_dir, base_dir, max_positions)
    elif is_driver() or spmd:
        engine = start_engine(cfg, base_dir, max_positions, external_launcher=spmd)
    if engine is not None:
        tokenizer = engine.tokenizer
        eval_problems = fitting_prompts(eval_problems, tokenizer, cfg, "eval set")
        if spmd:
            log.info(
                "rank %d hosts engine %d of %d (vLLM external launcher, TP=%d)",
                dist.get_rank(),
                engine.engine_index,
                engine.num_engines,
                cfg.rollout.tensor_parallel_size,
            )
    local_shards = local_shard_sync(cfg, policy, engine)
    # rank 0 scores with `pool`; with distributed scoring, one rank on each other node serves its shares
    scoring = start_scoring(
        cfg.run.reward_scoring, cfg.run.reward_workers, cfg.run.reward_timeout, cfg.run.reward_scoring_ranks
    )
    pool = scoring if is_driver() else None

    def held_out_accuracy() -> float:
        sync_weights(policy, engine, cfg.rollout.sync_bucket_mb, local_shards)
        acc = evaluate(engine, pool, eval_problems, tokenizer, cfg) if engine is not None else 0.0
        return broadcast(acc)

    # ---- SFT warm start (skipped when resuming a run that already did it)
    sft_record = run_dir / "sft.json"
    ckpt_root = run_dir / "checkpoints"
    resume_from = latest_checkpoint(ckpt_root) if resume else None
    if cfg.sft.enabled and not sft_record.is_file():
        sft_accuracy = _warm_start(
            cfg, policy, sft_task, tokenizer, held_out_accuracy, run_dir, resume, close=(engine, scoring)
        )
    elif sft_record.is_file():
        sft_accuracy = json.loads(sft_record.read_text())["sft_accuracy"]
        if resume_from is None:  # continue from the saved SFT weights
            policy = Policy.from_hf(
                run_dir / "sft_model",
                params_dtype=dtype,
                recompute=cfg.model.recompute,
                fused_output_layer=cfg.model.fused_output_layer,
            )
    else:
        sft_accuracy = held_out_accuracy()

    # ---- RL
    optimizer = build_optimizer(policy, cfg.optim)
    state = {"step": 0, "data_position": 0}
    if resume_from is not None:  # the lr needs no restoring: it is a function of the step (optimizer.lr_at)
        state = load_checkpoint(resume_from, policy, optimizer)
        log.info("resumed from %s at step %d", resume_from, state["step"])
    elif resume:
        log.info("--resume: no checkpoint in %s, starting at step 0", ckpt_root)
    # vLLM started from the base checkpoint: give it the current weights
    sync_weights(policy, engine, cfg.rollout.sync_bucket_mb, local_shards)

    metrics_log = (
        MetricsLogger(
            run_dir,
            cfg.run.steps,
            state["step"],
            cfg.run.tensorboard and is_driver(),
            cfg.run.wandb_project,
            cfg.model_dump(),
        )
        if is_driver()
        else None
    )

    # data.drop_solved_each_epoch: which rows each epoch holds, evolved by the ranks that collect rollouts and
    # saved with the loop state (after any batch sampled ahead, which the resumed run hands out first)
    removal = None
    if cfg.data.drop_solved_each_epoch:
        removal = SolvedPromptRemoval(len(dataset), state.get("prompt_removal"), start=state["data_position"])

    def collect(step: int, data_position: int, step_cfg: Config):
        seed = cfg.run.seed * 1_000_003 + step * 10_007
        return collect_rollouts(engine, pool, dataset, tokenizer, step_cfg, data_position, seed, removal)

    temperature = RolloutTemperature(cfg, policy, engine, dataset, tokenizer, state)  # rollout.temperature
    rollouts = RolloutQueue(collect, cfg.rollout.staleness, batch_from_state(state.get("pending_batch")))
    sleeps = engine is not None and not cfg.rollout.staleness  # at staleness 1 engines sample during updates
    for step in range(state["step"] + 1, cfg.run.steps + 1):
        t_step = time.perf_counter()
        # `auto`: chosen again for the target entropy when due (no sampling ahead is in flight then)
        step_cfg = temperature.config_for(step)
        batch = rollouts.take(step, state["data_position"], step_cfg) if engine is not None else None
        batch = broadcast(batch)  # with engines on every rank all hold it already: rank 0's timings win
        if engine is not None:
            rollouts.start_next(step, batch.data_position, cfg.run.steps, step_cfg)  # staleness 1 only
        if sleeps:
            engine.sleep()  # colocated on a GPU: vLLM's weights and KV cache make room for training
        t_train = time.perf_counter()
        train_metrics = policy_update(policy, optimizer, batch, step_cfg, step)
        train_seconds = time.perf_counter() - t_train
        # Memory order: training's gradients and cached blocks go, then vLLM's weights come back and take the
        # push, and only then its KV cache (the largest allocation) returns.
        policy.release_grads()
        waited = rollouts.wait()  # staleness 1: engines finish the next batch before they take new weights
        if sleeps:
            engine.wake_up(["weights"])
        sync_metrics = sync_weights(policy, engine, cfg.rollout.sync_bucket_mb, local_shards)
        if sleeps:
            engine.wake_up(["kv_cache"])
        state = {
            "step": step,
            "data_position": batch.data_position,
            "pending_batch": rollouts.pending_state(),
            **temperature.state(),
            **({"prompt_removal": removal.state()} if removal is not None else {}),
        }
        step_seconds = time.perf_counter() - t_step
        response_tokens = sum(len(r) for r in batch.responses)
        metrics = {
            **batch.stats,
            **train_metrics,
            **sync_metrics,
            **waited,
            **temperature.metrics(),
            "temperature": batch.temperature,  # what the batch was sampled and trained at (sampled ahead: earlier)
            "time_train_s": train_seconds,
            "time_step_s": step_seconds,
            "tokens_per_s": response_tokens / step_seconds,
            "train_tokens_per_s": train_metrics["packed_tokens"] / train_seconds,
        }
        if cfg.eval.every and step % cfg.eval.every == 0:
            metrics["heldout_accuracy"] = held_out_accuracy()
        if metrics_log:
            metrics_log.log(step, metrics)
        stop = preemption.stop_requested() and step < cfg.run.steps  # a collective: all ranks agree
        every = cfg.run.checkpoint_every
        if stop or (every and (step % every == 0 or step == cfg.run.steps)):
            save_checkpoint(ckpt_root, step, policy, optimizer, state, cfg.run.keep_checkpoints)
        if stop:
            preemption.exit_preempted(step, ckpt_root, (metrics_log, engine, scoring))
    rollouts.close()
    if metrics_log:
        metrics_log.close()

    rl_accuracy = held_out_accuracy()
    save_hf_checkpoint(policy, run_dir / "final_model")  # the next stage's model.path (e.g. math -> code)
    result = {
        "sft_accuracy": round(sft_accuracy, 4),
        "rl_accuracy": round(rl_accuracy, 4),
        "minutes": round((time.perf_counter() - started) / 60, 2),
        "run_dir": str(run_dir),
    }
    if is_driver():
        (run_dir / "result.json").write_text(json.dumps(result))
    if scoring is not None:
        scoring.close()
    if engine is not None:
        engine.shutdown()
    shutdown()
    return result


def _warm_start(
    cfg, policy, task, tokenizer, held_out_accuracy, run_dir: Path, resume: bool, close=()
) -> float:
    """SFT on (prompt, response) pairs, then save the SFT checkpoint for later runs/resume.

    The pairs come from `sft.train_path` when set, else from the synthetic task's traced solutions. Batches
    depend only on the step, so a preempted SFT continues exactly from run_dir/sft_checkpoints (with --resume).
    """
    from megatron_rl.data.dataset import load_sft_dataset
    from megatron_rl.data.prompts import render_prompt

    if cfg.sft.train_path:
        examples, skipped = load_sft_dataset(cfg.sft.train_path)
        log.info(
            "SFT data %s: %d pairs, %d bad rows skipped", cfg.sft.train_path, len(examples), len(skipped)
        )
    elif task is None:
        raise ConfigError("config key 'sft.train_path' is required for SFT when data.source is 'file'")
    eos = broadcast([tokenizer.eos_token_id] if is_driver() else [])
    tok = broadcast(tokenizer)
    bs = cfg.sft.batch_size

    def pairs(step: int):
        if cfg.sft.train_path:  # epochs cycle through the file in order
            batch = [examples[((step - 1) * bs + i) % len(examples)] for i in range(bs)]
            problems = [Problem(prompt=e.prompt) for e in batch]
            texts = [e.response for e in batch]
        else:
            problems = [task.train_problem(10_000_000 + step * bs + i) for i in range(bs)]
            texts = [task.sft_response(p) for p in problems]
        prompts = [render_prompt(p, tok, cfg.data.prompt_template, cfg.data.instruction) for p in problems]
        responses = [tok.encode(t, add_special_tokens=False) + eos for t in texts]
        return prompts, responses

    steps, accuracy = run_sft(
        policy, pairs, held_out_accuracy, cfg, run_dir / "sft_checkpoints", resume, close
    )
    log.info("SFT warm start: %d steps, held-out accuracy %.3f", steps, accuracy)
    save_hf_checkpoint(policy, run_dir / "sft_model")
    if is_driver():
        (run_dir / "sft.json").write_text(json.dumps({"sft_accuracy": accuracy, "sft_steps": steps}))
    dist.barrier()
    return accuracy
