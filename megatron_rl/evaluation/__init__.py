"""Evaluation as the papers report it: K samples per problem, avg@K and unbiased pass@k, with the protocol.

`megatron-rl eval` (run.py) samples with the rollout engines and scores with the stage's reward; the
estimators are in passk.py.
"""
