"""`megatron-rl plan`: hand-computed sizes for the tiny shape, real parameter counts, the stage configs fit."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open
from typer.testing import CliRunner

from launchers.curriculum import STAGES, stage_config, stage_overrides
from megatron_rl.cli import app
from megatron_rl.config import load_config
from megatron_rl.model.hf_config import load_hf_config
from megatron_rl.plan import (
    ARCHITECTURES,
    GIB,
    PlanError,
    format_plan,
    make_plan,
    microbatches_per_rank,
    resolve_shape,
    rollout_memory,
    stage_params,
    total_params,
    train_memory,
)

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "tiny_math.yaml"
STAGE_CONFIGS = sorted((REPO / "configs").glob("*_stage_*.yaml"))


def _checkpoint_numel(model_dir: str) -> int:
    """Parameters stored in an HF checkpoint (a tied lm_head is not stored)."""
    with safe_open(str(Path(model_dir) / "model.safetensors"), framework="pt") as f:
        return sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())


# ---------------------------------------------------------------- parameter counts


def test_tiny_shape_by_hand():
    """hidden 128, 2 layers, 2 heads x 64, 1 KV head, MLP 512, vocab 128 (103 tokens padded to 64s), untied."""
    shape, source = resolve_shape(load_config(TINY))
    assert "tiny" in source and shape.vocab_size == 128
    q = 128 * 128 + 128  # q_proj weight + bias
    kv = 2 * (64 * 128 + 64)  # k_proj, v_proj (one KV head of 64)
    o = 128 * 128
    mlp = 3 * 128 * 512  # gate, up, down
    norms = 2 * 128
    layer = q + kv + o + mlp + norms
    assert layer == 246_272
    assert total_params(shape) == 2 * layer + 2 * 128 * 128 + 128 == 525_440  # + embed, lm_head, final norm
    # Tensor-parallel 2 for vLLM: the one KV head is replicated, everything else halves.
    rank_layer = (64 * 128 + 64) + kv + 128 * 64 + 3 * 128 * 256 + norms
    assert stage_params(shape, 2, 1) == [2 * rank_layer + 2 * 64 * 128 + 128]
    # Pipeline 2: the embedding on the first stage, final norm + lm_head on the last.
    assert stage_params(shape, 1, 2) == [layer + 128 * 128, layer + 128 + 128 * 128]


def test_parameter_count_equals_the_real_checkpoints(tiny_ckpt, tiny_ckpt_gqa_tied):
    for ckpt in (tiny_ckpt, tiny_ckpt_gqa_tied):
        cfg = load_config(TINY, [f"model.path={ckpt}"])
        shape, source = resolve_shape(cfg)
        assert source.endswith("config.json")
        assert total_params(shape) == _checkpoint_numel(ckpt), ckpt


def test_built_in_shapes_give_the_published_sizes():
    # Qwen2.5-7B / DeepSeek-R1-Distill-Qwen-7B: 7.62B; -14B: 14.77B (model cards).
    assert total_params(ARCHITECTURES["qwen2-7b"]) == 7_615_616_512
    assert total_params(ARCHITECTURES["qwen2-14b"]) == 14_770_033_664


def test_a_config_json_wins_over_the_built_in_shape(tiny_ckpt):
    cfg = load_config(TINY, [f"model.path={tiny_ckpt}", "model.architecture=qwen2-7b"])
    assert resolve_shape(cfg)[0] == load_hf_config(tiny_ckpt)


# ---------------------------------------------------------------- memory by hand


def test_tiny_memory_by_hand():
    cfg = load_config(TINY)  # fp32, no recompute, 4096 tokens per micro-batch, 32 prompts x 8, 48 tokens
    shape, _ = resolve_shape(cfg)
    t = train_memory(cfg, shape, gpus=1)
    p = 525_440
    assert t.weights_gib * GIB == p * 4 and t.grads_gib * GIB == p * 4
    assert t.optimizer_gib * GIB == p * 8  # fp32: Adam's two moments, the weights are the master copy
    per_layer_token = 4 * (4 * 128 + 2 * 128 + 2 * 64 + 3 * 512)  # bytes: whole 4h, split q/attn/k/v/ffn
    transient = 4096 * 4 * 2 * 512  # one gate/up gradient during backward
    assert t.activations_gib * GIB == 2 * per_layer_token * 4096 + transient
    assert t.logits_gib * GIB == 4096 * 128 * 4 * 2 + 4096 * 4 * 128  # logits + grad, final-norm output

    r = rollout_memory(cfg, shape, gpus=1)
    kv_token = 2 * 2 * 1 * 64 * 4  # K and V x layers x KV heads x head dim x fp32
    assert r.kv_per_token_kib * 1024 == kv_token
    assert r.sequence_tokens == 1024 + 48  # max_prompt_tokens + max_response_tokens, a multiple of 16
    assert r.concurrent_sequences == 32 * 8  # one engine runs the whole batch
    assert r.kv_cache_gib * GIB == 256 * 1072 * kv_token
    assert r.weights_gib * GIB == p * 4
    assert r.budget_gib == pytest.approx(0.5 * 79.6)


def test_recompute_keeps_only_layer_inputs():
    cfg = load_config(TINY, ["model.recompute=true"])
    shape, _ = resolve_shape(cfg)
    t = train_memory(cfg, shape, gpus=1)
    full_layer = 4 * (4 * 128 + 2 * 128 + 2 * 64 + 3 * 512)
    assert t.activations_gib * GIB == 4096 * (2 * 4 * 128 + full_layer + 4 * 2 * 512)


def test_distributed_optimizer_shards_over_data_parallel_ranks():
    cfg = load_config(TINY, ["model.dtype=bfloat16", "optim.distributed_optimizer=true"])
    shape, _ = resolve_shape(cfg)
    t = train_memory(cfg, shape, gpus=4)
    assert t.dp == 4
    assert t.weights_gib * GIB == 525_440 * 2 and t.grads_gib * GIB == 525_440 * 4
    assert t.optimizer_gib * GIB == 525_440 * 12 / 4  # fp32 master + 2 moments, a quarter each


def test_gqa_kv_heads_split_over_engine_ranks_or_replicate_past_their_count():
    seven_b = ARCHITECTURES["qwen2-7b"]
    for rtp, heads_per_rank in ((1, 4), (2, 2), (4, 1)):
        cfg = load_config(stage_config("math", "7b"), [f"rollout.tensor_parallel_size={rtp}"])
        r = rollout_memory(cfg, seven_b, gpus=32)
        assert r.kv_per_token_kib * 1024 == 2 * 28 * heads_per_rank * 128 * 2
    cfg = load_config(TINY, ["rollout.tensor_parallel_size=2", "cluster.gpus_per_node=2"])
    tiny, _ = resolve_shape(cfg)
    r = rollout_memory(cfg, tiny, gpus=2)  # one KV head, two ranks: each rank keeps a copy
    assert r.kv_per_token_kib * 1024 == 2 * 2 * 1 * 64 * 4


def test_colocated_peak_is_the_largest_phase_of_a_step():
    """Training with vLLM asleep; the sync with the gradients freed, vLLM's weights awake and the push's
    buffers; generation with the trainer's weights and optimizer state resident (no gradients)."""
    cfg = load_config(stage_config("math", "7b"))
    plan = make_plan(cfg)
    p = plan.configured
    resident = p.train.weights_gib + p.train.optimizer_gib + p.train.runtime_gib
    # engine_ranks: all: the worker is in the trainer's process, no transfer buffer. Two exported buckets of
    # the largest group (the 1.0 GiB bf16 embedding, above the 512 MiB bucket), one TP-2 shard of it loading.
    embedding = 152064 * 3584 * 2 / GIB
    assert p.sync_buffers_gib == pytest.approx(2 * embedding + embedding / 2)
    assert p.phases == pytest.approx(
        {
            "training": p.train.peak_gib + 1.0,
            "sync": resident + p.rollout.weights_gib + p.rollout.runtime_gib + p.sync_buffers_gib,
            "generation": resident + p.rollout.budget_gib,
        }
    )
    assert p.peak_gib == pytest.approx(max(p.phases.values())) == p.phases["generation"]
    assert p.margin_gib == pytest.approx(cfg.cluster.gpu_memory_gib - p.peak_gib)
    assert p.train.gpus == p.rollout.gpus == 32 and p.rollout.engines == 16 and p.train.dp == 16
    alt = plan.alternative  # what if vLLM had half the nodes
    assert alt.placement == "separate" and alt.train.gpus == alt.rollout.gpus == 16


