"""HF <-> Megatron conversion with real megatron-core: bit-exact round trip and logits equal to transformers."""

from __future__ import annotations

import weakref
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.distributed_helpers import run_distributed


def _check_model(rank: int, world: int, model_dir: str, tp: int, pp: int) -> None:
    from megatron.core import parallel_state
    from transformers import Qwen2ForCausalLM

    from megatron_rl.distributed import ParallelLayout, init_distributed, shutdown
    from megatron_rl.model.convert import SafetensorsCheckpoint
    from megatron_rl.model.policy import Policy
    from megatron_rl.train.rl import save_hf_checkpoint

    init_distributed(ParallelLayout(tp=tp, pp=pp), rank=rank, world_size=world)
    policy = Policy.from_hf(model_dir)
    ckpt = SafetensorsCheckpoint(model_dir)

    # 1. Round trip: every exported tensor equals the checkpoint's bit for bit, none missing, none extra.
    exported = {}
    for bucket in policy.hf_buckets(bucket_bytes=50_000):  # small buckets: exercise the bucketing
        for name, tensor in bucket:
            assert name not in exported, f"{name} exported twice"
            exported[name] = tensor
    expected = set(ckpt.file_of) - ({"lm_head.weight"} if policy.cfg.tie_word_embeddings else set())
    assert set(exported) == expected
    for name, tensor in exported.items():
        assert torch.equal(tensor, ckpt.get(name)), f"{name} differs after the round trip"

    # 2. Streamed: when a bucket is sent, no tensor of an earlier bucket is alive (the next one is being
    # gathered meanwhile: two at most), and the manifest from the config is what is produced.
    _check_streamed_push(policy)

    # 3. The HF checkpoint is written bucket by bucket: shards and an index, the same tensors.
    out = Path(model_dir).parent / f"saved-tp{tp}-pp{pp}"
    save_hf_checkpoint(policy, out, bucket_bytes=400_000)
    if rank == 0:
        saved = SafetensorsCheckpoint(out)
        assert (out / "model.safetensors.index.json").is_file() and len(set(saved.file_of.values())) > 2
        assert set(saved.file_of) == expected
        for name in expected:
            assert torch.equal(saved.get(name), ckpt.get(name)), f"{name} differs in the saved checkpoint"
    dist.barrier()

    # 4. Logits equal transformers' Qwen2 on the same checkpoint (fp32).
    if pp == 1:
        hf = Qwen2ForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        gen = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, policy.cfg.vocab_size, (3, 29), generator=gen)
        positions = torch.arange(tokens.shape[1]).expand_as(tokens)
        with torch.no_grad():
            local = policy.model.eval()(input_ids=tokens, position_ids=positions, attention_mask=None)
            if tp > 1:  # vocab-parallel: gather the slices
                parts = [torch.empty_like(local) for _ in range(tp)]
                dist.all_gather(
                    parts, local.contiguous(), group=parallel_state.get_tensor_model_parallel_group()
                )
                local = torch.cat(parts, dim=-1)
            reference = hf(tokens).logits
        assert local.shape == reference.shape
        diff = (local - reference).abs().max().item()
        assert diff < 1e-4, f"max |megatron - transformers| logits = {diff}"
        assert reference.std() > 0.5  # the checkpoint's logits are far from flat: the check has teeth
    shutdown()


def _check_streamed_push(policy) -> None:
    from megatron_rl.rollout.weight_sync import WeightPush, WeightStream, push_stream

    sent: list[list[weakref.ref]] = []

    def send_bucket(slot, bucket, checksums):
        alive = [r for earlier in sent for r in earlier if r() is not None]
        assert not alive, f"{len(alive)} tensor(s) of earlier buckets still alive at bucket {len(sent)}"
        sent.append([weakref.ref(t) for _, t in bucket])
        return [checksums]

    push = WeightPush(lambda method, *args: {"reload_s": 0.0}, send_bucket, "test", lambda e: e)
    [report] = push_stream([push], WeightStream(policy.hf_manifest(), policy.hf_buckets(50_000)))
    assert len(sent) > 3 and report.tensors == len(policy.hf_manifest())


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2)])
def test_round_trip_and_logits(tiny_ckpt, tp, pp):
    run_distributed(_check_model, tp * pp, tiny_ckpt, tp, pp)


def test_round_trip_and_logits_gqa_tied_tp2(tiny_ckpt_gqa_tied):
    run_distributed(_check_model, 2, tiny_ckpt_gqa_tied, 2, 1)


