"""Throughput benchmark of the fused log-prob / entropy kernel against Megatron-core and plain torch.

    megatron-rl bench kernels [--tokens 4096 16384 32768] [--vocab 152064] [--out bench_kernels.json]
    (or python -m megatron_rl.bench.kernels)

Needs one CUDA device (TP=1). For each T it times, with CUDA events (median of --iters runs after --warmup):
- fused: kernels.logprob_entropy (Triton), and the same with the backward written in place over the logits;
- megatron: megatron.core's vocab_parallel_cross_entropy for the log-prob plus a separate eager entropy;
- torch: log_softmax + gather + entropy, eager.
each forward only and forward+backward (gradients from both outputs). Bytes moved are the minimum any
implementation must move: the forward reads the logits once (T * V * elem bytes), forward+backward reads
them twice and writes d logits once (3x that). Achieved bandwidth is set against the device's copy bandwidth,
measured in the same run with a large device-to-device copy (read + write bytes / time). Extra memory is the
peak allocated during the call above what was allocated before it (logits, targets, upstream gradients), minus
the d logits tensor itself when the implementation returns a new one: what the op needs beyond its inputs and
that gradient. It prints a markdown table and writes everything as JSON (--out).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import socket
import statistics
import sys
from collections.abc import Callable

import torch

DEVICE = "cuda"  # a module constant so that a CPU smoke test can run this file's logic end to end
QWEN25_VOCAB = 152064
IMPLEMENTATIONS = ("fused", "fused-inplace", "megatron", "torch")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# The targets, checked at the largest T: forward within 1.2x of the bandwidth floor (reading the
# logits once at copy bandwidth), forward+backward at >= 80% of copy bandwidth, >= 3x the Megatron baseline,
# and at most 64 bytes of extra memory per token.
TARGETS = {"fwd_floor_ratio_max": 1.2, "fwdbwd_copy_fraction_min": 0.8, "speedup_vs_megatron_min": 3.0}
MAX_EXTRA_BYTES_PER_TOKEN = 64


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="megatron-rl bench kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384, 32768], help="T values")
    p.add_argument("--vocab", type=int, default=QWEN25_VOCAB, help="V (TP=1: the whole vocabulary)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--iters", type=int, default=20, help="timed runs per measurement (the median is kept)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--impls", nargs="+", choices=IMPLEMENTATIONS, default=list(IMPLEMENTATIONS))
    p.add_argument("--block-v", type=int, default=None, help="override the fused kernel's block size")
    p.add_argument("--num-warps", type=int, default=None, help="override the fused kernel's warps per row")
    p.add_argument("--check-targets", action="store_true", help="time the fused op with its target check")
    p.add_argument("--out", default="bench_kernels.json", help="where to write the JSON results")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------
# Implementations: each maps (logits, targets, temperature) to (logprobs, entropy), differentiable.
# ----------------------------------------------------------------------------------------------------------


def _fused(args: argparse.Namespace, inplace: bool) -> Callable:
    from kernels.logprob_entropy import DEFAULT_BLOCK_V, DEFAULT_NUM_WARPS, logprob_entropy

    tuning = dict(block_v=args.block_v or DEFAULT_BLOCK_V, num_warps=args.num_warps or DEFAULT_NUM_WARPS)

    def run(logits, targets, temperature):
        return logprob_entropy(
            logits, targets, temperature, backend="triton", inplace_backward=inplace,
            check_targets=args.check_targets, **tuning,
        )  # fmt: skip

    return run


def _eager_entropy(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def _megatron() -> Callable:
    from megatron.core.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy

    def run(logits, targets, temperature):
        scaled = logits if temperature == 1.0 else logits / temperature
        return -vocab_parallel_cross_entropy(scaled, targets), _eager_entropy(logits, temperature)

    return run


def _torch_eager(logits, targets, temperature):
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(1, targets[:, None]).squeeze(1), -(logp.exp() * logp).sum(-1)


def _init_megatron() -> Callable[[], None]:
    """Megatron's cross entropy asks parallel_state for its TP group: set up a one-process one.

    Returns the matching teardown (which leaves alone whatever was initialized before).
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    created_group = not dist.is_initialized()
    if created_group:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        backend = "nccl" if DEVICE == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    created_state = not parallel_state.model_parallel_is_initialized()
    if created_state:
        parallel_state.initialize_model_parallel(1, 1)

    def teardown() -> None:
        if created_state:
            parallel_state.destroy_model_parallel()
        if created_group:
            dist.destroy_process_group()

    return teardown


# ----------------------------------------------------------------------------------------------------------
# Measurements.
# ----------------------------------------------------------------------------------------------------------


