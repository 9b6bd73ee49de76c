"""`megatron-rl bench memory` on the tiny model: two ranks, an engine in each, the plan beside the measured peaks."""

from __future__ import annotations

import json
import subprocess
import sys

from megatron_rl.bench.memory import PHASES


def test_bench_memory_tiny_prints_phases_and_sync_extra():
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_rl.bench.memory", "--model", "tiny"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.startswith("device: ")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(result["phases"]) == set(PHASES)
    for phase in result["phases"].values():
        assert phase["predicted_bytes"] > 0 and phase["measured_bytes"] > 0
        assert phase["rel_error"] == round(
            abs(phase["predicted_bytes"] - phase["measured_bytes"]) / phase["measured_bytes"], 4
        )
    assert result["max_rel_error"] == max(p["rel_error"] for p in result["phases"].values())
    assert result["processes_per_rank"] == 1  # the external launcher: vLLM runs inside each rank's process
    assert result["ranks"] == 2 and result["bucket_bytes"] == 1 << 20
    # The sync's peak above what the trainer and vLLM held before it; of it, the exported tensors alive at
    # once (at most two buckets, the one loading and the next; at TP 1 views of the parameters, which count
    # nothing, but for q/k/v, and with one KV head those are views too) and the rest.
    assert result["sync_extra_bytes"] == result["sync_exported_bytes"] + result["sync_other_bytes"]
    assert 0 <= result["sync_exported_bytes"] <= 2 * result["bucket_bytes"], result
