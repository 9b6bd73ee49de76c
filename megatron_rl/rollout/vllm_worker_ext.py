"""Methods injected into each vLLM worker (`worker_extension_cls`) to receive, verify and load weight pushes.

Runs inside vLLM's worker processes; `self` is the vLLM worker. A push (weight_sync.py) is `mrl_begin_sync`
(the manifest, checked against this worker's model: the HF layout of the checkpoint it started from), one load
per bucket (whichever transport carried it: `mrl_load_bucket` for safetensors bytes, `mrl_load_shared` for a
shared buffer, `mrl_recv_bucket` for a broadcast, `mrl_load_local` in the trainer's process; see
transport.py), then `mrl_finish_sync`; `mrl_abort_sync` ends a push that cannot complete.

Each bucket is loaded into the model as it arrives, with vLLM's layerwise reload: `begin` puts every layer's
weights aside (vLLM keeps the kernel tensors and gives the layer meta tensors), the model's own `load_weights`
collects each layer's tensors and, once a layer has all of them, materialises it, runs the layer's weight
processing (e.g. vLLM-CPU's oneDNN repacking) and copies the result into the kept kernel tensors; `finish`
(or `abort`) puts back the kernel tensors of every layer that received nothing. So no bucket outlives its
load, except the tensors of a layer cut by a bucket boundary, which are copied out of the transfer buffer
before the next bucket overwrites it.

A push of local shards (`mrl_begin_sync(manifest, [tp_rank, tp])`, sent when the trainer's TP rank r holds
exactly what this worker of TP rank r holds) carries each rank's own part of every tensor, which vLLM's
weight loaders would cut again: for that push the layer tensors the loaders see say so (see
`_load_as_shards`), and they are put back as they were when the push ends.
"""

from __future__ import annotations

import logging
import os
import time

import torch

from megatron_rl.model.convert import local_hf_shapes
from megatron_rl.model.hf_config import expected_hf_shapes, load_hf_config
from megatron_rl.rollout.base import WeightSyncError
from megatron_rl.rollout.transport import broadcast_from_trainer, join_weight_group, open_shared, unpack
from megatron_rl.rollout.weight_sync import (
    CORRUPTED,
    check_bucket,
    check_complete,
    check_manifest,
    tensor_checksum,
)

RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"


def _layerwise():
    from vllm.model_executor.model_loader.reload import layerwise

    return layerwise


def _keep_pending_tensors(model: torch.nn.Module) -> int:
    """Copy out the tensors that layers still waiting for more weights hold (views into a transfer buffer the
    next bucket reuses); returns how many layers were waiting."""
    waiting = 0
    for layer in model.modules():
        info = _layerwise().LAYERWISE_INFO.get(layer)
        if info is None or not info.can_load() or not info.loaded_weights:
            continue
        waiting += 1
        for _, bound in info.loaded_weights:
            for key, value in bound.arguments.items():
                if key != "param" and isinstance(value, torch.Tensor) and not value.is_meta:
                    bound.arguments[key] = value.clone()
    return waiting


def _forget_partial_layers(model: torch.nn.Module) -> None:
    """Before an abort: a layer that received only some of its tensors keeps its old weights (finalising it
    would process it with the missing parts uninitialised)."""
    for layer in model.modules():
        info = _layerwise().LAYERWISE_INFO.get(layer)
        if info is not None and info.can_load() and info.loaded_weights:
            info.loaded_weights.clear()
            info.load_numel = 0


def _check_same_shards(model: torch.nn.Module, tp_rank: int, tp: int) -> None:
    """Refuse a push of TP rank `tp_rank`'s shards (of `tp`) unless this worker holds exactly those: the same
    TP rank and size, and vocabulary rows split as the trainer splits them (no padding rows)."""
    from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    mine = (get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size())
    if mine != (tp_rank, tp):
        raise WeightSyncError(
            f"a push of TP rank {tp_rank}'s shards (of {tp}) reached the vLLM worker of TP rank {mine[0]} "
            f"(of {mine[1]}); local shards go only to the worker of the same TP rank"
        )
    for name, module in model.named_modules():
        if isinstance(module, VocabParallelEmbedding):
            rows = module.org_vocab_size // tp
            if (
                module.org_vocab_size % tp
                or module.num_embeddings_per_partition != rows
                or module.shard_indices.org_vocab_start_index != tp_rank * rows
            ):
                raise WeightSyncError(
                    f"vLLM's '{name}' splits its vocabulary of {module.org_vocab_size} rows (padded to "
                    f"{module.num_embeddings_padded}) otherwise than into {tp} equal parts: local shards "
                    "cannot be loaded as they are"
                )


