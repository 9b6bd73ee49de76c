"""Throughput benchmark of the fused log-prob / entropy kernels against Megatron-core and plain torch.

    megatron-rl bench kernels [--tokens 4096 16384 32768] [--vocab 152064] [--hidden 3584]
                              [--suites logits linear] [--out bench_kernels.json]
    (or python -m megatron_rl.bench.kernels)

Needs one CUDA device (TP=1). Two suites, each timed with CUDA events (median of --iters runs after --warmup),
forward only and forward+backward (gradients from both outputs):
- logits (input: logits [T, V]): fused = kernels.logprob_entropy (Triton), also with the backward written in
  place over the logits; megatron = megatron.core's vocab_parallel_cross_entropy for the log-prob plus an eager
  entropy; torch = log_softmax + gather + entropy. The two eager baselines run CHUNK tokens at a time (forward
  and backward of one chunk before the next, d logits written into one [T, V] tensor), so that their fp32
  temporaries are bounded and they fit at every T.
- linear (inputs: hidden [T, H], output weight [V, H]): fused-linear = kernels.linear_logprob_entropy (Triton;
  no [T, V] tensor; its default "gemm" backward), fused-linear-atomic (its "atomic" backward); torch-linear = the same maths in torch, chunked the same way (matmul of CHUNK tokens,
  log_softmax, gather, entropy, backward into d hidden and d weight).

Before anything is timed, every implementation is checked against an fp64 oracle on a small batch (values and
gradients; relative 1e-4 for fp32, 2e-2 for bf16): one that disagrees is reported with its error and never timed,
and the command exits 1.

Roofline per call: the logits suite must move T * V * elem bytes forward (read the logits once) and 3x that
forward+backward (read twice, write d logits); its FLOPs are a few per logit. The linear suite must read hidden
and weight (and write d hidden, d weight: (T + V) * H * elem bytes each way) and do 2 T V H FLOPs forward and
6 T V H forward+backward (8 T V H when the backward recomputes the logits, as the fused kernel does). Achieved
bandwidth is set against the device's copy bandwidth and achieved FLOP/s against a plain bf16 matmul, both
measured in the same run. Extra memory is the peak allocated during the call above what was allocated before it
(the inputs and upstream gradients), minus the gradients the call returns, per token. It prints a markdown
table and writes everything as JSON (--out).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import socket
import statistics
import sys
from collections.abc import Callable

import torch

DEVICE = "cuda"  # a module constant so that a CPU smoke test can run this file's logic end to end
QWEN25_VOCAB = 152064
QWEN25_7B_HIDDEN = 3584
LOGITS_IMPLS = ("fused", "fused-inplace", "megatron", "torch")
LINEAR_IMPLS = ("fused-linear", "fused-linear-atomic", "torch-linear")
IMPLEMENTATIONS = LOGITS_IMPLS + LINEAR_IMPLS
SUITE_OF = {**dict.fromkeys(LOGITS_IMPLS, "logits"), **dict.fromkeys(LINEAR_IMPLS, "linear")}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ORACLE_RTOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 1e-2}
ORACLE_TOKENS = 64
# The targets, checked at the largest T: logits forward within 1.2x of the bandwidth floor, forward+
# backward at >= 80% of copy bandwidth and >= 3x the Megatron baseline; fused linear forward+backward at >= 60%
# of the bf16 matmul peak and >= 3x the chunked torch baseline; at most 64 bytes of extra memory per token.
TARGETS = {
    "fwd_floor_ratio_max": 1.2,
    "fwdbwd_copy_fraction_min": 0.8,
    "speedup_vs_megatron_min": 3.0,
    "linear_matmul_fraction_min": 0.6,
    "linear_speedup_min": 3.0,
}
MAX_EXTRA_BYTES_PER_TOKEN = 64


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="megatron-rl bench kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384, 32768], help="T values")
    p.add_argument("--vocab", type=int, default=QWEN25_VOCAB, help="V (TP=1: the whole vocabulary)")
    p.add_argument("--hidden", type=int, default=QWEN25_7B_HIDDEN, help="H, for the linear suite")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--iters", type=int, default=20, help="timed runs per measurement (the median is kept)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--suites", nargs="+", choices=("logits", "linear"), default=["logits", "linear"])
    p.add_argument("--impls", nargs="+", choices=IMPLEMENTATIONS, default=list(IMPLEMENTATIONS))
    p.add_argument("--chunk", type=int, default=None, help="tokens per chunk of the eager baselines")
    p.add_argument("--block-v", type=int, default=None, help="override the fused kernel's block size")
    p.add_argument("--num-warps", type=int, default=None, help="override the fused kernel's warps per row")
    p.add_argument("--check-targets", action="store_true", help="time the fused op with its target check")
    p.add_argument("--out", default="bench_kernels.json", help="where to write the JSON results")
    return p.parse_args(argv)


def baseline_chunk(args: argparse.Namespace) -> int:
    """Tokens per chunk of the eager baselines: ~1 GiB of fp32 logits per temporary (1765 tokens at V=152064)."""
    return args.chunk or max(1, (1 << 30) // (4 * args.vocab))


# ----------------------------------------------------------------------------------------------------------
# Implementations. The logits suite maps (logits, targets, tau, g_lp, g_ent, backward) to (logprobs, entropy,
# d logits or None); the linear suite (hidden, weight, targets, tau, g_lp, g_ent, backward) to (logprobs,
# entropy, d hidden, d weight). The chunked baselines do their own backward chunk by chunk, so every
# implementation is called the same way and returns its gradients.
# ----------------------------------------------------------------------------------------------------------


def _grads(outputs, inputs, g_lp, g_ent):
    return torch.autograd.grad(list(outputs), inputs, [g_lp, g_ent])


def _fused(args: argparse.Namespace, inplace: bool) -> Callable:
    from kernels.logprob_entropy import DEFAULT_BLOCK_V, DEFAULT_NUM_WARPS, logprob_entropy

    tuning = dict(block_v=args.block_v or DEFAULT_BLOCK_V, num_warps=args.num_warps or DEFAULT_NUM_WARPS)

    def run(logits, targets, tau, g_lp, g_ent, backward):
        # In place, d logits is written over the input logits: later runs read gradients as logits (bounded
        # values; the timing does not depend on them).
        x = logits.detach().requires_grad_(backward)
        lp, ent = logprob_entropy(
            x, targets, tau, backend="triton", inplace_backward=inplace,
            check_targets=args.check_targets, **tuning,
        )  # fmt: skip
        return (lp, ent, *(_grads((lp, ent), [x], g_lp, g_ent) if backward else (None,)))

    return run


def _eager_entropy(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def _torch_math(logits, targets, tau):
    logp = torch.log_softmax(logits.float() / tau, dim=-1)
    return logp.gather(1, targets[:, None]).squeeze(1), -(logp.exp() * logp).sum(-1)


def _megatron_math(logits, targets, tau):
    from megatron.core.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy

    scaled = logits if tau == 1.0 else logits / tau
    return -vocab_parallel_cross_entropy(scaled, targets), _eager_entropy(logits, tau)


def _chunked_logits(math_fn: Callable, chunk: int) -> Callable:
    """An eager (logits -> logprob, entropy) run CHUNK tokens at a time, each chunk's backward before the next."""

    def run(logits, targets, tau, g_lp, g_ent, backward):
        n = logits.shape[0]
        lp, ent = torch.empty(n, device=logits.device), torch.empty(n, device=logits.device)
        grad = torch.empty_like(logits) if backward else None
        for lo in range(0, n, chunk):
            sl = slice(lo, lo + chunk)
            with torch.set_grad_enabled(backward):
                x = logits[sl].detach().requires_grad_(backward)
                lp_c, ent_c = math_fn(x, targets[sl], tau)
            if backward:
                (grad[sl],) = _grads((lp_c, ent_c), [x], g_lp[sl], g_ent[sl])
            lp[sl], ent[sl] = lp_c.detach(), ent_c.detach()
        return lp, ent, grad

    return run


