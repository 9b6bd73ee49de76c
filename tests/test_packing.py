"""Sequence packing without a model: coverage, order, layout, budgets, DP balance, efficiency."""

from __future__ import annotations

import random

import pytest
import torch

from megatron_rl.algo.packing import (
    IGNORE_INDEX,
    pack_microbatches,
    pack_values,
    plan_microbatches,
    unpack,
    unpack_to_samples,
)
from megatron_rl.bench.packing import acereason_like_lengths


def random_batch(n: int, seed: int, max_prompt: int = 12, max_response: int = 60):
    rng = random.Random(seed)
    prompts = [[rng.randrange(1, 128) for _ in range(rng.randint(1, max_prompt))] for _ in range(n)]
    responses = [[rng.randrange(1, 128) for _ in range(rng.randint(0, max_response))] for _ in range(n)]
    # The extremes: a length-1 sequence (prompt only), a one-token response, one at the budget.
    prompts[0], responses[0] = [7], []
    prompts[1], responses[1] = [9], [11]
    return prompts, responses


@pytest.mark.parametrize("dp_size", [1, 2, 3])
@pytest.mark.parametrize("pad_multiple", [1, 4])
def test_every_token_lands_once_and_comes_back_in_order(dp_size, pad_multiple):
    prompts, responses = random_batch(41, seed=dp_size * 10 + pad_multiple)
    budget = 96
    prompts[2], responses[2] = [5] * 20, [6] * (budget - 20)  # exactly the budget
    per_rank = [
        pack_microbatches(prompts, responses, budget, pad_multiple, dp_size, r) for r in range(dp_size)
    ]
    assert len({len(mbs) for mbs in per_rank}) == 1, "ranks must step the same number of micro-batches"

    seen: list[int] = []
    for mbs in per_rank:
        for mb in mbs:
            assert mb.num_tokens <= budget
            assert mb.tokens.shape == mb.position_ids.shape == (1, mb.num_tokens)
            assert mb.targets.shape == (mb.num_tokens,) and mb.cu_seqlens.dtype == torch.int32
            bounds = mb.cu_seqlens.tolist()
            assert bounds[0] == 0 and bounds[-1] == mb.num_tokens
            assert len(bounds) == len(mb.sample_indices) + 1 or not mb.sample_indices
            for k, i in enumerate(mb.sample_indices):
                start, end = bounds[k], bounds[k + 1]
                seq = prompts[i] + responses[i]
                assert (end - start) % pad_multiple == 0 and end - start - len(seq) < pad_multiple
                assert mb.tokens[0, start : start + len(seq)].tolist() == seq
                assert mb.position_ids[0, start:end].tolist() == list(range(end - start))
                # Position t predicts token t + 1: the targets are the response, at the response span only.
                span = mb.response_spans[k]
                assert span == (start + len(prompts[i]) - 1, start + len(seq) - 1)
                assert mb.targets[span[0] : span[1]].tolist() == responses[i]
                outside = torch.ones(mb.num_tokens, dtype=torch.bool)
                outside[span[0] : span[1]] = False
                assert (mb.targets[outside[start:end].nonzero() + start] == IGNORE_INDEX).all()
            assert mb.loss_mask.sum() == mb.num_response_tokens
            assert mb.real_tokens == sum(len(prompts[i]) + len(responses[i]) for i in mb.sample_indices)
            # unpack gives each sample its own response back, in sample_indices order.
            got = unpack(mb.targets.float(), mb)
            assert [g.long().tolist() for g in got] == [responses[i] for i in mb.sample_indices]
            seen += mb.sample_indices
    assert sorted(seen) == list(range(len(prompts))), "every sample exactly once over all ranks"

    # Recompute flow: per-micro-batch values back to samples, and per-sample values onto the packed axis.
    mbs = per_rank[0]
    values = [pack_values([torch.tensor(r, dtype=torch.float32) for r in responses], mb) for mb in mbs]
    back = unpack_to_samples(values, mbs)
    assert {i: v.long().tolist() for i, v in back.items()} == {i: responses[i] for i in back}
    adv = pack_values([float(i) for i in range(len(prompts))], mbs[0], fill=-1.0)
    for i, (start, end) in zip(mbs[0].sample_indices, mbs[0].response_spans, strict=True):
        assert (adv[start:end] == i).all()
    assert (adv[~mbs[0].loss_mask] == -1.0).all()


def test_sequence_longer_than_budget_is_an_error():
    prompts, responses = [[1] * 10, [1] * 3], [[2] * 60, [2] * 5]
    with pytest.raises(ValueError, match=r"sample 0 has 70 tokens, more than max_tokens_per_microbatch=64"):
        pack_microbatches(prompts, responses, 64)
    with pytest.raises(ValueError, match=r"sample 1 has 8 tokens \(12 padded to a multiple of 6\).*=10"):
        pack_microbatches([[1], [1] * 3], [[2], [2] * 5], 10, pad_multiple=6)
    with pytest.raises(ValueError, match="sample 1 has an empty prompt"):
        pack_microbatches([[1], []], [[2], [3]], 64)


def test_dp_ranks_get_equal_counts_even_with_too_few_samples():
    # 3 samples over 4 ranks: one rank gets a filler micro-batch that scores nothing.
    prompts, responses = [[1, 2], [3], [4, 5, 6]], [[7] * 5, [8], [9] * 2]
    per_rank = [
        pack_microbatches(prompts, responses, 64, pad_multiple=2, dp_size=4, dp_rank=r) for r in range(4)
    ]
    assert [len(mbs) for mbs in per_rank] == [1, 1, 1, 1]
    fillers = [mbs[0] for mbs in per_rank if not mbs[0].sample_indices]
    assert len(fillers) == 1
    filler = fillers[0]
    assert filler.num_tokens == 2 and filler.cu_seqlens.tolist() == [0, 2] and not filler.loss_mask.any()
    from megatron_rl.model.policy import packed_seq_params

    assert packed_seq_params(filler).max_seqlen_q == 2

    # Splitting to equalise counts keeps the per-rank token loads close on a realistic batch.
    p, r = acereason_like_lengths(256, 32, 992, seed=3)
    lengths = [a + b for a, b in zip(p, r, strict=True)]
    plan = plan_microbatches(lengths, 2048, dp_size=4)
    loads = [sum(lengths[i] for mb in rank for i in mb) for rank in plan]
    assert len({len(rank) for rank in plan}) == 1
    assert max(loads) - min(loads) <= max(lengths), loads


@pytest.mark.parametrize("dp_size", [1, 4])
def test_packing_efficiency_on_acereason_like_lengths(dp_size):
    """A rollout batch (128 prompts x 8 samples) with AceReason's length shape scaled to a 1K context."""
    p, r = acereason_like_lengths(1024, 32, 992, seed=0)
    assert sum(n == 992 for n in r) > 50 and min(r) < 100  # long tail to the cap, and short ones too
    prompts, responses = [[1] * n for n in p], [[2] * n for n in r]
    budget, pad_multiple = 2048, 8  # pad to 8: what sequence parallelism at TP=8 would need
    mbs = [
        mb
        for rank in range(dp_size)
        for mb in pack_microbatches(prompts, responses, budget, pad_multiple, dp_size, rank)
    ]
    real = sum(p) + sum(r)
    assert sum(mb.real_tokens for mb in mbs) == real
    real_token_fraction = real / sum(mb.num_tokens for mb in mbs)  # real tokens in the micro-batches
    budget_fill = real / (len(mbs) * budget)  # and how full the micro-batches are
    assert real_token_fraction >= 0.95 and budget_fill >= 0.95, (real_token_fraction, budget_fill)
