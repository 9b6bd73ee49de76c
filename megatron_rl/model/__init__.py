"""The policy model: HF Qwen2 config -> Megatron-core GPTModel, weight conversion, the tiny model factory.

Nothing outside this package knows Megatron's parameter names.
"""
