"""Typed run configs: YAML files plus dotted command-line overrides, validated with pydantic.

An unknown key or a wrong type is a one-line ConfigError naming the dotted key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny_math.yaml"


class ConfigError(ValueError):
    """A config the run cannot use; the CLI prints it as one line (no traceback)."""


class PlacementError(ConfigError):
    """The config is valid on its own, but the ranks, devices or addresses this run got cannot hold its layout
    or engine placement (world size, device kind, reachability)."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelCfg(Strict):
    path: str | None = None  # HF checkpoint dir; None = build the tiny model (init-tiny) in the run dir
    tiny_init_seed: int = 0
    tensor_parallel_size: int = Field(1, ge=1)
    pipeline_parallel_size: int = Field(1, ge=1)
    dtype: Literal["float32", "bfloat16"] = "float32"
    recompute: bool = False
    # Log-probs straight from the final hidden states and the output weight (kernels.linear_logprob_entropy):
    # no [tokens, vocab] logits tensor. "auto": on with a GPU, off on the CPU (tiny vocabularies there).
    fused_output_layer: bool | Literal["auto"] = "auto"
    # Built-in shape for `megatron-rl plan` when model.path is unset or not on this machine (no weights read).
    architecture: Literal["qwen2-7b", "qwen2-14b"] | None = None


class DataCfg(Strict):
    # synthetic_arithmetic (math reward) and synthetic_code (code reward): the tiny tasks built locally (data/)
    source: Literal["synthetic_arithmetic", "synthetic_code", "file"] = "synthetic_arithmetic"
    reward: Literal["math", "code"] = "math"  # math: \\boxed{} vs answer; code: rows carry tests (+ fn_name)
    train_path: str | None = None  # JSONL or Parquet with fields prompt, answer
    eval_path: str | None = None
    prompt_template: Literal["raw", "chat"] = "raw"
    instruction: str = "Please reason step by step, and put your final answer within \\boxed{}."
    # AceReason's code stage 2: at each epoch's end, prompts whose every sample in it was correct leave the
    # training set (data/epochs.py); data.source 'file' only (the synthetic tasks are endless, with no epochs)
    drop_solved_each_epoch: bool = False
    synthetic_digits: int = Field(3, ge=1, le=6)
    synthetic_eval_size: int = 200
    seed: int = 0


