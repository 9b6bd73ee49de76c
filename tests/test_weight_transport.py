"""Weight-push transports without vLLM: the flat layout, checksums, shared buffers across real processes, the
separate broadcast group. (The transports inside a running vLLM engine: tests/test_vllm_engine.py.)"""

from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_rl.rollout import WeightSyncError
from megatron_rl.rollout.transport import (
    ALIGN,
    SHM_PREFIX,
    SharedBuffer,
    flat_layout,
    join_weight_group,
    open_shared,
    pack,
    resolve_transport,
    unpack,
)
from megatron_rl.rollout.weight_sync import tensor_checksum
from tests.distributed_helpers import run_distributed


def _bucket() -> list[tuple[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [
        ("a.weight", torch.randn(7, 5, generator=gen)),
        ("b.bias", torch.randn(3, generator=gen).to(torch.bfloat16)),  # 6 bytes: the next offset must realign
        ("c.index", torch.arange(5, dtype=torch.int64)),
        ("d.empty", torch.zeros(0, 4)),
        ("e.scalar", torch.tensor(2.5)),
        ("f.transposed", torch.randn(4, 6, generator=gen).t()),  # not contiguous: pack copies it in order
    ]


def _maps(pid: int | str = "self") -> str:
    with open(f"/proc/{pid}/maps") as f:
        return f.read()


def test_layout_round_trip_is_bit_exact_views():
    bucket = _bucket()
    specs, nbytes = flat_layout(bucket)
    assert all(offset % ALIGN == 0 for _, _, _, offset, _ in specs)
    assert nbytes % ALIGN == 0 and nbytes >= sum(t.numel() * t.element_size() for _, t in bucket)
    buffer = torch.zeros(nbytes, dtype=torch.uint8)
    pack(bucket, specs, buffer)
    views = unpack(buffer, specs)
    assert list(views) == [name for name, _ in bucket]
    for name, t in bucket:
        assert views[name].dtype == t.dtype and views[name].shape == t.shape
        assert torch.equal(views[name], t), name
        assert tensor_checksum(views[name]) == tensor_checksum(t), name
    buffer.zero_()  # views, not copies
    assert not views["a.weight"].any()


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda s: s[0].__setitem__(3, s[-1][3] + 10_000), "tensor 'a.weight' (float32 [7, 5], 140 bytes"),
        (lambda s: s[2].__setitem__(4, 8), "tensor 'c.index' (int64 [5], 8 bytes"),
        (lambda s: s[0].__setitem__(3, 2), "tensor 'a.weight'"),  # offset not a multiple of 4
        (lambda s: s[1].__setitem__(0, "a.weight"), "tensor 'a.weight' arrived twice"),
        (lambda s: s[0].__setitem__(1, "complex_thing"), "unknown dtype 'complex_thing'"),
    ],
    ids=["out-of-bounds", "wrong-size", "misaligned", "duplicate", "dtype"],
)
def test_unpack_refuses_a_bad_layout_naming_the_tensor(edit, message):
    bucket = _bucket()
    specs, nbytes = flat_layout(bucket)
    buffer = torch.zeros(nbytes, dtype=torch.uint8)
    edit(specs)
    with pytest.raises(WeightSyncError, match=message.replace("[", r"\[").replace("(", r"\(")):
        unpack(buffer, specs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8], ids=str)