def _check_rank_reads_only_its_slices(rank: int, world: int, model_dirs: list[str]) -> None:
    from megatron_rl.distributed import ParallelLayout, init_distributed, shutdown
    from megatron_rl.model.build import build_gpt_model
    from megatron_rl.model.convert import SafetensorsCheckpoint, load_hf_into_megatron
    from megatron_rl.model.hf_config import expected_hf_shapes, load_hf_config

    init_distributed(ParallelLayout(tp=world, pp=1), rank=rank, world_size=world)
    for model_dir in model_dirs:
        cfg = load_hf_config(model_dir)
        ckpt = SafetensorsCheckpoint(model_dir)
        sliced = build_gpt_model(cfg)
        load_hf_into_megatron(sliced, cfg, ckpt)

        # Norms are replicated (read whole); every other tensor is split evenly over the TP ranks.
        whole = SafetensorsCheckpoint(model_dir)
        sizes = {name: whole.get(name).nbytes for name in expected_hf_shapes(cfg)}
        replicated = {name for name in sizes if name.endswith("norm.weight")}
        assert len(replicated) == 2 * cfg.num_hidden_layers + 1
        expected = (
            sum(sizes[n] for n in replicated) + sum(sizes[n] for n in sizes if n not in replicated) // world
        )
        assert ckpt.bytes_read == expected, (model_dir, ckpt.bytes_read, expected, sum(sizes.values()))

        # The same shards as cutting the whole tensors (the path a `transform` takes), which the round-trip
        # and logits tests above check against the checkpoint and transformers.
        reference = build_gpt_model(cfg)
        load_hf_into_megatron(reference, cfg, SafetensorsCheckpoint(model_dir), transform=lambda name, t: t)
        mine, theirs = dict(sliced.named_parameters()), dict(reference.named_parameters())
        assert mine.keys() == theirs.keys()
        for name, param in mine.items():
            assert torch.equal(param, theirs[name]), f"{name} differs between sliced and whole-tensor loading"
    shutdown()


def test_tp2_rank_reads_only_its_slices(tiny_ckpt, tiny_ckpt_gqa_tied):
    """tiny_ckpt has 1 KV head (TP=2 cuts its qkv group in two); tiny_ckpt_gqa_tied has one KV head per rank."""
    run_distributed(_check_rank_reads_only_its_slices, 2, [tiny_ckpt, tiny_ckpt_gqa_tied])


@pytest.mark.parametrize("heads,kv_heads,tp,tied", [(4, 2, 1, True), (4, 2, 2, True), (8, 4, 4, False)])
def test_local_export_is_vllm_shards_of_the_gathered_tensors(heads, kv_heads, tp, tied):
    """The local export (no gather): each TP rank's HF tensors, cut from its Megatron shard, are the rows (o and
    down: columns) vLLM's worker of that rank takes from the whole tensor; joined over ranks in vLLM's layout
    they are the whole HF tensors, the ones merge_shards gathers; their shapes are local_hf_shapes'."""
    from megatron_rl.model.convert import (
        local_hf_shapes,
        local_hf_tensors,
        local_layout_problem,
        merge_shards,
        shard_for_rank,
        stage_rules,
    )
    from megatron_rl.model.hf_config import expected_hf_shapes
    from megatron_rl.model.tiny import TinyShape, tiny_qwen2_config

    shape = TinyShape(
        hidden_size=64, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=16,
        tie_word_embeddings=tied, num_hidden_layers=2,
    )  # fmt: skip
    cfg = tiny_qwen2_config(shape)
    assert local_layout_problem(cfg, tp) is None
    gen = torch.Generator().manual_seed(0)
    hf = {name: torch.randn(s, generator=gen) for name, s in expected_hf_shapes(cfg).items()}
    local_shapes = local_hf_shapes(cfg, tp)
    seen = set()
    for rule in stage_rules(cfg, 0, 1, te=False):
        whole = [hf[n] for n in rule.hf]
        shards = [shard_for_rank(rule, whole, cfg, r, tp) for r in range(tp)]
        per_rank = [local_hf_tensors(rule, shards[r], cfg, tp) for r in range(tp)]
        gathered = merge_shards(rule, shards, cfg)
        for i, name in enumerate(rule.hf):
            dim = 1 if rule.split == "row" else 0
            for r in range(tp):
                assert tuple(per_rank[r][i].shape) == local_shapes[name], name
                if rule.split != "replicated":  # vLLM's cut of the whole tensor for its rank r
                    assert torch.equal(per_rank[r][i], whole[i].chunk(tp, dim=dim)[r]), (name, r)
            joined = (
                per_rank[0][i] if rule.split == "replicated" else torch.cat([p[i] for p in per_rank], dim)
            )
            assert torch.equal(joined, whole[i]) and torch.equal(joined, gathered[i]), name
            seen.add(name)
    assert seen == set(local_shapes) == set(hf)


def test_local_layout_problems():
    """Layouts where a Megatron rank's shard is not its vLLM worker's: named, so the sync gathers instead."""
    from megatron_rl.model.convert import local_layout_problem
    from megatron_rl.model.tiny import TinyShape, tiny_qwen2_config

    mqa = tiny_qwen2_config(
        TinyShape()
    )  # 1 KV head: vLLM replicates it over 2 ranks, Megatron splits its group
    assert "KV head" in local_layout_problem(mqa, 2)
    assert local_layout_problem(mqa, 1) is None
    gqa = TinyShape(num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    assert "multiple of 64" in local_layout_problem(tiny_qwen2_config(gqa, vocab_size=1000), 2)
