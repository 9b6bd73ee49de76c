"""Rollout engines on their own nodes (rollout.placement = "separate"): an engine server and its client.

The server (`megatron-rl serve-rollout --rendezvous DIR`) runs on an engine node. It listens on a free port,
writes DIR/engine_{INDEX}.json = {"host", "port", "pid", "index"} (DIR is on a filesystem the trainer sees) and
waits for one trainer. The trainer's `RemoteEngine` connects, sends the engine's options (the model directory
is prepared by the trainer, so the server learns it only then), and from then on uses it exactly like the
in-process `VLLMEngine`: generate, update_weights, sleep, wake_up, shutdown.

Wire protocol (`multiprocessing.connection`, pickled tuples, HMAC-authenticated with the engine key): each
request is (verb, args, kwargs), the first one ("start", (), engine_kwargs); each reply is ("ok", value) or
("error", exception type name, message). A failed request leaves the server up; the trainer disconnecting
without "shutdown" (it crashed) shuts the engine down and ends the server with exit code 1.

Weight pushes run on the trainer side with the same transports as in-process engines (transport.py), their
`call` forwarded to the engine's workers over the connection: "broadcast" (the default: trainer rank 0 and the
engine's workers form a gloo/NCCL group, rendezvous at `broadcast_host`, an address of the trainer that the
engine nodes reach) or "rpc" (safetensors bytes through the connection). Shared memory, CUDA IPC and in-process
handover need the engine on the trainer's host and are refused.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import secrets
import signal
import socket
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path

import torch

from megatron_rl.config import ConfigError, PlacementError
from megatron_rl.rollout.base import RolloutSample, SyncReport, WeightSyncError
from megatron_rl.rollout.transport import (
    BroadcastTransport,
    RpcTransport,
    Transport,
    close_all,
    resolve_transport,
)
from megatron_rl.rollout.vllm_engine import VLLMEngine, _worker_message, refuse_partial_weights
from megatron_rl.rollout.weight_sync import WeightPush, as_stream, push_stream

log = logging.getLogger(__name__)

# Errors an engine server reports by type and the client raises again as the same type (most specific first),
# so a config the remote engine refuses is still a one-line ConfigError at the trainer's CLI.
_RERAISED = (WeightSyncError, PlacementError, ConfigError, ValueError)

KEY_ENV = "MEGATRON_RL_ENGINE_KEY"
REMOTE_TRANSPORTS = ("broadcast", "rpc")
Address = tuple[str, int]


class RemoteEngineError(RuntimeError):
    """The engine server could not be reached, or failed in a way that is not a refused request."""


# ------------------------------------------------------------------------------------------ rendezvous
def engine_key(rendezvous_dir: str | os.PathLike) -> bytes:
    """The shared secret of the engine servers and the trainer: $MEGATRON_RL_ENGINE_KEY, else the file
    DIR/engine.key, created (mode 0600, random) by whichever side needs it first."""
    if os.environ.get(KEY_ENV):
        return os.environ[KEY_ENV].encode()
    path = Path(rendezvous_dir) / "engine.key"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        # Written in full under a private name, then linked into place: link fails if another process won
        # the race, and a reader never sees a half-written key. The name is private to this thread too
        # (connect_engines asks from one thread per engine).
        tmp = path.with_name(f".engine.key.{socket.gethostname()}.{os.getpid()}.{threading.get_native_id()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    return path.read_text().strip().encode()


def engine_file(rendezvous_dir: str | os.PathLike, index: int) -> Path:
    return Path(rendezvous_dir) / f"engine_{index}.json"


def _wait_for_engine_file(path: Path, deadline: float, wait_s: float) -> Address:
    while True:
        try:
            info = json.loads(path.read_text())
            return info["host"], int(info["port"])
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            pass
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"no rollout engine server after {wait_s:g} s: {path} was not written (start "
                f"`megatron-rl serve-rollout --rendezvous {path.parent} --index {path.stem.split('_')[-1]}` "
                "on the engine node, on a filesystem the trainer sees)"
            )
        time.sleep(0.2)


def _keepalive(conn: Connection) -> None:
    """TCP keepalive on a connection, so that a peer whose node died is noticed (~2 min), not waited on."""
    try:
        sock = socket.socket(fileno=os.dup(conn.fileno()))
    except OSError:
        return
    with sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for option, value in (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 15), ("TCP_KEEPCNT", 4)):
            if hasattr(socket, option):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


# ------------------------------------------------------------------------------------------ server
def serve(rendezvous_dir: str | os.PathLike, host: str | None = None, index: int | None = None) -> int:
    """Serve one engine to one trainer; returns the exit code (0 after "shutdown", 1 if the trainer left)."""
    if index is None:
        index = int(os.environ.get("SLURM_PROCID", "0"))
    # Without --host: listen on every interface and advertise the hostname, which the trainer resolves.
    listener = Listener((host or "0.0.0.0", 0), authkey=engine_key(rendezvous_dir))
    address = (host or socket.gethostname(), listener.address[1])
    path = engine_file(rendezvous_dir, index)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"host": address[0], "port": address[1], "pid": os.getpid(), "index": index}))
    os.replace(tmp, path)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    log.info("rollout engine %d listening on %s:%d (pid %d, %s)", index, *address, os.getpid(), path)

    engine, conn = None, None
    try:
        conn = _accept(listener)
        log.info("trainer connected from %s", _peer(conn))
        threading.Thread(target=_refuse_others, args=(listener, _peer(conn)), daemon=True).start()
        while True:
            try:
                verb, args, kwargs = conn.recv()
            except (EOFError, OSError) as e:
                return _trainer_gone(index, e, engine)
            try:
                if verb == "start":
                    if engine is not None:
                        raise RuntimeError("the engine was started already (one trainer per server)")
                    start = time.perf_counter()
                    # A process of its own: on the CPU, vLLM's engine core may run in it (VLLMEngine decides).
                    engine = VLLMEngine(*args, **{"in_process": True, **kwargs})
                    log.info("engine started in %.1f s: %s", time.perf_counter() - start, kwargs)
                    value = {"on_gpu": engine.on_gpu, "enable_sleep_mode": engine.enable_sleep_mode}
                elif verb == "shutdown":
                    if engine is not None:
                        engine, stopping = None, engine
                        stopping.shutdown()
                    value = None
                elif engine is None:
                    raise RuntimeError(f"request {verb!r} before the engine was started")
                else:
                    value = _dispatch(engine, verb, args, kwargs)
                reply = ("ok", value)
            except Exception as e:
                reply = error_reply(e)
                log.warning("request %r failed: %s", verb, reply[2].splitlines()[-1] if reply[2] else "")
            try:
                conn.send(reply)
            except OSError as e:
                return _trainer_gone(index, e, engine)
            if verb == "shutdown":
                log.info("rollout engine %d shut down on the trainer's request", index)
                return 0 if reply[0] == "ok" else 1
    finally:
        if engine is not None:
            engine.shutdown()
        for closable in (conn, listener):
            if closable is not None:
                closable.close()
        _remove_if_ours(path)


def error_reply(error: Exception) -> tuple[str, str, str]:
    """("error", kind, message) for a failed request: kind is the first of _RERAISED the error is an instance
    of (the client raises that type again), else its own type's name (the client raises RemoteEngineError)."""
    ours = next((c.__name__ for c in _RERAISED if isinstance(error, c)), None)
    kind = ours or type(error).__name__
    message = str(error) if kind == type(error).__name__ else f"{type(error).__name__}: {error}"
    return ("error", kind, message)


