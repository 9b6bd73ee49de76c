"""Packed THD forward/backward through real megatron-core equals the per-sample padded path, TP=1 and TP=2."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from tests.distributed_helpers import run_distributed

TOLERANCE = 1e-5
TEMPERATURE = 0.7
# (prompt, response) lengths: very different, a length-1 sequence, a one-token response, a long one.
SHAPES = [(5, 17), (1, 0), (12, 700), (1, 1), (3, 60), (30, 2), (8, 150), (2, 9)]
BUDGET = 800  # forces several micro-batches; the 712-token sequence fills one almost alone


def make_batch(vocab: int):
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, vocab, (p,), generator=gen).tolist() for p, _ in SHAPES]
    responses = [torch.randint(0, vocab, (r,), generator=gen).tolist() for _, r in SHAPES]
    # Per-token weights standing in for advantages (on log-probs) and an entropy bonus.
    w_lp = [torch.randn(r, generator=gen) for _, r in SHAPES]
    w_ent = [torch.randn(r, generator=gen) for _, r in SHAPES]
    return prompts, responses, w_lp, w_ent


def _check_packed_equals_unpacked(rank: int, world: int, model_dir: str, tp: int) -> None:
    from megatron_rl.algo.logprobs import response_logprobs
    from megatron_rl.algo.packing import pack_microbatches, pack_values, unpack
    from megatron_rl.distributed import ParallelLayout, init_distributed, shutdown
    from megatron_rl.model.policy import Policy, packed_forward_logprobs

    init_distributed(ParallelLayout(tp=tp), rank=rank, world_size=world)
    policy = Policy.from_hf(model_dir)
    model, group = policy.model, policy.tp_group
    params = [p for p in model.parameters() if p.requires_grad]
    prompts, responses, w_lp, w_ent = make_batch(policy.cfg.vocab_size)
    n_tokens = sum(r for _, r in SHAPES)  # the trainer normalises by the batch's response tokens

    # Reference: one right-padded batch, each sample in its own row.
    ref_lp, ref_ent = response_logprobs(model, prompts, responses, TEMPERATURE, group)
    loss = sum(
        (lp * w).sum() + (e * w2).sum() for lp, e, w, w2 in zip(ref_lp, ref_ent, w_lp, w_ent, strict=True)
    )
    ref_grads = torch.autograd.grad(loss / n_tokens, params)

    # Packed: pad each sequence to the TP size as sequence parallelism would (harmless without it).
    mbs = pack_microbatches(prompts, responses, BUDGET, pad_multiple=tp)
    assert len(mbs) >= 2 and any(len(mb.sample_indices) >= 4 for mb in mbs)
    got_lp, got_ent = {}, {}
    grads = [torch.zeros_like(p) for p in params]
    for mb in mbs:
        lp, ent = packed_forward_logprobs(model, mb, TEMPERATURE, group)
        assert lp.shape == ent.shape == (mb.num_tokens,) and lp.dtype == ent.dtype == torch.float32
        assert (lp[~mb.loss_mask] == 0).all() and (ent[~mb.loss_mask] == 0).all()
        loss = (lp * pack_values(w_lp, mb)).sum() + (ent * pack_values(w_ent, mb)).sum()
        for g, d in zip(grads, torch.autograd.grad(loss / n_tokens, params), strict=True):
            g += d
        got_lp.update(zip(mb.sample_indices, unpack(lp.detach(), mb), strict=True))
        got_ent.update(zip(mb.sample_indices, unpack(ent.detach(), mb), strict=True))

    assert sorted(got_lp) == list(range(len(SHAPES)))
    for i, (_, r) in enumerate(SHAPES):
        assert got_lp[i].shape == ref_lp[i].shape == (r,)
        if r:
            assert (got_lp[i] - ref_lp[i]).abs().max() < TOLERANCE, f"sample {i} logprobs"
            assert (got_ent[i] - ref_ent[i]).abs().max() < TOLERANCE, f"sample {i} entropies"
    assert max(e.abs().max() for e in ref_ent if e.numel()) > 0.5  # real distributions, not flat ones
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for name, g, ref in zip(names, grads, ref_grads, strict=True):
        diff = (g - ref).abs().max().item()
        assert diff < TOLERANCE, f"rank {rank}: grad of {name} differs by {diff}"
    assert max(ref.abs().max().item() for ref in ref_grads) > 1e-2  # gradients with teeth
    shutdown()


@pytest.mark.parametrize("tp", [1, 2])
def test_packed_logprobs_entropies_and_grads_equal_unpacked(tiny_ckpt, tp):
    run_distributed(_check_packed_equals_unpacked, tp, tiny_ckpt, tp)


def test_sdpa_packed_attention_equals_block_diagonal_mask():
    """The per-sequence SDPA loop is the block-diagonal causal mask, values and gradients, tail included."""
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_rl.model.sdpa_attention import SDPACoreAttention, packed_causal_mask

    heads, kv_heads, dim = 4, 2, 16
    config = TransformerConfig(
        num_layers=1,
        hidden_size=heads * dim,
        num_attention_heads=heads,
        num_query_groups=kv_heads,
        attention_dropout=0.0,
    )
    one_rank = SimpleNamespace(tp=SimpleNamespace(size=lambda: 1))
    attn = SDPACoreAttention(config, 1, AttnMaskType.causal, "self", pg_collection=one_rank)
    gen = torch.Generator().manual_seed(0)
    total, cu = 23, torch.tensor([0, 1, 9, 10, 20], dtype=torch.int32)  # 3 tail tokens past the last bound
    q = torch.randn(total, heads, dim, generator=gen, requires_grad=True)
    k = torch.randn(total, kv_heads, dim, generator=gen, requires_grad=True)
    v = torch.randn(total, kv_heads, dim, generator=gen, requires_grad=True)
    params = PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=10, max_seqlen_kv=10
    )
    out = attn(q, k, v, None, packed_seq_params=params)
    assert out.shape == (total, heads * dim)

    rep = heads // kv_heads
    qq, kk, vv = (x.permute(1, 0, 2).unsqueeze(0) for x in (q, k, v))
    kk, vv = kk.repeat_interleave(rep, dim=1), vv.repeat_interleave(rep, dim=1)
    mask = packed_causal_mask(cu, total, q.device)
    ref = (
        F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask)
        .squeeze(0)
        .permute(1, 0, 2)
        .reshape(total, -1)
    )
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    g = torch.randn(out.shape, generator=gen)
    got = torch.autograd.grad(out, (q, k, v), g)
    want = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
