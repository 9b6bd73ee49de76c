"""Benchmarks, one module per subject, each run as `megatron-rl bench NAME [ARGS]` (its `main(ARGS)`) or
`python -m megatron_rl.bench.NAME`: kernels, rewards, sync, packing, parity, update. Each states the device it ran on and
measures its baseline in the same run; docs/benchmarks.md holds the numbers. common.py: what every benchmark
says about the machine.
"""