def _trainer_gone(index: int, error: BaseException, engine) -> int:
    log.error(
        "rollout engine %d: the trainer disconnected without shutdown (%s); %sexiting 1",
        index,
        type(error).__name__,
        "" if engine is None else "shutting the engine down and ",
    )
    return 1


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)  # through serve's `finally`, which shuts vLLM's processes down too


def _dispatch(engine, verb: str, args: tuple, kwargs: dict):
    if verb == "call":
        return engine._call(*args)
    if verb == "rpc":
        return engine._rpc(*args)
    if verb in ("generate", "sleep", "wake_up", "release_weight_buffers", "weight_transport_state"):
        return getattr(engine, verb)(*args, **kwargs)
    raise ValueError(f"unknown rollout engine request {verb!r}")


def _accept(listener: Listener) -> Connection:
    """The next authenticated connection; a client with the wrong key is logged and turned away."""
    while True:
        try:
            conn = listener.accept()
        except (AuthenticationError, EOFError, ConnectionError) as e:
            log.warning("refused a connection: %s (wrong engine key?)", e)
            continue
        _keepalive(conn)
        return conn


def _refuse_others(listener: Listener, trainer: str) -> None:
    """While one trainer is served, every further client gets an error reply instead of a silent hang."""
    while True:
        try:
            other = _accept(listener)
        except OSError:  # the listener was closed: the server is exiting
            return
        try:
            if other.poll(10):
                other.recv()
                other.send(
                    ("error", "RemoteEngineError", f"this engine already serves the trainer at {trainer}")
                )
        except (EOFError, OSError):
            pass
        finally:
            other.close()


