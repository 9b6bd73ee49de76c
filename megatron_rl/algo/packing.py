"""Sequence packing: prompt+response sequences concatenated into THD micro-batches under a token budget.

Rollout lengths are skewed (a few hundred tokens to the length cap in one batch), so padding every sequence of
a micro-batch to its longest wastes most of the compute. Here each micro-batch is one row of concatenated
sequences with `cu_seqlens` marking the boundaries; Megatron's packed-sequence path (PackedSeqParams, "thd")
restarts RoPE at every boundary and the attention (TE/flash varlen on GPU, SDPACoreAttention on CPU) never
crosses one (model/policy.py turns a micro-batch into Megatron's arguments; this module is plain tensors). Each sequence is padded at its end only to `pad_multiple` (what sequence/context parallelism
needs); causal attention keeps those pad tokens from touching the real ones.

Planning (which sample goes into which micro-batch on which data-parallel rank) is deterministic and depends
only on the lengths, so every rank computes the same global plan from the same global batch and keeps its
share. All ranks get the same number of micro-batches, because the trainer steps them in lockstep.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch

IGNORE_INDEX = -100
PerSample = float | Sequence[float] | torch.Tensor  # a scalar, or one value per response token


@dataclass
class PackedMicroBatch:
    """One THD micro-batch: sequences back to back in a single row."""

    tokens: torch.Tensor  # [1, T] long
    position_ids: torch.Tensor  # [1, T], restarting at 0 per sequence
    targets: torch.Tensor  # [T] next-token ids at scored (response) positions, IGNORE_INDEX elsewhere
    cu_seqlens: torch.Tensor  # [n + 1] int32, boundaries of the (padded) sequences
    sample_indices: list[int]  # which input samples, in packing order
    response_spans: list[tuple[int, int]]  # per sample, [start, end) of its response-token predictions
    sample_lengths: list[int]  # per sample, real prompt + response length (before padding)

    @property
    def num_tokens(self) -> int:
        """Tokens in the micro-batch, padding included."""
        return self.tokens.shape[1]

    @property
    def real_tokens(self) -> int:
        return sum(self.sample_lengths)

    @property
    def loss_mask(self) -> torch.Tensor:
        """[T] bool, True at the positions that predict a response token."""
        return self.targets != IGNORE_INDEX

    @property
    def num_response_tokens(self) -> int:
        return sum(end - start for start, end in self.response_spans)

    def to(self, dev: torch.device | str) -> PackedMicroBatch:
        return replace(
            self,
            tokens=self.tokens.to(dev),
            position_ids=self.position_ids.to(dev),
            targets=self.targets.to(dev),
            cu_seqlens=self.cu_seqlens.to(dev),
        )


def padded_length(length: int, pad_multiple: int) -> int:
    return -(-length // pad_multiple) * pad_multiple


def plan_microbatches(
    lengths: Sequence[int], max_tokens_per_microbatch: int, pad_multiple: int = 1, dp_size: int = 1
) -> list[list[list[int]]]:
    """Sample indices per micro-batch per data-parallel rank: plan[rank][microbatch] = [sample, ...].

    Best-fit decreasing keeps micro-batches full; then, if the count is not a multiple of `dp_size`, the
    fullest multi-sample micro-batches are split in two until it is (a rank with nothing left to take gets an
    empty micro-batch, which `pack_microbatches` fills with one pad sequence); finally micro-batches are dealt
    to ranks largest first, each to the rank with the fewest tokens so far, to balance tokens across ranks.
    """
    if max_tokens_per_microbatch < pad_multiple:
        raise ValueError(
            f"max_tokens_per_microbatch={max_tokens_per_microbatch} is below pad_multiple={pad_multiple}"
        )
    if dp_size < 1 or pad_multiple < 1:
        raise ValueError(f"dp_size and pad_multiple must be >= 1, got {dp_size} and {pad_multiple}")
    sizes = [padded_length(n, pad_multiple) for n in lengths]
    for i, (n, size) in enumerate(zip(lengths, sizes, strict=True)):
        if size > max_tokens_per_microbatch:
            padded = f" ({size} padded to a multiple of {pad_multiple})" if size != n else ""
            raise ValueError(
                f"sample {i} has {n} tokens{padded}, more than max_tokens_per_microbatch="
                f"{max_tokens_per_microbatch}: raise the budget or cap the prompt + response length"
            )

    # Best-fit decreasing: each sequence, longest first, goes where it leaves the least room.
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, bin id), sorted
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        pos = bisect.bisect_left(free, (sizes[i], -1))
        if pos == len(free):
            bins.append([i])
            bisect.insort(free, (max_tokens_per_microbatch - sizes[i], len(bins) - 1))
        else:
            room, b = free.pop(pos)
            bins[b].append(i)
            bisect.insort(free, (room - sizes[i], b))

    def load(b: list[int]) -> int:
        return sum(sizes[i] for i in b)

    # Equal counts per rank: split the fullest bins that hold more than one sequence.
    target = max(1, -(-len(bins) // dp_size)) * dp_size
    while len(bins) < target:
        splittable = [b for b in bins if len(b) > 1]
        if not splittable:
            bins.append([])
            continue
        b = max(splittable, key=load)
        bins.remove(b)
        halves: list[list[int]] = [[], []]
        for i in b:  # already longest first: greedy two-way balance
            min(halves, key=load).append(i)
        bins.extend(halves)

    per_rank = target // dp_size
    plan: list[list[list[int]]] = [[] for _ in range(dp_size)]
    rank_load = [0] * dp_size
    for b in sorted(bins, key=lambda b: (-load(b), min(b, default=len(sizes)))):
        r = min((r for r in range(dp_size) if len(plan[r]) < per_rank), key=lambda r: (rank_load[r], r))
        plan[r].append(sorted(b))
        rank_load[r] += load(b)
    return plan


def pack_microbatches(
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    max_tokens_per_microbatch: int,
    pad_multiple: int = 1,
    dp_size: int = 1,
    dp_rank: int = 0,
    pad_id: int = 0,
) -> list[PackedMicroBatch]:
    """This data-parallel rank's micro-batches of the (global) batch of prompt+response samples.

    Every rank must pass the same global batch; every rank gets the same number of micro-batches. Each
    micro-batch holds at most `max_tokens_per_microbatch` tokens, each sequence padded to `pad_multiple`
    (1 unless sequence parallelism needs the TP size, or context parallelism 2 * CP).
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"sample {i} has an empty prompt: its first response token would not be scored")
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} is not in [0, dp_size={dp_size})")
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses, strict=True)]
    plan = plan_microbatches(lengths, max_tokens_per_microbatch, pad_multiple, dp_size)
    return [_build(samples, prompts, responses, pad_multiple, pad_id) for samples in plan[dp_rank]]


