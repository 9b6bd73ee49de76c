"""One GRPO update through the Policy gives the same gradients and metrics under every parallel layout.

Each layout runs `policy_update` (real megatron-core: DDP with fp32 main grads, the forward-backward schedule,
pipeline stages over gloo) on the same batch and writes the whole gradient, gathered to HF names by the same
export the weight sync uses, and the logged metrics. The layouts must agree with TP=1, PP=1, DP=1 (fp32, the
tiny model with tied embeddings, whose gradient PP=2 splits between the first and last stage), and that one
must equal the gradient of the token-level loss written out directly.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.distributed_helpers import run_distributed

RELATIVE = 1e-5
# Logged metrics, relative: the loss, entropy, clip fraction and token count are sums of the same numbers in
# another order; the norm and mismatch figures come from gradients and log-probs equal to about 1e-7.
TOLERANCES = {
    "loss": 1e-6,
    "entropy_mean": 1e-6,
    "clip_fraction": 1e-6,
    "packed_tokens": 0.0,
    "microbatches": 0.0,
    "grad_norm": 1e-5,
    "mismatch_kl": 1e-4,
    "mismatch_max_abs_diff": 1e-4,
}
# (prompt, response) lengths; sample 3 is not trained (masked), so the normaliser is not all the tokens.
SHAPES = [(5, 17), (3, 40), (12, 70), (4, 9), (3, 60), (7, 22), (8, 35), (2, 9)]
TRAINED = [True, True, True, False, True, True, True, True]


def make_batch(vocab: int) -> SimpleNamespace:
    gen = torch.Generator().manual_seed(0)
    return SimpleNamespace(
        prompts=[torch.randint(0, vocab, (p,), generator=gen).tolist() for p, _ in SHAPES],
        responses=[torch.randint(0, vocab, (r,), generator=gen).tolist() for _, r in SHAPES],
        trained=list(TRAINED),
        advantages=torch.randn(len(SHAPES), generator=gen).tolist(),
        # Rollout log-probs near the policy's own (a mismatch metric of about 0.01 to log).
        rollout_logprobs=None,
        temperature=0.8,  # config_overrides' rollout.temperature
    )


def config_overrides(budget: int) -> list[str]:
    return [
        f"grpo.max_tokens_per_microbatch={budget}",
        "grpo.micro_steps=1",
        "optim.grad_clip=0",
        "optim.lr=1e-3",
        "optim.warmup_steps=0",
        "rollout.temperature=0.8",
        "rollout.max_prompt_tokens=16",
        "rollout.max_response_tokens=80",
    ]


def config(budget: int):
    from megatron_rl.config import load_config

    return load_config(None, config_overrides(budget))


def gathered_grads(policy) -> dict[str, torch.Tensor]:
    """The full gradient under HF names: each parameter's data swapped for its main grad during an export."""
    params = policy.parameters()
    saved = [p.data for p in params]
    for p in params:
        p.data = p.main_grad
    try:
        return {name: t.clone() for bucket in policy.hf_buckets() for name, t in bucket}
    finally:
        for p, data in zip(params, saved, strict=True):
            p.data = data


def reference_grads(policy, batch, cfg) -> dict[str, torch.Tensor]:
    """d/dθ of -Σ_trained Σ_t A_i logp_t / (trained tokens), computed unpacked and unscheduled (ratio is 1 at
    the first update, so this is the clipped loss's gradient)."""
    from megatron_rl.algo.logprobs import response_logprobs

    params = policy.parameters()
    lps, _ = response_logprobs(policy.model, batch.prompts, batch.responses, cfg.rollout.temperature)
    total = sum(len(r) for r, t in zip(batch.responses, batch.trained, strict=True) if t)
    loss = (
        -sum(a * lp.sum() for lp, a, t in zip(lps, batch.advantages, batch.trained, strict=True) if t) / total
    )
    grads = torch.autograd.grad(loss, params)
    for p, g in zip(params, grads, strict=True):
        p.main_grad.copy_(g)
    return gathered_grads(policy)


