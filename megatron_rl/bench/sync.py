"""Weight-sync benchmark, Megatron policy -> vLLM engine, on whatever device this runs on.

    python -m megatron_rl.bench.sync            # or: megatron-rl bench sync

For each model (the tiny one and a ~150M-parameter Qwen2-shaped one, random weights, built locally) this
loads the Megatron policy and starts a vLLM engine from the same checkpoint, then times full weight syncs
over each weight transport (rollout/transport.py: shm or CUDA IPC handles, a gloo/NCCL broadcast group,
safetensors bytes through RPC). A sync is streamed (rollout/weight_sync.py): each bucket is exported
(Megatron parameters -> HF-named tensors), moved to the vLLM worker, verified by per-tensor checksums on
both sides and loaded in place before the next bucket is exported. The export alone is timed apart. One
warm-up sync per transport, then `--repeats` rounds with the transports interleaved (so a busy spell on a
shared machine hits all of them); the median of each.

Baselines, measured in the same run on the same bytes:
- vLLM reloading the same weights from the checkpoint on disk (its own `reload_weights`, same in-place load
  path; the file was just written, so it is read from the page cache);
- a plain memcpy of the same number of bytes (the floor for moving them once in memory).

Memory: during one more sync over the first transport (its transfer buffer released first), the peak of what
the trainer and the vLLM worker hold together (proportional set size, sampled every 2 ms), above what they held
before it: `sync_extra_bytes`, also in units of the largest bucket.

Prints the device, a markdown table and, last, one JSON line with the results.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence

import torch

from megatron_rl.bench.common import PeakMemory, announce_device, load_average
from megatron_rl.model.tiny import QWEN2_145M, TinyShape
from megatron_rl.rollout.base import SyncReport
from megatron_rl.rollout.weight_sync import WeightStream

MODELS: dict[str, TinyShape] = {
    "tiny": TinyShape(),  # the model the tests use
    "150m": QWEN2_145M,  # the shape the packing benchmark uses too
}


def _median_ms(fn: Callable[[], object], repeats: int) -> tuple[float, list[float]]:
    """One untimed warm-up call, then the median of `repeats` timed calls (ms) and all of them."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), times


def _sender_checksum_ms(policy, bucket_bytes: int, repeats: int) -> float:
    from megatron_rl.rollout.weight_sync import tensor_checksum

    tensors = [t for bucket in policy.hf_buckets(bucket_bytes) for _, t in bucket]
    return _median_ms(lambda: [tensor_checksum(t) for t in tensors], repeats)[0]


def default_transports() -> list[str]:
    # On a GPU the benchmark's engine shares the trainer's GPU, and NCCL allows one rank per GPU: broadcast
    # is for engines on other GPUs, so it is timed there only when asked for.
    return ["ipc", "shm", "rpc"] if torch.cuda.is_available() else ["shm", "broadcast", "rpc"]


def bench_model(name: str, repeats: int, bucket_bytes: int, transports: Sequence[str]) -> dict:
    from megatron_rl.model.policy import Policy
    from megatron_rl.model.tiny import write_tiny_checkpoint
    from megatron_rl.rollout.vllm_engine import VLLMEngine

    with tempfile.TemporaryDirectory(prefix=f"benchsync_{name}_") as tmp:
        model_dir = str(write_tiny_checkpoint(tmp, MODELS[name], seed=0))
        policy = Policy.from_hf(model_dir)
        engine = VLLMEngine(model_dir, seed=0)
        try:

            def sync(transport: str) -> tuple[tuple[float, float, float, float], SyncReport, int]:
                """(export ms, rest ms, total ms, vLLM load ms), the report and the number of buckets."""
                start = time.perf_counter()
                num_buckets = sum(1 for _ in policy.hf_buckets(bucket_bytes))  # the export alone
                exported = time.perf_counter()
                stream = WeightStream(policy.hf_manifest(), policy.hf_buckets(bucket_bytes))
                report = engine.update_weights(stream, transport=transport)  # raises if a checksum differs
                total = time.perf_counter() - exported
                ms = ((exported - start) * 1e3, (total - (exported - start)) * 1e3, total * 1e3)
                return (*ms, report.reload_seconds * 1e3), report, num_buckets

            # Full syncs, export and push timed apart; one warm-up per transport, then rounds interleaved.
            times: dict[str, list] = {t: [] for t in transports}
            for t in transports:
                sync(t)
            for _ in range(repeats):
                for t in transports:
                    row, report, num_buckets = sync(t)
                    times[t].append(row)

            # Memory: the peak, during one sync, of what the trainer and the vLLM worker hold together, above
            # what they held before it (the transfer buffer released first, so it counts).
            bucket_sizes = [
                sum(t.numel() * t.element_size() for _, t in b) for b in policy.hf_buckets(bucket_bytes)
            ]
            engine.release_weight_buffers()
            worker_pid = engine.weight_transport_state()["workers"][0]["pid"]
            with PeakMemory([os.getpid(), worker_pid]) as memory:
                stream = WeightStream(policy.hf_manifest(), policy.hf_buckets(bucket_bytes))
                engine.update_weights(stream, transport=transports[0])

            # The push verifies each tensor by an exact checksum on both sides; time the sender's half apart.
            checksum_ms = _sender_checksum_ms(policy, bucket_bytes, repeats)

            # No arguments: the worker reloads from the model path it started from (our checkpoint).
            reload_ms, _ = _median_ms(lambda: engine.llm.collective_rpc("reload_weights"), repeats)

            src = torch.ones(report.bytes, dtype=torch.uint8)  # ones, so the pages are really allocated
            dst = torch.empty_like(src)
            memcpy_ms, _ = _median_ms(lambda: dst.copy_(src), repeats)
        finally:
            engine.shutdown()
        params = sum(p.numel() for p in policy.model.parameters())

    mb = report.bytes / 1e6
    per_transport = {}
    for t, rows in times.items():
        export_ms, push_ms, total_ms, load_ms = (
            statistics.median(column) for column in zip(*rows, strict=True)
        )
        per_transport[t] = {
            "ms": round(total_ms, 2),
            "mb_per_s": round(mb / total_ms * 1e3, 1),
            "export_ms": round(export_ms, 2),
            "push_ms": round(push_ms, 2),
            "push_mb_per_s": round(mb / push_ms * 1e3, 1),
            "vllm_load_ms": round(load_ms, 2),
            "sync_ms_all": [round(row[2], 2) for row in rows],
        }
    first = per_transport[transports[0]]
    return {
        "params": params,
        "tensors": report.tensors,
        "mb": round(mb, 3),
        "buckets": num_buckets,
        # The first transport's figures at the top level (the default one: ipc on GPU, shm on CPU).
        "transport": transports[0],
        **{k: first[k] for k in ("ms", "mb_per_s", "export_ms", "push_ms", "push_mb_per_s")},
        "transports": per_transport,
        "checksum_sender_ms": round(checksum_ms, 2),
        "bucket_bytes": bucket_bytes,
        "largest_bucket_bytes": max(bucket_sizes),
        "sync_extra_bytes": memory.extra,
        "sync_extra_buckets": round(memory.extra / max(bucket_sizes), 2),
        "baseline_vllm_reload_from_disk_ms": round(reload_ms, 2),
        "baseline_vllm_reload_from_disk_mb_per_s": round(mb / reload_ms * 1e3, 1),
        "baseline_memcpy_ms": round(memcpy_ms, 3),
        "baseline_memcpy_mb_per_s": round(mb / memcpy_ms * 1e3, 1),
    }


