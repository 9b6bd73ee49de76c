"""The packing benchmark runs end to end (tiny model, small batch) and ends with its JSON summary line."""

from __future__ import annotations

import json
import subprocess
import sys

from megatron_rl.bench.packing import acereason_like_lengths, padded_batches


def test_acereason_like_lengths_are_skewed_with_a_tail_at_the_cap():
    prompts, responses = acereason_like_lengths(2000, 32, 992, seed=1)
    assert all(4 <= p <= 32 for p in prompts) and all(1 <= r <= 992 for r in responses)
    mean = sum(responses) / len(responses)
    truncated = sum(r == 992 for r in responses) / len(responses)
    assert 0.3 * 992 < mean < 0.5 * 992 and 0.05 < truncated < 0.15
    assert padded_batches(10, 3) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_bench_prints_json_last():
    # A separate process: the benchmark starts torch.distributed and Megatron's parallel state.
    cmd = [sys.executable, "-m", "megatron_rl.bench.packing", "--models", "tiny", "--num-samples", "8"]
    run = subprocess.run([*cmd, "--reps", "1"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.strip().splitlines()
    assert lines[0].startswith("device: ")
    summary = json.loads(lines[-1])
    (result,) = summary["results"]
    assert summary["real_token_fraction"] == result["real_token_fraction"] == 1.0  # no padding at all
    assert 0 < summary["budget_fill"] <= 1 and summary["speedup_vs_padded"] > 0
    assert summary["speedup_vs_microbatch_padded"] > 0
    assert result["real_tokens"] < result["microbatch_padded_tokens"] <= result["padded_tokens"]
    assert result["loss_abs_diff"] < 1e-5  # every way computed the same loss on the same sequences
