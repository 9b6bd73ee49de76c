"""How a weight push's bytes travel from the trainer to the vLLM workers.

A push is the same on every transport (weight_sync.py): the manifest is checked first (`mrl_begin_sync`), then
each bucket travels with the sender's checksums, is verified and loaded into the model by the worker, which
answers with its own checksums; `mrl_finish_sync` ends it. What differs is how a bucket's bytes get to the
worker:

- ``shm`` (colocated, CPU): the bucket is packed into one flat buffer in host shared memory (a file under
  /dev/shm, mapped by both sides); only a handle (path, size) and the layout go through `collective_rpc`.
  The worker maps the buffer once and reads the tensors in place as views.
- ``ipc`` (colocated, GPU): the same, with the flat buffer a CUDA allocation shared by a CUDA IPC handle
  (torch's `reduce_tensor` of a CUDA tensor), opened by the worker on the GPU with the same UUID.
- ``broadcast`` (engine not colocated with the trainer's memory): the trainer's rank 0 and the engine's
  workers form their own process group (gloo on CPU, NCCL on GPU) from a TCPStore, separate from the
  trainer's default group; rank 0 broadcasts each packed bucket into the workers' receive buffers.
- ``rpc``: the bucket's tensors serialised to safetensors bytes and sent through `collective_rpc` (the
  fallback; every byte is pickled through the engine's RPC pipe).

``auto`` picks ``ipc`` on GPU and ``shm`` on CPU: `VLLMEngine` runs its engine on the trainer's own host.

Shared buffers are per slot and reused by every bucket and every push (no allocation, no page faults after
the first bucket); a push uses one slot, since each bucket is loaded before the next is packed. A shared-memory file exists only until the workers have mapped it: the sender unlinks it as soon as the
first load returns, so nothing is left in /dev/shm even if a process dies; the memory goes when both sides
drop their mappings (`close`). This module holds both halves of each transport (the worker extension calls the
receiving ones) and does not import vllm.
"""

from __future__ import annotations

import datetime
import math
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch
import torch.distributed as dist

from megatron_rl.config import ConfigError, PlacementError
from megatron_rl.rollout.base import WeightSyncError

TRANSPORTS = ("auto", "shm", "ipc", "broadcast", "rpc", "local")
ALIGN = 256  # byte offset of every tensor in a flat buffer: any dtype can view it, CUDA likes it
SHM_PREFIX = "mrl-weights-"
GROUP_PREFIX = "megatron_rl_weight_sync"

# One layout entry per tensor: [name, dtype name, shape, byte offset, byte count]. Plain lists, so that
# vLLM's msgpack RPC carries them as they are.
Spec = list
NamedTensors = Sequence[tuple[str, torch.Tensor]]
Call = Callable[..., list]  # call(method, *args) -> one result per vLLM worker


def resolve_transport(name: str, on_gpu: bool) -> str:
    """The concrete transport for a requested name; a ConfigError names the valid choices."""
    if name not in TRANSPORTS:
        raise ConfigError(f"weight_transport must be one of {', '.join(TRANSPORTS)}, not {name!r}")
    if name == "auto":
        return "ipc" if on_gpu else "shm"
    if name == "ipc" and not on_gpu:
        raise PlacementError(
            "weight_transport='ipc' shares CUDA memory and needs a GPU; on the CPU use 'shm'"
        )
    return name


# ------------------------------------------------------------------------------------------ flat layout
def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise WeightSyncError(f"unknown dtype '{name}' in a weight push layout")
    return dtype


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def flat_layout(bucket: NamedTensors) -> tuple[list[Spec], int]:
    """Where each tensor of a bucket sits in one flat byte buffer, and the buffer's size."""
    specs, offset = [], 0
    for name, t in bucket:
        nbytes = t.numel() * t.element_size()
        specs.append([name, str(t.dtype).removeprefix("torch."), list(t.shape), offset, nbytes])
        offset = _align(offset + nbytes)
    return specs, offset


def pack(bucket: NamedTensors, specs: list[Spec], buffer: torch.Tensor) -> None:
    """Copy the bucket's tensors into `buffer` (uint8) at their layout offsets (from any device)."""
    for (_, t), (_, _, shape, offset, nbytes) in zip(bucket, specs, strict=True):
        buffer[offset : offset + nbytes].view(t.dtype).view(shape).copy_(t.detach())