def markdown_table(results: dict[str, dict]) -> str:
    rows = [
        "| model | params | tensors | MB | what (median) | ms | MB/s |",
        "|---|---:|---:|---:|---|---:|---:|",
    ]
    for name, r in results.items():
        lines = []
        for t, x in r["transports"].items():
            lines += [
                (f"**full sync, {t}** (streamed: export, send, checksums, load)", x["ms"], x["mb_per_s"]),
                (f"of which not export, {t}: send + checksums + vLLM load", x["push_ms"], x["push_mb_per_s"]),
                (f"of which vLLM load (layerwise, per bucket), {t}", x["vllm_load_ms"], None),
            ]
        lines += [
            ("export alone: Megatron -> HF tensors (timed apart)", r["export_ms"], None),
            ("sender-side checksums (timed apart)", r["checksum_sender_ms"], None),
            (
                f"memory: peak extra during a {r['transport']} sync, MB (in largest buckets: "
                f"{r['sync_extra_buckets']})",
                r["sync_extra_bytes"] / 1e6,
                None,
            ),
            (
                "baseline: vLLM reload from disk",
                r["baseline_vllm_reload_from_disk_ms"],
                r["baseline_vllm_reload_from_disk_mb_per_s"],
            ),
            ("baseline: memcpy of the same bytes", r["baseline_memcpy_ms"], r["baseline_memcpy_mb_per_s"]),
        ]
        for i, (what, ms, rate) in enumerate(lines):
            head = (
                f"{name} | {r['params'] / 1e6:.2f}M | {r['tensors']} | {r['mb']:.1f}" if i == 0 else " | | |"
            )
            rows.append(f"| {head} | {what} | {ms:.2f} | {'' if rate is None else f'{rate:.0f}'} |")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megatron-rl bench sync", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny,150m", help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--repeats", type=int, default=3, help="timed syncs per model (after one warm-up)")
    parser.add_argument("--bucket-mb", type=float, default=64.0, help="export bucket size in MiB")
    parser.add_argument(
        "--transports",
        default=",".join(default_transports()),
        help="comma-separated weight transports to time, the first one also at the top level of the JSON",
    )
    parser.add_argument("--out", help="also write the JSON results to this path")
    args = parser.parse_args(argv)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in MODELS]
    if unknown or not names or args.repeats < 1:
        parser.error(f"--models must name some of {', '.join(MODELS)} and --repeats must be >= 1")
    from megatron_rl.rollout.transport import resolve_transport

    try:
        transports = list(
            dict.fromkeys(
                resolve_transport(t.strip(), torch.cuda.is_available())
                for t in args.transports.split(",")
                if t.strip()
            )
        )
    except ValueError as e:
        parser.error(str(e))
    if not transports:
        parser.error("--transports must name at least one transport")

    from megatron_rl.distributed import ParallelLayout, init_distributed, shutdown

    device, load_before = announce_device()  # other jobs on a small machine skew the timings
    init_distributed(ParallelLayout(tp=1, pp=1))
    try:
        bucket_bytes = int(args.bucket_mb * (1 << 20))
        results = {name: bench_model(name, args.repeats, bucket_bytes, transports) for name in names}
    finally:
        shutdown()
    summary = {
        "device": device,
        "load_average_1min": [load_before, load_average()],  # before, after
        "repeats": args.repeats,
        "bucket_mb": args.bucket_mb,
        "transports": transports,
        "dtype": "float32",
        "models": results,
    }
    print(markdown_table(results))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1)
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    # vLLM spawns worker processes that re-import __main__; keep all work under this guard.
    raise SystemExit(main())
