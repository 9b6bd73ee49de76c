"""`megatron-rl verify-sync`: push perturbed Megatron weights into a running vLLM and check logprob parity.

Every rank builds its TP shard from the checkpoint with a deterministic perturbation (so the pushed weights
differ from those vLLM started with); rank 0 runs the engine. vLLM samples before and after the push; the
post-push logprobs must equal Megatron's recomputation (fp32) and the pre-push ones must not.
"""

from __future__ import annotations

import json
import os
import time
import zlib

import torch
import torch.distributed as dist

TOLERANCE = 1e-5
PROMPTS = ["12+34=", "987-65=", "The answer is ", "<think>"]


def perturb(name: str, tensor: torch.Tensor, scale: float = 0.05) -> torch.Tensor:
    """Same noise for the same tensor on every rank (seeded by its name), so replicated shards agree."""
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    noise = torch.randn(tensor.shape, generator=gen, dtype=torch.float32)
    return tensor + (scale * noise * tensor.float().std().clamp_min(1e-3)).to(tensor.dtype)


def _megatron_logprobs(policy, samples, temperature: float) -> list[torch.Tensor]:
    from megatron_rl.algo.logprobs import response_logprobs

    with torch.no_grad():
        lps, _ = response_logprobs(
            policy.model,
            [s.prompt_ids for s in samples],
            [s.token_ids for s in samples],
            temperature,
            policy.tp_group,
        )
    return lps


def _max_diff(samples, recomputed) -> float:
    """Largest |vLLM - Megatron| logprob; NaN anywhere makes the result NaN (and the check fail)."""
    diffs = [
        (lp.double().cpu() - torch.tensor(s.logprobs, dtype=torch.float64)).abs()
        for s, lp in zip(samples, recomputed, strict=True)
    ]
    return float(torch.cat(diffs).max())


def run(model_dir: str, tp: int, rank: int, world: int, bucket_mb: float, max_tokens: int, seed: int) -> dict:
    from megatron_rl.distributed import ParallelLayout, init_distributed, shutdown
    from megatron_rl.model.policy import Policy

    init_distributed(ParallelLayout(tp=tp, pp=1), rank=rank, world_size=world)
    policy = Policy.from_hf(model_dir, transform=perturb)
    policy.model.eval()
    engine = None
    if rank == 0:
        from megatron_rl.rollout.vllm_engine import VLLMEngine

        engine = VLLMEngine(model_dir, seed=seed)

    def sample(temperature: float):
        box = [None]
        if rank == 0:
            box = [engine.generate(PROMPTS, n=2, temperature=temperature, max_tokens=max_tokens, seed=seed)]
        if world > 1:
            dist.broadcast_object_list(box, src=0)
        return box[0]

    before = sample(1.0)
    start = time.perf_counter()
    buckets = list(policy.hf_buckets(int(bucket_mb * (1 << 20))))
    report = engine.update_weights(buckets) if rank == 0 else None
    sync_seconds = time.perf_counter() - start
    result = {}
    diffs = {}
    for temperature in (1.0, 0.7):
        after = sample(temperature)
        diffs[temperature] = _max_diff(after, _megatron_logprobs(policy, after, temperature))
    pre_push_diff = _max_diff(before, _megatron_logprobs(policy, before, 1.0))
    if rank == 0:
        result = {
            "max_abs_logprob_diff": max(diffs.values()),
            "max_abs_logprob_diff_t1.0": diffs[1.0],
            "max_abs_logprob_diff_t0.7": diffs[0.7],
            "pre_push_max_abs_logprob_diff": pre_push_diff,
            "tensors_pushed": report.tensors,
            "bytes_pushed": report.bytes,
            "sync_seconds": round(sync_seconds, 4),
            "tp": tp,
            "tokens_checked": sum(len(s.token_ids) for s in after),
        }
        engine.shutdown()
    shutdown()
    return result


def _worker(rank: int, world: int, port: int, args: tuple, out_path: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    result = run(*args[:2], rank, world, *args[2:])
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(result, f)


def verify_sync(
    model_dir: str, tp: int = 1, bucket_mb: float = 64.0, max_tokens: int = 24, seed: int = 0
) -> dict:
    """Run the check with `tp` Megatron ranks (spawned here when tp > 1); returns rank 0's report."""
    from megatron_rl.distributed import free_port

    if tp == 1:
        return run(model_dir, 1, 0, 1, bucket_mb, max_tokens, seed)
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.spawn(
            _worker,
            args=(tp, free_port(), (model_dir, tp, bucket_mb, max_tokens, seed), out),
            nprocs=tp,
            join=True,
        )
        with open(out) as f:
            return json.load(f)