def unpack(buffer: torch.Tensor, specs: list[Spec]) -> dict[str, torch.Tensor]:
    """The tensors of a flat buffer as views (no copy); a layout entry that does not fit is an error naming
    the tensor."""
    out: dict[str, torch.Tensor] = {}
    for name, dtype_name, shape, offset, nbytes in specs:
        dtype = _dtype(dtype_name)
        expected = math.prod(shape) * dtype.itemsize
        if nbytes != expected or offset < 0 or offset % dtype.itemsize or offset + nbytes > buffer.numel():
            raise WeightSyncError(
                f"tensor '{name}' ({dtype_name} {list(shape)}, {nbytes} bytes at offset {offset}) does not fit "
                f"the {buffer.numel()}-byte transfer buffer"
            )
        if name in out:
            raise WeightSyncError(f"tensor '{name}' arrived twice in one bucket")
        out[name] = buffer[offset : offset + nbytes].view(dtype).view(shape)
    return out


# ------------------------------------------------------------------------------------------ shared buffers
def shm_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


class SharedBuffer:
    """One flat byte buffer that the engine's workers can map: host shared memory or a CUDA allocation."""

    def __init__(self, nbytes: int, device: torch.device):
        self.id = uuid.uuid4().hex
        self.nbytes = nbytes
        self.path: str | None = None
        if device.type == "cuda":
            self.tensor = torch.empty(nbytes, dtype=torch.uint8, device=device)
            self.handle = {
                "kind": "cuda_ipc",
                "id": self.id,
                "nbytes": nbytes,
                **_cuda_ipc_handle(self.tensor),
            }
        else:
            self.path = os.path.join(shm_dir(), f"{SHM_PREFIX}{os.getpid()}-{self.id}")
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                # Reserve the pages now: on a full tmpfs a write into a merely truncated file is a SIGBUS.
                os.posix_fallocate(fd, 0, max(nbytes, 1))
            except OSError as e:
                os.close(fd)
                os.unlink(self.path)
                raise WeightSyncError(
                    f"no room for a {nbytes / 1e6:.1f} MB weight buffer in {shm_dir()} ({e.strerror}): enlarge it "
                    "(docker run --shm-size) or use weight_transport='broadcast' or 'rpc'"
                ) from None
            os.close(fd)
            self.tensor = torch.from_file(self.path, shared=True, size=max(nbytes, 1), dtype=torch.uint8)
            self.handle = {"kind": "shm", "id": self.id, "nbytes": nbytes, "path": self.path}

    def unlink(self) -> None:
        """Remove the shared-memory file once the workers hold their mappings (the memory stays mapped)."""
        if self.path is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            self.path = None

    def close(self) -> None:
        self.unlink()
        self.tensor = None


_CUDA_IPC_FIELDS = (
    "tensor_cls", "size", "stride", "offset", "storage_cls", "dtype", "device", "storage_handle",
    "storage_size_bytes", "storage_offset_bytes", "requires_grad", "ref_counter_handle", "ref_counter_offset",
    "event_handle", "event_sync_required",
)  # fmt: skip


def _cuda_ipc_handle(tensor: torch.Tensor) -> dict:
    """torch's CUDA IPC export of `tensor`, as plain msgpack-friendly fields (see `open_shared`)."""
    from torch.multiprocessing.reductions import reduce_tensor

    _, args = reduce_tensor(tensor)
    # rebuild_cuda_tensor's arguments, less the classes and dtype (always Tensor, TypedStorage, uint8).
    fields = dict(zip(_CUDA_IPC_FIELDS, args, strict=True))
    for unused in ("tensor_cls", "storage_cls", "dtype", "requires_grad"):
        del fields[unused]
    fields["size"], fields["stride"] = list(fields["size"]), list(fields["stride"])
    fields["gpu_uuid"] = str(torch.cuda.get_device_properties(fields.pop("device")).uuid)
    return fields


