"""Vocab-parallel log-prob / entropy: TP=2 in two gloo processes equals TP=1 on the full vocabulary.

Each rank holds the contiguous vocabulary slice [rank * V_local, (rank + 1) * V_local) of the same logits; the
outputs on every rank and the concatenated gradient slices must match the single-process result on the whole
vocabulary, with both the Triton kernels (under the CPU interpreter) and the torch reference, and the forward
must issue exactly one collective.
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kernels import logprob_entropy

WORLD = 2
V_LOCAL = 1300  # not a multiple of the test block (1024): each slice ends in a partial block
BLOCK_V = 1024
TEMPERATURE = 0.7
BACKENDS = ("triton", "reference")
COLLECTIVES = (
    "all_gather_single",
    "all_gather_into_tensor",
    "all_gather",
    "all_reduce",
    "broadcast",
    "reduce",
)


def make_case():
    gen = torch.Generator().manual_seed(0)
    n_rows, vocab = 10, WORLD * V_LOCAL
    logits = (torch.randn(n_rows, vocab, generator=gen) * 5).to(torch.bfloat16)
    targets = torch.randint(0, vocab, (n_rows,), generator=gen)
    targets[:6] = torch.tensor([-100, V_LOCAL - 1, V_LOCAL, 0, vocab - 1, 5])  # ignored, both slice edges
    targets[6] = logits[6].float().argmax()
    logits[7, :V_LOCAL] = -torch.inf  # rank 0's slice of row 7 is all masked
    return logits, targets, torch.randn(n_rows, generator=gen), torch.randn(n_rows, generator=gen)


def run(logits, targets, g_lp, g_ent, backend, tp_group=None):
    x = logits.clone().requires_grad_()
    lp, ent = logprob_entropy(x, targets, TEMPERATURE, tp_group, backend=backend, block_v=BLOCK_V)
    (grad,) = torch.autograd.grad([lp, ent], [x], [g_lp, g_ent])
    return lp, ent, grad


def _tp_worker(rank, store_path, out_dir):
    os.environ["TRITON_INTERPRET"] = "1"
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=WORLD)
    try:
        group = dist.new_group(list(range(WORLD)))
        calls = []
        for name in COLLECTIVES:  # count every collective the op issues
            if hasattr(dist, name):
                original = getattr(dist, name)
                setattr(dist, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
        logits, targets, g_lp, g_ent = make_case()
        local = logits[:, rank * V_LOCAL : (rank + 1) * V_LOCAL]
        results = {}
        for backend in BACKENDS:
            calls.clear()
            lp, ent, grad = run(local, targets, g_lp, g_ent, backend, group)
            results[backend] = {"lp": lp, "ent": ent, "grad": grad, "collectives": list(calls)}
        # Targets are checked against the global vocabulary: rank 0 accepts rank 1's ids, rejects the rest.
        try:
            logprob_entropy(
                local, torch.full_like(targets, WORLD * V_LOCAL), tp_group=group, backend="reference"
            )
        except ValueError as e:
            results["range_error"] = str(e)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_tp2_matches_tp1(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # inherited by the spawned ranks
    mp.spawn(_tp_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    logits, targets, g_lp, g_ent = make_case()
    for backend in BACKENDS:
        lp, ent, grad = run(logits, targets, g_lp, g_ent, backend)
        assert torch.isfinite(lp).all() and torch.isfinite(ent).all() and lp[0] == 0.0
        for result in ranks:
            got = result[backend]
            # One collective: the packed partials' all-gather (all_gather_into_tensor before torch 2.13).
            assert len(got["collectives"]) == 1 and "all_gather" in got["collectives"][0], got["collectives"]
            # The merge adds a few fp32 roundings to the single-rank path: |err| of a few u32 * |z|.
            torch.testing.assert_close(got["lp"], lp, rtol=1e-6, atol=2e-5)
            torch.testing.assert_close(got["ent"], ent, rtol=1e-6, atol=2e-5)
            assert "must be in [0, 2600)" in result["range_error"]
        tp_grad = torch.cat([result[backend]["grad"] for result in ranks], dim=1)
        # bf16 gradients: within one bf16 ulp (the Triton interpreter truncates to bf16).
        torch.testing.assert_close(tp_grad, grad, rtol=2.0**-7, atol=1e-7)
        assert torch.count_nonzero(tp_grad[7, :V_LOCAL]) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_slice_without_group_rejects_ids_past_it(monkeypatch, backend):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    logits, targets, g_lp, g_ent = make_case()
    with pytest.raises(
        ValueError, match=r"targets\[2\] = 1300"
    ):  # one rank's slice alone: ids past it are bad
        logprob_entropy(logits[:, :V_LOCAL], targets, backend=backend)
