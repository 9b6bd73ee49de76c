"""Build a Megatron-core GPTModel for a Qwen2-family config (RMSNorm, SwiGLU, GQA, RoPE, QKV bias)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_rl.distributed import use_cuda
from megatron_rl.model.hf_config import Qwen2Config


def transformer_engine_available() -> bool:
    if not use_cuda():
        return False
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        return False
    return True


def transformer_config(
    cfg: Qwen2Config,
    tp: int,
    pp: int,
    params_dtype: torch.dtype = torch.float32,
    recompute: bool = False,
) -> TransformerConfig:
    cfg.check_parallel(tp, pp)
    return TransformerConfig(
        num_layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.intermediate_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_key_value_heads,
        kv_channels=cfg.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=cfg.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        pipeline_dtype=params_dtype if pp > 1 else None,
        # Packed micro-batches differ in length: pipeline stages send each activation's shape first.
        variable_seq_lengths=pp > 1,
        moe_token_dispatcher_type="alltoall",  # no MoE here; the default (allgather) refuses variable lengths
        batch_p2p_comm=use_cuda(),  # gloo has no batched send/recv
        # Losses arrive normalised by the whole batch's token count: summed as they are, over micro-batches
        # and data-parallel ranks (policy.py).
        calculate_per_token_loss=True,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        # Weights always come from a checkpoint; random init would only cost time.
        perform_initialization=False,
        use_cpu_initialization=not use_cuda(),
        # CUDA-only fusions: off unless on a GPU.
        gradient_accumulation_fusion=False,
        bias_activation_fusion=use_cuda(),
        bias_dropout_fusion=use_cuda(),
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        recompute_granularity="full" if recompute else None,
        recompute_method="uniform" if recompute else None,
        recompute_num_layers=1 if recompute else None,
    )


def layer_spec(use_te: bool) -> ModuleSpec:
    """Transformer Engine spec on GPUs that have it; otherwise the local spec with an SDPA core attention."""
    if use_te:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec()
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_rl.model.sdpa_attention import SDPACoreAttention

    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    return spec


def build_gpt_model(
    cfg: Qwen2Config,
    params_dtype: torch.dtype = torch.float32,
    use_te: bool | None = None,
    recompute: bool = False,
) -> GPTModel:
    """One pipeline stage of the policy, for the parallel state already initialised."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    use_te = transformer_engine_available() if use_te is None else use_te
    model = GPTModel(
        config=transformer_config(cfg, tp, pp, params_dtype, recompute),
        transformer_layer_spec=layer_spec(use_te),
        vocab_size=cfg.vocab_size,
        max_sequence_length=cfg.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=cfg.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(cfg.rope_theta) if float(cfg.rope_theta).is_integer() else cfg.rope_theta,
        rotary_percent=1.0,
    )
    model.uses_transformer_engine = use_te  # the converter needs to know the parameter naming
    if use_cuda():
        model.cuda()
    return model