class AutoTemperatureCfg(Strict):
    """How `rollout.temperature: auto` picks the rollout temperature (train/temperature.py): before the first
    RL step and every `every` steps, probes sample `probe_prompts` fixed training prompts `probe_samples` times
    each at a trial temperature, and the trainer measures their mean response-token entropy at it; the probed
    temperature whose entropy is nearest `target_entropy` is used (AceReason-Nemotron 1.1 keeps it near 0.3)."""

    target_entropy: float = Field(0.3, gt=0)
    bounds: tuple[float, float] = (0.6, 1.2)  # the lowest and highest temperature tried (at most 2)
    every: int = Field(25, ge=0)  # choose again every N RL steps (0: only before the first step)
    probe_prompts: int = Field(16, ge=1)
    probe_samples: int = Field(4, ge=1)
    max_probes: int = Field(6, ge=1)  # trial temperatures per choice
    tolerance: float = Field(0.01, ge=0)  # a probe this close to the target ends the search

    @field_validator("bounds")
    @classmethod
    def _ordered_positive(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not 0 < low < high <= 2:
            raise ValueError(
                "must be [low, high] with 0 < low < high <= 2 (vLLM samples at temperatures up to 2)"
            )
        return value


class RolloutCfg(Strict):
    group_size: int = Field(8, ge=1)  # samples per prompt
    prompts_per_step: int = Field(32, ge=1)
    # A number > 0, or "auto": chosen for a target entropy (rollout.auto_temperature) and used for the loss too.
    temperature: float | Literal["auto"] = 1.0
    auto_temperature: AutoTemperatureCfg = AutoTemperatureCfg()
    top_p: float = Field(1.0, gt=0, le=1)
    max_response_tokens: int = Field(64, ge=1)
    cpu_kv_cache_gib: int = 1
    gpu_memory_utilization: float = 0.5
    colocate_sleep: bool = True  # on GPU: vLLM sleeps while the trainer runs
    tensor_parallel_size: int = Field(1, ge=1)  # vLLM engine TP (engines = rollout GPUs / this)
    placement: Literal["colocated", "separate"] = "colocated"  # separate: vLLM on its own nodes
    # colocated: "driver" = one engine in rank 0's process; "all" = every trainer rank hosts part of an engine
    # (vLLM's external launcher), world_size / tensor_parallel_size engines, each generating a slice of the step.
    engine_ranks: Literal["driver", "all"] = "driver"
    engine_nodes: int = Field(0, ge=0)  # nodes given to vLLM when placement is separate
    # 0: each step samples its batch with the weights of the step before (strictly on-policy). 1: the engines
    # sample the next step's batch while the trainer updates on this one, so a batch is one update old when
    # it is trained on (train/rollout_queue.py); the loss corrects that with grpo.tis_cap / mask_* bounds.
    staleness: int = Field(0, ge=0, le=1)
    # separate: the engine servers (`megatron-rl serve-rollout --rendezvous DIR`) announce themselves in this
    # directory (default RUN_DIR/engines), and the trainer waits up to engine_wait_s for num_engines of them
    # (default engine_nodes * cluster.gpus_per_node / tensor_parallel_size; slurm/ passes what it started).
    engine_rendezvous: str | None = None
    num_engines: int | None = Field(None, ge=1)
    engine_wait_s: float = Field(900.0, gt=0)
    max_num_seqs: int | None = Field(None, ge=1)  # sequences one engine runs at once; None: its whole share
    # Longer prompts are skipped (and counted); `plan` sizes the KV cache and micro-batches for this length.
    max_prompt_tokens: int = Field(1024, ge=1)
    # How weights reach vLLM (rollout/transport.py): auto = CUDA IPC on GPU, shared memory on CPU (colocated);
    # broadcast = a gloo/NCCL group with the engine's workers (engines on other GPUs/nodes); rpc = bytes via RPC.
    # local = tensors handed to the in-process worker (engine_ranks=all; what auto picks there).
    weight_transport: Literal["auto", "shm", "ipc", "broadcast", "rpc", "local"] = "auto"
    broadcast_host: str = "127.0.0.1"  # rendezvous address of trainer rank 0 for the broadcast transport
    # Weights travel to vLLM in buckets of at most this many MiB (a larger tensor group travels alone); a sync
    # holds at most two buckets and one transfer buffer of this size beyond the model (see `plan`).
    sync_bucket_mb: float = Field(512.0, gt=0)

    @field_validator("temperature", mode="before")
    @classmethod
    def _positive_or_auto(cls, value: Any) -> float | str:
        if value == "auto":
            return value
        try:
            number = float(value) if not isinstance(value, bool) else float("nan")
        except (TypeError, ValueError):
            number = float("nan")
        if not number > 0:
            raise ValueError("must be a number > 0 or 'auto'")
        return number


class GRPOCfg(Strict):
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.28
    overlong_filtering: bool = True  # responses cut at max length get no gradient
    dynamic_sampling: bool = False  # drop groups whose rewards are all equal, refill from more prompts
    max_refills: int = 3
    micro_steps: int = Field(1, ge=1)  # optimizer steps per rollout batch (1 = strictly on-policy)
    max_tokens_per_microbatch: int = 8192
    normalize_std: bool = True
    # Correction for the gap between vLLM's sampling log-probs and the trainer's (algo/grpo.rollout_correction),
    # with rho = p_trainer / p_rollout per token; 0 turns each off. tis_cap: weight each token's term by
    # min(rho, tis_cap) (truncated importance sampling). mask_token_ratio / mask_sequence_ratio: leave out of the
    # loss a sample with any token's rho, or the geometric mean of its rho, outside [1/bound, bound].
    tis_cap: float = 0.0
    mask_token_ratio: float = 0.0
    mask_sequence_ratio: float = 0.0

    @field_validator("tis_cap", "mask_token_ratio", "mask_sequence_ratio")
    @classmethod
    def _off_or_at_least_one(cls, value: float) -> float:
        if value != 0 and value < 1:
            raise ValueError("must be 0 (off) or at least 1 (a bound on a probability ratio)")
        return value


class OptimCfg(Strict):
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = 0.1
    distributed_optimizer: bool = False  # shard fp32 master weights + Adam moments over data-parallel ranks


class SFTCfg(Strict):
    enabled: bool = True
    # (prompt, response) pairs, JSONL or Parquet; None: the synthetic task's traced solutions (the tiny config)
    train_path: str | None = None
    max_steps: int = 400
    batch_size: int = 128
    lr: float = 2e-3
    eval_every: int = 10  # held-out accuracy every N steps (0: only after the last step)
    eval_after: int = 60
    # stop once held-out accuracy reaches this (a fixed step count varies wildly)
    stop_at_accuracy: float = 0.25


class EvalCfg(Strict):
    samples_per_problem: int = 4
    temperature: float = 0.6
    every: int = 0  # evaluate every N RL steps (0 = only at start and end)


class RunCfg(Strict):
    name: str = "tiny_math"
    output_dir: str = "runs"
    seed: int = 0
    steps: int = 100
    checkpoint_every: int = 25
    keep_checkpoints: int = 2
    tensorboard: bool = True
    wandb_project: str | None = None
    reward_workers: int = Field(2, ge=0)  # reward processes per scoring node (0: one per core of the node)
    reward_timeout: float = 5.0
    # driver: rank 0 scores every sample on its node; distributed: the lowest rank of each node scores a
    # contiguous share of each batch on its node's CPUs, gathered to rank 0 (train/reward_scoring.py)
    reward_scoring: Literal["driver", "distributed"] = "driver"
    # distributed: which ranks score, rank 0 first (null: the lowest rank of each node); naming two ranks of
    # one machine spreads scoring over two pools there (how the tests check it on one machine)
    reward_scoring_ranks: list[int] | None = None

    @field_validator("reward_scoring_ranks")
    @classmethod
    def _rank_zero_first(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (not value or value[0] != 0 or value != sorted(set(value))):
            raise ValueError(
                "must list distinct ranks in increasing order, starting with 0 (it gathers the rewards)"
            )
        return value


class ClusterCfg(Strict):
    """The machines a config is sized for (`megatron-rl plan`) and launched on (launchers/, slurm/)."""

    nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(1, ge=1)
    gpu: str = "H100-SXM-80GB"
    gpu_memory_gib: float = Field(79.6, gt=0)  # an 80 GB H100 reports 81559 MiB = 79.6 GiB
    account: str | None = None  # Slurm account, partition, time limit, container: launch settings only
    partition: str | None = None
    time: str = "04:00:00"
    container_image: str | None = None


class Config(Strict):
    run: RunCfg = RunCfg()
    model: ModelCfg = ModelCfg()
    data: DataCfg = DataCfg()
    rollout: RolloutCfg = RolloutCfg()
    grpo: GRPOCfg = GRPOCfg()
    optim: OptimCfg = OptimCfg()
    sft: SFTCfg = SFTCfg()
    eval: EvalCfg = EvalCfg()
    cluster: ClusterCfg = ClusterCfg()


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{key}' is not a section")
    node[leaf] = value


def _describe(err: ValidationError) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        return f"unknown config key '{key}'"
    return f"config key '{key}': {first['msg']} (got {first.get('input')!r})"


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read YAML (default: the embedded tiny_math.yaml), apply `a.b=value` overrides, validate."""
    path = Path(path) if path else DEFAULT_CONFIG
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw))
    try:
        cfg = Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(f"{path}: {_describe(e)}") from None
    check_sample_fits_microbatch(cfg, str(path))
    if cfg.data.source == "synthetic_code" and cfg.data.reward != "code":
        raise ConfigError(
            f"{path}: config key 'data.reward' must be 'code' with data.source 'synthetic_code'"
        )
    if cfg.data.drop_solved_each_epoch and cfg.data.source != "file":
        raise ConfigError(
            f"{path}: config key 'data.drop_solved_each_epoch' needs data.source 'file' (the synthetic tasks "
            "draw endless fresh problems: there are no epochs to remove solved prompts from)"
        )
    return cfg


def check_sample_fits_microbatch(cfg: Config, where: str) -> None:
    """The longest RL sample (prompt + response at their caps) must fit one packed micro-batch: packing never
    splits a sample, so otherwise the first full-length response would stop the run mid-stage."""
    longest = cfg.rollout.max_prompt_tokens + cfg.rollout.max_response_tokens
    if cfg.grpo.max_tokens_per_microbatch < longest:
        raise ConfigError(
            f"{where}: config key 'grpo.max_tokens_per_microbatch': {cfg.grpo.max_tokens_per_microbatch} is "
            f"below rollout.max_prompt_tokens + rollout.max_response_tokens = {longest}; a sample of that "
            "length would not fit one micro-batch"
        )