def open_shared(handle: dict) -> torch.Tensor:
    """Receiver side: map a `SharedBuffer` from its handle (a uint8 tensor over the sender's memory)."""
    if handle["kind"] == "shm":
        path = handle["path"]
        if not os.path.exists(path):
            raise WeightSyncError(f"shared weight buffer {path} is gone (the sender released it)")
        return torch.from_file(path, shared=True, size=max(handle["nbytes"], 1), dtype=torch.uint8)
    if handle["kind"] == "cuda_ipc":
        from torch.multiprocessing.reductions import rebuild_cuda_tensor

        uuids = [str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())]
        local = [i for i, u in enumerate(uuids) if u == handle["gpu_uuid"]]
        if not local:
            raise WeightSyncError(
                f"the trainer's GPU {handle['gpu_uuid']} is not visible to this vLLM worker, so CUDA IPC cannot "
                "reach it: use weight_transport='broadcast'"
            )
        return rebuild_cuda_tensor(
            torch.Tensor,
            torch.Size(handle["size"]),
            tuple(handle["stride"]),
            handle["offset"],
            torch.storage.TypedStorage,
            torch.uint8,
            local[0],
            handle["storage_handle"],
            handle["storage_size_bytes"],
            handle["storage_offset_bytes"],
            False,
            handle["ref_counter_handle"],
            handle["ref_counter_offset"],
            handle["event_handle"],
            handle["event_sync_required"],
        )
    raise WeightSyncError(f"unknown shared buffer kind {handle['kind']!r}")


# ------------------------------------------------------------------------------------------ broadcast group
def join_weight_group(
    store: dist.Store, rank: int, world_size: int, device: torch.device, timeout_s: float
) -> dist.ProcessGroup:
    """A process group of its own (not torch.distributed's default one, which the trainer and vLLM each
    already use): gloo on CPU, NCCL on GPU, the one place where the choice is made."""
    store = dist.PrefixStore(GROUP_PREFIX, store)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        return dist.ProcessGroupNCCL(store, rank, world_size)
    return dist.ProcessGroupGloo(store, rank, world_size, datetime.timedelta(seconds=timeout_s))


def broadcast_from_trainer(group: dist.ProcessGroup, tensor: torch.Tensor) -> dist.Work:
    """Rank 0 (the trainer) sends, every worker receives into `tensor`; returns the pending work."""
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    return group.broadcast([tensor], opts)


# ------------------------------------------------------------------------------------------ senders
class Transport:
    """Trainer side of one transport: `send_bucket` moves one bucket and returns each worker's checksums."""

    name = ""

    def __init__(self, call: Call):
        self.call = call

    def send_bucket(self, slot: int, bucket: NamedTensors, checksums: dict[str, int]) -> list[dict[str, int]]:
        """Move `bucket` through buffer `slot`; each worker verifies it against the sender's `checksums`
        before loading it, and answers with its own."""
        raise NotImplementedError

    def state(self) -> dict:
        return {"transport": self.name}

    def close(self) -> None:
        """Release buffers and groups on both sides; the transport can be used again afterwards."""


def close_all(transports: Iterable[Transport], describe: Callable[[Exception], str] = str) -> None:
    """Close every transport, the others too when one fails; then raise the first failure as a WeightSyncError
    (`describe` turns it into the message, e.g. unwrapping a vLLM worker's error)."""
    errors = []
    for transport in transports:
        try:
            transport.close()
        except Exception as e:  # keep releasing the others
            errors.append(e)
    if errors:
        raise WeightSyncError(f"releasing weight-push buffers failed: {describe(errors[0])}")


class RpcTransport(Transport):
    """Safetensors bytes through `collective_rpc`: simple, and every byte goes through the RPC pipe."""

    name = "rpc"

    def send_bucket(self, slot: int, bucket: NamedTensors, checksums: dict[str, int]) -> list[dict[str, int]]:
        from safetensors.torch import save

        payload = save({n: t.detach().to("cpu").contiguous() for n, t in bucket})
        return self.call("mrl_load_bucket", payload, checksums)


class LocalTransport(Transport):
    """The engine's worker lives in the trainer's process (vLLM's external launcher): `collective_rpc` calls
    it directly, so the tensors themselves are handed over, nothing copied or serialized."""

    name = "local"

    def send_bucket(self, slot: int, bucket: NamedTensors, checksums: dict[str, int]) -> list[dict[str, int]]:
        return self.call("mrl_load_local", [(n, t.detach()) for n, t in bucket], checksums)