def _load_as_shards(model: torch.nn.Module) -> list[tuple[torch.Tensor, str, bool, object]]:
    """Make vLLM's weight loaders take each tensor of this push as this worker's part, without cutting it.

    Called after initialize_layerwise_reload, so the tensors changed are those the loaders see during the
    push: the layers' meta tensors (whose attributes the materialised tensors copy, and which later pushes
    reuse) and the biases, which stay live. Linear weights (vLLM parameters) cut at `tp_rank * part size`:
    rank 0 of a part-sized tensor is all of it. Biases (plain parameters, the v1 loaders) skip their cut with
    `is_sharded_weight`. Vocabulary embeddings copy the tensor whole (with a shape check) without
    `output_dim`. Returns what was changed, for `_restore`."""
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding
    from vllm.model_executor.parameter import BasevLLMParameter

    changed: list[tuple[torch.Tensor, str, bool, object]] = []

    def set_attr(tensor: torch.Tensor, attr: str, value) -> None:
        changed.append((tensor, attr, attr in tensor.__dict__, tensor.__dict__.get(attr)))
        tensor.__dict__[attr] = value

    for module in model.modules():
        for param in module.parameters(recurse=False):
            if isinstance(module, VocabParallelEmbedding):
                set_attr(param, "output_dim", None)
            elif isinstance(param, BasevLLMParameter):
                set_attr(param, "tp_rank", 0)
            elif hasattr(param, "output_dim") or hasattr(param, "input_dim"):
                set_attr(param, "is_sharded_weight", True)
    return changed


def _restore(changed: list[tuple[torch.Tensor, str, bool, object]]) -> None:
    for tensor, attr, had, value in reversed(changed):  # reversed: a tensor reached twice ends as it began
        if had:
            tensor.__dict__[attr] = value
        else:
            tensor.__dict__.pop(attr, None)


def _refresh_tied_heads(model: torch.nn.Module) -> int:
    """Redo the weight processing of an output layer whose weight is the embedding's (tied embeddings).

    The reload processes the layers that received tensors; a tied lm_head receives none (its weight arrives
    as the embedding's), so it would keep what its processing made from the old weight: on the CPU an oneDNN
    matmul handle packed from it, which computes the logits. Returns how many layers were processed again."""
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

    owners: dict[int, int] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners[id(param)] = owners.get(id(param), 0) + 1
    refreshed = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, ParallelLMHead) and weight is not None and owners.get(id(weight), 0) > 1:
            module.quant_method.process_weights_after_loading(module)
            refreshed += 1
    return refreshed


