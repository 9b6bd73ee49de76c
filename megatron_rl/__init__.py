"""megatron-rl: GRPO with verifiable rewards on a Megatron-core policy with vLLM rollouts."""

__version__ = "0.1.0"
