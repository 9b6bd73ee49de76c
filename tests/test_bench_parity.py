"""`megatron-rl bench parity` on the tiny model: vLLM's sampling log-probs, the trainer's recomputation and a
float64 reference, compared token by token."""

from __future__ import annotations

import json
import subprocess
import sys


def test_parity_bench_compares_both_sides_with_fp64():
    # A subprocess, as a user runs it: vLLM spawns its engine process, which re-imports __main__.
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_rl.bench.parity", "--prompts", "8", "--samples", "2", "--max-tokens", "8"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("device: ")
    result = json.loads(lines[-1])
    assert 0 < result["tokens"] <= 8 * 2 * 8  # responses may stop before --max-tokens
    diffs = result["abs_diff"]
    assert set(diffs) == {"vllm_vs_trainer", "vllm_vs_fp64", "trainer_vs_fp64"}
    # fp32 on both sides: each within fp32 rounding of the exact value, and of each other.
    for name, d in diffs.items():
        assert 0 <= d["mean"] <= d["p99"] <= d["max"] < 1e-4, name
    assert diffs["vllm_vs_trainer"]["max"] < 1e-5
    assert sum(row["tokens"] for row in result["by_logprob_range"]) == result["tokens"]
    assert any(line.startswith("| vllm_vs_trainer |") for line in lines)
