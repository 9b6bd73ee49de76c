"""Verifiable rewards: a math verifier and a sandboxed code-execution harness, scored in a worker pool.

    from megatron_rl.rewards import RewardPool, math_reward
    math_reward("... </think> The answer is \\boxed{\\frac12}.", "1/2")        # 1.0, in-process
    with RewardPool(workers=8) as pool:                                         # reuse it every step
        pool.score_math(responses, answers)                                     # [1.0, 0.0, ...]
        pool.score_code(responses, tests, fn_names)                             # LiveCodeBench test cases

See docs/rewards.md.
"""

from megatron_rl.rewards.code_reward import (
    CheckTests,
    CodeResult,
    IOTests,
    extract_code,
    parse_tests,
    stdout_matches,
    values_equal,
)
from megatron_rl.rewards.math_grader import extract_math_answer, last_boxed, math_reward, math_reward_detail
from megatron_rl.rewards.pool import RewardPool, score_code_batch, score_math_batch
from megatron_rl.rewards.sandbox import Sandbox, SandboxLimits, SandboxUnavailable

__all__ = [
    "CheckTests",
    "CodeResult",
    "IOTests",
    "RewardPool",
    "Sandbox",
    "SandboxLimits",
    "SandboxUnavailable",
    "extract_code",
    "extract_math_answer",
    "last_boxed",
    "math_reward",
    "math_reward_detail",
    "parse_tests",
    "score_code_batch",
    "score_math_batch",
    "stdout_matches",
    "values_equal",
]
