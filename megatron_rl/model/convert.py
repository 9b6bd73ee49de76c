"""HF Qwen2 tensors <-> Megatron-core GPTModel shards (tensor and pipeline parallel).

Loading reads only this rank's slices from safetensors; exporting gathers TP (all-gather) and PP (broadcast)
and yields HF-named tensors in buckets, the form the rollout engines take. The local export (`export_local_hf_
buckets`) instead yields this TP rank's own part of each HF tensor, without any collective: what a vLLM worker
of the same TP rank holds (q/k/v, gate/up de-fused, vocabulary rows). Every tensor name and shape is checked
against what the config implies; a missing, extra or mis-shaped tensor is an error naming it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from safetensors import safe_open

from megatron_rl.model.hf_config import ModelConfigError, Qwen2Config, expected_hf_shapes

NamedTensors = list[tuple[str, torch.Tensor]]


class SafetensorsCheckpoint:
    """Lazy access to an HF checkpoint directory: model.safetensors or a sharded index.

    `bytes_read` counts the bytes of every tensor and slice `get` has returned.
    """

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        index = self.dir / "model.safetensors.index.json"
        single = self.dir / "model.safetensors"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.file_of = {name: self.dir / f for name, f in weight_map.items()}
        elif single.is_file():
            with safe_open(single, "pt") as f:
                self.file_of = {name: single for name in f.keys()}
        else:
            raise ModelConfigError(f"{self.dir}: no model.safetensors or model.safetensors.index.json")
        self._open: dict[Path, object] = {}
        self.bytes_read = 0

    def shapes(self) -> dict[str, tuple[int, ...]]:
        out = {}
        for name, path in self.file_of.items():
            out[name] = tuple(self._handle(path).get_slice(name).get_shape())
        return out

    def get(self, name: str, rows: slice | None = None, columns: slice | None = None) -> torch.Tensor:
        """Tensor `name`, or only its `rows` (dim 0) and/or `columns` (dim 1), read with safetensors' get_slice.

        Rows are contiguous in the file; a column range is strided, so the OS still pages in most of the tensor
        (but only the range is copied out of it)."""
        if name not in self.file_of:
            raise ModelConfigError(f"{self.dir}: missing tensor '{name}'")
        handle = self._handle(self.file_of[name])
        if rows is None and columns is None:
            tensor = handle.get_tensor(name)
        else:
            index = (rows or slice(None),) + (() if columns is None else (columns,))
            tensor = handle.get_slice(name)[index]
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor

    def _handle(self, path: Path):
        if path not in self._open:
            if not path.is_file():
                raise ModelConfigError(f"{self.dir}: shard file '{path.name}' named in the index is missing")
            self._open[path] = safe_open(path, "pt")
        return self._open[path]


# ----------------------------------------------------------------------------------------------------------
# The mapping: one rule per Megatron parameter.


@dataclass(frozen=True)
class Rule:
    megatron: str  # parameter name inside one pipeline stage (local layer index)
    hf: tuple[str, ...]  # HF tensors it is made of
    split: str  # replicated | column | row | qkv | gate_up
    export: bool = True  # False for the tied output-layer copy on the last stage


def stage_rules(cfg: Qwen2Config, pp_rank: int, pp_size: int, te: bool) -> list[Rule]:
    per_stage = cfg.num_hidden_layers // pp_size
    first, last = pp_rank == 0, pp_rank == pp_size - 1
    rules: list[Rule] = []
    if first:
        rules.append(Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "column"))
    for local in range(per_stage):
        g = pp_rank * per_stage + local
        m, h = f"decoder.layers.{local}.", f"model.layers.{g}."
        attn_norm = "self_attention.linear_qkv.layer_norm_weight" if te else "input_layernorm.weight"
        mlp_norm = "mlp.linear_fc1.layer_norm_weight" if te else "pre_mlp_layernorm.weight"
        rules.append(Rule(m + attn_norm, (h + "input_layernorm.weight",), "replicated"))
        qkv = tuple(h + f"self_attn.{x}_proj.weight" for x in "qkv")
        rules.append(Rule(m + "self_attention.linear_qkv.weight", qkv, "qkv"))
        if cfg.qkv_bias:
            qkv_b = tuple(h + f"self_attn.{x}_proj.bias" for x in "qkv")
            rules.append(Rule(m + "self_attention.linear_qkv.bias", qkv_b, "qkv"))
        rules.append(Rule(m + "self_attention.linear_proj.weight", (h + "self_attn.o_proj.weight",), "row"))
        rules.append(Rule(m + mlp_norm, (h + "post_attention_layernorm.weight",), "replicated"))
        gate_up = (h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight")
        rules.append(Rule(m + "mlp.linear_fc1.weight", gate_up, "gate_up"))
        rules.append(Rule(m + "mlp.linear_fc2.weight", (h + "mlp.down_proj.weight",), "row"))
    if last:
        rules.append(Rule("decoder.final_layernorm.weight", ("model.norm.weight",), "replicated"))
        if not cfg.tie_word_embeddings:
            rules.append(Rule("output_layer.weight", ("lm_head.weight",), "column"))
        elif not first:
            # Megatron keeps a copy of the tied embedding on the last stage; the first stage exports it.
            rules.append(Rule("output_layer.weight", ("model.embed_tokens.weight",), "column", export=False))
    return rules


def _interleave_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: Qwen2Config) -> torch.Tensor:
    """HF's separate q/k/v -> Megatron's per-query-group layout [q_g0.., k_g0, v_g0, q_g1.., ...]."""
    groups = cfg.num_key_value_heads
    qs = q.reshape(groups, -1, *q.shape[1:])
    ks = k.reshape(groups, -1, *k.shape[1:])
    vs = v.reshape(groups, -1, *v.shape[1:])
    return torch.cat([qs, ks, vs], dim=1).reshape(-1, *q.shape[1:])


def _split_qkv(
    full: torch.Tensor, cfg: Qwen2Config, groups: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Interleaved qkv rows of `groups` whole query groups (default: all of them) -> q, k, v."""
    d = cfg.head_dim
    q_rows = cfg.num_attention_heads // cfg.num_key_value_heads * d  # a group's q rows
    groups = groups or cfg.num_key_value_heads
    per_group = full.reshape(groups, q_rows + 2 * d, *full.shape[1:])
    q, k, v = torch.split(per_group, [q_rows, d, d], dim=1)
    return tuple(x.reshape(-1, *full.shape[1:]).contiguous() for x in (q, k, v))


