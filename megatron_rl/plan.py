"""What a config needs per GPU, from shapes alone: `megatron-rl plan CONFIG`.

No GPU, no weights: the model shape comes from model.path's config.json when that exists, else from the
built-in table below (model.architecture), else from the tiny model that `train` builds. Every figure is an
estimate with its assumption written next to it; the ones that dominate (weights, optimizer state, KV cache,
logits) are exact byte counts for the tensors named.

Training memory follows Megatron-core's mixed precision: bf16 weights, an fp32 gradient buffer and Adam's
fp32 master copy plus two fp32 moments (12 bytes/parameter), the last sharded over data-parallel ranks with the
distributed optimizer. Activations are counted per micro-batch of `grpo.max_tokens_per_microbatch` packed
tokens (THD packing: one sequence axis whatever the number of samples):

- per layer and token, without recompute (our count for a Qwen2 layer, flash/SDPA attention, no dropout, no
  sequence parallelism): the layer input and the RMSNorm output before attention and before the MLP stay
  whole on every tensor-parallel rank (4h values); q, attention output, k and v (2 q_dim + 2 kv_dim), the
  gate/up output (2 ffn) and the SwiGLU output (ffn) are split over TP ranks;
- with full recompute (`model.recompute`, Megatron's uniform method, one layer per checkpoint): only each
  layer's input (h values) is kept, and one layer's activations are rebuilt at a time during backward;
- plus the bf16 logits [tokens, vocab / TP] that the fused log-prob kernel keeps for backward and their
  gradient, and a transient of one gate/up output during backward;
- with pipeline parallelism (1F1B) the first stage holds `pp` micro-batches in flight.

Rollout memory is vLLM's: weights split over the engine's TP ranks, and a KV cache of
2 x layers x kv_heads_per_rank x head_dim x dtype bytes per token (GQA: kv heads are replicated when the
engine's TP exceeds them) for every concurrent sequence at prompt + max response length. vLLM takes
`rollout.gpu_memory_utilization` of the GPU for itself and fills what its weights and activations leave with
KV cache.

Placement: colocated, vLLM and the trainer share every GPU, in three phases per step (train/rl.py):
- training: vLLM asleep (weights to host memory, KV cache freed), the trainer at its peak;
- sync: the trainer's gradient buffers freed and its cache emptied (`Policy.release_grads`), vLLM's weights
  awake but not its KV cache, and the push's own buffers (rollout/weight_sync.py): at most two exported
  buckets of `rollout.sync_bucket_mb` (a tensor group larger than that travels alone), one transfer buffer of
  a bucket (none when the engine's worker is in the trainer's process, engine_ranks=all; a send and a receive
  buffer for broadcast), and the one layer vLLM's layerwise load materialises;
- generation: the trainer's weights and optimizer state resident (no gradients), vLLM at its budget.
Separate, vLLM runs on `rollout.engine_nodes` nodes and the trainer on the rest; an engine GPU holds vLLM's
budget plus a receive buffer and one materialised layer during a sync.

On the CPU (`host_memory`, checked by `megatron-rl bench memory`) the same terms are counted per rank process
of a colocated run with an engine on every rank, with four differences: activations are those of the CPU's
layer spec (torch ops, unfused: `layer_saved_values`); vLLM-CPU has no sleep mode, so its weights and KV cache
stay in every phase; its KV cache is the fixed allocation of `rollout.cpu_kv_cache_gib`; and the GPU runtime
allowances are replaced by two terms measured at startup, the process's resident memory before any weight
exists and what vLLM's start adds beyond its weights and KV cache.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from megatron_rl.config import Config
from megatron_rl.model.hf_config import ModelConfigError, Qwen2Config, load_hf_config

GIB = 1024**3

# Shapes from the public config.json of DeepSeek-R1-Distill-Qwen-7B / -14B (Qwen2 architecture); the parameter
# counts they give, 7.62B and 14.77B, match the published sizes (tests/test_plan.py). The planner reads shapes
# only: rope_theta / rms_norm_eps are carried because Qwen2Config needs them.
ARCHITECTURES: dict[str, Qwen2Config] = {
    "qwen2-7b": Qwen2Config(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        head_dim=128,
        max_position_embeddings=131072,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    ),
    "qwen2-14b": Qwen2Config(
        vocab_size=152064,
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=48,
        num_attention_heads=40,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=131072,
        rope_theta=1000000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    ),
}

# Allowances for what shapes do not tell (our estimates, stated in the output):
TRAINER_RUNTIME_GIB = 2.5  # CUDA context, NCCL buffers, allocator fragmentation of the trainer process
VLLM_RUNTIME_GIB = 2.0  # vLLM's CUDA context, CUDA graphs, NCCL buffers
VLLM_ASLEEP_GIB = 1.0  # what a sleeping vLLM keeps on the GPU (context, small buffers)
VLLM_BATCHED_TOKENS = (
    8192  # tokens vLLM runs in one forward pass (chunked prefill budget) for its profile run
)
KV_BLOCK_TOKENS = 16  # vLLM allocates the KV cache in blocks of this many tokens
# A layout is suggested only when its peak leaves this share of the GPU free: every figure here is an
# estimate, and fragmentation or a longer-than-planned batch should not end a run.
SUGGESTION_HEADROOM = 0.10


class PlanError(ValueError):
    """A config the planner cannot size: one line naming the key."""


def resolve_shape(cfg: Config) -> tuple[Qwen2Config, str]:
    """The model shape and where it came from (no weights are read)."""
    path = cfg.model.path
    if path and (Path(path) / "config.json").is_file():
        try:
            return load_hf_config(path), f"{path}/config.json"
        except ModelConfigError as e:
            raise PlanError(str(e)) from None
    if cfg.model.architecture:
        return ARCHITECTURES[cfg.model.architecture], f"built-in '{cfg.model.architecture}'"
    if path:
        raise PlanError(
            f"model.path '{path}' has no config.json here and model.architecture is not set "
            f"(one of: {', '.join(ARCHITECTURES)})"
        )
    from megatron_rl.model.tiny import tiny_qwen2_config

    return tiny_qwen2_config(), "the tiny model (model.path is null: `train` builds it)"


# ---------------------------------------------------------------------------------------------- parameters


def _kv_heads_per_rank(shape: Qwen2Config, tp: int) -> int:
    """KV heads one TP rank holds: split when TP divides them, else replicated (one per rank, vLLM-style)."""
    return max(1, shape.num_key_value_heads // tp)


def layer_params(shape: Qwen2Config, tp: int = 1) -> int:
    """Parameters of one decoder layer on one tensor-parallel rank."""
    h, d, i = shape.hidden_size, shape.head_dim, shape.intermediate_size
    q = shape.num_attention_heads // tp * d
    kv = _kv_heads_per_rank(shape, tp) * d
    bias = (q + 2 * kv) if shape.qkv_bias else 0
    return h * (q + 2 * kv) + bias + q * h + 3 * h * (i // tp) + 2 * h


def stage_params(shape: Qwen2Config, tp: int, pp: int) -> list[int]:
    """Parameters on one rank of each pipeline stage (embedding on the first, norm + lm_head on the last)."""
    embed = shape.vocab_size // tp * shape.hidden_size
    per_stage = shape.num_hidden_layers // pp * layer_params(shape, tp)
    out = []
    for s in range(pp):
        n = per_stage
        if s == 0:
            n += embed
        if s == pp - 1:
            n += shape.hidden_size  # final RMSNorm
            if not shape.tie_word_embeddings or pp > 1:  # Megatron keeps a tied copy on the last stage
                n += embed
        out.append(n)
    return out


def total_params(shape: Qwen2Config) -> int:
    """The HF checkpoint's parameter count."""
    return stage_params(shape, 1, 1)[0]