def _fused_linear(args: argparse.Namespace, triton_backward: str = "gemm") -> Callable:
    from kernels.linear_logprob_entropy import linear_logprob_entropy

    def run(hidden, weight, targets, tau, g_lp, g_ent, backward):
        h, w = hidden.detach().requires_grad_(backward), weight.detach().requires_grad_(backward)
        lp, ent = linear_logprob_entropy(
            h, w, targets, tau, backend="triton", check_targets=args.check_targets,
            triton_backward=triton_backward,
        )  # fmt: skip
        return (lp, ent, *(_grads((lp, ent), [h, w], g_lp, g_ent) if backward else (None, None)))

    return run


def _torch_linear(chunk: int) -> Callable:
    """The same maths in torch: CHUNK tokens' logits at a time (matmul in the inputs' dtype, log_softmax in fp32),
    each chunk's backward before the next, d weight summed over the chunks in fp32."""

    def run(hidden, weight, targets, tau, g_lp, g_ent, backward):
        n = hidden.shape[0]
        lp, ent = torch.empty(n, device=hidden.device), torch.empty(n, device=hidden.device)
        d_h = torch.empty_like(hidden) if backward else None
        d_w = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if backward else None
        w = weight.detach().requires_grad_(backward)
        for lo in range(0, n, chunk):
            sl = slice(lo, lo + chunk)
            with torch.set_grad_enabled(backward):
                h = hidden[sl].detach().requires_grad_(backward)
                lp_c, ent_c = _torch_math(h @ w.T, targets[sl], tau)
            if backward:
                d_h[sl], d_w_c = _grads((lp_c, ent_c), [h, w], g_lp[sl], g_ent[sl])
                d_w += d_w_c
            lp[sl], ent[sl] = lp_c.detach(), ent_c.detach()
        return lp, ent, d_h, (d_w.to(weight.dtype) if backward else None)

    return run


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
# Inputs, the fp64 oracle, measurements.
# ----------------------------------------------------------------------------------------------------------


