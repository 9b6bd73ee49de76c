"""Read and validate a Hugging Face Qwen2-family config.json."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

SUPPORTED_ARCHITECTURES = ("Qwen2ForCausalLM",)


class ModelConfigError(ValueError):
    """A checkpoint's config or tensors do not fit what megatron-rl supports; the message names the field."""


@dataclass(frozen=True)
class Qwen2Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool = True

    def check_parallel(self, tp: int, pp: int) -> None:
        """Raise a one-line error naming the field that `tp`/`pp` does not divide."""
        for field, value in (
            ("num_attention_heads", self.num_attention_heads),
            ("vocab_size", self.vocab_size),
            ("intermediate_size", self.intermediate_size),
        ):
            if value % tp:
                raise ModelConfigError(f"tensor_parallel_size={tp} does not divide {field}={value}")
        kv = self.num_key_value_heads
        if kv % tp and tp % kv:
            raise ModelConfigError(
                f"tensor_parallel_size={tp} and num_key_value_heads={kv}: one must divide the other"
            )
        if self.num_hidden_layers % pp:
            raise ModelConfigError(
                f"pipeline_parallel_size={pp} does not divide num_hidden_layers={self.num_hidden_layers}"
            )


def _require(raw: dict, key: str, path: Path) -> object:
    if key not in raw:
        raise ModelConfigError(f"{path}: missing field '{key}'")
    return raw[key]


def load_hf_config(model_dir: str | Path) -> Qwen2Config:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ModelConfigError(f"{path}: no config.json in the model directory")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelConfigError(f"{path}: not valid JSON ({e})") from None
    archs = raw.get("architectures") or [raw.get("model_type", "?")]
    if archs[0] not in SUPPORTED_ARCHITECTURES:
        raise ModelConfigError(
            f"{path}: field 'architectures' is {archs}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    heads = int(_require(raw, "num_attention_heads", path))
    hidden = int(_require(raw, "hidden_size", path))
    if raw.get("use_sliding_window"):
        raise ModelConfigError(
            f"{path}: field 'use_sliding_window' is true; sliding-window attention is not supported"
        )
    rope_scaling = raw.get("rope_scaling")
    if rope_scaling and rope_scaling.get("type", rope_scaling.get("rope_type")) not in (None, "default"):
        raise ModelConfigError(f"{path}: field 'rope_scaling' = {rope_scaling} is not supported")
    rope_theta = raw.get("rope_theta")
    if rope_theta is None and isinstance(raw.get("rope_parameters"), dict):
        rope_theta = raw["rope_parameters"].get("rope_theta")
    return Qwen2Config(
        vocab_size=int(_require(raw, "vocab_size", path)),
        hidden_size=hidden,
        intermediate_size=int(_require(raw, "intermediate_size", path)),
        num_hidden_layers=int(_require(raw, "num_hidden_layers", path)),
        num_attention_heads=heads,
        num_key_value_heads=int(raw.get("num_key_value_heads", heads)),
        head_dim=int(raw.get("head_dim") or hidden // heads),
        max_position_embeddings=int(raw.get("max_position_embeddings", 32768)),
        rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
    )


def expected_hf_shapes(cfg: Qwen2Config) -> dict[str, tuple[int, ...]]:
    """Every tensor an HF Qwen2 checkpoint of this config holds (lm_head only when untied), in load order."""
    h, d, i = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "self_attn.q_proj.weight"] = (q, h)
        shapes[p + "self_attn.k_proj.weight"] = (kv, h)
        shapes[p + "self_attn.v_proj.weight"] = (kv, h)
        if cfg.qkv_bias:
            shapes[p + "self_attn.q_proj.bias"] = (q,)
            shapes[p + "self_attn.k_proj.bias"] = (kv,)
            shapes[p + "self_attn.v_proj.bias"] = (kv,)
        shapes[p + "self_attn.o_proj.weight"] = (h, q)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes[p + "mlp.gate_proj.weight"] = (i, h)
        shapes[p + "mlp.up_proj.weight"] = (i, h)
        shapes[p + "mlp.down_proj.weight"] = (h, i)
    shapes["model.norm.weight"] = (h,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    return shapes


def check_hf_tensors(found: dict[str, tuple[int, ...]], cfg: Qwen2Config, where: str) -> None:
    """Raise naming the first missing, extra or mis-shaped tensor; a tied lm_head copy is tolerated."""
    expected = expected_hf_shapes(cfg)
    for name, shape in expected.items():
        if name not in found:
            raise ModelConfigError(f"{where}: missing tensor '{name}' (expected shape {list(shape)})")
        if tuple(found[name]) != shape:
            raise ModelConfigError(
                f"{where}: tensor '{name}' has shape {list(found[name])}, expected {list(shape)}"
            )
    for name in found:
        if name not in expected and not (name == "lm_head.weight" and cfg.tie_word_embeddings):
            raise ModelConfigError(f"{where}: unexpected tensor '{name}' (not part of a Qwen2 model)")