def _update(rank: int, world: int, model_dir: str, layouts: list, budgets: list[int], out_dir: str) -> None:
    """One update per budget under each (tp, pp) of `layouts` in turn (data-parallel over the rest of the
    world; (tp, pp, True): with the output layer fused into kernels.linear_logprob_entropy); rank 0 writes
    OUT_DIR/tp{tp}_pp{pp}_dp{dp}[_fused].pt. A one-rank run also writes the rollout log-probs every other run
    uses, and the reference gradient."""
    import megatron_rl.model.policy as policy_module
    from megatron_rl.algo.logprobs import response_logprobs
    from megatron_rl.distributed import ParallelLayout, init_distributed, shutdown
    from megatron_rl.model.policy import Policy
    from megatron_rl.train.optimizer import build_optimizer
    from megatron_rl.train.update import policy_update

    kernel_calls = []  # the fused kernel, counted: a fused layout must go through it, the others must not
    fused_kernel = policy_module.linear_logprob_entropy
    policy_module.linear_logprob_entropy = lambda *a, **k: kernel_calls.append(1) or fused_kernel(*a, **k)
    shared = Path(out_dir) / "rollout_logprobs.pt"
    for tp, pp, *fused in layouts:  # (tp, pp) or (tp, pp, True): the output layer fused into the kernel
        fused = bool(fused and fused[0])
        init_distributed(ParallelLayout(tp=tp, pp=pp), rank=rank, world_size=world)
        results = {}
        for budget in budgets:
            policy = Policy.from_hf(model_dir, fused_output_layer=fused)
            cfg = config(budget)
            batch = make_batch(policy.cfg.vocab_size)
            if world == 1:
                with torch.no_grad():  # what vLLM would have reported, give or take 0.01
                    lps, _ = response_logprobs(
                        policy.model, batch.prompts, batch.responses, cfg.rollout.temperature
                    )
                noise = torch.Generator().manual_seed(1)
                batch.rollout_logprobs = [lp + 0.01 * torch.randn(lp.shape, generator=noise) for lp in lps]
                torch.save(batch.rollout_logprobs, shared)
            else:
                batch.rollout_logprobs = torch.load(shared)
            # The reference before the step moves the weights.
            reference = reference_grads(policy, batch, cfg) if world == 1 else None
            # As after every RL step: the gradient buffers are freed; the update allocates them again.
            held = policy.grad_buffer_bytes()
            policy.release_grads()
            assert held > 0 and policy.grad_buffer_bytes() == 0, held
            kernel_calls.clear()
            metrics = policy_update(policy, build_optimizer(policy, cfg.optim), batch, cfg, step=1)
            results[budget] = {"metrics": metrics, "grads": gathered_grads(policy), "reference": reference}
            calls = torch.tensor([len(kernel_calls)])
            torch.distributed.all_reduce(calls)  # only last-stage ranks compute log-probs
            results[budget]["kernel_calls"] = int(calls)
        if rank == 0:
            name = f"tp{tp}_pp{pp}_dp{world // (tp * pp)}" + ("_fused" if fused else "")
            torch.save(results, Path(out_dir) / f"{name}.pt")
    shutdown()


def relative_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


def assert_same(got: dict, want: dict, what: str) -> None:
    assert sorted(got) == sorted(want), what
    worst = max(relative_diff(got[n], want[n]) for n in want)
    assert worst < RELATIVE, f"{what}: gradient differs by {worst:.2e} (relative L2)"


@pytest.fixture(scope="module")
def layouts(tiny_ckpt_gqa_tied, tmp_path_factory):
    """Results per (tp, pp, dp[, "fused"]): {budget: {"metrics", "grads", "reference", "kernel_calls"}}. One rank
    (two budgets, the output layer unfused and fused), then four ranks laid out as TP2 x PP2, TP2 x DP2,
    PP2 x DP2, DP4, and TP2 x PP2 with the fused output layer, in turn."""
    work = tmp_path_factory.mktemp("layouts")
    # On the CPU with gloo, on a GPU machine too: one GPU cannot host four NCCL ranks.
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        run_distributed(_update, 1, tiny_ckpt_gqa_tied, [(1, 1), (1, 1, True)], [4096, 100], str(work))
        four = [(2, 2), (2, 1), (1, 2), (1, 1), (2, 2, True)]
        run_distributed(_update, 4, tiny_ckpt_gqa_tied, four, [100], str(work))
        results = {
            tuple(int(part[2:]) if part != "fused" else part for part in path.stem.split("_")): torch.load(
                path
            )
            for path in work.glob("tp*_pp*_dp*.pt")
        }
    finally:
        if hidden is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = hidden
    return results


def test_update_gradient_is_the_token_level_mean_whatever_the_packing(layouts):
    one_microbatch, several = layouts[(1, 1, 1)][4096], layouts[(1, 1, 1)][100]
    assert one_microbatch["metrics"]["microbatches"] == 1 and several["metrics"]["microbatches"] >= 3
    # The reference divides by the trained tokens of the whole batch: a loss normalised per micro-batch (or
    # over all tokens, trained or not) gives another gradient.
    assert_same(
        one_microbatch["grads"], one_microbatch["reference"], "one micro-batch vs the token-level loss"
    )
    assert_same(several["grads"], several["reference"], "several micro-batches vs the token-level loss")
    assert max(g.abs().max() for g in several["reference"].values()) > 1e-3  # gradients with teeth