def test_host_memory_counts_the_cpu_layer_spec_and_keeps_vllm_in_every_phase():
    """The CPU's colocated step per rank (bench memory checks it): the local layer spec's saved tensors, counted
    by hand for the ~150M shape (h = q = 1024, 4 KV heads of 64, MLP 3072), vLLM's weights, fixed KV cache and
    measured runtime held in every phase, gradients only in training."""
    from dataclasses import replace

    from megatron_rl.model.tiny import QWEN2_145M
    from megatron_rl.plan import host_memory, layer_saved_values

    tiny, _ = resolve_shape(load_config(TINY))
    sizes = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim")
    shape = replace(tiny, intermediate_size=3072, **{k: getattr(QWEN2_145M, k) for k in sizes})
    h, q, ffn, d = 1024, 1024, 3072, 64
    assert layer_saved_values(shape, 1, "te") == (4 * h + 2 * q + 2 * 256 + 3 * ffn, h)
    # norms 2 x (input, normalised, output); q, k and v repeated to 16 heads, per-sequence output, projection
    # input; rotary cos/sin for q and k; fc1 output (2 ffn), SiLU output, up half, product
    assert layer_saved_values(shape, 1, "local") == (6 * h + 5 * q + 4 * d + 5 * ffn, 3 * h)
    cfg = load_config(TINY, ["rollout.engine_ranks=all", "cluster.gpus_per_node=2", "model.dtype=float32"])
    m = host_memory(cfg, shape, 2, baseline_bytes=500 << 20, vllm_runtime_bytes=300 << 20)
    t = m.terms
    assert (
        t["vllm_kv_cache"] == cfg.rollout.cpu_kv_cache_gib * GIB and t["trainer_weights"] == t["vllm_weights"]
    )
    resident = sum(t[k] for k in ("baseline", "trainer_weights", "optimizer_state", "vllm_weights",
                                  "vllm_kv_cache", "vllm_runtime"))  # fmt: skip
    assert m.phases == {
        "generation": resident + t["vllm_activations"],
        "training": resident + t["trainer_grads"] + t["trainer_activations"],
        "sync": resident + t["sync_buffers"],
    }


