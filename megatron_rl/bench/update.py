"""One policy-update step: the Policy's scheduled path against a per-parameter baseline, same run.

    python -m megatron_rl.bench.update --dp 2       # or: megatron-rl bench update --dp 2

A packed batch of AceReason-like rollouts (bench/packing.py's length distribution) for a ~150M-parameter
Qwen2-shaped model, built locally, on `--dp` data-parallel ranks (gloo on the CPU, one process each). The step
is forward + backward of a token-level policy-gradient loss over the rank's micro-batches, the gradients'
reduction over the data-parallel ranks, their global norm and the clip (no optimizer step: it is the same
code in both), done two ways on the same weights and batch:

- scheduled: `Policy.forward_backward` (Megatron's schedule, DDP with fp32 main-grad buffers reduced a bucket
  at a time) then `Policy.clip_grads` (one batched norm, one all-reduce);
- per-parameter (the trainer before): autograd accumulates each gradient in the parameter's dtype, then one
  all-reduce per parameter, a norm with one host sync per parameter and a clip per parameter, on a second
  copy of the model without the DDP wrapper.

Each is timed as the median over `--reps` steps after one warm-up step each, the two interleaved so that load
drift hits both alike; rank 0 prints one JSON line with both times (the slowest rank's), their ratio and the
largest relative difference between the two ways' gradients.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace

import torch
import torch.distributed as dist

from megatron_rl.bench.common import announce_device, load_average
from megatron_rl.bench.packing import MODELS, acereason_like_lengths


def per_parameter_step(model, microbatches, loss_of, params, dp_group, max_norm: float) -> float:
    """The baseline: gradients in the parameter dtype, reduced and measured one parameter at a time."""
    from megatron_rl.model.policy import packed_forward_logprobs

    for p in params:
        p.grad = None
    for mb in microbatches:
        logprobs, entropy = packed_forward_logprobs(model, mb, 1.0)
        loss_of(mb, logprobs, entropy)[0].backward()
    if dist.get_world_size(dp_group) > 1:
        for p in params:
            dist.all_reduce(p.grad, group=dp_group)
    square = 0.0
    for p in params:
        square += float(p.grad.detach().double().pow(2).sum().cpu())
    norm = square**0.5
    if norm > max_norm:
        for p in params:
            p.grad.mul_(max_norm / (norm + 1e-6))
    return norm


def _rank_main(rank: int, world: int, port: int, args: argparse.Namespace, workdir: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, args.threads))
    from megatron_rl.algo.packing import pack_microbatches, pack_values
    from megatron_rl.distributed import ParallelLayout, init_distributed, shutdown
    from megatron_rl.model.build import build_gpt_model
    from megatron_rl.model.convert import SafetensorsCheckpoint, load_hf_into_megatron
    from megatron_rl.model.policy import Policy

    init_distributed(ParallelLayout(), rank=rank, world_size=world)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    policy = Policy.from_hf(workdir, params_dtype=dtype)
    baseline = build_gpt_model(policy.cfg, params_dtype=dtype)
    load_hf_into_megatron(baseline, policy.cfg, SafetensorsCheckpoint(workdir))
    baseline_params = [p for p in baseline.parameters() if p.requires_grad]

    spec = MODELS[args.model]
    n = args.samples
    prompt_lens, response_lens = acereason_like_lengths(n, spec.max_prompt, spec.max_response, args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    vocab = policy.cfg.vocab_size
    prompts = [torch.randint(0, vocab, (k,), generator=gen).tolist() for k in prompt_lens]
    responses = [torch.randint(0, vocab, (k,), generator=gen).tolist() for k in response_lens]
    advantages = torch.randn(n, generator=gen).tolist()
    response_tokens = sum(response_lens)
    budget = args.budget_factor * (spec.max_prompt + spec.max_response)
    mbs = pack_microbatches(prompts, responses, budget, dp_size=world, dp_rank=rank)

    def loss_of(mb, logprobs, entropy):
        loss = (-(logprobs * pack_values(advantages, mb)).sum() - 1e-3 * entropy.sum()) / response_tokens
        return loss, {}

    def scheduled() -> float:
        policy.zero_grads()
        policy.forward_backward(mbs, 1.0, loss_of)
        return policy.clip_grads(args.max_norm)

    def per_parameter() -> float:
        return per_parameter_step(baseline, mbs, loss_of, baseline_params, policy.dp_group, args.max_norm)

    ways = {"scheduled": scheduled, "per_parameter": per_parameter}
    norms = {name: way() for name, way in ways.items()}  # warm-up
    grad_diff = max(
        float((p.main_grad - q.grad.float()).norm() / q.grad.float().norm().clamp_min(1e-30))
        for p, q in zip(policy.parameters(), baseline_params, strict=True)
    )
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(args.reps):
        for name, way in ways.items():
            dist.barrier()
            start = time.perf_counter()
            way()
            elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # a step lasts as long as its slowest rank
            times[name].append(float(elapsed))
    if rank == 0:
        median = {name: statistics.median(t) for name, t in times.items()}
        result = {
            "model": args.model,
            "params": sum(p.numel() for p in baseline_params),
            "dtype": args.dtype,
            "data_parallel": world,
            "threads_per_rank": torch.get_num_threads(),
            "microbatches_per_rank": len(mbs),
            "packed_tokens_per_rank": sum(mb.num_tokens for mb in mbs),
            "scheduled_step_s": round(median["scheduled"], 3),
            "per_parameter_step_s": round(median["per_parameter"], 3),
            "speedup": round(median["per_parameter"] / median["scheduled"], 3),
            "grad_norm": {name: round(v, 6) for name, v in norms.items()},
            "max_relative_grad_diff": float(f"{grad_diff:.3g}"),
            "reps": args.reps,
        }
        with open(out, "w") as f:
            json.dump(result, f)
    shutdown()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megatron-rl bench update", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="150m", choices=sorted(MODELS))
    parser.add_argument("--dp", type=int, default=2, help="data-parallel ranks (processes)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--samples", type=int, default=32, help="sequences in the batch (all ranks)")
    parser.add_argument(
        "--budget-factor", type=int, default=2, help="micro-batch budget: x the longest sequence"
    )
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per rank (0: cores / dp)")
    parser.add_argument("--max-norm", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads == 0:
        args.threads = max(1, (os.cpu_count() or 1) // args.dp)
    device, load = announce_device()
    import torch.multiprocessing as mp

    from megatron_rl.distributed import free_port
    from megatron_rl.model.tiny import write_tiny_checkpoint

    with tempfile.TemporaryDirectory() as workdir:
        spec = MODELS[args.model]
        shape = replace(spec.shape, max_position_embeddings=1024, initializer_range=0.02)
        model_dir = str(write_tiny_checkpoint(os.path.join(workdir, "model"), shape, seed=args.seed))
        out = os.path.join(workdir, "result.json")
        mp.start_processes(
            _rank_main,
            args=(args.dp, free_port(), args, model_dir, out),
            nprocs=args.dp,
            start_method="spawn",
        )
        with open(out) as f:
            result = json.load(f)
    print(json.dumps({**result, "device": device, "load_average": [load, load_average()]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