def make_inputs(suite: str, n_tokens: int, args: argparse.Namespace, seed: int = 0) -> dict:
    """The suite's inputs on DEVICE: logits with std 2, or hidden and weight whose logits have std ~2."""
    dtype = DTYPES[args.dtype]
    gen = torch.Generator(device=DEVICE).manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, device=DEVICE, generator=gen) * scale).to(dtype)

    inputs = {}
    if suite == "logits":
        inputs["logits"] = randn(n_tokens, args.vocab, scale=2.0)
    else:
        inputs["hidden"] = randn(n_tokens, args.hidden)
        inputs["weight"] = randn(args.vocab, args.hidden, scale=2.0 / math.sqrt(args.hidden))
    inputs["targets"] = torch.randint(0, args.vocab, (n_tokens,), device=DEVICE, generator=gen)
    inputs["g_lp"] = torch.randn(n_tokens, device=DEVICE, generator=gen)
    inputs["g_ent"] = torch.randn(n_tokens, device=DEVICE, generator=gen)
    return inputs


def _call(impl: Callable, suite: str, inputs: dict, tau: float, backward: bool):
    tensors = [inputs["logits"]] if suite == "logits" else [inputs["hidden"], inputs["weight"]]
    return impl(*tensors, inputs["targets"], tau, inputs["g_lp"], inputs["g_ent"], backward)


def oracle_error(name: str, impl: Callable, args: argparse.Namespace) -> dict:
    """Worst error of one implementation against fp64 on ORACLE_TOKENS tokens, relative to the tolerance: values
    relative to |ref| + |z|_row + 1, gradients relative to their largest exact entry. <= 1 passes."""
    suite = SUITE_OF[name]
    inputs = make_inputs(suite, ORACLE_TOKENS, args, seed=1)
    tau, rtol = args.temperature, ORACLE_RTOL[DTYPES[args.dtype]]
    # fp64 copies first: some implementations write over their inputs (in-place backward, Megatron in fp32).
    names = ("logits",) if suite == "logits" else ("hidden", "weight")
    leaves = [inputs[k].double().cpu().requires_grad_() for k in names]
    got = _call(impl, suite, inputs, tau, backward=True)
    z = (leaves[0] if suite == "logits" else leaves[0] @ leaves[1].T) / tau
    logp = torch.log_softmax(z, dim=-1)
    lp = logp.gather(1, inputs["targets"].cpu()[:, None]).squeeze(1)
    ent = -(logp.exp() * logp).sum(-1)
    grads = torch.autograd.grad(
        [lp, ent], leaves, [inputs["g_lp"].double().cpu(), inputs["g_ent"].double().cpu()]
    )
    scale = z.detach().abs().amax(-1) + 1
    worst = {}
    for key, g, ref in (("logprob", got[0], lp.detach()), ("entropy", got[1], ent.detach())):
        worst[key] = float(((g.double().cpu() - ref).abs() / (rtol * (ref.abs() + scale))).max())
    for i, ref in enumerate(grads):
        err = (got[2 + i].double().cpu() - ref).abs().max()
        worst[f"grad{i}"] = float(err / (rtol * ref.abs().max()))
    return {"worst_relative_to_tolerance": max(worst.values()), "parts": worst, "rtol": rtol}


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


