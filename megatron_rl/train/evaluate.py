"""Held-out accuracy: mean reward over `samples_per_problem` samples per problem at the eval temperature."""

from __future__ import annotations

from megatron_rl.train.rollouts import sample_and_score


def evaluate(engine, pool, problems, tokenizer, cfg, seed: int = 12345) -> float:
    """A collective when every rank hosts an engine (all ranks get the accuracy); else rank 0 only."""
    _, rewards, _, _ = sample_and_score(
        engine, pool, problems, tokenizer, cfg, seed, cfg.eval.samples_per_problem, cfg.eval.temperature
    )
    return sum(rewards) / len(rewards)
