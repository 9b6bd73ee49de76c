"""The verification half of a weight push, shared by the sender (trainer) and receiver (engine worker).

A push is: a manifest (every tensor's name, shape, dtype) checked against the receiver's model before any
tensor is loaded; then buckets of tensors, each checked against the manifest; then a check that every
manifest tensor arrived. The receiver returns an exact checksum of each tensor it loaded, which the sender
compares with its own.
"""

from __future__ import annotations

import torch

from megatron_rl.rollout.base import WeightSyncError

Manifest = dict[str, tuple[int, ...]]


def tensor_checksum(t: torch.Tensor) -> int:
    """Exact checksum of a tensor's bits, position-weighted, computed on the tensor's own device."""
    flat = t.detach().contiguous().reshape(-1)
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()]
    bits = flat.view(ints).to(torch.int64)
    weights = torch.arange(bits.numel(), device=bits.device, dtype=torch.int64) % 1021 + 1
    # int64 wrap-around is deterministic, so both sides agree even when the sum overflows.
    return int((bits * weights).sum().item())


def check_manifest(manifest: Manifest, expected: Manifest, allowed_extra: set[str] = frozenset()) -> None:
    for name, shape in expected.items():
        if name not in manifest:
            raise WeightSyncError(f"weight push is missing tensor '{name}' (receiver expects {list(shape)})")
        if tuple(manifest[name]) != tuple(shape):
            raise WeightSyncError(
                f"weight push tensor '{name}' has shape {list(manifest[name])}, receiver expects {list(shape)}"
            )
    for name in manifest:
        if name not in expected and name not in allowed_extra:
            raise WeightSyncError(f"weight push has unexpected tensor '{name}' (not in the receiver's model)")


def check_bucket(bucket: dict[str, torch.Tensor], manifest: Manifest, received: set[str]) -> None:
    for name, tensor in bucket.items():
        if name not in manifest:
            raise WeightSyncError(f"tensor '{name}' was not announced in the push manifest")
        if tuple(tensor.shape) != tuple(manifest[name]):
            raise WeightSyncError(
                f"tensor '{name}' arrived with shape {list(tensor.shape)}, manifest says {list(manifest[name])}"
            )
        if name in received:
            raise WeightSyncError(f"tensor '{name}' arrived twice in one push")


def check_complete(manifest: Manifest, received: set[str]) -> None:
    missing = [n for n in manifest if n not in received]
    if missing:
        raise WeightSyncError(f"weight push ended without tensor '{missing[0]}' ({len(missing)} missing)")


def compare_checksums(sent: dict[str, int], received: dict[str, int]) -> None:
    for name, value in sent.items():
        if received.get(name) != value:
            raise WeightSyncError(
                f"tensor '{name}' checksum mismatch: sent {value}, receiver loaded {received.get(name)}"
            )
