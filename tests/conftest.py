"""Shared fixtures: tiny checkpoints built locally once per session."""

from __future__ import annotations

import pytest

from megatron_rl.model.tiny import TinyShape, write_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> str:
    """The default tiny shape (2 heads, 1 KV head, untied), with weights large enough that logits are far from
    uniform (init std 0.1), so parity checks compare real distributions."""
    return str(
        write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), TinyShape(initializer_range=0.1), seed=1)
    )


@pytest.fixture(scope="session")
def tiny_ckpt_gqa_tied(tmp_path_factory) -> str:
    """4 query heads over 2 KV heads, tied embeddings: the other branches of the conversion."""
    shape = TinyShape(
        hidden_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        tie_word_embeddings=True,
        initializer_range=0.1,
        num_hidden_layers=2,
    )
    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_gqa"), shape, seed=2))