def _peer(conn: Connection) -> str:
    try:
        with socket.socket(fileno=os.dup(conn.fileno())) as sock:
            host, port = sock.getpeername()[:2]
            return f"{host}:{port}"
    except OSError:
        return "?"


def _remove_if_ours(path: Path) -> None:
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


# ------------------------------------------------------------------------------------------ client
class RemoteEngine:
    """A `VLLMEngine` running in an engine server (`serve`) on another node, used the same way.

    `address_or_rendezvous`: the rendezvous directory the servers write to (engine `index` is waited for up to
    `wait_s` seconds), or a server's (host, port) / "host:port" (then the key comes from `authkey` or
    $MEGATRON_RL_ENGINE_KEY). `engine_kwargs` are VLLMEngine's (tensor_parallel_size, dtype, seed,
    max_model_len, gpu_memory_utilization, enable_sleep_mode, max_num_seqs, ...). `model_dir` must be the same
    path on both sides (a shared filesystem): the tokenizer is loaded from it here, the model there.

    `weight_transport`: "broadcast" ("auto") or "rpc". `broadcast_host`: where the engine's workers reach this
    process's TCPStore for the broadcast group (default: this machine's hostname; a loopback address is refused
    for an engine on another host)."""

    external_launcher = False

    def __init__(
        self,
        address_or_rendezvous: str | os.PathLike | Address,
        model_dir: str,
        *,
        index: int = 0,
        wait_s: float = 600.0,
        weight_transport: str = "auto",
        broadcast_host: str | None = None,
        authkey: bytes | None = None,
        **engine_kwargs,
    ):
        self.weight_transport = _remote_transport(weight_transport)
        self.broadcast_host, self.index = broadcast_host or socket.gethostname(), index
        self._transports: dict[str, Transport] = {}
        self._last_push: WeightPush | None = None
        self._lock = threading.Lock()  # one request on the wire at a time (broadcast calls from a thread)
        self._conn: Connection | None = None
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.address, self._conn = _connect(address_or_rendezvous, index, wait_s, authkey)
        try:
            if self.weight_transport == "broadcast":
                self._check_broadcast_host()  # before the engine's (long) start
            started = self._request(
                "start", model_dir=model_dir, weight_transport=self.weight_transport, **engine_kwargs
            )
        except BaseException:
            self._close()
            raise
        self.on_gpu, self.enable_sleep_mode = started["on_gpu"], started["enable_sleep_mode"]

    def __repr__(self) -> str:
        return f"RemoteEngine({self.address[0]}:{self.address[1]}, index={self.index})"

    # ----------------------------------------------------------------------------------------- wire
    def _request(self, verb: str, *args, **kwargs):
        where = f"{self.address[0]}:{self.address[1]}"
        with self._lock:
            if self._conn is None:
                raise RemoteEngineError(f"the connection to the rollout engine at {where} is closed")
            try:
                self._conn.send((verb, args, kwargs))
                reply = self._conn.recv()
            except (EOFError, OSError) as e:
                self._close()
                raise RemoteEngineError(
                    f"lost the rollout engine at {where} during {verb!r} ({type(e).__name__}: {e}); see the "
                    "engine server's log"
                ) from None
        if reply[0] == "ok":
            return reply[1]
        _, kind, message = reply
        reraised = {error.__name__: error for error in _RERAISED}
        if kind in reraised:
            raise reraised[kind](message)
        raise RemoteEngineError(f"rollout engine at {where} failed {verb!r}: {kind}: {message}")

    def _call(self, method: str, *args) -> list:
        """vLLM's collective_rpc on the engine's workers: one answer per worker (the transports' `call`)."""
        return self._request("call", method, *args)

    def _rpc(self, method: str, *args):
        return self._request("rpc", method, *args)

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # ----------------------------------------------------------------------------------------- sampling
    def generate(
        self,
        prompts: Sequence[str] | Sequence[Sequence[int]],
        n: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_tokens: int = 256,
        seed: int | None = None,
        index_offset: int = 0,
    ) -> list[RolloutSample]:
        refuse_partial_weights(self._last_push)
        prompts = [p if isinstance(p, str) else [int(t) for t in p] for p in prompts]
        return self._request(
            "generate", prompts, n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens,
            seed=seed, index_offset=index_offset,
        )  # fmt: skip

    # ----------------------------------------------------------------------------------------- weights
    def update_weights(
        self, buckets: Iterable[list[tuple[str, torch.Tensor]]], transport: str | None = None
    ) -> SyncReport:
        """As VLLMEngine.update_weights: manifest first, then each bucket verified by checksum and loaded."""
        return push_stream([self.start_push(transport)], as_stream(buckets))[0]

    def start_push(self, transport: str | None = None) -> WeightPush:
        kind = self.weight_transport if transport is None else _remote_transport(transport)
        self._last_push = WeightPush(self._rpc, self._transport(kind).send_bucket, kind, self._push_error)
        return self._last_push

    def _push_error(self, error: Exception) -> Exception:
        """A worker refused the push (WeightSyncError naming the tensor), unless the connection itself is gone."""
        if self._conn is None:
            return error
        return WeightSyncError(f"{_worker_message(error)} (rollout engine at {self.address[0]})")

    def _transport(self, name: str) -> Transport:
        if name not in self._transports:
            if name == "rpc":
                self._transports[name] = RpcTransport(self._call)
            else:
                self._check_broadcast_host()
                if self.on_gpu != torch.cuda.is_available():
                    raise PlacementError(
                        "config key 'rollout.weight_transport': 'broadcast' needs the trainer and the engine on "
                        f"the same kind of device (trainer {'GPU' if torch.cuda.is_available() else 'CPU'}, "
                        f"engine {'GPU' if self.on_gpu else 'CPU'}); use 'rpc'"
                    )
                device = (
                    torch.device("cuda", torch.cuda.current_device()) if self.on_gpu else torch.device("cpu")
                )
                self._transports[name] = BroadcastTransport(self._call, device, self.broadcast_host)
        return self._transports[name]

    def _check_broadcast_host(self) -> None:
        """The engine's workers connect to `broadcast_host`: a loopback address reaches only this machine."""
        local = {"localhost", socket.gethostname(), socket.getfqdn()}
        if _is_loopback(self.broadcast_host) and not (
            _is_loopback(self.address[0]) or self.address[0] in local
        ):
            raise PlacementError(
                f"config key 'rollout.broadcast_host': {self.broadcast_host!r} is this machine's loopback "
                f"address, which the engine at {self.address[0]} cannot reach; give an address of the trainer's "
                "node that the engine nodes reach (its hostname or interface IP), or use weight_transport='rpc'"
            )

    def release_weight_buffers(self) -> None:
        """Free every transport's buffers and groups on both sides (re-created by the next push)."""
        close_all(self._transports.values())

    def weight_transport_state(self) -> dict:
        return {
            "sender": {name: t.state() for name, t in self._transports.items()},
            "workers": self._request("weight_transport_state")["workers"],
        }

    # ----------------------------------------------------------------------------------------- memory
    def sleep(self) -> None:
        if self.enable_sleep_mode:
            self.release_weight_buffers()  # the workers' receive buffers would hold GPU memory
        self._request("sleep")

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        self._request("wake_up", None if tags is None else list(tags))

    def shutdown(self) -> None:
        """Shut the engine and its server down (the server exits 0); safe to call twice."""
        if self._conn is None:
            return
        try:
            self.release_weight_buffers()
        except (WeightSyncError, RemoteEngineError) as e:
            log.warning("%s", e)
        try:
            self._request("shutdown")
        except RemoteEngineError as e:
            log.warning("%s", e)
        finally:
            self._close()
        for transport in self._transports.values():
            pool = getattr(transport, "pool", None)
            if pool is not None:
                pool.shutdown(wait=False)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name: not resolved here (a hostname may map to 127.0.1.1 locally only)
        return False


