"""Colocated multi-engine rollouts: every trainer rank hosts part of a vLLM engine (vLLM's external launcher).

Two ranks, a Megatron policy and a vLLM engine per rank (two engines, TP=1) or one engine across both (TP=2):
sampling as a collective (each engine its slice, gathered to all ranks), weight pushes into each rank's
in-process engine, and a 2-rank tensor-parallel `megatron-rl train` run with rollout.engine_ranks=all.
"""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from tests.distributed_helpers import run_distributed

PROMPTS = [[5, 6, 7], [8, 9, 10], [11, 12], [13, 14, 15, 16], [17]]


def _engines(rank: int, world: int, model_dir: str, trainer_tp: int, rollout_tp: int, transport: str) -> None:
    import torch.distributed as dist
    from transformers import Qwen2ForCausalLM

    from megatron_rl.distributed import ParallelLayout, init_distributed, shutdown
    from megatron_rl.model.policy import Policy
    from megatron_rl.rollout.vllm_engine import VLLMEngine
    from megatron_rl.train.rollouts import generate_all

    init_distributed(ParallelLayout(tp=trainer_tp), rank=rank, world_size=world)
    policy = Policy.from_hf(model_dir)
    engine = VLLMEngine(
        model_dir, tensor_parallel_size=rollout_tp, external_launcher=True, weight_transport=transport,
        max_model_len=128,
    )  # fmt: skip
    assert engine.num_engines == world // rollout_tp and engine.engine_index == rank // rollout_tp
    sampling = {"n": 2, "max_tokens": 6, "seed": 3}

    # Every rank gets every prompt's samples, in prompt order, whichever engine made them.
    samples = generate_all(engine, PROMPTS, **sampling)
    assert [s.prompt_index for s in samples] == [i for i in range(len(PROMPTS)) for _ in range(2)]
    assert [s.prompt_ids for s in samples[::2]] == PROMPTS
    everyone = [None] * world
    dist.all_gather_object(everyone, [s.token_ids for s in samples])
    assert everyone[0] == everyone[1]
    # An engine with an empty slice (one prompt, two engines) still takes part: no hang, one prompt back.
    assert len(generate_all(engine, PROMPTS[:1], **sampling)) == 2

    # Push changed weights (every rank exports full HF tensors, TP gathered) and check vLLM's logprobs
    # against transformers on the pushed tensors.
    with torch.no_grad():
        for p in policy.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(7)))
    buckets = list(policy.hf_buckets())
    tensors = {name: t for bucket in buckets for name, t in bucket}
    assert tensors["model.embed_tokens.weight"].shape == (policy.cfg.vocab_size, policy.cfg.hidden_size)
    report = engine.update_weights(buckets)
    assert report.tensors == len(tensors)
    assert report.transport == ("local" if transport == "auto" else transport)
    hf = Qwen2ForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    hf.load_state_dict(tensors, strict=False)
    worst = 0.0
    for s in generate_all(engine, PROMPTS, **sampling):
        ids = torch.tensor([s.prompt_ids + s.token_ids])
        with torch.no_grad():
            logprobs = torch.log_softmax(hf(ids).logits[0, len(s.prompt_ids) - 1 : -1], -1)
        ref = logprobs.gather(-1, torch.tensor(s.token_ids)[:, None])[:, 0]
        worst = max(worst, (ref - torch.tensor(s.logprobs)).abs().max().item())
    assert worst < 1e-5, f"rank {rank}: max |vLLM - transformers| logprob after the push = {worst}"
    engine.shutdown()
    shutdown()


# Trainer TP=2 with an engine on each rank and the "local" transport is the layout of the training run below.
@pytest.mark.parametrize("trainer_tp,rollout_tp,transport", [(1, 1, "shm"), (2, 2, "rpc")])
def test_engines_on_every_rank(tiny_ckpt, trainer_tp, rollout_tp, transport):
    run_distributed(_engines, 2, tiny_ckpt, trainer_tp, rollout_tp, transport)