def shard_for_rank(
    rule: Rule, hf: list[torch.Tensor], cfg: Qwen2Config, tp_rank: int, tp: int
) -> torch.Tensor:
    """This TP rank's shard of `rule.megatron`, cut from the whole HF tensors of the rule."""
    if rule.split == "replicated":
        return hf[0]
    if rule.split == "column":
        return hf[0].chunk(tp, dim=0)[tp_rank]
    if rule.split == "row":
        return hf[0].chunk(tp, dim=1)[tp_rank]
    if rule.split == "qkv":
        return _interleave_qkv(*hf, cfg).chunk(tp, dim=0)[tp_rank]
    if rule.split == "gate_up":
        return torch.cat([hf[0].chunk(tp, dim=0)[tp_rank], hf[1].chunk(tp, dim=0)[tp_rank]], dim=0)
    raise AssertionError(rule.split)


# Part of one HF tensor: its name, then its rows and columns (None: all of them).
Read = tuple[str, slice | None, slice | None]


def _chunk(size: int, tp: int, tp_rank: int) -> slice:
    """The [lo, hi) that `tensor.chunk(tp)[tp_rank]` takes along a dimension of `size`."""
    step = -(-size // tp)
    return slice(min(tp_rank * step, size), min((tp_rank + 1) * step, size))


def _qkv_reads(names: tuple[str, ...], cfg: Qwen2Config, rows: slice) -> list[Read]:
    """The parts of q, k and v (`names`, weights or biases) that make `rows` of the interleaved qkv.

    Each query group's block is its q heads, then its k head, then its v head (_interleave_qkv). With
    num_key_value_heads a multiple of tp a rank's rows are whole groups; with tp a multiple of it (Megatron
    then splits a group over ranks) they may start and end inside a group's q, k or v.
    """
    d = cfg.head_dim
    q_rows = cfg.num_attention_heads // cfg.num_key_value_heads * d
    # (tensor, offset of its part in a group's block, rows of it per group)
    parts = ((names[0], 0, q_rows), (names[1], q_rows, d), (names[2], q_rows + d, d))
    reads: list[Read] = []
    for group in range(cfg.num_key_value_heads):
        for name, offset, count in parts:
            start = group * (q_rows + 2 * d) + offset  # the part's first row in the interleaved layout
            lo, hi = max(rows.start, start), min(rows.stop, start + count)
            if lo < hi:
                source = group * count - start  # interleaved row + source = row of the HF tensor
                reads.append((name, slice(lo + source, hi + source), None))
    return reads


def rank_reads(
    rule: Rule, shapes: dict[str, tuple[int, ...]], cfg: Qwen2Config, tp_rank: int, tp: int
) -> tuple[list[Read], int]:
    """What this TP rank's shard of `rule.megatron` is made of: parts of HF tensors (of `shapes`), in order,
    and the dimension they are joined along. Joined, they equal shard_for_rank on the whole tensors."""
    first = rule.hf[0]
    if rule.split == "replicated":
        return [(first, None, None)], 0
    if rule.split == "column":
        return [(first, _chunk(shapes[first][0], tp, tp_rank), None)], 0
    if rule.split == "row":
        return [(first, None, _chunk(shapes[first][1], tp, tp_rank))], 1
    if rule.split == "qkv":
        interleaved = sum(shapes[name][0] for name in rule.hf)
        return _qkv_reads(rule.hf, cfg, _chunk(interleaved, tp, tp_rank)), 0
    if rule.split == "gate_up":
        return [(name, _chunk(shapes[name][0], tp, tp_rank), None) for name in rule.hf], 0
    raise AssertionError(rule.split)


def read_shard(
    ckpt: SafetensorsCheckpoint, rule: Rule, shapes: dict, cfg: Qwen2Config, tp_rank: int, tp: int
) -> torch.Tensor:
    """This TP rank's shard of `rule.megatron`, reading only its parts of the HF tensors."""
    reads, dim = rank_reads(rule, shapes, cfg, tp_rank, tp)
    parts = [ckpt.get(name, rows, columns) for name, rows, columns in reads]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def merge_shards(rule: Rule, shards: list[torch.Tensor], cfg: Qwen2Config) -> list[torch.Tensor]:
    """The inverse of shard_for_rank over all TP ranks: the HF tensors of `rule`, in rule.hf order."""
    if rule.split == "replicated":
        return [shards[0]]
    if rule.split == "column":
        return [torch.cat(shards, dim=0)]
    if rule.split == "row":
        return [torch.cat(shards, dim=1)]
    if rule.split == "qkv":
        return list(_split_qkv(torch.cat(shards, dim=0), cfg))
    if rule.split == "gate_up":
        halves = [s.chunk(2, dim=0) for s in shards]
        return [torch.cat([g for g, _ in halves], dim=0), torch.cat([u for _, u in halves], dim=0)]
    raise AssertionError(rule.split)


# ----------------------------------------------------------------------------------------------------------
# The local layout: a TP rank's own part of each HF tensor, as a vLLM worker of the same TP rank holds it.


def local_layout_problem(cfg: Qwen2Config, tp: int) -> str | None:
    """Why TP rank r's Megatron shards are not the shards vLLM's TP rank r holds at tensor parallelism `tp`
    (None: they are, and local_hf_tensors turns one into the other).

    vLLM splits q heads, k/v heads, gate, up, o and down evenly over its ranks, but replicates k/v heads when
    there are fewer than ranks (Megatron then splits a query group's rows over ranks), and it pads the
    vocabulary to a multiple of 64 before splitting it (Megatron splits the unpadded rows)."""
    if cfg.num_key_value_heads % tp:
        return f"{cfg.num_key_value_heads} KV head(s) do not split over TP={tp} (vLLM replicates them)"
    if cfg.vocab_size % 64 or cfg.vocab_size % tp:
        return (
            f"vocabulary size {cfg.vocab_size} is not a multiple of 64 and of TP={tp} (vLLM pads it to a "
            "multiple of 64 before splitting it)"
        )
    if cfg.num_attention_heads % tp or cfg.intermediate_size % tp:
        return f"attention heads or intermediate size do not split evenly over TP={tp}"
    return None


def local_hf_tensors(rule: Rule, local: torch.Tensor, cfg: Qwen2Config, tp: int) -> list[torch.Tensor]:
    """A TP rank's shard of `rule.megatron` -> that rank's part of each HF tensor of the rule, in rule.hf order
    (views of `local` except q/k/v): q/k/v de-interleaved from the rank's whole query groups, gate and up the
    two halves of linear_fc1's rows, everything else as it is (vocabulary rows, o/down columns, norms)."""
    if rule.split in ("replicated", "column", "row"):
        return [local]
    if rule.split == "qkv":
        return list(_split_qkv(local, cfg, cfg.num_key_value_heads // tp))
    if rule.split == "gate_up":
        return list(local.chunk(2, dim=0))
    raise AssertionError(rule.split)


def local_hf_shapes(cfg: Qwen2Config, tp: int) -> dict[str, tuple[int, ...]]:
    """Every tensor the local export of one TP rank produces (one pipeline stage), with its shape, from the
    config: the whole model's HF tensors cut evenly over `tp` (rows, or columns for o/down; norms whole)."""
    full = expected_hf_shapes(cfg)
    shapes: dict[str, tuple[int, ...]] = {}
    for rule in stage_rules(cfg, 0, 1, te=False):
        for name in rule.hf:
            shape = full[name]
            if rule.split == "row":
                shape = (shape[0], shape[1] // tp)
            elif rule.split != "replicated":
                shape = (shape[0] // tp, *shape[1:])
            shapes[name] = shape
    return {name: shapes[name] for name in full}  # in the checkpoint's order


# ----------------------------------------------------------------------------------------------------------
# Model side.


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module"):
        model = model.module
    return model


def _rules_for(model: torch.nn.Module, cfg: Qwen2Config) -> list[Rule]:
    model = unwrap(model)
    return stage_rules(
        cfg,
        parallel_state.get_pipeline_model_parallel_rank(),
        parallel_state.get_pipeline_model_parallel_world_size(),
        getattr(model, "uses_transformer_engine", False),
    )


def load_hf_into_megatron(
    model: torch.nn.Module,
    cfg: Qwen2Config,
    ckpt: SafetensorsCheckpoint,
    transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
) -> None:
    """Copy this rank's shard of every parameter of `model` from `ckpt`, reading only the rows or columns the
    rank holds (rank_reads). With `transform(name, tensor)` each HF tensor is read whole, altered, then cut
    (shard_for_rank): tests and verify-sync perturb weights that way."""
    params = dict(unwrap(model).named_parameters())
    rules = _rules_for(model, cfg)
    covered = {r.megatron for r in rules}
    uncovered = [n for n in params if n not in covered]
    if uncovered:
        raise ModelConfigError(f"Megatron parameter '{uncovered[0]}' has no HF source; the spec is not Qwen2")
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    shapes = expected_hf_shapes(cfg)
    with torch.no_grad():
        for rule in rules:
            target = params[rule.megatron]
            if transform is None:
                shard = read_shard(ckpt, rule, shapes, cfg, tp_rank, tp)
            else:
                shard = shard_for_rank(rule, [transform(n, ckpt.get(n)) for n in rule.hf], cfg, tp_rank, tp)
            if tuple(shard.shape) != tuple(target.shape):
                raise ModelConfigError(
                    f"tensor {list(rule.hf)} gives shard shape {list(shard.shape)} for Megatron parameter "
                    f"'{rule.megatron}' of shape {list(target.shape)}"
                )
            target.copy_(shard)
            if rule.split != "replicated":
                # Megatron marks split parameters only when it initialises them itself (perform_initialization
                # is off: the weights come from here); gradient-norm clipping needs the mark to count shards.
                target.tensor_model_parallel = True
                target.partition_dim = 1 if rule.split == "row" else 0
                target.partition_stride = 1


def receiver_module(hf_name: str) -> str:
    """The module of a receiver that fuses tensors (vLLM) an HF tensor loads into: q/k/v weights and biases
    into one qkv_proj, gate and up into one gate_up_proj, anything else into its own module."""
    module = hf_name.rsplit(".", 1)[0]
    for parts, fused in (
        (("q_proj", "k_proj", "v_proj"), "qkv_proj"),
        (("gate_proj", "up_proj"), "gate_up_proj"),
    ):
        head, _, last = module.rpartition(".")
        if last in parts:
            return f"{head}.{fused}"
    return module


def export_hf_groups(model: torch.nn.Module, cfg: Qwen2Config) -> Iterator[NamedTensors]:
    """Yield the model's HF-named full tensors, one group per receiver module (receiver_module: q/k/v weights
    and biases together, gate/up together), in stage order.

    Runs on every rank of the TP x PP group and is a collective: all of them must consume it in step.
    A receiver that loads a bucket at a time (vLLM's layerwise reload processes a layer once it has all its
    tensors) then never waits across buckets.
    """
    return _per_receiver(_export_hf_parameters(model, cfg))


def export_local_hf_groups(model: torch.nn.Module, cfg: Qwen2Config) -> Iterator[NamedTensors]:
    """Yield this TP rank's part of each HF tensor (local_hf_tensors), grouped as export_hf_groups groups the
    whole tensors. No collective and no full-size tensor: each rank runs it on its own. One pipeline stage
    only (with PP a rank does not hold every layer its vLLM worker serves)."""
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        raise ModelConfigError("the local export needs the whole model on one pipeline stage (PP=1)")
    params = dict(unwrap(model).named_parameters())
    tp = parallel_state.get_tensor_model_parallel_world_size()

    def per_parameter() -> Iterator[NamedTensors]:
        for rule in _rules_for(model, cfg):
            if rule.export:
                tensors = local_hf_tensors(rule, params[rule.megatron].detach(), cfg, tp)
                yield list(zip(rule.hf, tensors, strict=True))

    return _per_receiver(per_parameter())


def _per_receiver(per_parameter: Iterator[NamedTensors]) -> Iterator[NamedTensors]:
    """Join consecutive parameters' HF tensors that load into the same receiver module."""
    group: NamedTensors = []
    for tensors in per_parameter:
        if group and receiver_module(group[0][0]) != receiver_module(tensors[0][0]):
            yield group
            group = []
        group.extend(tensors)
        del tensors  # not alive while the next one is gathered
    if group:
        yield group


def _export_hf_parameters(model: torch.nn.Module, cfg: Qwen2Config) -> Iterator[NamedTensors]:
    """Per Megatron parameter, its HF-named full tensors (a collective, as export_hf_groups)."""
    params = dict(unwrap(model).named_parameters())
    tp = parallel_state.get_tensor_model_parallel_world_size()
    tp_group = parallel_state.get_tensor_model_parallel_group()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    for stage in range(pp):
        if stage == pp_rank:
            rules = [r for r in _rules_for(model, cfg) if r.export]
            meta = [(r.megatron, r.hf, r.split) for r in rules]
        else:
            meta = None
        if pp > 1:
            box = [meta]
            dist.broadcast_object_list(box, src=dist.get_global_rank(pp_group, stage), group=pp_group)
            meta = box[0]
        hf_shapes = expected_hf_shapes(cfg)
        for megatron_name, hf_names, split in meta:
            rule = Rule(megatron_name, tuple(hf_names), split)
            tensors: list[torch.Tensor]
            if stage == pp_rank:
                local = params[megatron_name].detach()
                shards = None
                if tp > 1 and split != "replicated":
                    shards = [torch.empty_like(local) for _ in range(tp)]
                    dist.all_gather(shards, local.contiguous(), group=tp_group)
                    tensors = merge_shards(rule, shards, cfg)
                else:  # this rank holds the whole tensor: views of the parameter, copies only for q/k/v
                    tensors = local_hf_tensors(rule, local, cfg, 1)
            else:
                dtype = next(iter(params.values())).dtype
                tensors = [
                    torch.empty(hf_shapes[n], dtype=dtype, device=next(iter(params.values())).device)
                    for n in hf_names
                ]
            if pp > 1:
                for t in tensors:
                    dist.broadcast(t, src=dist.get_global_rank(pp_group, stage), group=pp_group)
            yield list(zip(hf_names, tensors, strict=True))
            tensors = shards = local = None  # not alive while the next parameter is gathered


def bucketed(groups: Iterator[NamedTensors], bucket_bytes: int) -> Iterator[NamedTensors]:
    """Join groups of tensors into buckets of at most `bucket_bytes`; a group is never split, and a group
    larger than the budget travels alone."""
    bucket: NamedTensors = []
    size = 0
    for group in groups:
        nbytes = sum(t.numel() * t.element_size() for _, t in group)
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.extend(group)
        size += nbytes
        del group  # a yielded bucket's tensors are not kept alive while the next group is gathered
    if bucket:
        yield bucket


def export_hf_buckets(
    model: torch.nn.Module, cfg: Qwen2Config, bucket_bytes: int = 512 << 20
) -> Iterator[NamedTensors]:
    return bucketed(export_hf_groups(model, cfg), bucket_bytes)


def export_local_hf_buckets(
    model: torch.nn.Module, cfg: Qwen2Config, bucket_bytes: int = 512 << 20
) -> Iterator[NamedTensors]:
    return bucketed(export_local_hf_groups(model, cfg), bucket_bytes)
