"""The kernel benchmark command (megatron_rl/bench/kernels.py): refuses to run without CUDA; runs end to end.

The smoke test stands in a CPU for the GPU (wall-clock "events", no memory statistics) only to exercise the
benchmark's plumbing: argument handling, every implementation including the Megatron baseline, the derived
columns, the target checks and the JSON. Its numbers mean nothing and go nowhere but tmp_path.
"""

import json
import time

import pytest
import torch

from megatron_rl.bench import kernels as bench


def test_needs_cuda(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(["--out", str(tmp_path / "x.json")]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


class _WallClockEvent:
    def __init__(self, enable_timing=False):
        self.t = None

    def record(self):
        self.t = time.perf_counter()

    def elapsed_time(self, end):
        return (end.t - self.t) * 1e3


@pytest.fixture
def cpu_as_cuda(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(bench, "DEVICE", "cpu")
    fake = {
        "is_available": lambda: True,
        "get_device_name": lambda *a: "CPU standing in for a GPU (smoke test)",
        "Event": _WallClockEvent,
        "synchronize": lambda *a: None,
        "empty_cache": lambda: None,
        "reset_peak_memory_stats": lambda *a: None,
        "memory_allocated": lambda *a: 0,
        "max_memory_allocated": lambda *a: 0,
    }
    for name, value in fake.items():
        monkeypatch.setattr(torch.cuda, name, value)


SMOKE = ["--tokens", "8", "16", "--vocab", "1500", "--hidden", "32", "--iters", "2", "--warmup", "1"]


def test_smoke_on_cpu(cpu_as_cuda, tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = [*SMOKE, "--block-v", "1024", "--chunk", "5", "--temperature", "0.7", "--out", str(out)]
    assert bench.main(argv) == 0
    data = json.loads(out.read_text())
    # Every implementation agreed with fp64 before it was timed.
    assert set(data["meta"]["oracle"]) == set(bench.IMPLEMENTATIONS) and data["meta"]["not_timed_wrong"] == []
    assert all(o["worst_relative_to_tolerance"] <= 1 for o in data["meta"]["oracle"].values())
    assert [(r["impl"], r["tokens"]) for r in data["results"]] == [
        (impl, t) for t in (8, 16) for impl in bench.IMPLEMENTATIONS
    ]
    for r in data["results"]:
        assert "error" not in r and r["fwd_ms"] > 0 and r["fwdbwd_bytes_per_s"] > 0
        if r["suite"] == "linear":  # the roofline: 6 T V H FLOPs forward+backward
            assert r["fwdbwd_flops"] == 6 * r["tokens"] * 1500 * 32 and r["fwdbwd_flops_per_s"] > 0
    assert data["targets"]["tokens"] == 16
    assert set(data["targets"]) >= {
        "fwd_floor_ratio",
        "fwdbwd_speedup_vs_megatron",
        "linear_fwdbwd_matmul_fraction",
        "linear_fwdbwd_speedup_vs_torch",
        "max_extra_bytes_per_token",
    }
    printed = capsys.readouterr().out
    assert "| impl | T | fwd ms |" in printed and "Targets at T = 16" in printed
    assert printed.strip() == data["markdown"]


def test_chunked_baselines_equal_unchunked():
    # Chunking (forward and backward of 3 tokens at a time) changes nothing but the memory.
    gen = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(10, 50, generator=gen), torch.randint(0, 50, (10,), generator=gen)
    g_lp, g_ent = torch.randn(10, generator=gen), torch.randn(10, generator=gen)
    lp, ent, grad = bench._chunked_logits(bench._torch_math, 3)(logits, targets, 0.7, g_lp, g_ent, True)
    x = logits.clone().requires_grad_()
    ref = bench._torch_math(x, targets, 0.7)
    (ref_grad,) = torch.autograd.grad(list(ref), [x], [g_lp, g_ent])
    torch.testing.assert_close((lp, ent, grad), (*ref, ref_grad))
    hidden, weight = torch.randn(10, 8, generator=gen), torch.randn(50, 8, generator=gen)
    lp, ent, d_h, d_w = bench._torch_linear(3)(hidden, weight, targets, 0.7, g_lp, g_ent, True)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref = bench._torch_math(h @ w.T, targets, 0.7)
    expected = (*ref, *torch.autograd.grad(list(ref), [h, w], [g_lp, g_ent]))
    torch.testing.assert_close((lp, ent, d_h, d_w), expected)


def test_a_wrong_kernel_is_never_timed(cpu_as_cuda, tmp_path, monkeypatch):
    def off_by_a_bit(args, inplace):
        chunked = bench._chunked_logits(bench._torch_math, 4)

        def run(logits, targets, tau, g_lp, g_ent, backward):
            lp, ent, grad = chunked(logits, targets, tau, g_lp, g_ent, backward)
            return lp + 1.0, ent, grad  # a whole nat off: far outside the bf16 tolerance

        return run

    monkeypatch.setattr(bench, "_fused", off_by_a_bit)
    out = tmp_path / "bench.json"
    argv = [*SMOKE, "--suites", "logits", "--impls", "fused", "torch", "--out", str(out)]
    assert bench.main(argv) == 1
    data = json.loads(out.read_text())
    assert data["meta"]["not_timed_wrong"] == ["fused"]
    fused = [r for r in data["results"] if r["impl"] == "fused"]
    assert fused and all("not timed" in r["error"] and "fwd_ms" not in r for r in fused)
    assert all("error" not in r for r in data["results"] if r["impl"] == "torch")


def test_gpu_check_dry_run(tmp_path, monkeypatch):
    """`make gpu-check`'s script end to end at tiny sizes on the CPU: the compiled-kernel tests are collected and
    skip (no CUDA), the benchmarks refuse, and the one JSON file records every step."""
    from megatron_rl.bench import gpu_check

    monkeypatch.setenv("OUT", str(tmp_path))
    assert gpu_check.main(["--dry-run"]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [s["name"] for s in report["steps"]] == ["tests", "logits", "linear", "linear-atomic"]
    tests, *benches = report["steps"]
    assert tests["rc"] == 0 and "skipped" in tests["output_tail"], tests["output_tail"]
    for bench_step in benches:
        assert bench_step["rc"] == 2 and "needs a CUDA device" in bench_step["output_tail"]
    assert report["ok"] is False and report["targets"] == {}
    full = gpu_check.steps(gpu_check.FULL, tmp_path)
    assert sum(gpu_check.LIMITS.values()) <= 8 * 60  # the budget
    assert "32768" in full[1][1] and "152064" in full[2][1] and "3584" in full[2][1]