class WeightSyncExtension:
    # ------------------------------------------------------------------------------------ one push
    def mrl_begin_sync(self, manifest: dict[str, list[int]], shard: list[int] | None = None) -> int:
        """Open a push of whole tensors, or with `shard` = [tp_rank, tp] of TP rank tp_rank's parts of them
        (checked: this worker must be that rank and hold exactly those parts)."""
        if not getattr(self, "_mrl_quieted", False):
            logging.getLogger(RELOAD_LOGGER).addFilter(self.mrl_quiet_rotary_warning)
            self._mrl_quieted = True
        if getattr(self, "_mrl_manifest", None) is not None:
            self.mrl_abort_sync()  # the sender of the open push is gone
        cfg = load_hf_config(self.model_config.model)
        allowed_extra = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
        manifest = {name: tuple(shape) for name, shape in manifest.items()}
        model = self.model_runner.get_model()
        if shard is None:
            check_manifest(manifest, expected_hf_shapes(cfg), allowed_extra)
        else:
            _check_same_shards(model, *shard)
            check_manifest(manifest, local_hf_shapes(cfg, shard[1]), allowed_extra)
        _layerwise().initialize_layerwise_reload(model)
        self._mrl_as_shards = _load_as_shards(model) if shard is not None else []
        self._mrl_manifest, self._mrl_received, self._mrl_load_s = manifest, set(), 0.0
        return len(manifest)

    def _mrl_stage(self, bucket: dict[str, torch.Tensor], expected: dict[str, int]) -> dict[str, int]:
        """Verify a bucket, then load it into the model; nothing of a refused bucket is loaded."""
        if getattr(self, "_mrl_manifest", None) is None:
            raise WeightSyncError("a weight bucket arrived outside a push (no manifest)")
        check_bucket(bucket, self._mrl_manifest, self._mrl_received)
        checksums = {name: tensor_checksum(t) for name, t in bucket.items()}
        for name, value in expected.items():
            if checksums.get(name) != value:
                raise WeightSyncError(
                    f"tensor '{name}' {CORRUPTED}: checksum {checksums.get(name)}, the sender's {value}; "
                    "nothing of its bucket was loaded"
                )
        start = time.perf_counter()
        model = self.model_runner.get_model()
        try:
            model.load_weights(iter(bucket.items()))
            _keep_pending_tensors(model)
        except BaseException:
            self.mrl_abort_sync()
            raise
        self._mrl_received.update(bucket)
        self._mrl_load_s += time.perf_counter() - start
        return checksums

    def mrl_load_bucket(self, payload: bytes, expected: dict[str, int]) -> dict[str, int]:
        from safetensors.torch import load as load_safetensors

        return self._mrl_stage(load_safetensors(payload), expected)

    def mrl_load_local(self, bucket: list, expected: dict[str, int]) -> dict[str, int]:
        """In-process worker (external launcher): the trainer's tensors, by reference."""
        return self._mrl_stage(dict(bucket), expected)

    def mrl_finish_sync(self) -> dict:
        if getattr(self, "_mrl_manifest", None) is None:
            raise WeightSyncError("mrl_finish_sync outside a push (no manifest)")
        check_complete(self._mrl_manifest, self._mrl_received)
        start = time.perf_counter()
        model = self.model_runner.get_model()
        _layerwise().finalize_layerwise_reload(model, self.model_config)
        _restore(self.__dict__.pop("_mrl_as_shards", []))
        _refresh_tied_heads(model)
        for reset in ("reset_lora_state", "reset_encoder_cache", "reset_mm_cache"):  # as vLLM's reload does
            getattr(self.model_runner, reset, lambda: None)()
        tensors = len(self._mrl_received)
        self._mrl_manifest, self._mrl_received = None, set()
        return {"tensors": tensors, "reload_s": self._mrl_load_s + time.perf_counter() - start}

    def mrl_abort_sync(self) -> int:
        """End an open push: layers that received all their tensors keep them, every other layer gets its
        previous weights back. Returns how many tensors had been loaded (0 when no push was open)."""
        if getattr(self, "_mrl_manifest", None) is None:
            return 0
        model = self.model_runner.get_model()
        _forget_partial_layers(model)
        _layerwise().finalize_layerwise_reload(model, self.model_config)
        _restore(self.__dict__.pop("_mrl_as_shards", []))
        _refresh_tied_heads(model)
        loaded = len(self._mrl_received)
        self._mrl_manifest, self._mrl_received = None, set()
        return loaded

    @staticmethod
    def mrl_quiet_rotary_warning(record: logging.LogRecord) -> bool:
        """vLLM's reload warns "RotaryEmbedding: Failed to load weights" on every push: the rotary cache is a
        buffer no checkpoint carries, and the reload puts it back as it was. Drop that one line."""
        return not record.getMessage().startswith("RotaryEmbedding: Failed to load weights")

    # ------------------------------------------------------------------------------------ shm / ipc
    def mrl_load_shared(self, handle: dict, specs: list, expected: dict[str, int]) -> dict[str, int]:
        buffers = self.__dict__.setdefault("_mrl_buffers", {})
        buf = buffers.get(handle["id"])
        if buf is None:
            buf = buffers[handle["id"]] = open_shared(handle)
        return self._mrl_stage(unpack(buf, specs), expected)

    def mrl_release_buffers(self, ids: list[str]) -> int:
        buffers = self.__dict__.get("_mrl_buffers", {})
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

    def mrl_recv_bucket(
        self, slot: int, nbytes: int, specs: list, expected: dict[str, int]
    ) -> dict[str, int]:
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
        return self._mrl_stage(unpack(buf[:nbytes], specs), expected)

    def mrl_leave_broadcast(self) -> int:
        released = len(self.__dict__.get("_mrl_recv", {}))
        self._mrl_recv = {}
        self._mrl_group = self._mrl_store = None
        return released

    # ------------------------------------------------------------------------------------ inspection
    def mrl_tensor_parallel_rank(self) -> int:
        from vllm.distributed import get_tensor_model_parallel_rank

        return get_tensor_model_parallel_rank()

    def mrl_transport_state(self) -> dict:
        """What this worker holds for weight pushes (tests use it to check that buffers are released)."""
        return {
            "pid": os.getpid(),
            "push_open": self.__dict__.get("_mrl_manifest") is not None,
            "shared_buffers": sorted(self.__dict__.get("_mrl_buffers", {})),
            "recv_buffers": len(self.__dict__.get("_mrl_recv", {})),
            "recv_bytes": sum(b.numel() for b in self.__dict__.get("_mrl_recv", {}).values()),
            "in_group": self.__dict__.get("_mrl_group") is not None,
        }
