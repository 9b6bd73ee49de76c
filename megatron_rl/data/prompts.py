"""Turning a problem into prompt token ids."""

from __future__ import annotations

from megatron_rl.data.dataset import Problem


def render_prompt(problem: Problem, tokenizer, template: str, instruction: str) -> list[int]:
    """`raw`: the problem text as is (the tiny task); `chat`: the model's chat template with the instruction
    that asks for reasoning in <think>...</think> and a final \\boxed{} answer (the AceReason math prompt)."""
    if template == "raw":
        return tokenizer.encode(problem.prompt, add_special_tokens=False)
    messages = [{"role": "user", "content": f"{problem.prompt}\n{instruction}"}]
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