@pytest.mark.parametrize(
    "layout", [(2, 2, 1), (2, 1, 2), (1, 2, 2), (1, 1, 4), (1, 1, 1, "fused"), (2, 2, 1, "fused")], ids=str
)
def test_update_gradient_and_metrics_equal_across_layouts(layouts, layout):
    """Every layout, and model.fused_output_layer (log-probs from hidden states and the output weight, TP=1
    and TP2 x PP2), gives the unfused TP=1 gradient and metrics within 1e-5."""
    base, got = layouts[(1, 1, 1)][100], layouts[layout][100]
    fused = layout[-1] == "fused"
    assert (got["kernel_calls"] > 0) == fused and base["kernel_calls"] == 0
    assert_same(got["grads"], base["grads"], f"(tp, pp, dp)={layout}")
    for key, tolerance in TOLERANCES.items():
        want, value = base["metrics"][key], got["metrics"][key]
        assert abs(value - want) <= tolerance * abs(want), f"{key}: {value} at {layout}, {want} at (1, 1, 1)"
    assert base["metrics"]["mismatch_kl"] > 0 and base["metrics"]["entropy_mean"] > 0.1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_update_on_gpu_is_the_token_level_mean(tiny_ckpt_gqa_tied, tmp_path):
    """On a GPU the same update goes through DDP with the gradient reduction overlapped with backward (a side
    stream); its gradient is still the token-level loss's."""
    run_distributed(_update, 1, tiny_ckpt_gqa_tied, [(1, 1)], [100], str(tmp_path))
    result = torch.load(tmp_path / "tp1_pp1_dp1.pt")[100]
    worst = max(
        relative_diff(result["grads"][n].cpu(), result["reference"][n].cpu()) for n in result["reference"]
    )
    assert worst < 1e-4, worst  # fp32 on the GPU: cuBLAS sums in another order than the reference's kernels


def _corrections(rank: int, world: int, model_dir: str, out: str) -> None:
    """policy_update with the rollout corrections, on rollout log-probs equal to the trainer's bit for bit
    (recomputed through the same packed path) or with one sample pushed off."""
    from megatron_rl.algo.packing import pack_microbatches, unpack_to_samples
    from megatron_rl.config import load_config
    from megatron_rl.distributed import ParallelLayout, init_distributed, shutdown
    from megatron_rl.model.policy import Policy
    from megatron_rl.train.optimizer import build_optimizer
    from megatron_rl.train.update import policy_update

    init_distributed(ParallelLayout(), rank=rank, world_size=world)
    corrections = ["grpo.tis_cap=2", "grpo.mask_token_ratio=2.5", "grpo.mask_sequence_ratio=1.5"]
    cases = {  # name: (overrides, push sample 0 off by a token ratio of 3, zero advantage for sample 0)
        "plain": ([], False, False),
        "corrected": (corrections, False, False),
        "masked": (corrections, True, False),
        "zero_advantage": ([], False, True),
    }
    results = {}
    for name, (overrides, push, zero) in cases.items():
        policy = Policy.from_hf(model_dir)
        cfg = load_config(None, [*config_overrides(100), *overrides])
        batch = make_batch(policy.cfg.vocab_size)
        mbs = pack_microbatches(batch.prompts, batch.responses, 100)
        exact = unpack_to_samples(
            [lp for lp, _ in policy.forward_logprobs(mbs, cfg.rollout.temperature)], mbs
        )
        batch.rollout_logprobs = [exact[i].clone() for i in range(len(SHAPES))]
        if push:
            batch.rollout_logprobs[0][3] -= math.log(3.0)  # p_trainer / p_rollout = 3 at one token
        if zero:
            batch.advantages[0] = 0.0
        metrics = policy_update(policy, build_optimizer(policy, cfg.optim), batch, cfg, step=1)
        results[name] = {"metrics": metrics, "weights": [p.detach().clone() for p in policy.parameters()]}
    torch.save(results, out)
    shutdown()


def test_rollout_corrections_in_the_update(tiny_ckpt_gqa_tied, tmp_path):
    out = str(tmp_path / "corrections.pt")
    run_distributed(_corrections, 1, tiny_ckpt_gqa_tied, out)
    r = torch.load(out)
    # Equal log-probs on both sides: the corrected update is the plain one, bit for bit.
    assert r["corrected"]["metrics"]["mismatch_max_abs_diff"] == 0.0
    assert all(
        torch.equal(a, b) for a, b in zip(r["plain"]["weights"], r["corrected"]["weights"], strict=True)
    )
    assert r["corrected"]["metrics"]["tis_clipped_fraction"] == 0.0
    assert r["corrected"]["metrics"]["masked_sequence_fraction"] == 0.0
    # One token at ratio 3: sample 0 leaves the loss (token rule 2.5; a masked sample weighs like a zero
    # advantage), one token of 8 samples' responses is above the TIS cap.
    masked = r["masked"]["metrics"]
    assert masked["masked_sequence_fraction"] == 1 / len(SHAPES)
    assert masked["tis_clipped_fraction"] == 1 / sum(n for _, n in SHAPES)
    assert masked["mismatch_ratio_max"] == pytest.approx(3.0, rel=1e-5)
    for a, b in zip(r["masked"]["weights"], r["zero_advantage"]["weights"], strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-7)
    assert any(
        not torch.equal(a, b) for a, b in zip(r["masked"]["weights"], r["plain"]["weights"], strict=True)
    )
