"""optim.distributed_optimizer: Adam state sharded over data-parallel ranks, same update as plain AdamW."""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_rl.config import load_config
from megatron_rl.distributed import ParallelLayout, init_distributed, shutdown
from tests.distributed_helpers import run_distributed


def _step(policy, optimizer) -> None:
    """One step on the same data on every rank (gradients equal, as after the data-parallel all-reduce)."""
    from megatron_rl.train.optimizer import PolicyOptimizer

    policy.zero_grads()
    ids = torch.arange(16).view(1, 16) % 100
    policy.model(ids, torch.arange(16).view(1, 16), None).float().pow(2).mean().backward()
    if not isinstance(
        optimizer, PolicyOptimizer
    ):  # a plain torch optimizer reads .grad, in the model's dtype
        for p in policy.parameters():
            p.grad = p.main_grad.to(p.dtype)
    optimizer.step()


def _sharded_matches_plain(rank: int, world: int, model_dir: str, out: str) -> None:
    from megatron_rl.model.policy import Policy
    from megatron_rl.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
    from megatron_rl.train.optimizer import build_optimizer

    init_distributed(ParallelLayout(), rank=rank, world_size=world)  # data-parallel 2
    try:
        sharded_cfg = load_config(None, ["optim.distributed_optimizer=true", "optim.lr=1e-2"]).optim
        plain_cfg = load_config(None, ["optim.lr=1e-2"]).optim
        sharded, plain = Policy.from_hf(model_dir), Policy.from_hf(model_dir)
        sharded_opt = build_optimizer(sharded, sharded_cfg)
        plain_opt = build_optimizer(plain, plain_cfg)
        assert sharded_opt.group is not None and plain_opt.group is None
        for _ in range(2):
            _step(sharded, sharded_opt)
            _step(plain, plain_opt)
        for (name, a), b in zip(sharded.model.named_parameters(), plain.model.parameters(), strict=True):
            assert torch.allclose(a, b, rtol=0, atol=1e-7), name
        n_params = len(list(sharded.model.parameters()))
        assert 0 < len(sharded_opt.inner.state) < n_params  # this rank keeps moments for its share only
        sizes = [p.numel() for p in sharded.model.parameters()]
        owned = sum(sizes[i] for i in sharded_opt.owned)
        assert abs(owned - sum(sizes) / 2) <= max(sizes) / 2  # the shares are balanced by size

        save_checkpoint(Path(out), 2, sharded, sharded_opt, {"step": 2, "data_position": 0}, keep=1)
        fresh = Policy.from_hf(model_dir)
        fresh_opt = build_optimizer(fresh, sharded_cfg)
        load_checkpoint(latest_checkpoint(Path(out)), fresh, fresh_opt)
        saved, loaded = sharded_opt.state_dict()["inner"]["state"], fresh_opt.state_dict()["inner"]["state"]
        assert saved.keys() == loaded.keys() and saved
        for key in saved:
            assert torch.equal(saved[key]["exp_avg_sq"], loaded[key]["exp_avg_sq"])
        _step(sharded, sharded_opt)
        _step(fresh, fresh_opt)
        for a, b in zip(sharded.model.parameters(), fresh.model.parameters(), strict=True):
            assert torch.equal(a, b)  # the resumed optimizer continues exactly
    finally:
        shutdown()


def test_distributed_optimizer_matches_adamw_and_resumes(tiny_ckpt, tmp_path):
    run_distributed(_sharded_matches_plain, 2, tiny_ckpt, str(tmp_path / "checkpoints"))


