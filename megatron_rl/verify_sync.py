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


def _worst(diffs: list[float]) -> float:
    """The largest difference; NaN if any is NaN (so that the check fails)."""
    return float("nan") if any(d != d for d in diffs) else max(diffs)


def run(
    model_dir: str,
    tp: int,
    rank: int,
    world: int,
    bucket_mb: float,
    max_tokens: int,
    seed: int,
    transports: tuple[str, ...] = ("auto",),
) -> dict:
    from megatron_rl.distributed import ParallelLayout, init_distributed, shutdown
    from megatron_rl.model.policy import Policy
    from megatron_rl.rollout.weight_sync import WeightStream

    init_distributed(ParallelLayout(tp=tp, pp=1), rank=rank, world_size=world)
    policy = Policy.from_hf(model_dir, transform=perturb)
    policy.eval()
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

    # Each transport starts from the checkpoint's own weights (vLLM reloads them from disk), so each push
    # has to bring the perturbed weights in by itself.
    checks = {}
    for i, transport in enumerate(transports):
        if i and rank == 0:
            engine.llm.collective_rpc("reload_weights")
        before = sample(1.0)
        start = time.perf_counter()
        stream = WeightStream(policy.hf_manifest(), policy.hf_buckets(int(bucket_mb * (1 << 20))))
        report = engine.update_weights(stream, transport=transport) if rank == 0 else stream.drain()
        sync_seconds = time.perf_counter() - start
        diffs = {}
        for temperature in (1.0, 0.7):
            after = sample(temperature)
            diffs[temperature] = _max_diff(after, _megatron_logprobs(policy, after, temperature))
        checks[transport] = {
            "transport": report.transport if report else transport,
            "max_abs_logprob_diff_t1.0": diffs[1.0],
            "max_abs_logprob_diff_t0.7": diffs[0.7],
            "pre_push_max_abs_logprob_diff": _max_diff(before, _megatron_logprobs(policy, before, 1.0)),
            "tensors_pushed": report.tensors if report else 0,
            "bytes_pushed": report.bytes if report else 0,
            "sync_seconds": round(sync_seconds, 4),
            "tokens_checked": sum(len(s.token_ids) for s in after),
        }
    result = {}
    if rank == 0:
        values = lambda key: [c[key] for c in checks.values()]  # noqa: E731
        result = {
            "max_abs_logprob_diff": _worst(
                values("max_abs_logprob_diff_t1.0") + values("max_abs_logprob_diff_t0.7")
            ),
            "max_abs_logprob_diff_t1.0": _worst(values("max_abs_logprob_diff_t1.0")),
            "max_abs_logprob_diff_t0.7": _worst(values("max_abs_logprob_diff_t0.7")),
            "pre_push_max_abs_logprob_diff": min(values("pre_push_max_abs_logprob_diff")),
            "tensors_pushed": min(values("tensors_pushed")),
            "bytes_pushed": min(values("bytes_pushed")),
            "sync_seconds": max(values("sync_seconds")),
            "tp": tp,
            "tokens_checked": min(values("tokens_checked")),
            "transports": checks,
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
    model_dir: str,
    tp: int = 1,
    bucket_mb: float = 64.0,
    max_tokens: int = 24,
    seed: int = 0,
    transports: tuple[str, ...] = ("auto",),
) -> dict:
    """Run the check with `tp` Megatron ranks (spawned here when tp > 1), once per weight transport (one
    engine); returns rank 0's report: the worst case over transports, and each under "transports"."""
    from megatron_rl.distributed import free_port

    transports = tuple(transports)
    if tp == 1:
        return run(model_dir, 1, 0, 1, bucket_mb, max_tokens, seed, transports)
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.spawn(
            _worker,
            args=(tp, free_port(), (model_dir, tp, bucket_mb, max_tokens, seed, transports), out),
            nprocs=tp,
            join=True,
        )
        with open(out) as f:
            return json.load(f)


def main(argv: list[str] | None = None) -> int:
    """`python -m megatron_rl.verify_sync --model DIR [--tp N] [--transport shm,broadcast,rpc]`."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m megatron_rl.verify_sync", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--model", required=True, help="HF checkpoint directory")
    parser.add_argument("--tp", type=int, default=1, help="Megatron tensor-parallel size")
    parser.add_argument("--transport", default="auto", help="comma-separated: auto, shm, ipc, broadcast, rpc")
    parser.add_argument("--bucket-mb", type=float, default=64.0)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from megatron_rl.rollout.transport import TRANSPORTS

    transports = tuple(t.strip() for t in args.transport.split(",") if t.strip())
    if not transports or any(t not in TRANSPORTS for t in transports):
        parser.error(f"--transport must name some of {', '.join(TRANSPORTS)}")
    result = verify_sync(args.model, args.tp, args.bucket_mb, args.max_tokens, args.seed, transports)
    print(json.dumps(result), flush=True)
    return 0 if result["max_abs_logprob_diff"] <= TOLERANCE else 1  # NaN fails too


if __name__ == "__main__":
    # vLLM spawns worker processes that re-import __main__; keep all work under this guard.
    raise SystemExit(main())
