"""avg@K and the unbiased pass@k estimator over problems with K samples each."""

from __future__ import annotations

import math
from collections.abc import Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """The probability that at least one of k samples drawn without replacement from n, of which c are
    correct, is correct: 1 - C(n - c, k) / C(n, k) (the unbiased estimator of Chen et al. 2021, arXiv
    2107.03374, not the plug-in 1 - (1 - c/n)^k). Exact integer binomials, one rounding at the end."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def k_values(samples: int) -> list[int]:
    """1, 2, 4, ... up to `samples`, and `samples` itself."""
    ks, k = [], 1
    while k < samples:
        ks.append(k)
        k *= 2
    return [*ks, samples]


def summarise(correct: Sequence[int], samples: int) -> dict:
    """avg@K (the mean accuracy over all samples) and pass@k for k in k_values(K), each the mean over problems
    and rounded to 6 decimals; `correct[i]` is how many of problem i's `samples` were correct."""
    if not correct:
        raise ValueError("no problems to summarise")
    passes = {
        str(k): sum(pass_at_k(samples, c, k) for c in correct) / len(correct) for k in k_values(samples)
    }
    return {
        "problems": len(correct),
        "k": samples,
        "avg@k": round(sum(correct) / (len(correct) * samples), 6),
        "pass@k": {k: round(v, 6) for k, v in passes.items()},
    }