def _build(
    samples: list[int],
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    pad_multiple: int,
    pad_id: int,
) -> PackedMicroBatch:
    tokens: list[int] = []
    positions: list[int] = []
    targets: list[int] = []
    bounds = [0]
    spans: list[tuple[int, int]] = []
    real: list[int] = []
    for i in samples:
        prompt, response = list(prompts[i]), list(responses[i])
        seq = prompt + response
        size = padded_length(len(seq), pad_multiple)
        start = bounds[-1]
        # Position t predicts token t + 1; only predictions of response tokens are scored.
        tgt = [IGNORE_INDEX] * size
        tgt[len(prompt) - 1 : len(seq) - 1] = response
        tokens += seq + [pad_id] * (size - len(seq))
        positions += range(size)
        targets += tgt
        bounds.append(start + size)
        spans.append((start + len(prompt) - 1, start + len(seq) - 1))
        real.append(len(seq))
    if not samples:  # a filler so that every rank steps the same number of micro-batches; scores nothing
        tokens, positions = [pad_id] * pad_multiple, list(range(pad_multiple))
        targets, bounds = [IGNORE_INDEX] * pad_multiple, [0, pad_multiple]
    return PackedMicroBatch(
        tokens=torch.tensor(tokens, dtype=torch.long).unsqueeze(0),
        position_ids=torch.tensor(positions, dtype=torch.long).unsqueeze(0),
        targets=torch.tensor(targets, dtype=torch.long),
        cu_seqlens=torch.tensor(bounds, dtype=torch.int32),
        sample_indices=list(samples),
        response_spans=spans,
        sample_lengths=real,
    )


def unpack(values: torch.Tensor, mb: PackedMicroBatch) -> list[torch.Tensor]:
    """Per-sample response values ([len(response)] each), in `mb.sample_indices` order, from [T] or [1, T]."""
    if values.dim() >= 2 and values.shape[0] == 1 and values.shape[1] == mb.num_tokens:
        values = values[0]
    if values.shape[0] != mb.num_tokens:
        raise ValueError(f"values have {values.shape[0]} positions, the micro-batch {mb.num_tokens}")
    return [values[start:end] for start, end in mb.response_spans]


def unpack_to_samples(
    values: Sequence[torch.Tensor], mbs: Sequence[PackedMicroBatch]
) -> dict[int, torch.Tensor]:
    """{sample index: response values} from one [T] tensor per micro-batch (e.g. recomputed log-probs)."""
    out: dict[int, torch.Tensor] = {}
    for v, mb in zip(values, mbs, strict=True):
        out.update(zip(mb.sample_indices, unpack(v, mb), strict=True))
    return out


def pack_values(
    per_sample: Sequence[PerSample] | Mapping[int, PerSample], mb: PackedMicroBatch, fill: float = 0.0
) -> torch.Tensor:
    """The inverse of `unpack`: a [T] fp32 tensor with each sample's response values on its span.

    `per_sample` is indexed by global sample index (a list, or a dict such as `unpack_to_samples` returns);
    an entry is a scalar (e.g. the sample's advantage, broadcast over its response) or one value per response
    token (e.g. old log-probs).
    """
    out = torch.full((mb.num_tokens,), fill, dtype=torch.float32, device=mb.tokens.device)
    for i, (start, end) in zip(mb.sample_indices, mb.response_spans, strict=True):
        out[start:end] = torch.as_tensor(per_sample[i], dtype=torch.float32)
    return out
