"""Triton kernels with their torch references, autograd wrappers and benchmarks.

One op per file: ``logprob_entropy.py`` holds the fused per-token log-prob / entropy kernel, its torch
reference and its autograd wrapper; ``linear_logprob_entropy.py`` fuses the output layer's matmul into
the same computation so that no [T, V] logits tensor exists; ``megatron_rl/bench/kernels.py`` benchmarks it (``megatron-rl bench
kernels``). Triton is optional at import time: without it the torch reference runs.
"""

from kernels.linear_logprob_entropy import linear_logprob_entropy, linear_logprob_entropy_reference
from kernels.logprob_entropy import logprob_entropy, logprob_entropy_reference

__all__ = [
    "linear_logprob_entropy",
    "linear_logprob_entropy_reference",
    "logprob_entropy",
    "logprob_entropy_reference",
]