def _bf16_master_weights(rank: int, world: int, model_dir: str, out: str) -> None:
    """Steps far below bf16's resolution are lost by a bf16 AdamW but accumulate in the fp32 masters."""
    from megatron_rl.model.policy import Policy
    from megatron_rl.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
    from megatron_rl.train.optimizer import build_optimizer

    init_distributed(ParallelLayout(), rank=rank, world_size=world)
    try:
        cfg = load_config(None, ["optim.lr=1e-5"]).optim
        mixed = Policy.from_hf(model_dir, params_dtype=torch.bfloat16)
        pure = Policy.from_hf(model_dir, params_dtype=torch.bfloat16)
        start = [p.detach().clone() for p in mixed.model.parameters()]
        mixed_opt = build_optimizer(mixed, cfg)
        pure_opt = torch.optim.AdamW(pure.model.parameters(), lr=cfg.lr)
        assert mixed_opt.state_dict()["master"]  # fp32 copies of the bf16 parameters
        for _ in range(20):
            _step(mixed, mixed_opt)
            _step(pure, pure_opt)
        moved_mixed = sum(int((p != s).sum()) for p, s in zip(mixed.model.parameters(), start, strict=True))
        moved_pure = sum(int((p != s).sum()) for p, s in zip(pure.model.parameters(), start, strict=True))
        assert moved_mixed > 3 * max(1, moved_pure), (moved_mixed, moved_pure)
        assert any(p.dtype == torch.bfloat16 for p in mixed.model.parameters())
        for i, p in enumerate(mixed.model.parameters()):
            m = mixed_opt.master[i]
            assert m.dtype == torch.float32 and torch.equal(p, m.to(p.dtype))

        save_checkpoint(Path(out), 20, mixed, mixed_opt, {"step": 20, "data_position": 0}, keep=1)
        fresh = Policy.from_hf(model_dir, params_dtype=torch.bfloat16)
        fresh_opt = build_optimizer(fresh, cfg)
        load_checkpoint(latest_checkpoint(Path(out)), fresh, fresh_opt)
        for i, m in mixed_opt.master.items():
            assert torch.equal(m, fresh_opt.master[i])  # the masters, not their bf16 rounding, come back
    finally:
        shutdown()


def test_bf16_model_keeps_fp32_master_weights(tiny_ckpt, tmp_path):
    run_distributed(_bf16_master_weights, 1, tiny_ckpt, str(tmp_path / "checkpoints"))


def test_balanced_owners_spread_parameters_by_size():
    from megatron_rl.train.optimizer import balanced_owners

    assert balanced_owners([10, 1, 1, 8], 2) == [0, 1, 1, 1]
    assert balanced_owners([5, 5, 5], 1) == [0, 0, 0]


def _tp_grad_norm(rank: int, world: int, model_dir: str, out: str) -> None:
    """Under TP the gradient norm counts each shard once and replicated parameters stay identical on every rank
    (a per-rank norm would clip ranks differently and make the replicated layer norms drift apart)."""
    import torch.distributed as dist

    from megatron_rl.algo.packing import pack_microbatches
    from megatron_rl.model.policy import Policy
    from megatron_rl.train.optimizer import build_optimizer

    init_distributed(ParallelLayout(tp=world), rank=rank, world_size=world)
    try:
        policy = Policy.from_hf(model_dir)
        optimizer = build_optimizer(policy, load_config(None, ["optim.lr=1e-2"]).optim)
        prompts = [[3, 4, 5], [6, 7]]
        responses = [[8, 9, 10, 11], [12, 13, 14]]
        first_norm = None

        def nll(mb, logprobs, entropy):  # log-probs from the vocab-parallel logits (same on every rank)
            return -(logprobs * mb.loss_mask).sum(), {}

        for _ in range(3):
            policy.zero_grads()
            policy.forward_backward(pack_microbatches(prompts, responses, 64), 1.0, nll)
            norm = policy.clip_grads(max_norm=1e-3)  # always clips
            first_norm = norm if first_norm is None else first_norm
            optimizer.step()
        norms = [None] * world
        dist.all_gather_object(norms, norm)
        assert norms[0] == norms[-1], norms
        torch.save(first_norm, Path(out) / f"norm_tp{world}.pt")  # same weights: comparable across TP
        for name, p in policy.model.named_parameters():
            if not getattr(p, "tensor_model_parallel", False):
                copies = [torch.zeros_like(p) for _ in range(world)]
                dist.all_gather(copies, p.detach().contiguous())
                assert torch.equal(copies[0], copies[-1]), name
    finally:
        shutdown()


def test_tp_gradient_norm_matches_tp1_and_replicas_stay_equal(tiny_ckpt, tmp_path):
    run_distributed(_tp_grad_norm, 1, tiny_ckpt, str(tmp_path))
    run_distributed(_tp_grad_norm, 2, tiny_ckpt, str(tmp_path))
    tp1, tp2 = torch.load(tmp_path / "norm_tp1.pt"), torch.load(tmp_path / "norm_tp2.pt")
    assert abs(tp1 - tp2) <= 1e-5 * tp1, (tp1, tp2)