# ---------------------------------------------------------------------------------------------- the plan


@dataclass
class TrainMemory:
    gpus: int
    tp: int
    pp: int
    dp: int
    params_per_gpu: int
    weights_gib: float
    grads_gib: float
    optimizer_gib: float
    activations_gib: float
    logits_gib: float
    runtime_gib: float
    recompute: bool
    tokens_per_microbatch: int

    @property
    def static_gib(self) -> float:
        return self.weights_gib + self.grads_gib + self.optimizer_gib

    @property
    def peak_gib(self) -> float:
        return self.static_gib + self.activations_gib + self.logits_gib + self.runtime_gib


@dataclass
class RolloutMemory:
    gpus: int
    tp: int
    engines: int
    weights_gib: float
    kv_per_token_kib: float
    sequence_tokens: int
    concurrent_sequences: int
    kv_cache_gib: float
    activations_gib: float
    runtime_gib: float
    budget_gib: float
    max_concurrent_sequences: int  # what the budget holds at full length

    @property
    def needed_gib(self) -> float:
        return self.weights_gib + self.kv_cache_gib + self.activations_gib + self.runtime_gib


@dataclass
class Placement:
    placement: str
    train: TrainMemory
    rollout: RolloutMemory
    peak_gib: float
    fits: bool
    reasons: list[str] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)  # per-GPU peak of each phase of a step, GiB
    sync_buffers_gib: float = 0.0  # the sync's own buffers on a GPU that hosts both
    margin_gib: float = 0.0  # GPU memory minus peak_gib


