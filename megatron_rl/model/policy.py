"""The policy: this rank's share of a Megatron GPTModel, and the one place the trainer meets Megatron.

The trainer (train/) hands the policy packed micro-batches and a loss on per-token log-probs; the policy runs
them through Megatron's forward-backward schedule (`get_forward_backward_func`: one stage, or a pipeline of
stages exchanging activations), with the model wrapped in Megatron-core's DistributedDataParallel:

- gradients accumulate in fp32 main-grad buffers (`param.main_grad`), whatever the parameter dtype, so ten
  bf16 micro-batches do not round each other away;
- they are summed over data-parallel ranks bucket by bucket (on a GPU the reduction of a bucket starts as soon
  as backward has filled it, overlapped with the rest of backward; gloo on the CPU reduces after backward);
- embedding and output-layer gradients are summed between the first and last pipeline stage when tied;
- the norm is one batched computation and one all-reduce over the model-parallel group.

The loss a micro-batch returns is already normalised by the whole batch's token count (the trainer knows it on
every rank), so the schedule is told to neither average over micro-batches nor over data-parallel ranks
(`calculate_per_token_loss`), and gradients are plain sums.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
from megatron.core.transformer.module import param_is_not_shared

from kernels import linear_logprob_entropy, logprob_entropy
from megatron_rl.algo.packing import PackedMicroBatch
from megatron_rl.distributed import device, use_cuda
from megatron_rl.model.build import build_gpt_model
from megatron_rl.model.convert import (
    NamedTensors,
    SafetensorsCheckpoint,
    export_hf_buckets,
    export_local_hf_buckets,
    load_hf_into_megatron,
    local_hf_shapes,
    local_layout_problem,
)
from megatron_rl.model.fused_output import hidden_states_out, output_weight
from megatron_rl.model.hf_config import Qwen2Config, check_hf_tensors, expected_hf_shapes, load_hf_config

# loss_fn(micro-batch, logprobs [T], entropy [T]) -> (loss, stats): the loss already divided by the whole
# batch's normaliser; stats are scalars to sum over micro-batches (tensors or floats).
LossFn = Callable[
    [PackedMicroBatch, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]
]


def packed_seq_params(mb: PackedMicroBatch) -> PackedSeqParams:
    """The THD boundaries of `mb` for Megatron (RoPE restarts and attention stops at each one)."""
    cu = mb.cu_seqlens.to(device=mb.tokens.device, dtype=torch.int32)
    longest = max(b - a for a, b in pairwise(mb.cu_seqlens.tolist()))  # sizes RoPE's table; TE's varlen too
    return PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest, max_seqlen_kv=longest
    )


def forward_kwargs(mb: PackedMicroBatch) -> dict:
    """Keyword arguments of GPTModel.forward for one packed micro-batch."""
    return {
        "input_ids": mb.tokens,
        "position_ids": mb.position_ids,
        "attention_mask": None,
        "packed_seq_params": packed_seq_params(mb),
    }


def logprobs_from_logits(
    logits: torch.Tensor, mb: PackedMicroBatch, temperature: float, tp_group=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logprobs [T], entropy [T]) fp32 from the last stage's vocab-parallel logits [1, T, V / TP]; entropy is
    0 outside responses. Position t holds log p(token t + 1) under softmax(logits / temperature)."""
    logprobs, entropy = logprob_entropy(logits[0], mb.targets, temperature, tp_group=tp_group)
    return logprobs, torch.where(mb.loss_mask, entropy, torch.zeros_like(entropy))


