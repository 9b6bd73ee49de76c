"""Methods injected into each vLLM worker (`worker_extension_cls`) to receive and verify weight pushes.

Runs inside vLLM's worker processes; `self` is the vLLM worker. A push is `mrl_begin_sync` (the manifest,
checked against this worker's model: the HF layout of the checkpoint it started from), one load per bucket
(whichever transport carried it: `mrl_load_bucket` for safetensors bytes, `mrl_load_shared` for a shared
buffer, `mrl_recv_bucket` for a broadcast; see transport.py), each acknowledged with per-tensor checksums,
then `mrl_finish_sync`, which loads everything with one in-place reload. (vLLM's layerwise reload finalises
every layer on each call, so loading bucket by bucket leaves layers that a bucket did not cover broken.)

Staged tensors are views into the shared or receive buffers where the transport has them, so staging copies
nothing; the reload copies them into the model, which keeps no reference to them.
"""

from __future__ import annotations

import logging
import os
import time

import torch

from megatron_rl.model.hf_config import expected_hf_shapes, load_hf_config
from megatron_rl.rollout.base import WeightSyncError
from megatron_rl.rollout.transport import broadcast_from_trainer, join_weight_group, open_shared, unpack
from megatron_rl.rollout.weight_sync import (
    check_bucket,
    check_complete,
    check_manifest,
    tensor_checksum,
)

RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"


class WeightSyncExtension:
    # ------------------------------------------------------------------------------------ one push
    def mrl_begin_sync(self, manifest: dict[str, list[int]]) -> int:
        if not getattr(self, "_mrl_quieted", False):
            logging.getLogger(RELOAD_LOGGER).addFilter(self.mrl_quiet_rotary_warning)
            self._mrl_quieted = True
        cfg = load_hf_config(self.model_config.model)
        allowed_extra = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
        manifest = {name: tuple(shape) for name, shape in manifest.items()}
        check_manifest(manifest, expected_hf_shapes(cfg), allowed_extra)
        self._mrl_manifest = manifest
        self._mrl_staged: dict = {}
        return len(manifest)

    def _mrl_stage(self, bucket: dict[str, torch.Tensor]) -> dict[str, int]:
        if getattr(self, "_mrl_manifest", None) is None:
            raise WeightSyncError("a weight bucket arrived outside a push (no manifest)")
        check_bucket(bucket, self._mrl_manifest, set(self._mrl_staged))
        self._mrl_staged.update(bucket)
        return {name: tensor_checksum(t) for name, t in bucket.items()}

    def mrl_load_bucket(self, payload: bytes) -> dict[str, int]:
        from safetensors.torch import load as load_safetensors

        return self._mrl_stage(load_safetensors(payload))

    def mrl_load_local(self, bucket: list) -> dict[str, int]:
        """In-process worker (external launcher): the trainer's tensors, by reference."""
        return self._mrl_stage(dict(bucket))

    def mrl_finish_sync(self) -> dict:
        staged, self._mrl_staged = self._mrl_staged, {}
        manifest, self._mrl_manifest = self._mrl_manifest, None
        check_complete(manifest, set(staged))
        start = time.perf_counter()
        self.model_runner.reload_weights(weights_iterator=iter(staged.items()))
        return {"tensors": len(staged), "reload_s": time.perf_counter() - start}

    @staticmethod
    def mrl_quiet_rotary_warning(record: logging.LogRecord) -> bool:
        """vLLM's reload warns "RotaryEmbedding: Failed to load weights" on every push: the rotary cache is a
        buffer no checkpoint carries, and the reload puts it back as it was. Drop that one line."""
        return not record.getMessage().startswith("RotaryEmbedding: Failed to load weights")

    # ------------------------------------------------------------------------------------ shm / ipc
    def mrl_load_shared(self, handle: dict, specs: list) -> dict[str, int]:
        buffers = self.__dict__.setdefault("_mrl_buffers", {})
        buf = buffers.get(handle["id"])
        if buf is None:
            buf = buffers[handle["id"]] = open_shared(handle)
        return self._mrl_stage(unpack(buf, specs))

    def mrl_release_buffers(self, ids: list[str]) -> int:
        buffers = self.__dict__.get("_mrl_buffers", {})
        self.__dict__.get("_mrl_staged", {}).clear()  # staged views would keep the memory mapped
        return sum(buffers.pop(i, None) is not None for i in ids)

    # ------------------------------------------------------------------------------------ broadcast
    def mrl_worker_rank(self) -> int:
        return self.rank

    def mrl_join_broadcast(self, host: str, port: int, world_size: int, timeout_s: float) -> int:
        import datetime

        import torch.distributed as dist

        store = dist.TCPStore(
            host, port, world_size, is_master=False, timeout=datetime.timedelta(seconds=timeout_s)
        )
        self._mrl_group = join_weight_group(store, 1 + self.rank, world_size, self.device, timeout_s)
        self._mrl_store = store
        self._mrl_recv: dict[int, torch.Tensor] = {}
        return 1 + self.rank

    def mrl_recv_bucket(self, slot: int, nbytes: int, specs: list) -> dict[str, int]:
        group = getattr(self, "_mrl_group", None)
        if group is None:
            raise WeightSyncError("broadcast bucket arrived before the worker joined the weight group")
        buf = self._mrl_recv.get(slot)
        if buf is None or buf.numel() < nbytes:
            self._mrl_recv[slot] = buf = None  # drop the old one first: no two of them at once
            self._mrl_recv[slot] = buf = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        if nbytes:  # always receive before checking anything, or the trainer's broadcast would wait forever
            broadcast_from_trainer(group, buf[:nbytes]).wait()
            if buf.is_cuda:
                torch.cuda.current_stream(buf.device).synchronize()
        return self._mrl_stage(unpack(buf[:nbytes], specs))

    def mrl_leave_broadcast(self) -> int:
        self.__dict__.get("_mrl_staged", {}).clear()
        released = len(self.__dict__.get("_mrl_recv", {}))
        self._mrl_recv = {}
        self._mrl_group = self._mrl_store = None
        return released

    # ------------------------------------------------------------------------------------ inspection
    def mrl_transport_state(self) -> dict:
        """What this worker holds for weight pushes (tests use it to check that buffers are released)."""
        return {
            "pid": os.getpid(),
            "staged": len(self.__dict__.get("_mrl_staged", {})),
            "shared_buffers": sorted(self.__dict__.get("_mrl_buffers", {})),
            "recv_buffers": len(self.__dict__.get("_mrl_recv", {})),
            "recv_bytes": sum(b.numel() for b in self.__dict__.get("_mrl_recv", {}).values()),
            "in_group": self.__dict__.get("_mrl_group") is not None,
        }
