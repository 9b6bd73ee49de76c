"""avg@K and unbiased pass@k: the estimator against brute-force enumeration; the reward kind of a data file."""

from __future__ import annotations

import itertools
import json
from fractions import Fraction

import pytest

from megatron_rl.config import ConfigError
from megatron_rl.evaluation.passk import k_values, pass_at_k, summarise
from megatron_rl.evaluation.run import reward_kind


def brute_force_pass_at_k(n: int, c: int, k: int) -> Fraction:
    """The fraction of all k-subsets of n samples (the first c correct) holding at least one correct sample."""
    subsets = list(itertools.combinations(range(n), k))
    return Fraction(sum(any(i < c for i in s) for s in subsets), len(subsets))


def test_pass_at_k_equals_enumeration():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(float(brute_force_pass_at_k(n, c, k)), abs=1e-15)
    # Not the plug-in estimator 1 - (1 - c/n)^k: 4 samples, 1 correct, pass@2 is 1/2, not 7/16.
    assert pass_at_k(4, 1, 2) == 0.5 and pass_at_k(64, 0, 64) == 0.0 and pass_at_k(64, 64, 1) == 1.0


@pytest.mark.parametrize("n,c,k", [(4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)])
def test_pass_at_k_refuses_impossible_counts(n, c, k):
    with pytest.raises(ValueError, match=f"n={n}, c={c}, k={k}"):
        pass_at_k(n, c, k)


def test_summary_is_the_mean_over_problems():
    assert k_values(1) == [1] and k_values(8) == [1, 2, 4, 8] and k_values(6) == [1, 2, 4, 6]
    correct = [0, 1, 3, 4]  # of 4 samples each
    s = summarise(correct, 4)
    assert s["problems"] == 4 and s["k"] == 4 and s["avg@k"] == 0.5  # 8 of 16 samples
    assert s["pass@k"]["1"] == s["avg@k"]  # pass@1 is the mean accuracy
    assert s["pass@k"]["4"] == 0.75  # every problem with a correct sample
    expected_2 = (0 + 0.5 + 1 + 1) / 4  # C(3,2)/C(4,2) = 1/2 for the problem with one correct
    assert s["pass@k"]["2"] == pytest.approx(expected_2)


def test_reward_kind_from_the_rows(tmp_path):
    math_rows, code_rows = tmp_path / "math.jsonl", tmp_path / "code.jsonl"
    math_rows.write_text("not json\n" + json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n")
    code_rows.write_text(json.dumps({"prompt": "add", "tests": [{"input": "1 1", "output": "2"}]}) + "\n")
    assert reward_kind(math_rows) == "math" and reward_kind(code_rows) == "code"
    with pytest.raises(ConfigError, match="--data: file '.*missing.jsonl' does not exist"):
        reward_kind(tmp_path / "missing.jsonl")
