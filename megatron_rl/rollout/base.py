"""What a rollout engine is to the trainer: generate samples with their logprobs, take new weights."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch


class WeightSyncError(RuntimeError):
    """A weight push was refused or arrived wrong; the message names the tensor."""


@dataclass
class RolloutSample:
    prompt_index: int  # which prompt of the request this sample answers
    prompt_ids: list[int]
    token_ids: list[int]  # the sampled response tokens (stop token included when the engine emitted one)
    logprobs: list[float]  # log p(token) under softmax(logits / temperature), one per response token
    finish_reason: Literal["stop", "length"]
    text: str = ""


@dataclass
class SyncReport:
    tensors: int
    bytes: int
    seconds: float
    checksums: dict[str, int] = field(default_factory=dict)
    transport: str = ""  # how the bytes travelled: shm, ipc, broadcast or rpc
    reload_seconds: float = 0.0  # of `seconds`, the engine's in-place loading of the buckets it received

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / self.seconds if self.seconds > 0 else float("inf")


class RolloutEngine(Protocol):
    def generate(
        self,
        prompts: Sequence[str] | Sequence[Sequence[int]],
        n: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_tokens: int = 256,
        seed: int | None = None,
    ) -> list[RolloutSample]:
        """n samples per prompt, grouped by prompt in order (len = n * len(prompts))."""
        ...

    def update_weights(
        self, buckets: Iterable[list[tuple[str, torch.Tensor]]], transport: str | None = None
    ) -> SyncReport:
        """Load HF-named tensors (the whole model, in buckets: a list, or a WeightStream that produces them
        one at a time) and verify them; raises WeightSyncError. `transport` overrides the engine's default way
        of moving the bytes."""
        ...

    def sleep(self) -> None:
        """Free accelerator memory (weights and KV cache) while training runs; no-op where not supported."""
        ...

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        """Bring the memory back: "weights" and/or "kv_cache" (None: all); sampling needs all of it."""
        ...

    def shutdown(self) -> None: ...
