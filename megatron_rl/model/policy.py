"""The policy: one rank's Megatron GPTModel shard with its HF config, loaded from an HF checkpoint."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from megatron.core import parallel_state

from megatron_rl.model.build import build_gpt_model
from megatron_rl.model.convert import (
    NamedTensors,
    SafetensorsCheckpoint,
    export_hf_buckets,
    load_hf_into_megatron,
)
from megatron_rl.model.hf_config import Qwen2Config, check_hf_tensors, load_hf_config


@dataclass
class Policy:
    model: torch.nn.Module
    cfg: Qwen2Config
    model_dir: Path

    @classmethod
    def from_hf(
        cls,
        model_dir: str | Path,
        params_dtype: torch.dtype = torch.float32,
        transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
        recompute: bool = False,
    ) -> Policy:
        """Build this rank's shard (parallel state must be initialised) and fill it from the checkpoint, reading
        only the rows or columns of each tensor that the shard holds.

        `transform(name, tensor)` may alter each HF tensor on the way in (tests and verify-sync perturb weights
        with it); each tensor is then read whole.
        """
        model_dir = Path(model_dir)
        cfg = load_hf_config(model_dir)
        cfg.check_parallel(
            parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_pipeline_model_parallel_world_size(),
        )
        ckpt = SafetensorsCheckpoint(model_dir)
        check_hf_tensors(ckpt.shapes(), cfg, str(model_dir))
        model = build_gpt_model(cfg, params_dtype=params_dtype, recompute=recompute)
        load_hf_into_megatron(model, cfg, ckpt, transform)
        return cls(model=model, cfg=cfg, model_dir=model_dir)

    def hf_buckets(self, bucket_bytes: int = 512 << 20) -> Iterator[NamedTensors]:
        """The whole model as HF-named tensors, bucketed (a collective over the model-parallel group)."""
        return export_hf_buckets(self.model, self.cfg, bucket_bytes)

    @property
    def tp_group(self):
        tp = parallel_state.get_tensor_model_parallel_world_size()
        return parallel_state.get_tensor_model_parallel_group() if tp > 1 else None