def _remote_transport(name: str) -> str:
    if name in ("shm", "ipc", "local"):
        raise ConfigError(
            f"config key 'rollout.weight_transport': {name!r} shares the trainer's memory with the engine, but a "
            "remote engine (rollout.placement='separate') runs on another host; use 'broadcast' (or 'auto') "
            "or 'rpc'"
        )
    resolve_transport(name, on_gpu=False)  # refuses unknown names, listing the valid ones
    return "broadcast" if name == "auto" else name


def _connect(
    target: str | os.PathLike | Address, index: int, wait_s: float, authkey: bytes | None
) -> tuple[Address, Connection]:
    """Connect and authenticate, waiting up to `wait_s` for the server's file and for its port to open (a
    file left by an earlier server is re-read until the new one replaces it)."""
    deadline = time.monotonic() + wait_s
    path = None
    if isinstance(target, tuple):
        address = (target[0], int(target[1]))
    elif (m := re.fullmatch(r"([^/:]+):(\d+)", str(target))) and not os.path.isdir(target):
        address = (m.group(1), int(m.group(2)))
    else:
        path = engine_file(target, index)
    if authkey is None:
        if path is None and not os.environ.get(KEY_ENV):
            raise ValueError(f"connecting to an engine by address needs `authkey` or ${KEY_ENV}")
        authkey = engine_key(target) if path is not None else os.environ[KEY_ENV].encode()
    retried = False
    while True:
        if path is not None:
            address = _wait_for_engine_file(path, deadline, wait_s)
        where = f"{address[0]}:{address[1]}" + (f" (from {path})" if path is not None else "")
        try:
            conn = Client(address, authkey=authkey)
        except AuthenticationError:
            raise RemoteEngineError(
                f"the rollout engine at {where} refused this trainer's key: the two sides must share "
                f"${KEY_ENV} or the rendezvous directory's engine.key"
            ) from None
        except OSError as e:
            if time.monotonic() < deadline:
                if not retried:
                    log.info(
                        "rollout engine at %s: %s; retrying for up to %g s", where, e.strerror or e, wait_s
                    )
                    retried = True
                time.sleep(0.5)
                continue
            raise RemoteEngineError(
                f"cannot connect to the rollout engine at {where} within {wait_s:g} s: {e.strerror or e}"
            ) from None
        _keepalive(conn)
        return address, conn


def connect_engines(
    rendezvous_dir: str | os.PathLike, count: int, model_dir: str, *, wait_s: float = 600.0, **engine_kwargs
) -> list[RemoteEngine]:
    """Engines 0..count-1 of a rendezvous directory, each started with the same options (concurrently: a vLLM
    start takes a while). If any fails, the others are shut down and the first error is raised."""
    # Imported here, before the threads: transformers' lazy imports are not thread-safe (two threads importing
    # AutoTokenizer at once can fail with "cannot import name 'AutoTokenizer' from 'transformers'").
    from transformers import AutoTokenizer  # noqa: F401

    with ThreadPoolExecutor(max_workers=max(1, count), thread_name_prefix="mrl-engine-start") as pool:
        futures = [
            pool.submit(
                RemoteEngine, rendezvous_dir, model_dir, index=i, wait_s=wait_s, **engine_kwargs
            )  # fmt: skip
            for i in range(count)
        ]
        errors = [f.exception() for f in futures]
    if any(errors):
        for future, error in zip(futures, errors, strict=True):
            if error is None:
                future.result().shutdown()
        raise next(e for e in errors if e is not None)
    return [f.result() for f in futures]