def logprobs_from_hidden(
    hidden: torch.Tensor, weight: torch.Tensor, mb: PackedMicroBatch, temperature: float, tp_group=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`logprobs_from_logits` from the last stage's final hidden states [1, T, H] and this rank's output-layer
    weight shard [V / TP, H], through the fused kernel: the logits are never materialised."""
    logprobs, entropy = linear_logprob_entropy(hidden[0], weight, mb.targets, temperature, tp_group=tp_group)
    return logprobs, torch.where(mb.loss_mask, entropy, torch.zeros_like(entropy))


def packed_forward_logprobs(
    model: torch.nn.Module, mb: PackedMicroBatch, temperature: float, tp_group=None, fused: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """One micro-batch through a whole (unsplit) model, differentiable: what tests and benchmarks compare the
    scheduled path with (`fused`: through the fused output layer). The trainer goes through
    `Policy.forward_backward`."""
    mb = mb.to(device())
    with hidden_states_out(model, fused):
        output = model(**forward_kwargs(mb))
    if fused:
        return logprobs_from_hidden(output, output_weight(model), mb, temperature, tp_group)
    return logprobs_from_logits(output, mb, temperature, tp_group)


def _finalize_grads(model_chunks: list[torch.nn.Module], num_tokens=None, **kwargs) -> None:
    # The schedule passes the summed token counts for Megatron to divide by; our losses are normalised already.
    finalize_model_grads(model_chunks, None, **kwargs)


@dataclass
class Policy:
    model: torch.nn.Module  # this rank's pipeline stage (a GPTModel)
    cfg: Qwen2Config
    model_dir: Path
    ddp: DistributedDataParallel = field(repr=False, default=None)  # type: ignore[assignment]
    # Log-probs from the final hidden states and the output weight through the fused kernel (no [T, V] logits):
    # model.fused_output_layer, "auto" = on with CUDA.
    fused_output_layer: bool = False

    def __post_init__(self) -> None:
        if self.ddp is None:
            self.ddp = wrap_data_parallel(self.model)

    @classmethod
    def from_hf(
        cls,
        model_dir: str | Path,
        params_dtype: torch.dtype = torch.float32,
        transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
        recompute: bool = False,
        fused_output_layer: bool | str = "auto",
    ) -> Policy:
        """Build this rank's shard (parallel state must be initialised) and fill it from the checkpoint, reading
        only the rows or columns of each tensor that the shard holds.

        `transform(name, tensor)` may alter each HF tensor on the way in (tests and verify-sync perturb weights
        with it); each tensor is then read whole. `fused_output_layer`: True, False or "auto" (on with CUDA).
        """
        model_dir = Path(model_dir)
        cfg = load_hf_config(model_dir)
        cfg.check_parallel(
            parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_pipeline_model_parallel_world_size(),
        )
        ckpt = SafetensorsCheckpoint(model_dir)
        check_hf_tensors(ckpt.shapes(), cfg, str(model_dir))
        model = build_gpt_model(cfg, params_dtype=params_dtype, recompute=recompute)
        load_hf_into_megatron(model, cfg, ckpt, transform)
        fused = use_cuda() if fused_output_layer == "auto" else bool(fused_output_layer)
        return cls(model=model, cfg=cfg, model_dir=model_dir, fused_output_layer=fused)

    # ---- layout

    @property
    def tp_group(self):
        tp = parallel_state.get_tensor_model_parallel_world_size()
        return parallel_state.get_tensor_model_parallel_group() if tp > 1 else None

    @property
    def dp_size(self) -> int:
        return parallel_state.get_data_parallel_world_size()

    @property
    def dp_rank(self) -> int:
        return parallel_state.get_data_parallel_rank()

    @property
    def dp_group(self):
        return parallel_state.get_data_parallel_group()

    @property
    def is_last_stage(self) -> bool:
        """Whether this rank's stage produces the logits (the only stage where losses and log-probs exist)."""
        return parallel_state.is_pipeline_last_stage()

    def layout(self) -> dict[str, int]:
        return {
            "world_size": dist.get_world_size(),
            "tensor_parallel_size": parallel_state.get_tensor_model_parallel_world_size(),
            "pipeline_parallel_size": parallel_state.get_pipeline_model_parallel_world_size(),
        }

    def parameters(self) -> list[torch.nn.Parameter]:
        """The trainable parameters of this rank's stage (their gradients are in `.main_grad`, fp32)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def train(self) -> None:
        self.model.train()

    def eval(self) -> None:
        self.model.eval()

    # ---- forward / backward

    def forward_logprobs(
        self, microbatches: Sequence[PackedMicroBatch], temperature: float
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(logprobs [T], entropy [T]) of every micro-batch, without gradients, through the pipeline. On the
        last stage only; other stages get []."""

        def keep(mb: PackedMicroBatch, logprobs: torch.Tensor, entropy: torch.Tensor):
            zero = logprobs.new_zeros(())
            return zero, {"logprobs": logprobs.detach(), "entropy": entropy.detach()}

        with torch.no_grad():
            stats = self._run_schedule(microbatches, temperature, keep, forward_only=True)
        return [(s["logprobs"], s["entropy"]) for s in stats]

    def forward_backward(
        self, microbatches: Sequence[PackedMicroBatch], temperature: float, loss_fn: LossFn
    ) -> list[dict[str, torch.Tensor]]:
        """Forward and backward of `loss_fn` over every micro-batch; afterwards `.main_grad` of each parameter
        holds the gradient of the summed losses, summed over data-parallel ranks. Returns each micro-batch's
        stats on the last stage ([] elsewhere). Call `zero_grads` before."""
        return self._run_schedule(microbatches, temperature, loss_fn, forward_only=False)

    def _run_schedule(
        self,
        microbatches: Sequence[PackedMicroBatch],
        temperature: float,
        loss_fn: LossFn,
        forward_only: bool,
    ) -> list[dict]:
        tp_group = self.tp_group
        fused = self.fused_output_layer

        def forward_step(data_iterator, model):
            mb = next(data_iterator).to(device())
            with hidden_states_out(self.model, fused):  # fused: the last stage returns hidden states
                output = model(**forward_kwargs(mb))

            def loss(output: torch.Tensor):
                if fused:  # the gradient reaches the output weight through the kernel
                    weight = output_weight(self.model)
                    logprobs, entropy = logprobs_from_hidden(output, weight, mb, temperature, tp_group)
                else:
                    logprobs, entropy = logprobs_from_logits(output, mb, temperature, tp_group)
                value, stats = loss_fn(mb, logprobs, entropy)
                # (loss, token count, stats): with calculate_per_token_loss the schedule adds losses as they are.
                return value, torch.tensor(mb.num_response_tokens, dtype=torch.int), stats

            return output, loss

        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(microbatches),
            model=[self.ddp],
            num_microbatches=len(microbatches),
            seq_length=max(
                mb.num_tokens for mb in microbatches
            ),  # activations' shapes are sent per micro-batch
            micro_batch_size=1,
            forward_only=forward_only,
        )

    # ---- gradients

    def zero_grads(self) -> None:
        """Zeroed gradient buffers, allocated again first if `release_grads` freed them."""
        if self.grads_released:
            for buffer in self.ddp.buffers:
                buffer.reload_from_cpu(move_params=False, move_grads=True)  # reallocates and zeroes
        self.ddp.zero_grad_buffer()
        for p in self.parameters():
            p.grad = None

    def release_grads(self) -> None:
        """Free the fp32 gradient buffers until the next `zero_grads` (Megatron's grad-buffer offload: the
        storage is resized to nothing, every `main_grad` view stays valid), then, on a GPU, PyTorch's cached
        blocks, so that a colocated vLLM can take the memory back."""
        for buffer in self.ddp.buffers:
            buffer.offload_to_cpu(move_params=False, move_grads=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()

    @property
    def grads_released(self) -> bool:
        return any(b.grad_data.untyped_storage().size() == 0 for b in self.ddp.buffers if b.grad_data.numel())

    def grad_buffer_bytes(self) -> int:
        """Bytes the gradient buffers hold now (0 after `release_grads`)."""
        return sum(b.grad_data.untyped_storage().nbytes() for b in self.ddp.buffers)

    def clip_grads(self, max_norm: float) -> float:
        """The global L2 norm of the gradients (split parameters counted once per shard, replicated and tied
        ones once), one batched reduction; scales them to `max_norm` when above it (0: never). Returns the norm
        before clipping."""
        grads = [p.main_grad for p in self.parameters()]
        counted = [
            p.main_grad
            for p in self.parameters()
            if param_is_not_shared(p) and param_is_not_tensor_parallel_duplicate(p)
        ]
        squares = (
            torch.stack(torch._foreach_norm(counted, dtype=torch.float64)).pow(2).sum() if counted else None
        )
        total = (
            squares.reshape(1)
            if squares is not None
            else torch.zeros(1, dtype=torch.float64, device=device())
        )
        group = parallel_state.get_model_parallel_group()
        if dist.get_world_size(group) > 1:
            dist.all_reduce(total, group=group)
        norm = float(total.sqrt())
        if max_norm > 0 and norm > max_norm:
            torch._foreach_mul_(grads, max_norm / (norm + 1e-6))
        return norm

    # ---- metrics

    def batch_totals(self, sums: dict[str, float], maxes: dict[str, float] | None = None) -> dict[str, float]:
        """Per-rank partial figures of one batch -> the whole batch's, the same on every rank: `sums` added and
        `maxes` maximised over the data-parallel ranks of the last stage (other stages pass zeros: only the
        last stage has losses). Every rank must pass the same keys."""
        maxes = maxes or {}
        keys_sum, keys_max = sorted(sums), sorted(maxes)
        # On the collective's device: NCCL reduces CUDA tensors only.
        summed = torch.tensor([float(sums[k]) for k in keys_sum], dtype=torch.float64, device=device())
        maxed = torch.tensor([float(maxes[k]) for k in keys_max], dtype=torch.float64, device=device())
        for group in (self.dp_group, parallel_state.get_pipeline_model_parallel_group()):
            if dist.get_world_size(group) > 1:  # non-last stages hold zeros: summing over stages selects
                if keys_sum:
                    dist.all_reduce(summed, group=group)
                if keys_max:
                    dist.all_reduce(maxed, op=dist.ReduceOp.MAX, group=group)
        return {
            **dict(zip(keys_sum, summed.tolist(), strict=True)),
            **dict(zip(keys_max, maxed.tolist(), strict=True)),
        }

    # ---- weights in and out

    def hf_buckets(self, bucket_bytes: int = 512 << 20) -> Iterator[NamedTensors]:
        """The whole model as HF-named tensors, bucketed and produced one bucket at a time as it is consumed
        (a collective over the model-parallel group: every rank consumes it in step)."""
        return export_hf_buckets(self.model, self.cfg, bucket_bytes)

    def hf_manifest(self) -> dict[str, tuple[int, ...]]:
        """Every tensor `hf_buckets` produces, with its shape, from the config (no tensor is made)."""
        return expected_hf_shapes(self.cfg)

    def hf_local_buckets(self, bucket_bytes: int = 512 << 20) -> Iterator[NamedTensors]:
        """This TP rank's part of every HF tensor, as a vLLM worker of the same TP rank holds it, bucketed like
        `hf_buckets`; no collective and no full-size tensor (one pipeline stage only)."""
        return export_local_hf_buckets(self.model, self.cfg, bucket_bytes)

    def hf_local_manifest(self) -> dict[str, tuple[int, ...]]:
        """Every tensor `hf_local_buckets` produces, with its shape, from the config."""
        return local_hf_shapes(self.cfg, parallel_state.get_tensor_model_parallel_world_size())

    @property
    def tp_shard(self) -> tuple[int, int]:
        """(this rank's TP rank, TP size): which part of each tensor `hf_local_buckets` produces."""
        return (
            parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_tensor_model_parallel_world_size(),
        )

    def local_shards_problem(self, rollout_tp: int, engine_tp_rank: int) -> str | None:
        """Why this rank's shards cannot go as they are to its vLLM worker, of TP rank `engine_tp_rank` in an
        engine of TP `rollout_tp` (None: they can, through `hf_local_buckets`)."""
        tp_rank, tp = self.tp_shard
        if rollout_tp != tp:
            return f"rollout TP {rollout_tp} differs from the trainer's TP {tp}"
        if engine_tp_rank != tp_rank:
            return (
                f"this rank's vLLM worker is TP rank {engine_tp_rank}, its Megatron shards TP rank {tp_rank}"
            )
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            return "the trainer is pipeline parallel"
        return local_layout_problem(self.cfg, tp)

    def save_sharded(self, directory: Path) -> None:
        """This rank's shards in Megatron's distributed checkpoint format (a collective; any layout loads it)."""
        dist_checkpointing.save(self.model.sharded_state_dict(), str(directory))

    def load_sharded(self, directory: Path) -> None:
        """Fill this rank's shards from a distributed checkpoint saved under any TP/PP layout."""
        self.model.load_state_dict(dist_checkpointing.load(self.model.sharded_state_dict(), str(directory)))


def wrap_data_parallel(model: torch.nn.Module) -> DistributedDataParallel:
    """Megatron-core's DDP around one stage, and the schedule hooks Megatron's training loop installs."""
    # Its setup logs its whole config and every parameter of every bucket at INFO, on every rank.
    logging.getLogger("megatron.core.distributed").setLevel(logging.WARNING)
    overlap = use_cuda()  # the overlap runs on a CUDA side stream; gloo on the CPU reduces after backward
    ddp = DistributedDataParallel(
        config=model.config,
        ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=overlap,
            use_distributed_optimizer=False,
            check_for_nan_in_grad=False,
        ),
        module=model,
    )
    config = model.config
    config.no_sync_func = ddp.no_sync
    config.grad_sync_func = ddp.start_grad_sync if overlap else None
    config.finalize_model_grads_func = _finalize_grads
    return ddp
