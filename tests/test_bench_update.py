"""The update-step benchmark runs end to end (tiny model, two data-parallel ranks) and both ways agree."""

from __future__ import annotations

import json
import math
import subprocess
import sys


def test_bench_update_two_ranks_same_gradients_both_ways():
    cmd = [sys.executable, "-m", "megatron_rl.bench.update", "--model", "tiny", "--dp", "2", "--samples", "8"]
    run = subprocess.run([*cmd, "--reps", "1"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.strip().splitlines()
    assert lines[0].startswith("device: ")
    result = json.loads(lines[-1])
    assert result["data_parallel"] == 2 and result["microbatches_per_rank"] >= 1
    # The scheduled path (fp32 main grads, bucketed reduction, one batched norm) and the per-parameter
    # baseline compute the same gradient of the same loss.
    norms = result["grad_norm"]
    assert math.isfinite(norms["scheduled"]) and norms["scheduled"] > 0
    assert abs(norms["scheduled"] - norms["per_parameter"]) <= 1e-5 * norms["per_parameter"]
    assert result["max_relative_grad_diff"] < 1e-5
    assert result["scheduled_step_s"] > 0 and result["per_parameter_step_s"] > 0
