"""The protocol of a weight push, shared by the sender (trainer) and receiver (engine worker).

A push is streamed: a manifest (every tensor's name and shape, known from the model's config before any tensor
exists) is checked against the receiver's model before any weight changes; then buckets, each produced, sent,
loaded into the model in place and freed before the next is produced; then a check that every manifest tensor
arrived. Each bucket travels with the sender's exact checksum of each tensor: the receiver recomputes them on
what arrived and refuses the bucket, before loading any of it, when one differs (the sender resends it once).
The receiver answers with its checksums, which the sender compares with its own.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait

import torch

from megatron_rl.rollout.base import SyncReport, WeightSyncError

Manifest = dict[str, tuple[int, ...]]
NamedTensors = list[tuple[str, torch.Tensor]]
Sender = Callable[[int, NamedTensors, dict[str, int]], list[dict[str, int]]]

log = logging.getLogger(__name__)

# Words in the receiver's refusal of a bucket whose bytes changed on the way: the one refusal worth a resend.
CORRUPTED = "arrived corrupted"


_FOLD = 1021  # positions are weighted by 2 * (word index mod _FOLD) + 1
_FOLD_WEIGHTS: dict[torch.device, torch.Tensor] = {}


def _weights(n: int, device: torch.device) -> torch.Tensor:
    w = _FOLD_WEIGHTS.get(device)
    if w is None:
        w = _FOLD_WEIGHTS[device] = torch.arange(_FOLD, dtype=torch.int64, device=device) * 2 + 1
    return w[:n]


def tensor_checksum(t: torch.Tensor) -> int:
    """Exact checksum of a tensor's bytes, position-weighted, computed on the tensor's own device.

    The bytes are read as 64-bit words; word i is weighted by the odd number 2 * (i mod 1021) + 1 and all are
    summed with int64 wrap-around (deterministic, so sender and receiver agree). An odd weight times any
    single-bit change is never 0 mod 2^64, so every one-bit difference shows. Folding the words into 1021
    columns first makes it one pass over memory (~0.05 s for 150 MB on 2 CPU cores).
    """
    flat = t.detach().reshape(-1)
    if not flat.is_contiguous() or (flat.storage_offset() * flat.element_size()) % 8:
        flat = flat.clone()  # int64 words need an 8-byte-aligned start
    data = flat.view(torch.uint8)
    words = data[: data.numel() // 8 * 8].view(torch.int64)
    rows = words.numel() // _FOLD
    total = torch.zeros((), dtype=torch.int64, device=data.device)
    if rows:
        total += (words[: rows * _FOLD].view(rows, _FOLD).sum(0) * _weights(_FOLD, data.device)).sum()
    rest = words[rows * _FOLD :]
    total += (rest * _weights(rest.numel(), data.device)).sum()
    tail = data[words.numel() * 8 :].to(torch.int64)  # the last < 8 bytes, weighted by their position
    total += (tail * _weights(tail.numel(), data.device)).sum() * 0x9E3779B1
    return int(total.item())


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


class WeightStream:
    """The tensors of one push: the manifest, known before the first bucket, and the buckets, produced one at a
    time (a bucket can be freed once it has been pushed). Each produced tensor is checked against the manifest
    on the sender's side too, so an exporter that disagrees with the config fails naming the tensor.

    `shard` = (tp_rank, tp): the tensors are not whole but TP rank tp_rank's parts of them, as a receiver
    worker of that TP rank in an engine of TP `tp` holds them (the receiver checks that it is one, and loads
    them without cutting); None: whole tensors, each worker cuts its own part."""

    def __init__(
        self,
        manifest: dict[str, Sequence[int]],
        buckets: Iterable[NamedTensors],
        shard: tuple[int, int] | None = None,
    ):
        self.manifest = {name: tuple(shape) for name, shape in manifest.items()}
        self._buckets = buckets
        self.shard = shard

    def __iter__(self) -> Iterator[NamedTensors]:
        produced: set[str] = set()
        for bucket in self._buckets:
            check_bucket(dict(bucket), self.manifest, produced)
            produced.update(name for name, _ in bucket)
            yield bucket
            del bucket  # not alive while the next one is produced
        check_complete(self.manifest, produced)

    def drain(self) -> None:
        """Produce and drop the rest of the buckets: after a failed push, the ranks that produce the stream
        together (a collective gather) must all reach its end."""
        for _ in self._buckets:
            pass


def as_stream(buckets: Iterable[NamedTensors] | WeightStream) -> WeightStream:
    """A WeightStream as it is, or a list of buckets with the manifest read from them."""
    if isinstance(buckets, WeightStream):
        return buckets
    buckets = list(buckets)
    return WeightStream({name: t.shape for bucket in buckets for name, t in bucket}, buckets)


def bucket_checksums(bucket: NamedTensors) -> dict[str, int]:
    return {name: tensor_checksum(t) for name, t in bucket}


class WeightPush:
    """The sender's side of one push to one engine: `begin`, `send` per bucket, `finish`; `abort` when the push
    cannot complete (the receiver then puts back what it had not loaded yet).

    `rpc(method, *args)` calls the engine's worker extension (first worker's answer); `send_bucket(slot,
    bucket, checksums)` moves one bucket with whichever transport and returns each worker's checksums;
    `worker_error` turns an error a worker raised (wrapped by vLLM, or by the connection to a remote engine)
    into the one to raise. `partial` says, after a failure, that the engine holds part of this push."""

    def __init__(self, rpc: Callable, send_bucket: Sender, transport: str, worker_error: Callable):
        self.rpc, self.send_bucket, self.transport, self.worker_error = (
            rpc,
            send_bucket,
            transport,
            worker_error,
        )
        self.received: dict[str, int] = {}
        self.bytes = 0
        self.buckets_loaded = 0
        self.partial: str | None = None
        self.start = time.perf_counter()
        self._sender: ThreadPoolExecutor | None = None
        self._in_flight: Future | None = None

    def _call(self, fn: Callable, *args):
        try:
            return fn(*args)
        except WeightSyncError:
            raise
        except Exception as e:
            raise self.worker_error(e) from None

    def begin(self, manifest: Manifest, shard: tuple[int, int] | None = None) -> None:
        self.start = time.perf_counter()
        args = ({name: list(shape) for name, shape in manifest.items()},)
        self._call(self.rpc, "mrl_begin_sync", *(args if shard is None else (*args, list(shard))))

    def send(self, bucket: NamedTensors, checksums: dict[str, int]) -> None:
        # One reusable transfer slot: sends run one after another, so a bucket is loaded before the next one
        # is packed.
        try:
            answers = self._call(self.send_bucket, 0, bucket, checksums)
        except WeightSyncError as e:
            if CORRUPTED not in str(e):
                raise
            log.warning("weight push: %s; sending the bucket again", e)
            answers = self._call(self.send_bucket, 0, bucket, checksums)
        for worker_checksums in answers:
            compare_checksums(checksums, worker_checksums)
            self.received.update(worker_checksums)
        self.bytes += sum(t.numel() * t.element_size() for _, t in bucket)
        self.buckets_loaded += 1

    def send_async(self, bucket: NamedTensors, checksums: dict[str, int]) -> Future:
        """`send` in this push's own thread, after the bucket before it (one request at a time per engine):
        the caller produces the next bucket meanwhile. The thread's work item holds the bucket only through a
        list that the send empties, so the bucket is released when the send returns, before its future is
        done: an executor's work item keeps its arguments until its thread next runs, by which time the caller
        may be producing the bucket after next."""
        if self._sender is None:
            self._sender = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mrl-weight-push")
        self._in_flight = self._sender.submit(self._send_taken, [bucket], checksums)
        return self._in_flight

    def _send_taken(self, box: list[NamedTensors], checksums: dict[str, int]) -> None:
        self.send(box.pop(), checksums)

    def _settle(self) -> None:
        """Wait for the bucket in flight (its error, if any, is someone else's to report) and end the thread."""
        if self._in_flight is not None:
            wait([self._in_flight])
            self._in_flight = None
        if self._sender is not None:
            self._sender.shutdown(wait=True)
            self._sender = None

    def finish(self) -> SyncReport:
        self._settle()
        finished = self._call(self.rpc, "mrl_finish_sync")
        return SyncReport(
            tensors=len(self.received),
            bytes=self.bytes,
            seconds=time.perf_counter() - self.start,
            checksums=self.received,
            transport=self.transport,
            reload_seconds=finished["reload_s"],
        )

    def abort(self, error: BaseException) -> None:
        """After `error`: the receiver restores every layer this push had not loaded; when some had been
        loaded, `partial` says so (the engine then holds a mix of old and new weights)."""
        self._settle()
        if self.buckets_loaded:
            self.partial = f"{self.buckets_loaded} bucket(s) of a failed weight push were loaded ({error})"
        try:
            self._call(self.rpc, "mrl_abort_sync")
        except Exception as e:  # the original error is the one to report
            log.warning("weight push: aborting on the engine failed too: %s", e)


def push_stream(
    pushes: Sequence[WeightPush], stream: WeightStream, pool: ThreadPoolExecutor | None = None
) -> list[SyncReport]:
    """One streamed push to every engine of `pushes`. Each bucket goes to all of them, each in its push's own
    thread, while this thread produces (exports) and checksums the next bucket; before that one is handed
    over, the one in flight must have been loaded by every engine. So at most two buckets of the stream are
    alive at a time, and producing overlaps sending and loading. `pool` runs the begin and finish calls of
    several engines concurrently."""

    def each(fn: Callable, *args) -> list:
        if pool is None or len(pushes) == 1:
            return [fn(p, *args) for p in pushes]
        return [f.result() for f in [pool.submit(fn, p, *args) for p in pushes]]

    try:
        each(WeightPush.begin, stream.manifest, stream.shard)
        in_flight: list[Future] = []
        for bucket in stream:
            checksums = bucket_checksums(bucket)
            for future in in_flight:
                future.result()
            in_flight = [push.send_async(bucket, checksums) for push in pushes]
            del bucket
        for future in in_flight:
            future.result()
        return each(WeightPush.finish)
    except BaseException as error:
        for push in pushes:
            push.abort(error)
        raise