def matmul_flops(n: int, iters: int, dtype: torch.dtype = torch.bfloat16) -> float:
    """Dense matmul FLOP/s of an n x n x n product in `dtype`: the peak the fused linear kernel is set against."""
    a = torch.randn(n, n, device=DEVICE).to(dtype)
    b = torch.randn(n, n, device=DEVICE).to(dtype)
    ms = cuda_time_ms(lambda: a @ b, iters, warmup=3)
    return 2 * n**3 / (ms * 1e-3)


def peak_extra_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes allocated while fn runs above those allocated before, minus the gradients it returns."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    returned = sum(t.numel() * t.element_size() for t in out[2:] if t is not None)
    del out
    return peak - returned


def bench_one(name: str, impl: Callable, n_tokens: int, args: argparse.Namespace) -> dict:
    suite = SUITE_OF[name]
    inputs = make_inputs(suite, n_tokens, args)
    tau = args.temperature
    result = {"impl": name, "suite": suite, "tokens": n_tokens}
    try:
        fwd = lambda: _call(impl, suite, inputs, tau, backward=False)  # noqa: E731
        fwdbwd = lambda: _call(impl, suite, inputs, tau, backward=True)  # noqa: E731
        result["fwd_ms"] = cuda_time_ms(fwd, args.iters, args.warmup)
        result["fwd_extra_bytes"] = peak_extra_bytes(fwd)
        result["fwdbwd_ms"] = cuda_time_ms(fwdbwd, args.iters, args.warmup)
        result["fwdbwd_extra_bytes"] = peak_extra_bytes(fwdbwd)
    except torch.cuda.OutOfMemoryError as e:
        result["error"] = f"out of memory: {str(e).splitlines()[0]}"
    return result


def roofline(suite: str, n_tokens: int, args: argparse.Namespace, elem_bytes: int) -> dict:
    """The minimum bytes and FLOPs one call must move and do, forward and forward+backward."""
    t, v, h = n_tokens, args.vocab, args.hidden
    if suite == "logits":
        fwd_bytes = t * v * elem_bytes
        return {"fwd_bytes": fwd_bytes, "fwdbwd_bytes": 3 * fwd_bytes, "fwd_flops": 0, "fwdbwd_flops": 0}
    io = (t + v) * h * elem_bytes
    return {
        "fwd_bytes": io,
        "fwdbwd_bytes": 2 * io,
        "fwd_flops": 2 * t * v * h,
        "fwdbwd_flops": 6 * t * v * h,
    }


def add_derived(
    results: list[dict], args: argparse.Namespace, elem_bytes: int, copy_bw: float, peak_flops: float
):
    for r in results:
        if "error" in r:
            continue
        r.update(roofline(r["suite"], r["tokens"], args, elem_bytes))
        for phase in ("fwd", "fwdbwd"):
            seconds = r[f"{phase}_ms"] * 1e-3
            r[f"{phase}_bytes_per_s"] = r[f"{phase}_bytes"] / seconds
            r[f"{phase}_copy_fraction"] = r[f"{phase}_bytes_per_s"] / copy_bw
            r[f"{phase}_flops_per_s"] = r[f"{phase}_flops"] / seconds
            r[f"{phase}_matmul_fraction"] = r[f"{phase}_flops_per_s"] / peak_flops if peak_flops else 0.0
            r[f"{phase}_extra_bytes_per_token"] = r[f"{phase}_extra_bytes"] / r["tokens"]
        r["fwd_floor_ratio"] = r["fwd_ms"] * 1e-3 / (r["fwd_bytes"] / copy_bw)


