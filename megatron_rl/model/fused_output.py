"""The output layer fused into the log-prob computation: the GPTModel hands back its final hidden states and
the policy computes log-probs and entropy from them and the output layer's weight with
kernels.linear_logprob_entropy, so that no [T, V] logits tensor is made.

Megatron-core's GPTModel has no switch for this (its `_postprocess` always calls `output_layer`), so for the
duration of one forward call the output layer's `forward` is replaced on that instance by one that returns its
input: GPTModel then returns the hidden states [b, s, h] where it would return logits [b, s, V / TP]. Nothing
else changes: the parameter stays where it is (names, checkpoints, DDP buckets), and its gradient arrives through
the kernel into the same `.grad` / `main_grad` path. The column-parallel layer's input all-reduce in backward
is done by the kernel (it sums d hidden over the tensor-parallel group).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def output_weight(model: torch.nn.Module) -> torch.Tensor:
    """The weight the last stage's output layer multiplies by: the embedding's when tied and this stage holds
    the embedding, else the output layer's own (what GPTModel._postprocess passes as `weight`)."""
    if model.share_embeddings_and_output_weights:
        return model.shared_embedding_or_output_weight()
    return model.output_layer.weight


def _pass_hidden_states(hidden_states, weight=None, runtime_gather_output=None):
    return hidden_states, None  # (output, bias) like ColumnParallelLinear.forward


@contextmanager
def hidden_states_out(model: torch.nn.Module, enabled: bool = True) -> Iterator[None]:
    """Within the block, `model(...)` returns the final hidden states instead of logits (a no-op on stages
    without an output layer, or when not `enabled`)."""
    layer = getattr(model, "output_layer", None) if enabled else None
    if layer is None:
        yield
        return
    if getattr(layer, "sequence_parallel", False):
        raise NotImplementedError("the fused output layer does not support sequence parallelism yet")
    layer.forward = _pass_hidden_states
    try:
        yield
    finally:
        del layer.forward  # back to the class's forward