def cuda_time_ms(fn: Callable[[], object], iters: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def copy_bandwidth(nbytes: int, iters: int) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting the read and the write."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    ms = cuda_time_ms(lambda: dst.copy_(src), iters, warmup=3)
    return 2 * nbytes / (ms * 1e-3)


def peak_extra_bytes(fn: Callable[[], object], discount: int = 0) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del out
    return peak - discount


def bench_one(name: str, impl: Callable, n_tokens: int, args: argparse.Namespace) -> dict:
    dtype = DTYPES[args.dtype]
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    logits = torch.randn(n_tokens, args.vocab, device=DEVICE, dtype=dtype, generator=gen) * 2
    logits.requires_grad_()
    targets = torch.randint(0, args.vocab, (n_tokens,), device=DEVICE, generator=gen)
    g_lp = torch.randn(n_tokens, device=DEVICE, generator=gen)
    g_ent = torch.randn(n_tokens, device=DEVICE, generator=gen)
    tau = args.temperature

    def forward():
        return impl(logits, targets, tau)

    def forward_backward():
        lp, ent = impl(logits, targets, tau)
        return torch.autograd.grad([lp, ent], [logits], [g_lp, g_ent])

    grad_bytes = 0 if name == "fused-inplace" else logits.numel() * logits.element_size()
    result = {"impl": name, "tokens": n_tokens}
    try:
        result["fwd_ms"] = cuda_time_ms(forward, args.iters, args.warmup)
        result["fwd_extra_bytes"] = peak_extra_bytes(forward)
        result["fwdbwd_ms"] = cuda_time_ms(forward_backward, args.iters, args.warmup)
        result["fwdbwd_extra_bytes"] = peak_extra_bytes(forward_backward, discount=grad_bytes)
    except torch.cuda.OutOfMemoryError as e:
        result["error"] = f"out of memory: {str(e).splitlines()[0]}"
    return result


def check_agreement(args: argparse.Namespace) -> float:
    """Max |difference| of the fused outputs from plain torch on a small batch: never time a broken kernel."""
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    logits = torch.randn(256, args.vocab, device=DEVICE, dtype=DTYPES[args.dtype], generator=gen) * 2
    targets = torch.randint(0, args.vocab, (256,), device=DEVICE, generator=gen)
    ours = _fused(args, inplace=False)(logits, targets, args.temperature)
    ref = _torch_eager(logits, targets, args.temperature)
    return max(float((a - b).abs().max()) for a, b in zip(ours, ref, strict=True))


def add_derived(results: list[dict], elem_bytes: int, vocab: int, copy_bw: float) -> None:
    for r in results:
        if "error" in r:
            continue
        fwd_bytes = r["tokens"] * vocab * elem_bytes
        r["fwd_bytes_per_s"] = fwd_bytes / (r["fwd_ms"] * 1e-3)
        r["fwdbwd_bytes_per_s"] = 3 * fwd_bytes / (r["fwdbwd_ms"] * 1e-3)
        r["fwd_copy_fraction"] = r["fwd_bytes_per_s"] / copy_bw
        r["fwdbwd_copy_fraction"] = r["fwdbwd_bytes_per_s"] / copy_bw
        r["fwd_floor_ratio"] = r["fwd_ms"] * 1e-3 / (fwd_bytes / copy_bw)
        r["fwd_extra_bytes_per_token"] = r["fwd_extra_bytes"] / r["tokens"]
        r["fwdbwd_extra_bytes_per_token"] = r["fwdbwd_extra_bytes"] / r["tokens"]


def check_targets(results: list[dict]) -> dict:
    by = {(r["impl"], r["tokens"]): r for r in results}
    n = max(r["tokens"] for r in results)
    fused, inplace, meg = by.get(("fused", n)), by.get(("fused-inplace", n)), by.get(("megatron", n))
    checks = {"tokens": n}

    def ok(r):
        return r is not None and "error" not in r

    if ok(fused):
        ratio = fused["fwd_floor_ratio"]
        checks["fwd_floor_ratio"] = (ratio, ratio <= TARGETS["fwd_floor_ratio_max"])
        # Forward+backward: the better of the two fused variants; memory: the worst of what each one needs.
        variants = [x for x in (fused, inplace) if ok(x)]
        frac = max(x["fwdbwd_copy_fraction"] for x in variants)
        checks["fwdbwd_copy_fraction"] = (frac, frac >= TARGETS["fwdbwd_copy_fraction_min"])
        extra = max(x[f"{phase}_extra_bytes_per_token"] for x in variants for phase in ("fwd", "fwdbwd"))
        checks["max_extra_bytes_per_token"] = (extra, extra <= MAX_EXTRA_BYTES_PER_TOKEN)
        if ok(meg):
            for phase in ("fwd", "fwdbwd"):
                speedup = meg[f"{phase}_ms"] / fused[f"{phase}_ms"]
                checks[f"{phase}_speedup_vs_megatron"] = (
                    speedup,
                    speedup >= TARGETS["speedup_vs_megatron_min"],
                )
    return checks


def markdown(meta: dict, results: list[dict], checks: dict) -> str:
    gb = 1e9
    lines = [
        f"Device: {meta['device']}; torch {meta['torch']}, triton {meta['triton']}; {meta['dtype']} logits, "
        f"V = {meta['vocab']}, TP=1, temperature {meta['temperature']}; median of {meta['iters']} runs.",
        f"Measured copy bandwidth: {meta['copy_bytes_per_s'] / gb:.0f} GB/s. "
        f"Fused output vs torch on 256 tokens: max |diff| {meta['max_abs_diff_vs_torch']:.2e}.",
        "",
        "| impl | T | fwd ms | fwd GB/s | fwd / copy BW | fwd+bwd ms | fwd+bwd GB/s | fwd+bwd / copy BW "
        "| extra B/token fwd | extra B/token fwd+bwd |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['impl']} | {r['tokens']} | {r['error']} |||||||| ")
            continue
        lines.append(
            f"| {r['impl']} | {r['tokens']} | {r['fwd_ms']:.3f} | {r['fwd_bytes_per_s'] / gb:.0f} "
            f"| {r['fwd_copy_fraction']:.0%} | {r['fwdbwd_ms']:.3f} | {r['fwdbwd_bytes_per_s'] / gb:.0f} "
            f"| {r['fwdbwd_copy_fraction']:.0%} | {r['fwd_extra_bytes_per_token']:.0f} "
            f"| {r['fwdbwd_extra_bytes_per_token']:.0f} |"
        )
    lines += ["", f"Targets at T = {checks['tokens']}:", ""]
    wanted = {
        "fwd_floor_ratio": "forward time / bandwidth floor <= 1.2",
        "fwdbwd_copy_fraction": "forward+backward bandwidth / copy bandwidth >= 0.8",
        "fwd_speedup_vs_megatron": "forward speedup vs Megatron >= 3",
        "fwdbwd_speedup_vs_megatron": "forward+backward speedup vs Megatron >= 3",
        "max_extra_bytes_per_token": "extra memory per token <= 64 B",
    }
    for key, text in wanted.items():
        if key in checks:
            value, passed = checks[key]
            lines.append(f"- {text}: {value:.3g} ({'met' if passed else 'NOT met'})")
        else:
            lines.append(f"- {text}: not measured")
    return "\n".join(lines)


def _installed_version(package: str) -> str:
    """A package's version from its metadata: Triton itself is imported only under kernels/ (DESIGN.md)."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "the kernel benchmark needs a CUDA device (none is visible); no numbers were measured.",
            file=sys.stderr,
        )
        return 2
    impls: dict[str, Callable] = {}
    teardown = None
    for name in args.impls:
        if name == "fused":
            impls[name] = _fused(args, inplace=False)
        elif name == "fused-inplace":
            impls[name] = _fused(args, inplace=True)
        elif name == "torch":
            impls[name] = _torch_eager
        elif name == "megatron":
            try:
                teardown = _init_megatron()
                impls[name] = _megatron()
            except Exception as e:  # report the baseline as missing rather than losing the whole run
                print(f"megatron baseline skipped: {type(e).__name__}: {e}", file=sys.stderr)

    meta = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": _installed_version("triton"),
        "dtype": args.dtype,
        "vocab": args.vocab,
        "temperature": args.temperature,
        "iters": args.iters,
        "check_targets": args.check_targets,
        "block_v": args.block_v,
        "num_warps": args.num_warps,
        "copy_bytes_per_s": copy_bandwidth(1 << 30, iters=max(args.iters, 10)),  # 1 GiB each way
        "max_abs_diff_vs_torch": check_agreement(args),
    }
    results = []
    for n_tokens in args.tokens:
        for name, impl in impls.items():
            results.append(bench_one(name, impl, n_tokens, args))
            torch.cuda.empty_cache()  # the next implementation starts from the same free memory
            print(f"done: {name} T={n_tokens}", file=sys.stderr)
    elem_bytes = torch.tensor([], dtype=DTYPES[args.dtype]).element_size()
    add_derived(results, elem_bytes, args.vocab, meta["copy_bytes_per_s"])
    checks = check_targets(results)
    table = markdown(meta, results, checks)
    print(table)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "results": results, "targets": checks, "markdown": table}, f, indent=2)
    print(f"wrote {args.out}", file=sys.stderr)
    if teardown is not None:
        teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