def check_targets(results: list[dict]) -> dict:
    by = {(r["impl"], r["tokens"]): r for r in results}
    n = max(r["tokens"] for r in results)
    checks: dict = {"tokens": n}

    def ok(name):
        r = by.get((name, n))
        return r if r is not None and "error" not in r else None

    fused, inplace, meg = ok("fused"), ok("fused-inplace"), ok("megatron")
    if fused:
        ratio = fused["fwd_floor_ratio"]
        checks["fwd_floor_ratio"] = (ratio, ratio <= TARGETS["fwd_floor_ratio_max"])
        variants = [x for x in (fused, inplace) if x]
        frac = max(x["fwdbwd_copy_fraction"] for x in variants)
        checks["fwdbwd_copy_fraction"] = (frac, frac >= TARGETS["fwdbwd_copy_fraction_min"])
        if meg:
            for phase in ("fwd", "fwdbwd"):
                speedup = meg[f"{phase}_ms"] / fused[f"{phase}_ms"]
                checks[f"{phase}_speedup_vs_megatron"] = (
                    speedup,
                    speedup >= TARGETS["speedup_vs_megatron_min"],
                )
    lin_variants = [x for x in (ok("fused-linear"), ok("fused-linear-atomic")) if x]
    lin = min(lin_variants, key=lambda x: x["fwdbwd_ms"]) if lin_variants else None  # the faster backward
    torch_lin = ok("torch-linear")
    if lin:
        frac = lin["fwdbwd_matmul_fraction"]
        checks["linear_fwdbwd_matmul_fraction"] = (frac, frac >= TARGETS["linear_matmul_fraction_min"])
        if torch_lin:
            speedup = torch_lin["fwdbwd_ms"] / lin["fwdbwd_ms"]
            checks["linear_fwdbwd_speedup_vs_torch"] = (speedup, speedup >= TARGETS["linear_speedup_min"])
    fused_all = [x for x in (fused, inplace, *lin_variants) if x]
    if fused_all:
        extra = max(x[f"{phase}_extra_bytes_per_token"] for x in fused_all for phase in ("fwd", "fwdbwd"))
        checks["max_extra_bytes_per_token"] = (extra, extra <= MAX_EXTRA_BYTES_PER_TOKEN)
    return checks


