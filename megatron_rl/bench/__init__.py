"""Benchmarks, one module per subject, each run as `megatron-rl bench NAME [ARGS]` (its `main(ARGS)`) or
`python -m megatron_rl.bench.NAME`: kernels, kernel_memory, gpu_check, rewards, sync, packing, update, parity,
curate, overlap, memory. Each states the device it ran on and measures its baseline in the same run (memory: the
plan's prediction beside what it measures); docs/benchmarks.md holds the numbers. common.py: what every benchmark
says about the machine.
"""