class SharedTransport(Transport):
    """Colocated engines: each bucket packed into a flat shared buffer; only its handle and layout are sent."""

    def __init__(self, call: Call, device: torch.device):
        super().__init__(call)
        self.device = device
        self.name = "ipc" if device.type == "cuda" else "shm"
        self.buffers: dict[int, SharedBuffer] = {}

    def send_bucket(self, slot: int, bucket: NamedTensors, checksums: dict[str, int]) -> list[dict[str, int]]:
        specs, nbytes = flat_layout(bucket)
        buf = self.buffers.get(slot)
        if buf is None or buf.nbytes < nbytes:
            if buf is not None:  # a bucket outgrew its slot: both sides drop the old buffer
                self._release([slot])
            buf = self.buffers[slot] = SharedBuffer(nbytes, self.device)
        pack(bucket, specs, buf.tensor)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # the worker reads it from another process
        try:
            return self.call("mrl_load_shared", buf.handle, specs, checksums)
        except BaseException:
            try:  # a worker may or may not have mapped it: start the slot afresh next time
                self._release([slot])
            except Exception:
                pass
            raise
        finally:
            buf.unlink()  # every worker has mapped it (or failed): no file is left behind

    def _release(self, slots: Sequence[int]) -> None:
        bufs = [self.buffers.pop(s) for s in slots if s in self.buffers]
        if not bufs:
            return
        try:
            self.call("mrl_release_buffers", [b.id for b in bufs])
        finally:
            for b in bufs:
                b.close()
            if self.device.type == "cuda":
                torch.cuda.ipc_collect()

    def state(self) -> dict:
        return {
            "transport": self.name,
            "buffers": len(self.buffers),
            "bytes": sum(b.nbytes for b in self.buffers.values()),
            "files": [b.path for b in self.buffers.values() if b.path is not None],
        }

    def close(self) -> None:
        self._release(list(self.buffers))


class BroadcastTransport(Transport):
    """Engines that cannot map the trainer's memory: a gloo/NCCL group of trainer rank 0 and the workers."""

    name = "broadcast"

    def __init__(self, call: Call, device: torch.device, host: str = "127.0.0.1", timeout_s: float = 300.0):
        super().__init__(call)
        self.device, self.host, self.timeout_s = device, host, timeout_s
        self.group: dist.ProcessGroup | None = None
        self.store: dist.TCPStore | None = None
        self.buffer: torch.Tensor | None = (
            None  # one send buffer: a bucket is on the wire before the next packs
        )
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mrl-weight-rpc")
        self.abandoned: list = []

    def _connect(self) -> None:
        workers = len(self.call("mrl_worker_rank"))
        world = 1 + workers
        timeout = datetime.timedelta(seconds=self.timeout_s)
        self.store = dist.TCPStore(
            self.host, 0, world, is_master=True, wait_for_workers=False, timeout=timeout
        )
        # The workers join inside an RPC while this thread joins here: both sides must be in the rendezvous.
        joined = self.pool.submit(
            self.call, "mrl_join_broadcast", self.host, self.store.port, world, self.timeout_s
        )
        try:
            self.group = join_weight_group(self.store, 0, world, self.device, self.timeout_s)
        except BaseException:
            joined.cancel()
            raise
        joined.result()

    def send_bucket(self, slot: int, bucket: NamedTensors, checksums: dict[str, int]) -> list[dict[str, int]]:
        if self.group is None:
            self._connect()
        specs, nbytes = flat_layout(bucket)
        if self.buffer is None or self.buffer.numel() < nbytes:
            self.buffer = None
            self.buffer = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        pack(bucket, specs, self.buffer)
        received = self.pool.submit(self.call, "mrl_recv_bucket", slot, nbytes, specs, checksums)
        if nbytes:
            self._wait(broadcast_from_trainer(self.group, self.buffer[:nbytes]), received)
        return received.result()

    def _wait(self, work: dist.Work, received: Future) -> None:
        """Wait for the broadcast, but give up at once if the workers' side failed (they will not join it)."""
        while not work.is_completed():
            if received.done() and received.exception() is not None:
                # The group has a broadcast that will never finish; keep it alive rather than block tearing it
                # down, and connect afresh on the next push.
                self.abandoned.append((self.group, work))
                self.group = None
                raise received.exception()
            time.sleep(0.0005)
        work.wait()

    def state(self) -> dict:
        return {
            "transport": self.name,
            "connected": self.group is not None,
            "bytes": 0 if self.buffer is None else self.buffer.numel(),
        }

    def close(self) -> None:
        if self.group is not None:
            try:
                self.call("mrl_leave_broadcast")
            finally:
                self.group = self.store = None
        self.buffer = None