def markdown(meta: dict, results: list[dict], checks: dict) -> str:
    gb, tf = 1e9, 1e12
    lines = [
        f"Device: {meta['device']}; torch {meta['torch']}, triton {meta['triton']}; {meta['dtype']}, "
        f"V = {meta['vocab']}, H = {meta['hidden']}, TP=1, temperature {meta['temperature']}; "
        f"median of {meta['iters']} runs; eager baselines in chunks of {meta['chunk']} tokens.",
        f"Measured copy bandwidth: {meta['copy_bytes_per_s'] / gb:.0f} GB/s; bf16 matmul "
        f"{meta['matmul_flops_per_s'] / tf:.0f} TFLOP/s.",
        "Agreement with fp64 (worst error / tolerance, <= 1 passes): "
        + ", ".join(f"{k} {v['worst_relative_to_tolerance']:.2g}" for k, v in meta["oracle"].items())
        + ".",
        "",
        "| impl | T | fwd ms | fwd+bwd ms | fwd GB/s | fwd+bwd GB/s | fwd+bwd TFLOP/s | fwd+bwd / matmul "
        "| extra B/token fwd | extra B/token fwd+bwd |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['impl']} | {r['tokens']} | {r['error']} ||||||||")
            continue
        lines.append(
            f"| {r['impl']} | {r['tokens']} | {r['fwd_ms']:.3f} | {r['fwdbwd_ms']:.3f} "
            f"| {r['fwd_bytes_per_s'] / gb:.0f} | {r['fwdbwd_bytes_per_s'] / gb:.0f} "
            f"| {r['fwdbwd_flops_per_s'] / tf:.1f} | {r['fwdbwd_matmul_fraction']:.0%} "
            f"| {r['fwd_extra_bytes_per_token']:.0f} | {r['fwdbwd_extra_bytes_per_token']:.0f} |"
        )
    lines += ["", f"Targets at T = {checks['tokens']}:", ""]
    wanted = {
        "fwd_floor_ratio": "logits forward time / bandwidth floor <= 1.2",
        "fwdbwd_copy_fraction": "logits forward+backward bandwidth / copy bandwidth >= 0.8",
        "fwd_speedup_vs_megatron": "logits forward speedup vs chunked Megatron >= 3",
        "fwdbwd_speedup_vs_megatron": "logits forward+backward speedup vs chunked Megatron >= 3",
        "linear_fwdbwd_matmul_fraction": "fused linear forward+backward FLOP/s / bf16 matmul >= 0.6",
        "linear_fwdbwd_speedup_vs_torch": "fused linear forward+backward speedup vs chunked torch >= 3",
        "max_extra_bytes_per_token": "fused extra memory per token <= 64 B",
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


def build_impls(args: argparse.Namespace) -> tuple[dict[str, Callable], Callable[[], None] | None]:
    """The implementations asked for (in the suites asked for), and the Megatron teardown if one was set up."""
    chunk = baseline_chunk(args)
    makers = {
        "fused": lambda: _fused(args, inplace=False),
        "fused-inplace": lambda: _fused(args, inplace=True),
        "torch": lambda: _chunked_logits(_torch_math, chunk),
        "megatron": lambda: _chunked_logits(_megatron_math, chunk),
        "fused-linear": lambda: _fused_linear(args),
        "fused-linear-atomic": lambda: _fused_linear(args, triton_backward="atomic"),
        "torch-linear": lambda: _torch_linear(chunk),
    }
    impls, teardown = {}, None
    for name in args.impls:
        if SUITE_OF[name] not in args.suites:
            continue
        try:
            if name == "megatron":
                teardown = _init_megatron()
            impls[name] = makers[name]()
        except Exception as e:  # report the baseline as missing rather than losing the whole run
            print(f"{name} skipped: {type(e).__name__}: {e}", file=sys.stderr)
    return impls, teardown


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "the kernel benchmark needs a CUDA device (none is visible); no numbers were measured.",
            file=sys.stderr,
        )
        return 2
    impls, teardown = build_impls(args)
    # A wrong kernel is never timed: check every implementation against fp64 first.
    oracle = {name: oracle_error(name, impl, args) for name, impl in impls.items()}
    wrong = sorted(name for name, o in oracle.items() if not o["worst_relative_to_tolerance"] <= 1.0)
    meta = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": _installed_version("triton"),
        "dtype": args.dtype,
        "vocab": args.vocab,
        "hidden": args.hidden,
        "temperature": args.temperature,
        "iters": args.iters,
        "chunk": baseline_chunk(args),
        "check_targets": args.check_targets,
        "block_v": args.block_v,
        "num_warps": args.num_warps,
        # 1 GiB each way (16 MiB for the CPU smoke test)
        "copy_bytes_per_s": copy_bandwidth(
            1 << 30 if DEVICE == "cuda" else 1 << 24, iters=max(args.iters, 10)
        ),
        "matmul_flops_per_s": matmul_flops(8192 if DEVICE == "cuda" else 256, iters=max(args.iters, 10)),
        "oracle": oracle,
        "not_timed_wrong": wrong,
    }
    results = []
    for n_tokens in args.tokens:
        for name, impl in impls.items():
            if name in wrong:
                parts = oracle[name]["parts"]
                results.append({"impl": name, "suite": SUITE_OF[name], "tokens": n_tokens,
                                "error": f"not timed: disagrees with fp64 ({parts})"})  # fmt: skip
                continue
            results.append(bench_one(name, impl, n_tokens, args))
            torch.cuda.empty_cache()  # the next implementation starts from the same free memory
            print(f"done: {name} T={n_tokens}", file=sys.stderr)
            with open(args.out, "w") as f:  # raw results so far: a run stopped at a time limit keeps them
                json.dump({"meta": meta, "results": results, "partial": True}, f, indent=2)
    elem_bytes = torch.tensor([], dtype=DTYPES[args.dtype]).element_size()
    add_derived(results, args, elem_bytes, meta["copy_bytes_per_s"], meta["matmul_flops_per_s"])
    checks = check_targets(results)
    table = markdown(meta, results, checks)
    print(table)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "results": results, "targets": checks, "markdown": table}, f, indent=2)
    print(f"wrote {args.out}", file=sys.stderr)
    if teardown is not None:
        teardown()
    if wrong:
        print(f"NOT TIMED, wrong against fp64: {', '.join(wrong)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