@pytest.mark.parametrize("numel", [1, 127, 1021 * 8 + 3, 40_000])
def test_checksum_sees_every_single_bit_flip(dtype, numel):
    t = (torch.randn(numel, generator=torch.Generator().manual_seed(numel)) * 50).to(dtype)
    value = tensor_checksum(t)
    assert tensor_checksum(t.clone()) == value
    nbytes = numel * t.element_size()
    for byte in {0, nbytes // 2, nbytes - 1, max(0, nbytes - 9)}:
        for bit in (0, 7):
            flipped = t.clone()
            flipped.view(torch.uint8)[byte] ^= 1 << bit
            assert tensor_checksum(flipped) != value, (byte, bit)


def test_checksum_of_views_equals_that_of_copies():
    base = torch.randn(1001)
    assert tensor_checksum(base[1:]) == tensor_checksum(base[1:].clone())  # start not 8-byte aligned
    grid = torch.randn(30, 40)
    assert tensor_checksum(grid.t()) == tensor_checksum(grid.t().contiguous())
    assert tensor_checksum(grid) != tensor_checksum(grid.t().contiguous())  # position matters


def test_a_sent_bucket_is_released_before_its_send_completes():
    """WeightPush.send_async: nothing references the bucket once its send has returned, when its future
    completes. (The caller is producing the bucket after next by then; an executor's work item would keep its
    arguments until its thread next ran, a third bucket alive for a while.)"""
    import threading
    import weakref

    from megatron_rl.rollout.weight_sync import WeightPush

    registered = threading.Event()

    def send_bucket(slot, bucket, checksums):
        registered.wait(timeout=30)
        return [checksums]

    push = WeightPush(lambda *args: None, send_bucket, "test", lambda e: e)
    bucket = _bucket()
    refs = [weakref.ref(t) for _, t in bucket]
    alive_when_done: list[int] = []
    future = push.send_async(bucket, {name: tensor_checksum(t) for name, t in bucket})
    del bucket
    # Runs in the push's thread as the future completes (it is not done before `registered` is set).
    future.add_done_callback(lambda _: alive_when_done.append(sum(r() is not None for r in refs)))
    registered.set()
    future.result(timeout=30)
    push._settle()
    assert alive_when_done == [0]


def test_transport_names():
    assert resolve_transport("auto", on_gpu=False) == "shm"
    assert resolve_transport("auto", on_gpu=True) == "ipc"
    assert resolve_transport("broadcast", on_gpu=False) == "broadcast"
    with pytest.raises(ValueError, match="needs a GPU; on the CPU use 'shm'"):
        resolve_transport("ipc", on_gpu=False)
    with pytest.raises(ValueError, match="weight_transport must be one of auto, shm, ipc, broadcast, rpc"):
        resolve_transport("nccl", on_gpu=True)


def _read_shared(handle, specs, expected, out) -> None:
    views = unpack(open_shared(handle), specs)
    out.put({name: tensor_checksum(t) for name, t in views.items()} == expected)
    views["a.weight"].fill_(7.0)  # the sender sees writes: one memory, two mappings


def test_shared_buffer_crosses_processes_and_leaves_nothing_behind():
    bucket = _bucket()
    specs, nbytes = flat_layout(bucket)
    buf = SharedBuffer(nbytes, torch.device("cpu"))
    path = buf.path
    assert path.startswith("/dev/shm/") and os.path.exists(path)
    pack(bucket, specs, buf.tensor)
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    child = ctx.Process(
        target=_read_shared, args=(buf.handle, specs, {n: tensor_checksum(t) for n, t in bucket}, out)
    )
    child.start()
    child.join(60)
    assert child.exitcode == 0 and out.get() is True
    assert torch.equal(unpack(buf.tensor, specs)["a.weight"], torch.full((7, 5), 7.0))

    buf.unlink()  # what the sender does once the workers have mapped it: the memory stays, the file goes
    assert not os.path.exists(path) and path in _maps()
    assert torch.equal(unpack(buf.tensor, specs)["c.index"], torch.arange(5))
    with pytest.raises(WeightSyncError, match="is gone"):
        open_shared(buf.handle)
    buf.close()
    assert path not in _maps()  # the last mapping went with the tensor


def _broadcast_beside_default_group(rank: int, world: int, port: int) -> None:
    dist.init_process_group("gloo", rank=rank, world_size=world)  # the trainer's own group, as in training
    timeout = datetime.timedelta(seconds=60)
    store = dist.TCPStore("127.0.0.1", port, world, is_master=rank == 0, timeout=timeout)
    group = join_weight_group(store, rank, world, torch.device("cpu"), 60)
    bucket = _bucket()
    specs, nbytes = flat_layout(bucket)
    buffer = torch.zeros(nbytes, dtype=torch.uint8)
    if rank == 0:
        pack(bucket, specs, buffer)
    group.broadcast([buffer], dist.BroadcastOptions()).wait()
    received = unpack(buffer, specs)
    assert all(torch.equal(received[n], t) for n, t in bucket)
    dist.all_reduce(ones := torch.ones(1))  # the default group is untouched by the weight group
    assert ones.item() == world
    dist.destroy_process_group()


def test_weight_group_broadcasts_beside_the_default_group():
    from megatron_rl.distributed import free_port

    run_distributed(_broadcast_beside_default_group, 2, free_port())


def _read_cuda(handle, specs, expected, out) -> None:
    views = unpack(open_shared(handle), specs)
    out.put({name: tensor_checksum(t) for name, t in views.items()} == expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_ipc_buffer_crosses_processes():
    bucket = [(n, t.cuda()) for n, t in _bucket()]
    specs, nbytes = flat_layout(bucket)
    buf = SharedBuffer(nbytes, torch.device("cuda", torch.cuda.current_device()))
    assert buf.handle["kind"] == "cuda_ipc" and buf.path is None
    pack(bucket, specs, buf.tensor)
    torch.cuda.synchronize()
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    child = ctx.Process(
        target=_read_cuda, args=(buf.handle, specs, {n: tensor_checksum(t) for n, t in bucket}, out)
    )
    child.start()
    child.join(120)
    assert child.exitcode == 0 and out.get() is True
    buf.close()
    torch.cuda.ipc_collect()


def _nccl_broadcast(rank: int, world: int, port: int) -> None:
    store = dist.TCPStore("127.0.0.1", port, world, is_master=rank == 0)
    device = torch.device("cuda", rank)
    group = join_weight_group(store, rank, world, device, 60)
    bucket = [(n, t.to(device)) for n, t in _bucket()]
    specs, nbytes = flat_layout(bucket)
    buffer = torch.zeros(nbytes, dtype=torch.uint8, device=device)
    if rank == 0:
        pack(bucket, specs, buffer)
    group.broadcast([buffer], dist.BroadcastOptions()).wait()
    torch.cuda.synchronize(device)
    received = unpack(buffer, specs)
    assert all(torch.equal(received[n], t) for n, t in bucket)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs one GPU per rank: 2 GPUs")
def test_nccl_weight_group_broadcast():
    from megatron_rl.distributed import free_port

    run_distributed(_nccl_broadcast, 2, free_port())


def test_shared_memory_too_small_is_a_clear_error():
    """A full /dev/shm (Docker gives 64 MB by default) is refused up front, not a SIGBUS on the first write."""
    with pytest.raises(
        WeightSyncError, match=r"no room for a .* weight buffer in /dev/shm .*'broadcast' or 'rpc'"
    ):
        SharedBuffer(1 << 50, torch.device("cpu"))  # 1 PB
    assert not [
        f for f in os.listdir("/dev/shm") if f.startswith(f"{SHM_PREFIX}{os.getpid()}-")
    ]  # no file left
