"""Methods injected into each vLLM worker (`worker_extension_cls`) to receive and verify weight pushes.

Runs inside vLLM's worker processes; `self` is the vLLM worker. Tensors arrive as safetensors bytes through
`collective_rpc`, are checked against this worker's model (the HF layout of the checkpoint it started from),
acknowledged with per-tensor checksums, and loaded together with the model runner's in-place reload when
the push is complete. (vLLM's layerwise reload finalises every layer on each call, so loading bucket by bucket
leaves layers that a bucket did not cover broken; staging costs one host copy of the weights.)
"""

from __future__ import annotations

from safetensors.torch import load as load_safetensors

from megatron_rl.model.hf_config import expected_hf_shapes, load_hf_config
from megatron_rl.rollout.weight_sync import (
    check_bucket,
    check_complete,
    check_manifest,
    tensor_checksum,
)


class WeightSyncExtension:
    def mrl_begin_sync(self, manifest: dict[str, list[int]]) -> int:
        cfg = load_hf_config(self.model_config.model)
        allowed_extra = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
        manifest = {name: tuple(shape) for name, shape in manifest.items()}
        check_manifest(manifest, expected_hf_shapes(cfg), allowed_extra)
        self._mrl_manifest = manifest
        self._mrl_staged: dict = {}
        return len(manifest)

    def mrl_load_bucket(self, payload: bytes) -> dict[str, int]:
        bucket = load_safetensors(payload)
        check_bucket(bucket, self._mrl_manifest, set(self._mrl_staged))
        self._mrl_staged.update(bucket)
        return {name: tensor_checksum(t) for name, t in bucket.items()}

    def mrl_finish_sync(self) -> int:
        staged, self._mrl_staged = self._mrl_staged, {}
        check_complete(self._mrl_manifest, set(staged))
        self.model_runner.reload_weights(weights_iterator=iter(staged.items()))
        return len(staged)