@dataclass
class LayoutOption:
    """One trainer layout (TP x PP) for the configured placement, as the memory model sees it."""

    tp: int
    pp: int
    dp: int
    training_peak_gib: float
    peak_gib: float
    pipeline_bubble: float  # idle fraction of each stage in a 1F1B step: (pp - 1) / (m + pp - 1)
    fits: bool
    headroom: bool = True  # leaves SUGGESTION_HEADROOM of the GPU free


@dataclass
class Plan:
    config: str
    model: str
    params: int
    gpu: str
    gpu_memory_gib: float
    nodes: int
    gpus_per_node: int
    configured: Placement
    alternative: Placement | None
    notes: list[str]
    layouts: list[LayoutOption] = field(default_factory=list)
    suggested: LayoutOption | None = None

    @property
    def fits(self) -> bool:
        return self.configured.fits

    def to_json(self) -> str:
        out = asdict(self)
        out["fits"] = self.fits
        for key in ("configured", "alternative"):
            if out[key] is not None:
                p = getattr(self, key)
                out[key]["train"]["peak_gib"] = round(p.train.peak_gib, 2)
                out[key]["rollout"]["needed_gib"] = round(p.rollout.needed_gib, 2)
        return json.dumps(_rounded(out))


def _rounded(x):
    if isinstance(x, float):
        return round(x, 3)
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_rounded(v) for v in x]
    return x


def _dtype_bytes(cfg: Config) -> int:
    return 2 if cfg.model.dtype == "bfloat16" else 4


def layer_saved_values(shape: Qwen2Config, tp: int, layer_spec: str = "te") -> tuple[int, int]:
    """Values per token that one decoder layer keeps for backward without recompute, and those the final norm
    and the output layer keep on the last stage, for a layer spec:

    - "te" (GPU: Transformer Engine's fused norm + linear, fused SwiGLU, flash attention): see the module
      docstring; the final norm's output (h);
    - "local" (the CPU: megatron-core's local spec with torch ops and SDPACoreAttention, counted from the
      autograd graph of model/build.py's model): each torch RMSNorm keeps its input, its normalised input and
      its output (3h, two per layer); attention keeps the rotated q, k and v repeated to every query head
      (repeat_interleave, when KV heads are fewer; else the rotated k and the qkv output v is a view of), the
      output of each packed sequence and the projection's input, a reshaped copy (together 5q with GQA); rotary
      keeps cos and sin for q and for k (4 head_dim); the MLP keeps the fc1 output (2 ffn), the SiLU output, the
      up half and the product (5 ffn in all); the final norm 3h."""
    h, d, ffn = shape.hidden_size, shape.head_dim, shape.intermediate_size // tp
    q = shape.num_attention_heads // tp * d
    kv = _kv_heads_per_rank(shape, tp) * d
    if layer_spec == "te":
        return 4 * h + 2 * q + 2 * kv + 3 * ffn, h
    if layer_spec != "local":
        raise ValueError(f"layer_spec {layer_spec!r}: 'te' or 'local'")
    k_v = 2 * q if q > kv else kv + (q + 2 * kv)
    return 6 * h + 3 * q + k_v + 4 * d + 5 * ffn, 3 * h