def test_two_rank_train_with_two_engines_and_resume(tmp_path):
    """A tensor-parallel trainer (TP=2) with one vLLM engine on each of its ranks. After SFT and RL updates,
    vLLM's sampling log-probs still equal the trainer's recomputation (replicated parameters must stay identical
    across TP ranks, every push must reach both engines), and a resumed run gives the engines the checkpoint's
    weights."""
    from tests.test_train_run import PIPELINE_ENV as env
    from tests.test_train_run import _args, torchrun

    launcher = torchrun(2)

    def run(steps: int, *extra: str) -> subprocess.CompletedProcess:
        args = _args(tmp_path, "two", steps)  # args[1:4]: "-m megatron_rl.cli train"
        cmd = launcher + args[1:4] + list(extra) + args[4:]
        cmd += ["rollout.engine_ranks=all", "model.tensor_parallel_size=2", "run.tensorboard=false"]
        # 10 SFT steps: enough for replicated parameters to drift apart across TP ranks if they could
        cmd += ["sft.max_steps=10", "sft.eval_after=10", "sft.eval_every=10"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
        assert proc.returncode == 0, proc.stderr[-4000:]
        return proc

    first = run(2)
    assert "rank 0 hosts engine 0 of 2" in first.stderr and "rank 1 hosts engine 1 of 2" in first.stderr
    assert len(first.stdout.strip().splitlines()) == 1  # the result line, printed by rank 0 only
    assert json.loads(first.stdout)["run_dir"] == str(tmp_path / "two")
    # Resume on both engines from the step-2 checkpoint: the engines get the checkpoint's weights, so the
    # step-3 rollouts are scored by the trainer with the same log-probs vLLM sampled them with.
    second = run(3, "--resume")
    assert "at step 2" in second.stderr
    records = {}
    for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        records[r["step"]] = r
    assert sorted(records) == [1, 2, 3]
    for step in (1, 2, 3):
        assert records[step]["mismatch_max_abs_diff"] < 1e-5, records[step]
    assert (tmp_path / "two" / "final_model" / "model.safetensors").is_file()


def _local_shards(rank: int, world: int, model_dir: str) -> None:
    import torch.distributed as dist
    from transformers import Qwen2ForCausalLM

    from megatron_rl.config import load_config
    from megatron_rl.distributed import ParallelLayout, init_distributed, shutdown
    from megatron_rl.model.policy import Policy
    from megatron_rl.rollout import transport as transport_module
    from megatron_rl.rollout.base import WeightSyncError
    from megatron_rl.rollout.vllm_engine import VLLMEngine
    from megatron_rl.rollout.weight_sync import WeightStream
    from megatron_rl.train.rl import local_shard_sync, sync_weights
    from megatron_rl.train.rollouts import generate_all

    init_distributed(ParallelLayout(tp=2), rank=rank, world_size=world)
    policy = Policy.from_hf(model_dir)
    engine = VLLMEngine(model_dir, tensor_parallel_size=2, external_launcher=True, max_model_len=128)
    cfg = load_config(None, ["rollout.engine_ranks=all", "rollout.tensor_parallel_size=2"])
    assert local_shard_sync(cfg, policy, engine)  # same TP, same TP rank, GQA 2 KV heads, vocab of 64s
    assert not local_shard_sync(
        load_config(None, ["rollout.engine_ranks=all"]), policy, engine
    )  # rollout TP 1
    sampling = {"n": 2, "max_tokens": 6, "seed": 3}
    before = [(s.token_ids, s.logprobs) for s in generate_all(engine, PROMPTS, **sampling)]
    with torch.no_grad():
        for p in policy.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(7)))
    whole = {name: t.clone() for bucket in policy.hf_buckets() for name, t in bucket}  # the gathered tensors

    # The local-shard sync: no gather of any kind, only this rank's part of each tensor leaves the trainer.
    collectives, shapes = [], {}
    real = {name: getattr(dist, name) for name in ("all_gather", "all_gather_into_tensor", "broadcast")}

    def counting(name):
        def call(*args, **kwargs):
            collectives.append(name)
            return real[name](*args, **kwargs)

        return call

    real_local = policy.hf_local_buckets

    def recording(*args):
        for bucket in real_local(*args):
            shapes.update((n, tuple(t.shape)) for n, t in bucket)
            yield bucket

    policy.hf_local_buckets = recording
    for name in real:
        setattr(dist, name, counting(name))
    try:
        metrics = sync_weights(policy, engine, 0.05, local_shards=True)  # 50 KB buckets: several per push
    finally:
        for name, fn in real.items():
            setattr(dist, name, fn)
        policy.hf_local_buckets = real_local
    assert metrics["sync_local_shards"] == 1.0 and collectives == [], collectives
    assert shapes == policy.hf_local_manifest()
    assert (
        shapes["model.layers.0.self_attn.q_proj.weight"][0]
        == whole["model.layers.0.self_attn.q_proj.weight"].shape[0] // 2
    )
    local = [(s.token_ids, s.logprobs) for s in generate_all(engine, PROMPTS, **sampling)]
    assert local != before
    # vLLM now serves exactly the gathered tensors: its logprobs are transformers' on them
    hf = Qwen2ForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    hf.load_state_dict(whole, strict=False)
    hf.tie_weights()
    worst = 0.0
    for s in generate_all(engine, PROMPTS, **sampling):
        ids = torch.tensor([s.prompt_ids + s.token_ids])
        with torch.no_grad():
            ref = torch.log_softmax(hf(ids).logits[0, len(s.prompt_ids) - 1 : -1], -1)
        ref = ref.gather(-1, torch.tensor(s.token_ids)[:, None])[:, 0]
        worst = max(worst, (ref - torch.tensor(s.logprobs)).abs().max().item())
    assert worst < 1e-5, f"rank {rank}: max |vLLM - transformers| logprob after the local push = {worst}"

    # A gathered sync of the same policy afterwards (the worker's tensors have their usual loaders back) gives
    # vLLM the same weights: the same samples and logprobs, exactly.
    assert sync_weights(policy, engine, 0.05)["sync_local_shards"] == 0.0
    assert [(s.token_ids, s.logprobs) for s in generate_all(engine, PROMPTS, **sampling)] == local

    # Refused, naming the tensor: a local tensor changed on the way; a local manifest with a whole tensor's
    # shape; shards of the other TP rank. Then a whole push (after the refused local ones, which put the
    # worker's loaders back as they were) serves the policy again.
    target = "model.layers.0.self_attn.k_proj.weight"
    real_send = transport_module.LocalTransport.send_bucket

    def tampering(self, slot, bucket, checksums):
        bucket = [
            (n, t.clone().index_fill_(0, torch.tensor([0]), 1.0) if n == target else t) for n, t in bucket
        ]
        return real_send(self, slot, bucket, checksums)

    transport_module.LocalTransport.send_bucket = tampering
    try:
        with pytest.raises(WeightSyncError, match=rf"tensor '{target}' arrived corrupted"):
            sync_weights(policy, engine, 0.05, local_shards=True)
    finally:
        transport_module.LocalTransport.send_bucket = real_send
    manifest = dict(policy.hf_local_manifest())
    manifest[target] = tuple(whole[target].shape)
    with pytest.raises(WeightSyncError, match=rf"tensor '{target}' has shape"):
        engine.update_weights(WeightStream(manifest, policy.hf_local_buckets(), policy.tp_shard))
    with pytest.raises(WeightSyncError, match=f"reached the vLLM worker of TP rank {rank}"):
        engine.update_weights(
            WeightStream(policy.hf_local_manifest(), policy.hf_local_buckets(), (1 - rank, 2))
        )
    sync_weights(policy, engine, 0.05)
    assert [(s.token_ids, s.logprobs) for s in generate_all(engine, PROMPTS, **sampling)] == local
    engine.shutdown()
    shutdown()


def test_local_shard_sync_tp2(tiny_ckpt_gqa_tied):
    """Trainer TP=2 and one vLLM engine of TP=2 over the same two ranks: each rank pushes its own Megatron
    shards to its own vLLM worker (no TP gather), which then serves exactly what a gathered push gives it;
    verification (checksums, manifest of local shapes, the worker's TP rank) still refuses by name."""
    run_distributed(_local_shards, 2, tiny_ckpt_gqa_tied)