def test_plan_says_when_a_config_sized_for_many_engines_runs_one():
    many = make_plan(load_config(stage_config("math", "7b")))  # engine_ranks: all
    assert not any("engine_ranks" in n for n in many.notes)
    one = make_plan(load_config(stage_config("math", "7b"), ["rollout.engine_ranks=driver"]))
    assert any("16 vLLM engines" in n and "engine_ranks: all" in n for n in one.notes)


# ---------------------------------------------------------------- the stage configs


@pytest.mark.parametrize("path", STAGE_CONFIGS, ids=lambda p: p.name)
def test_stage_configs_load_and_state_their_cluster(path):
    cfg = load_config(path)
    assert cfg.cluster.gpus_per_node == 8 and cfg.cluster.gpu.startswith("H100")
    assert cfg.model.dtype == "bfloat16" and cfg.rollout.prompts_per_step == 128
    assert cfg.model.path is None and cfg.model.architecture is not None
    assert cfg.data.reward == ("math" if path.name.startswith("math") else "code")


@pytest.mark.parametrize(
    "domain,model,stage",
    [(d, m, s) for d in STAGES for m in ("7b", "14b") for s in STAGES[d]],
)
def test_every_curriculum_stage_fits(domain, model, stage):
    cfg = load_config(stage_config(domain, model), stage_overrides(domain, model, stage))
    plan = make_plan(cfg)
    assert plan.fits, plan.configured.reasons
    assert plan.configured.peak_gib <= cfg.cluster.gpu_memory_gib
    # The configured trainer layout is the one plan's layout order puts first among those that fit.
    assert (plan.suggested.tp, plan.suggested.pp) == (
        cfg.model.tensor_parallel_size,
        cfg.model.pipeline_parallel_size,
    )


