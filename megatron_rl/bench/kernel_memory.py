"""Peak CPU memory of log-prob/entropy from hidden states, fused (no logits) vs unfused (fp32 logits), per token.

    megatron-rl bench kernel_memory [--tokens 4096 16384] [--hidden 1024] [--vocab 32768] [--impls fused unfused]
    (or python -m megatron_rl.bench.kernel_memory)

For each implementation and T, a fresh Python process builds hidden [T, H], weight [V, H], targets and upstream
gradients (the inputs), runs forward and backward once, and reports how far its memory peaked above the level
with the inputs in place, minus the outputs (logprob, entropy, d hidden, d weight): what the op needs beyond
its inputs and outputs. The fused implementation is kernels.linear_logprob_entropy with the torch reference
backend (the CPU path); the unfused one is the trainer's old path, fp32 logits = hidden @ weight.T followed by
kernels.logprob_entropy.

How the peak is measured, and why this way: torch's CPU allocator is invisible to tracemalloc, and
torch.cuda's statistics do not exist on the CPU. The kernel's own high-water mark of the process's resident
memory is exact and sees everything (torch, oneDNN scratch, the interpreter): each process resets it (writing
5 to /proc/self/clear_refs) after a warm-up call, reads VmRSS, runs the op, and reads VmHWM. glibc is told to
serve every allocation of 64 KiB or more with its own mmap (MALLOC_MMAP_THRESHOLD_), so a freed tensor leaves
the resident set at once instead of staying in the heap, and the resident set follows what is live.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from megatron_rl.bench.common import MALLOC_RETURNS_FREED_MEMORY, reset_peak_resident, status_bytes

QUICK = {"tokens": [512, 2048], "hidden": 256, "vocab": 32768}  # the test's sizes: seconds on 2 cores
MAX_EXTRA_BYTES_PER_TOKEN = 64
MAX_WORKSPACE_BYTES = 256 << 20
IMPLEMENTATIONS = ("fused", "unfused")


def _run_op(impl: str, hidden, weight, targets, g_lp, g_ent):
    import torch

    from kernels import linear_logprob_entropy, logprob_entropy

    if impl == "fused":
        lp, ent = linear_logprob_entropy(hidden, weight, targets, backend="reference")
    else:
        logits = hidden.float() @ weight.float().T
        lp, ent = logprob_entropy(logits, targets, backend="reference")
    d_hidden, d_weight = torch.autograd.grad([lp, ent], [hidden, weight], [g_lp, g_ent])
    return lp.detach(), ent.detach(), d_hidden, d_weight


def measure_in_this_process(impl: str, tokens: list[int], hidden_size: int, vocab: int) -> list[dict]:
    """For each T: peak bytes above the inputs, minus the outputs, of one forward+backward (fp32), measured
    in this process (one T after the other, each from its own reset of the high-water mark)."""
    import torch

    torch.manual_seed(0)

    def inputs(n):
        h = torch.randn(n, hidden_size).requires_grad_()
        w = (torch.randn(vocab, hidden_size) * hidden_size**-0.5).requires_grad_()
        return h, w, torch.randint(0, vocab, (n,)), torch.randn(n), torch.randn(n)

    # Warm-up at the smallest T: thread pools, oneDNN kernels and scratch for these tile shapes, lazy imports.
    _run_op(impl, *inputs(min(tokens)))
    results = []
    for n in tokens:
        args = inputs(n)
        reset_peak_resident()  # VmHWM := the current resident set
        before = status_bytes("VmRSS")
        outputs = _run_op(impl, *args)
        peak = status_bytes("VmHWM")
        output_bytes = sum(t.numel() * t.element_size() for t in outputs)
        results.append(
            {
                "impl": impl,
                "tokens": n,
                "hidden": hidden_size,
                "vocab": vocab,
                "extra_bytes": peak - before - output_bytes,
            }
        )
        del args, outputs
    return results


def measure(impl: str, tokens: list[int], hidden_size: int, vocab: int) -> list[dict]:
    """`measure_in_this_process` in a fresh Python process (its memory state and glibc settings are known)."""
    env = dict(os.environ, **MALLOC_RETURNS_FREED_MEMORY)
    env.pop("TRITON_INTERPRET", None)
    code = (
        "import json, sys; from megatron_rl.bench.kernel_memory import measure_in_this_process as m; "
        f"print(json.dumps(m({impl!r}, {list(tokens)!r}, {hidden_size}, {vocab})))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"memory measurement of {impl} at T={tokens} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def summarize(results: list[dict]) -> dict:
    """Per implementation: growth per token between the smallest and largest T, and the fixed workspace (the
    extra at the smallest T minus that growth times T), with the issue's bounds checked for the fused one."""
    summary = {}
    for impl in sorted({r["impl"] for r in results}):
        rows = sorted((r for r in results if r["impl"] == impl), key=lambda r: r["tokens"])
        lo, hi = rows[0], rows[-1]
        growth = hi["extra_bytes"] - lo["extra_bytes"]
        dt = hi["tokens"] - lo["tokens"]
        per_token = growth / dt if dt else 0.0
        summary[impl] = {
            "growth_bytes": growth,
            "growth_bytes_per_token": per_token,
            "max_extra_bytes": hi["extra_bytes"],
            "growth_within_bound": growth <= MAX_EXTRA_BYTES_PER_TOKEN * dt,
            "workspace_within_bound": max(r["extra_bytes"] for r in rows) - max(per_token, 0) * hi["tokens"]
            <= MAX_WORKSPACE_BYTES,
        }
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="megatron-rl bench kernel_memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--impls", nargs="+", choices=IMPLEMENTATIONS, default=["fused"])
    p.add_argument("--out", default=None, help="also write the results here as JSON")
    args = p.parse_args(argv)
    from megatron_rl.bench.common import announce_device

    device, load = announce_device()
    results = [r for impl in args.impls for r in measure(impl, args.tokens, args.hidden, args.vocab)]
    summary = summarize(results)
    lines = [
        f"H = {args.hidden}, V = {args.vocab}, fp32, forward+backward",
        "",
        "| impl | T | extra MiB |",
        "|---|---:|---:|",
    ]
    lines += [f"| {r['impl']} | {r['tokens']} | {r['extra_bytes'] / 2**20:.1f} |" for r in results]
    for impl, s in summary.items():
        lines.append(
            f"\n{impl}: grows {s['growth_bytes_per_token']:.1f} B/token between T = {min(args.tokens)} and "
            f"{max(args.tokens)}; peak extra {s['max_extra_bytes'] / 2**20:.1f} MiB"
        )
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": device, "load": load, "results": results, "summary": summary}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
