"""The weight-sync benchmark runs end to end on the tiny model, over every transport, and reports sane numbers."""

from __future__ import annotations

import json
import subprocess
import sys

import torch


def test_bench_sync_tiny_prints_results():
    # A subprocess, as a user runs it: vLLM spawns its engine process, which re-imports __main__.
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_rl.bench.sync", "--models", "tiny", "--repeats", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("device: ")
    assert any(line.startswith("| tiny |") for line in lines)
    tiny = json.loads(lines[-1])["models"]["tiny"]
    assert tiny["tensors"] == 27  # 3 outside the layers + 12 in each of the 2 layers
    for key in (
        "ms",
        "mb_per_s",
        "export_ms",
        "push_ms",
        "baseline_vllm_reload_from_disk_ms",
        "baseline_memcpy_ms",
    ):
        assert tiny[key] > 0, (key, tiny)
    assert tiny["mb"] > 2.0  # 525,440 fp32 parameters
    # Every transport this device has was timed, and the table has its rows.
    expected = ["ipc", "shm", "rpc"] if torch.cuda.is_available() else ["shm", "broadcast", "rpc"]
    assert list(tiny["transports"]) == expected and tiny["transport"] == expected[0]
    for name, timing in tiny["transports"].items():
        assert timing["ms"] >= timing["push_ms"] and timing["ms"] > timing["vllm_load_ms"] > 0, (name, timing)
        assert timing["mb_per_s"] > 0 and len(timing["sync_ms_all"]) == 1, name
        assert any(f"**full sync, {name}**" in line for line in lines), name
