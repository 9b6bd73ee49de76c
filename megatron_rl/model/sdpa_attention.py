"""A core-attention module for megatron-core's local layer spec, on torch SDPA.

megatron-core's local DotProductAttention asks CUDA for a scratch buffer and does not take packed sequences;
this one runs on the CPU and on GPUs without Transformer Engine, and honours packed-sequence boundaries
(block-diagonal causal attention from cu_seqlens).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide


class SDPACoreAttention(MegatronModule):
    """Causal (optionally packed) attention on [s, b, heads, head_dim] tensors, returns [s, b, hidden/TP]."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPACoreAttention does not support context parallelism")
        from megatron.core import parallel_state

        tp = (
            pg_collection.tp.size()
            if pg_collection is not None
            else parallel_state.get_tensor_model_parallel_world_size()
        )
        self.heads_per_partition = divide(config.num_attention_heads, tp)
        self.head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.attn_mask_type = attn_mask_type

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        # Megatron passes [s, b, n, d] (or [t, 1, n, d] squeezed to [t, n, d] for packed THD input).
        packed = packed_seq_params is not None
        thd = query.dim() == 3
        if thd:
            query, key, value = (x.unsqueeze(1) for x in (query, key, value))
        s_q, b = query.shape[0], query.shape[1]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, n, s, d]
        groups = q.shape[1] // k.shape[1]
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        dropout = self.dropout_p if self.training else 0.0
        if packed:
            out = self._packed_attention(q, k, v, packed_seq_params.cu_seqlens_q, dropout)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=dropout, scale=self.softmax_scale
            )
        out = out.permute(2, 0, 1, 3).reshape(s_q, b, self.heads_per_partition * self.head_dim)
        return out.squeeze(1) if thd else out

    def _packed_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, dropout: float
    ) -> torch.Tensor:
        """Causal attention within each packed sequence, one SDPA call per sequence.

        Equivalent to one call with `packed_causal_mask`, but costs sum(len_i^2) instead of T^2 in time and
        memory (a [T, T] mask at T = 32K is 1 GiB) and keeps SDPA's fused causal kernels. Tokens past
        cu_seqlens[-1] attend only to themselves.
        """
        bounds = cu_seqlens.tolist()
        lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        tail = q.shape[2] - bounds[-1]
        # split, not slicing: its backward is one concatenation, where each slice's backward would write a
        # zero-filled gradient of the whole packed row (quadratic in the number of sequences).
        pieces = [x.split(lengths + [tail], dim=2) for x in (q, k, v)]
        parts = [
            F.scaled_dot_product_attention(
                qi, ki, vi, is_causal=True, dropout_p=dropout, scale=self.softmax_scale
            )
            for qi, ki, vi, n in zip(*pieces, lengths, strict=False)
            if n > 0
        ]
        if tail:
            parts.append(pieces[2][-1])
        return torch.cat(parts, dim=2)


def packed_causal_mask(cu_seqlens: torch.Tensor, total: int, device: torch.device) -> torch.Tensor:
    """Boolean [total, total] mask: token i sees token j iff both lie in the same sequence and j <= i.

    Tokens past cu_seqlens[-1] (padding) each form their own sequence so no row is fully masked.
    """
    seq_id = torch.full((total,), -1, dtype=torch.long, device=device)
    bounds = cu_seqlens.to(device=device, dtype=torch.long)
    lengths = bounds[1:] - bounds[:-1]
    seq_id[: int(bounds[-1])] = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)
    tail = seq_id < 0
    seq_id[tail] = len(lengths) + torch.arange(int(tail.sum()), device=device)
    same = seq_id[:, None] == seq_id[None, :]
    idx = torch.arange(total, device=device)
    return same & (idx[None, :] <= idx[:, None])
