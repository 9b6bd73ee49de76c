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


def test_smoke_on_cpu(cpu_as_cuda, tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["--tokens", "8", "16", "--vocab", "1500", "--iters", "2", "--warmup", "1", "--block-v", "1024"]
    assert bench.main([*argv, "--temperature", "0.7", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["meta"]["max_abs_diff_vs_torch"] < 1e-4  # the fused op agrees with plain torch
    assert [(r["impl"], r["tokens"]) for r in data["results"]] == [
        (impl, t) for t in (8, 16) for impl in bench.IMPLEMENTATIONS
    ]
    for r in data["results"]:
        assert "error" not in r and r["fwd_ms"] > 0 and r["fwdbwd_bytes_per_s"] > 0
    assert data["targets"]["tokens"] == 16
    assert set(data["targets"]) >= {
        "fwd_floor_ratio",
        "fwdbwd_speedup_vs_megatron",
        "max_extra_bytes_per_token",
    }
    printed = capsys.readouterr().out
    assert "| impl | T | fwd ms |" in printed and "Targets at T = 16" in printed
    assert printed.strip() == data["markdown"]