def test_layouts_weigh_pipeline_bubble_against_memory():
    """The 14B stage 1: PP trades memory for a bubble of (pp - 1) / (m + pp - 1) with m micro-batches per rank;
    a layout that does not fit is listed but never suggested."""
    cfg = load_config(stage_config("math", "14b"))
    plan = make_plan(cfg)
    by_layout = {(o.tp, o.pp): o for o in plan.layouts}
    tp2pp2, tp2pp1, tp4pp1 = by_layout[(2, 2)], by_layout[(2, 1)], by_layout[(4, 1)]
    assert tp2pp2.fits and tp4pp1.fits
    assert tp2pp1.fits and not tp2pp1.headroom  # fits, with less than 10% of the GPU to spare: not suggested
    assert tp2pp2.training_peak_gib < tp2pp1.training_peak_gib  # half the layers per stage
    # 1024 samples of 9216 tokens, 3 per 34816-token micro-batch, over 16 data-parallel ranks: m = 22.
    assert microbatches_per_rank(cfg, 16) == 22
    assert tp2pp2.pipeline_bubble == pytest.approx(1 / 23) and tp4pp1.pipeline_bubble == 0
    assert plan.suggested is tp4pp1
    assert "trainer layouts" in format_plan(plan)


def test_each_stage_runs_the_sequences_plan_says_its_kv_cache_holds():
    """stage_overrides derives rollout.max_num_seqs from the plan: as many as `plan` says fit at full length and
    not one more (or null when the whole share fits); a stage config's own value is its stage 1's."""

    def rollout(domain, model, overrides):
        return make_plan(load_config(stage_config(domain, model), overrides)).configured.rollout

    for domain, model, stage in [(d, m, s) for d in STAGES for m in ("7b", "14b") for s in STAGES[d]]:
        overrides = stage_overrides(domain, model, stage)
        seqs = load_config(stage_config(domain, model), overrides).rollout.max_num_seqs
        if seqs is None:
            whole = rollout(domain, model, overrides)
            assert whole.concurrent_sequences <= whole.max_concurrent_sequences, (domain, model, stage)
        else:
            configured = rollout(domain, model, overrides)
            one_more = rollout(domain, model, [*overrides, f"rollout.max_num_seqs={seqs + 1}"])
            assert configured.concurrent_sequences == seqs <= configured.max_concurrent_sequences
            assert one_more.max_concurrent_sequences < seqs + 1, (domain, model, stage)
        if stage == "1":
            assert load_config(stage_config(domain, model)).rollout.max_num_seqs == seqs, (domain, model)


def test_cli_json_for_the_14b_config():
    result = CliRunner().invoke(app, ["plan", str(stage_config("math", "14b")), "--json"])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    assert out["fits"] is True and out["params"] == 14_770_033_664
    assert out["configured"]["train"]["tp"] == 4 and out["configured"]["rollout"]["tp"] == 4


def test_oversize_config_does_not_fit_exit_1():
    """The 14B math stage on one 8-GPU node at 32K with 70% of each GPU for vLLM: the trainer's weights and
    optimizer state (not sharded much over 2 data-parallel ranks) leave vLLM no room."""
    args = [
        sys.executable, "-m", "megatron_rl.cli", "plan", str(stage_config("math", "14b")),
        *stage_overrides("math", "14b", "4"), "cluster.nodes=1", "rollout.gpu_memory_utilization=0.7",
    ]  # fmt: skip
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert any(line.startswith("fits") and line.split()[-1] == "NO" for line in lines), proc.stdout
    assert any(line.startswith("  ! ") for line in lines)  # with the reason


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["model.architecture=qwen2-70b"], "model.architecture"),
        (["model.path=/nonexistent/model"], "model.architecture is not set"),
        (["model.architecture=qwen2-7b", "model.tensor_parallel_size=3"], "tensor_parallel_size"),
        (["rollout.placement=separate", "rollout.engine_nodes=1"], "engine_nodes"),
        (["rollout.bogus=1"], "unknown config key 'rollout.bogus'"),
    ],
)
def test_bad_config_is_a_one_line_error(overrides, message):
    result = CliRunner().invoke(app, ["plan", str(TINY), *overrides])
    assert result.exit_code == 2
    err = result.output.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err, err


def test_plan_errors_are_plan_errors():
    with pytest.raises(PlanError, match="does not divide the 3 training GPUs"):
        train_memory(
            load_config(TINY, ["model.tensor_parallel_size=2"]), resolve_shape(load_config(TINY))[0], 3
        )
