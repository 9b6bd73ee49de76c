"""Triton kernels with their torch references, autograd wrappers and benchmarks.

One op per file: ``logprob_entropy.py`` holds the fused per-token log-prob / entropy kernel, its torch
reference and its autograd wrapper; ``megatron_rl/bench/kernels.py`` benchmarks it (``megatron-rl bench
kernels``). Triton is optional at import time: without it the torch reference runs.
"""

from kernels.logprob_entropy import logprob_entropy, logprob_entropy_reference

__all__ = ["logprob_entropy", "logprob_entropy_reference"]