def train_memory(cfg: Config, shape: Qwen2Config, gpus: int, layer_spec: str = "te") -> TrainMemory:
    """The trainer's memory on one GPU (or, with layer_spec "local", one CPU rank): see the module docstring
    and `layer_saved_values`."""
    tp, pp = cfg.model.tensor_parallel_size, cfg.model.pipeline_parallel_size
    if gpus % (tp * pp):
        raise PlanError(
            f"model.tensor_parallel_size x pipeline_parallel_size = {tp * pp} does not divide the "
            f"{gpus} training GPUs"
        )
    if shape.num_key_value_heads % tp:
        raise PlanError(
            f"model.tensor_parallel_size={tp} does not divide num_key_value_heads="
            f"{shape.num_key_value_heads} (Megatron splits KV heads over TP ranks)"
        )
    try:
        shape.check_parallel(tp, pp)
    except ModelConfigError as e:
        raise PlanError(f"model: {e}") from None
    dp = gpus // (tp * pp)
    a = _dtype_bytes(cfg)
    # bf16: weights 2 B, fp32 grad buffer 4 B, Adam fp32 master + 2 moments 12 B. fp32: 4 + 4 + 8 (no master).
    grad_b, opt_b = 4, (12 if a == 2 else 8)
    if cfg.optim.distributed_optimizer:
        opt_b = opt_b / dp
    stages = stage_params(shape, tp, pp)
    h, ffn = shape.hidden_size, shape.intermediate_size // tp
    layer_values, last_values = layer_saved_values(shape, tp, layer_spec)
    full_layer = a * layer_values  # bytes per token, all of one layer's saved tensors
    kept_layer = a * h if cfg.model.recompute else full_layer
    tokens = cfg.grpo.max_tokens_per_microbatch
    layers = shape.num_hidden_layers // pp
    logits = tokens * (shape.vocab_size // tp) * a * 2  # saved logits + their gradient
    worst = None
    for s, n in enumerate(stages):
        in_flight = pp - s  # 1F1B: stage s holds pp - s micro-batches' activations
        acts = in_flight * layers * kept_layer * tokens
        acts += tokens * (full_layer if cfg.model.recompute else 0)  # the layer being recomputed
        acts += tokens * a * 2 * ffn  # backward transient: one gate/up gradient
        lg = logits + tokens * a * last_values if s == pp - 1 else 0
        total = n * (a + grad_b + opt_b) + acts + lg
        if worst is None or total > worst[0]:
            worst = (total, n, acts, lg)
    _, n, acts, lg = worst
    return TrainMemory(
        gpus=gpus,
        tp=tp,
        pp=pp,
        dp=dp,
        params_per_gpu=n,
        weights_gib=n * a / GIB,
        grads_gib=n * grad_b / GIB,
        optimizer_gib=n * opt_b / GIB,
        activations_gib=acts / GIB,
        logits_gib=lg / GIB,
        runtime_gib=TRAINER_RUNTIME_GIB,
        recompute=cfg.model.recompute,
        tokens_per_microbatch=tokens,
    )


def rollout_memory(cfg: Config, shape: Qwen2Config, gpus: int) -> RolloutMemory:
    rtp = cfg.rollout.tensor_parallel_size
    if gpus % rtp:
        raise PlanError(f"rollout.tensor_parallel_size={rtp} does not divide the {gpus} rollout GPUs")
    if rtp > cfg.cluster.gpus_per_node:
        raise PlanError(
            f"rollout.tensor_parallel_size={rtp} is more than cluster.gpus_per_node={cfg.cluster.gpus_per_node}"
        )
    try:
        shape.check_parallel(rtp, 1)
    except ModelConfigError as e:
        raise PlanError(f"rollout: {e}") from None
    a = _dtype_bytes(cfg)
    engines = gpus // rtp
    weights = stage_params(shape, rtp, 1)[0] * a
    kv_token = 2 * shape.num_hidden_layers * _kv_heads_per_rank(shape, rtp) * shape.head_dim * a
    seq = cfg.rollout.max_prompt_tokens + cfg.rollout.max_response_tokens
    seq = math.ceil(seq / KV_BLOCK_TOKENS) * KV_BLOCK_TOKENS
    share = math.ceil(cfg.rollout.prompts_per_step * cfg.rollout.group_size / engines)
    concurrent = min(share, cfg.rollout.max_num_seqs or share)
    kv = concurrent * seq * kv_token
    # Profile-run peak: one forward of VLLM_BATCHED_TOKENS (gate/up and residual stream) and fp32 logits for
    # every running sequence at sampling time.
    acts = VLLM_BATCHED_TOKENS * a * (2 * shape.intermediate_size // rtp + 4 * shape.hidden_size)
    acts += concurrent * shape.vocab_size * 4
    budget = cfg.rollout.gpu_memory_utilization * cfg.cluster.gpu_memory_gib * GIB
    free_for_kv = budget - weights - acts - VLLM_RUNTIME_GIB * GIB
    return RolloutMemory(
        gpus=gpus,
        tp=rtp,
        engines=engines,
        weights_gib=weights / GIB,
        kv_per_token_kib=kv_token / 1024,
        sequence_tokens=seq,
        concurrent_sequences=concurrent,
        kv_cache_gib=kv / GIB,
        activations_gib=acts / GIB,
        runtime_gib=VLLM_RUNTIME_GIB,
        budget_gib=budget / GIB,
        max_concurrent_sequences=max(0, int(free_for_kv // (seq * kv_token))),
    )


def largest_group_bytes(shape: Qwen2Config, dtype_bytes: int) -> int:
    """The largest group of HF tensors a sync exports together (model/convert.py: one vLLM module: the
    embedding or lm_head, q/k/v with biases, or gate/up), whole (gathered over TP)."""
    h, d, i = shape.hidden_size, shape.head_dim, shape.intermediate_size
    q, kv = shape.num_attention_heads * d, shape.num_key_value_heads * d
    qkv = (q + 2 * kv) * (h + (1 if shape.qkv_bias else 0))
    return max(shape.vocab_size * h, qkv, 2 * i * h) * dtype_bytes


def sync_buffers(cfg: Config, shape: Qwen2Config, engine_tp: int) -> tuple[float, float]:
    """GiB a weight sync adds (trainer side, engine side) on one GPU: two exported buckets and the send buffer
    on the trainer's; the receive buffer and the one layer (an engine TP shard of the largest group) that vLLM's
    layerwise load materialises on the engine's."""
    a = _dtype_bytes(cfg)
    largest = largest_group_bytes(shape, a)
    bucket = max(cfg.rollout.sync_bucket_mb * (1 << 20), largest)
    transport = cfg.rollout.weight_transport
    if transport == "auto":
        transport = "local" if cfg.rollout.engine_ranks == "all" else "ipc"
    send = {"local": 0, "rpc": 0}.get(transport, bucket)  # rpc serialises in host memory
    receive = bucket if transport == "broadcast" else 0  # ipc maps the sender's buffer
    return (2 * bucket + send) / GIB, (receive + largest / engine_tp) / GIB


def _check_sample_fits(cfg: Config) -> list[str]:
    longest = cfg.rollout.max_prompt_tokens + cfg.rollout.max_response_tokens
    if longest > cfg.grpo.max_tokens_per_microbatch:
        return [
            f"a sample of {longest} tokens (rollout.max_prompt_tokens + max_response_tokens) exceeds "
            f"grpo.max_tokens_per_microbatch={cfg.grpo.max_tokens_per_microbatch}: the packer refuses it"
        ]
    return []


def place(cfg: Config, shape: Qwen2Config, placement: str, engine_nodes: int) -> Placement:
    c = cfg.cluster
    mem = c.gpu_memory_gib
    reasons = _check_sample_fits(cfg)
    if placement == "colocated":
        gpus = c.nodes * c.gpus_per_node
        train = train_memory(cfg, shape, gpus)
        rollout = rollout_memory(cfg, shape, gpus)
        trainer_side, engine_side = sync_buffers(cfg, shape, rollout.tp)
        sync_extra = trainer_side + engine_side
        asleep = VLLM_ASLEEP_GIB if cfg.rollout.colocate_sleep else rollout.budget_gib
        # After the update the gradient buffers are freed before vLLM wakes (Policy.release_grads).
        resident = train.weights_gib + train.optimizer_gib + train.runtime_gib
        vllm_awake = (
            rollout.weights_gib + rollout.runtime_gib if cfg.rollout.colocate_sleep else rollout.budget_gib
        )
        phases = {
            "training": train.peak_gib + asleep,
            "sync": resident + vllm_awake + sync_extra,
            "generation": resident + rollout.budget_gib,
        }
        peak = max(phases.values())
        if phases["training"] > mem:
            reasons.append(
                f"training needs {phases['training']:.1f} GiB per GPU (with vLLM {'asleep' if cfg.rollout.colocate_sleep else 'awake'}), "
                f"more than {mem:g}"
            )
        if phases["sync"] > mem:
            reasons.append(
                f"the weight sync needs {phases['sync']:.1f} GiB per GPU (its buffers {sync_extra:.1f}), more than "
                f"{mem:g}: lower rollout.sync_bucket_mb"
            )
        if phases["generation"] > mem:
            reasons.append(
                f"generation needs {phases['generation']:.1f} GiB per GPU (trainer weights and optimizer state "
                f"{resident - train.runtime_gib:.1f} + runtime + vLLM budget {rollout.budget_gib:.1f}), more than "
                f"{mem:g}: lower rollout.gpu_memory_utilization"
            )
    else:
        if engine_nodes < 1 or engine_nodes >= c.nodes:
            raise PlanError(
                f"rollout.engine_nodes={engine_nodes}: separate placement needs 1 <= engine_nodes < "
                f"cluster.nodes={c.nodes}"
            )
        train = train_memory(cfg, shape, (c.nodes - engine_nodes) * c.gpus_per_node)
        rollout = rollout_memory(cfg, shape, engine_nodes * c.gpus_per_node)
        trainer_side, engine_side = sync_buffers(cfg, shape, rollout.tp)
        sync_extra = max(trainer_side, engine_side)
        resident = train.weights_gib + train.optimizer_gib + train.runtime_gib
        phases = {
            "training": train.peak_gib,
            "sync": max(resident + trainer_side, rollout.budget_gib + engine_side),
            "generation": rollout.budget_gib,
        }
        peak = max(phases.values())
        if train.peak_gib > mem:
            reasons.append(f"training needs {train.peak_gib:.1f} GiB per GPU, more than {mem:g}")
        if rollout.budget_gib > mem:
            reasons.append("rollout.gpu_memory_utilization is above 1")
        elif phases["sync"] > mem:
            reasons.append(
                f"the weight sync needs {phases['sync']:.1f} GiB on a GPU, more than {mem:g}: lower "
                "rollout.sync_bucket_mb"
            )
    if rollout.needed_gib > rollout.budget_gib:
        reasons.append(
            f"vLLM needs {rollout.needed_gib:.1f} GiB (weights {rollout.weights_gib:.1f}, KV cache "
            f"{rollout.kv_cache_gib:.1f} for {rollout.concurrent_sequences} x {rollout.sequence_tokens} tokens) "
            f"but its budget is {rollout.budget_gib:.1f}; it holds {rollout.max_concurrent_sequences} sequences "
            f"at full length: set rollout.max_num_seqs <= {rollout.max_concurrent_sequences} or raise TP/utilization"
        )
    return Placement(placement, train, rollout, peak, not reasons, reasons, phases, sync_extra, mem - peak)


@dataclass
class HostMemory:
    """Bytes one rank process holds at the peak of each phase of a colocated step on the CPU, and the terms
    they add up from (see `host_memory`)."""

    terms: dict[str, int]
    phases: dict[str, int]


def host_memory(
    cfg: Config, shape: Qwen2Config, ranks: int, baseline_bytes: int, vllm_runtime_bytes: int
) -> HostMemory:
    """The colocated step on the CPU, per rank process: `ranks` trainer ranks, each hosting vLLM's worker
    (rollout.engine_ranks=all). The terms are train_memory's (with the CPU's "local" layer spec),
    rollout_memory's and sync_buffers', in bytes, with what differs from a GPU: vLLM-CPU cannot sleep, so its
    weights and its KV cache (a fixed allocation of rollout.cpu_kv_cache_gib, not a share of a budget) are held
    in every phase; and in place of the GPU's runtime allowances, two terms the caller measures at startup:

    - `baseline_bytes`: what the process holds with Python, torch, megatron-core and vLLM imported and its
      process groups started, before any weight exists;
    - `vllm_runtime_bytes`: what starting the engine added beyond its weights and KV cache (vLLM's own
      structures, tokenizer, threads, kernels).

    Phases (a step runs them in the order generation, training, sync):
    - training: baseline + trainer weights, gradient buffers, optimizer state, one micro-batch's activations
      and logits + vLLM's weights, KV cache and runtime;
    - sync: baseline + trainer weights and optimizer state (gradients released) + vLLM's weights, KV cache and
      runtime + the sync's buffers;
    - generation: the same without the sync's buffers, plus vLLM's activations (its profile-run forward)."""
    train = train_memory(cfg, shape, ranks, layer_spec="local")
    rollout = rollout_memory(cfg, shape, ranks)
    trainer_side, engine_side = sync_buffers(cfg, shape, rollout.tp)

    def nbytes(gib: float) -> int:
        return round(gib * GIB)

    terms = {
        "baseline": baseline_bytes,
        "trainer_weights": nbytes(train.weights_gib),
        "trainer_grads": nbytes(train.grads_gib),
        "optimizer_state": nbytes(train.optimizer_gib),
        "trainer_activations": nbytes(train.activations_gib + train.logits_gib),
        "vllm_weights": nbytes(rollout.weights_gib),
        "vllm_kv_cache": cfg.rollout.cpu_kv_cache_gib * GIB,
        "vllm_runtime": vllm_runtime_bytes,
        "vllm_activations": nbytes(rollout.activations_gib),
        "sync_buffers": nbytes(trainer_side + engine_side),
    }
    t = terms
    resident = sum(
        t[k]
        for k in (
            "baseline",
            "trainer_weights",
            "optimizer_state",
            "vllm_weights",
            "vllm_kv_cache",
            "vllm_runtime",
        )
    )
    phases = {
        "generation": resident + t["vllm_activations"],
        "training": resident + t["trainer_grads"] + t["trainer_activations"],
        "sync": resident + t["sync_buffers"],
    }
    return HostMemory(terms, phases)


def fitting_max_num_seqs(cfg: Config) -> int | None:
    """The rollout.max_num_seqs that `cfg` needs (its own value is ignored): None when each engine's whole share
    of a step's sequences fits in its KV cache at full length, else the most sequences that do, i.e. the
    largest value for which vLLM's needs stay within its budget. PlanError when not even one fits."""
    shape, _ = resolve_shape(cfg)

    def rollout(seqs: int | None) -> RolloutMemory:
        trial = cfg.model_copy(deep=True)
        trial.rollout.max_num_seqs = seqs
        return place(trial, shape, cfg.rollout.placement, cfg.rollout.engine_nodes).rollout

    every = rollout(None)
    if every.needed_gib <= every.budget_gib:
        return None
    # What fits beside the whole share running is a lower bound: fewer running sequences need fewer sampling
    # logits, which can leave room for one or two more.
    seqs = every.max_concurrent_sequences
    while seqs + 1 < every.concurrent_sequences:
        more = rollout(seqs + 1)
        if more.needed_gib > more.budget_gib:
            break
        seqs += 1
    if seqs < 1:
        raise PlanError(
            f"rollout: not one sequence of {every.sequence_tokens} tokens fits in vLLM's budget of "
            f"{every.budget_gib:.1f} GiB; raise rollout.gpu_memory_utilization or rollout.tensor_parallel_size"
        )
    return seqs


def microbatches_per_rank(cfg: Config, dp: int) -> int:
    """Micro-batches each data-parallel rank runs per optimizer step when every sample has the maximum length
    (the fewest: shorter samples pack more per micro-batch but the count per step is what fills the pipeline)."""
    longest = cfg.rollout.max_prompt_tokens + cfg.rollout.max_response_tokens
    per_microbatch = max(1, cfg.grpo.max_tokens_per_microbatch // longest)
    samples = cfg.rollout.prompts_per_step * cfg.rollout.group_size
    return max(1, math.ceil(samples / dp / per_microbatch))


def layout_options(cfg: Config, shape: Qwen2Config) -> list[LayoutOption]:
    """Every TP x PP the trainer could use with the configured placement: TP a power of two within a node that
    divides the KV heads, PP a divisor of the layers, TP x PP dividing the training GPUs."""
    c = cfg.cluster
    options = []
    for tp in (t for t in (1, 2, 4, 8) if t <= c.gpus_per_node and shape.num_key_value_heads % t == 0):
        for pp in (q for q in range(1, shape.num_hidden_layers + 1) if shape.num_hidden_layers % q == 0):
            trial = cfg.model_copy(deep=True)
            trial.model.tensor_parallel_size, trial.model.pipeline_parallel_size = tp, pp
            try:
                placed = place(trial, shape, cfg.rollout.placement, cfg.rollout.engine_nodes)
            except PlanError:
                continue  # TP x PP does not divide the GPUs, or the shape refuses it
            m = microbatches_per_rank(cfg, placed.train.dp)
            options.append(
                LayoutOption(
                    tp,
                    pp,
                    placed.train.dp,
                    placed.train.peak_gib,
                    placed.peak_gib,
                    (pp - 1) / (m + pp - 1),
                    placed.fits,
                    placed.peak_gib <= (1 - SUGGESTION_HEADROOM) * c.gpu_memory_gib,
                )
            )
    return options


def suggested_layout(options: list[LayoutOption]) -> LayoutOption | None:
    """The layout the model prefers among those that fit with SUGGESTION_HEADROOM of the GPU to spare (any
    that fits when none has it): the least pipeline bubble, then the smallest TP x PP
    (more data-parallel ranks: their gradient reduction overlaps backward, where TP adds two all-reduces of the
    activations per layer and PP a bubble), then the smaller TP. The memory model says what fits; it has no
    measured communication costs, so this is an ordering by structure, not a timing."""
    fitting = [o for o in options if o.fits and o.headroom] or [o for o in options if o.fits]
    return min(fitting, key=lambda o: (round(o.pipeline_bubble, 3), o.tp * o.pp, o.tp), default=None)


def make_plan(cfg: Config, config_name: str = "") -> Plan:
    shape, source = resolve_shape(cfg)
    c = cfg.cluster
    placement = cfg.rollout.placement
    configured = place(cfg, shape, placement, cfg.rollout.engine_nodes)
    alternative = None
    if placement == "separate":
        alternative = place(cfg, shape, "colocated", 0)
    elif c.nodes >= 2:
        alt_nodes = cfg.rollout.engine_nodes or c.nodes // 2
        try:
            alternative = place(cfg, shape, "separate", alt_nodes)
        except PlanError:
            alternative = None
    notes = [
        "estimates: Megatron mixed precision (bf16 weights, fp32 grads, Adam fp32 master + 2 moments)"
        if cfg.model.dtype == "bfloat16"
        else "estimates: fp32 weights, grads and Adam moments",
        f"allowances: trainer runtime {TRAINER_RUNTIME_GIB} GiB, vLLM runtime {VLLM_RUNTIME_GIB} GiB, "
        f"sleeping vLLM {VLLM_ASLEEP_GIB} GiB, vLLM profile batch {VLLM_BATCHED_TOKENS} tokens",
    ]
    if configured.rollout.engines > 1 and placement == "colocated" and cfg.rollout.engine_ranks == "driver":
        notes.append(
            f"sized for {configured.rollout.engines} vLLM engines, but rollout.engine_ranks='driver' runs one "
            "(in rank 0's process): set rollout.engine_ranks: all for an engine on every "
            f"{cfg.rollout.tensor_parallel_size} rank(s)"
        )
    share = math.ceil(cfg.rollout.prompts_per_step * cfg.rollout.group_size / configured.rollout.engines)
    if configured.rollout.concurrent_sequences < share:
        notes.append(
            f"each engine runs {configured.rollout.concurrent_sequences} of its {share} sequences at once "
            f"(rollout.max_num_seqs); vLLM queues the rest"
        )
    layouts = layout_options(cfg, shape)
    suggested = suggested_layout(layouts)
    if suggested is not None and (suggested.tp, suggested.pp) != (
        cfg.model.tensor_parallel_size,
        cfg.model.pipeline_parallel_size,
    ):
        notes.append(
            f"layout: TP {suggested.tp} x PP {suggested.pp} also fits and comes first in the layout order "
            "(see layouts)"
        )
    return Plan(
        config=config_name,
        model=f"{source}: {total_params(shape) / 1e9:.2f}B parameters, {shape.num_hidden_layers} layers, "
        f"hidden {shape.hidden_size}, {shape.num_attention_heads} heads / {shape.num_key_value_heads} KV heads",
        params=total_params(shape),
        gpu=c.gpu,
        gpu_memory_gib=c.gpu_memory_gib,
        nodes=c.nodes,
        gpus_per_node=c.gpus_per_node,
        configured=configured,
        alternative=alternative,
        notes=notes,
        layouts=layouts,
        suggested=suggested,
    )


# ---------------------------------------------------------------------------------------------- printing


def _placement_rows(p: Placement) -> list[tuple[str, str]]:
    t, r = p.train, p.rollout
    recompute = "full recompute" if t.recompute else "no recompute"
    rows = [
        ("training GPUs", f"{t.gpus}  (TP {t.tp} x PP {t.pp} x DP {t.dp})"),
        ("  parameters / GPU", f"{t.params_per_gpu / 1e9:.3f}B"),
        ("  weights", f"{t.weights_gib:7.2f} GiB"),
        ("  gradients", f"{t.grads_gib:7.2f} GiB"),
        ("  optimizer state", f"{t.optimizer_gib:7.2f} GiB"),
        (
            "  activations",
            f"{t.activations_gib:7.2f} GiB  ({t.tokens_per_microbatch} tokens/micro-batch, {recompute})",
        ),
        ("  logits + grad", f"{t.logits_gib:7.2f} GiB"),
        ("  runtime allowance", f"{t.runtime_gib:7.2f} GiB"),
        ("  training peak", f"{t.peak_gib:7.2f} GiB"),
        ("rollout GPUs", f"{r.gpus}  ({r.engines} vLLM engines x TP {r.tp})"),
        ("  weights", f"{r.weights_gib:7.2f} GiB"),
        (
            "  KV cache",
            f"{r.kv_cache_gib:7.2f} GiB  ({r.concurrent_sequences} seqs x {r.sequence_tokens} tokens x "
            f"{r.kv_per_token_kib:.0f} KiB)",
        ),
        ("  activations + runtime", f"{r.activations_gib + r.runtime_gib:7.2f} GiB"),
        (
            "  vLLM needs / budget",
            f"{r.needed_gib:7.2f} / {r.budget_gib:.2f} GiB  (holds {r.max_concurrent_sequences} seqs)",
        ),
        ("per GPU, training", f"{p.phases['training']:7.2f} GiB"),
        ("per GPU, weight sync", f"{p.phases['sync']:7.2f} GiB  (its buffers {p.sync_buffers_gib:.2f})"),
        ("per GPU, generation", f"{p.phases['generation']:7.2f} GiB"),
        ("peak per GPU", f"{p.peak_gib:7.2f} GiB"),
        ("margin", f"{p.margin_gib:7.2f} GiB"),
        ("fits", "yes" if p.fits else "NO"),
    ]
    return rows


def format_plan(plan: Plan) -> str:
    lines = [
        f"config  {plan.config}",
        f"model   {plan.model}",
        f"cluster {plan.nodes} node(s) x {plan.gpus_per_node} {plan.gpu} ({plan.gpu_memory_gib:g} GiB each)",
        "",
    ]
    sections = [("configured: " + plan.configured.placement, plan.configured)]
    if plan.alternative is not None:
        sections.append(("what if: " + plan.alternative.placement, plan.alternative))
    for title, p in sections:
        lines.append(f"== {title}")
        width = max(len(k) for k, _ in _placement_rows(p))
        lines += [f"{k:<{width}}  {v}" for k, v in _placement_rows(p)]
        lines += [f"  ! {reason}" for reason in p.reasons]
        lines.append("")
    lines.append(
        f"== trainer layouts ({plan.configured.placement}; bubble: 1F1B idle fraction at full-length samples)"
    )
    lines.append(
        f"  TP  PP  DP  training peak  peak/GPU  bubble  fits (headroom: {SUGGESTION_HEADROOM:.0%} free)"
    )
    for o in plan.layouts:
        mark = "  <- suggested" if o is plan.suggested else ""
        lines.append(
            f"  {o.tp:>2}  {o.pp:>2}  {o.dp:>2}  {o.training_peak_gib:9.1f} GiB  {o.peak_gib:6.1f}  {o.pipeline_bubble:6.1%}  "
            f"{('yes' if o.headroom else 'yes, tight') if o.fits else 'no'}{mark}"
        )
    lines.append("")
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)
