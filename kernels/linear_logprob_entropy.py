"""The output layer fused with per-token log-prob and entropy: no [T, V] logits tensor ever exists.

For final hidden states ``h`` [T, H], this rank's output-layer weight shard ``W`` [V_local, H] (rows
[r * V_local, (r + 1) * V_local) of the vocabulary on tensor-parallel rank r), global target ids [T] and a
temperature ``tau``, with logits ``x = h @ W.T`` over the FULL vocabulary and ``z = x / tau``:

    logprob[t] = z[t, target[t]] - logsumexp(z[t])
    entropy[t] = -sum_v p[t, v] * log p[t, v],       p = softmax(z)

exactly what ``kernels.logprob_entropy`` computes from materialised logits, but the logits are produced one
tile of [BLOCK_T tokens, BLOCK_V vocabulary rows] at a time, in fp32 (bf16 inputs are multiplied with fp32
accumulation), and reduced at once to the same per-row partials ``(m, s, a, x_target)`` that module uses (see
its docstring for the maths, which keeps everything relative to the row maximum). Tiles of one row are combined
with ``_combine_partials``, ranks with one all-gather of the packed [T, 4] partials (the one forward collective,
as in ``logprob_entropy``); only the [T, 3] statistics (m, log_s, entropy) are saved for the backward pass.

Backward recomputes each logits tile, forms its gradient

    d x = (g_lp * (onehot - p) - g_H * p * (log p + H)) / tau

in fp32 (``logprob_entropy``'s backward per tile) and turns it into ``d h = d x @ W`` and ``d W = d x.T @ h``,
d W accumulated in fp32. Each rank's ``d h`` covers only its vocabulary slice, so with a tensor-parallel group
it is summed over the group (one all-reduce in backward: what a column-parallel output layer's input does) and
every rank returns the full gradient of its replicated ``h``. The Triton backward does the two products in one
of two ways (``triton_backward``): "gemm" (default) writes a fixed-size chunk of d logits and hands it to two
library matmuls; "atomic" multiplies every tile straight into fp32 accumulators with atomic adds. Which is
faster on a GPU has not been measured yet (docs/benchmarks.md).

Two implementations share the wrapper, the merge and the validation, chosen by ``logprob_entropy``'s
``_select_backend``: Triton kernels (CUDA, or the CPU interpreter with TRITON_INTERPRET=1), and a torch
reference that walks the same tiles with torch matmuls (the CPU path and the fallback). Memory beyond inputs
and outputs: the tile workspace (fixed; for the "gemm" backward, CHUNK x V_local d logits in the inputs' dtype),
12 bytes per token of saved statistics, and an fp32 [V_local, H] accumulator for ``d W`` when the weight is
not fp32; the "atomic" backward also accumulates ``d h`` in an fp32 [T, H] buffer (4 H bytes per token) when
``h`` is not fp32.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from kernels.logprob_entropy import (
    SUPPORTED_DTYPES,
    _all_gather_single,
    _check_temperature_and_targets,
    _combine_partials,
    _finish_partials,
    _interpreting,
    _select_backend,
    tl,
    triton,
)
from kernels.logprob_entropy import _backward_reference as _tile_grad_reference
from kernels.logprob_entropy import _forward_reference as _tile_partials_reference

# Torch reference tiles: 512 x 8192 fp32 logits = 16 MiB per temporary, a handful alive at once.
REFERENCE_BLOCK_T = 512
REFERENCE_BLOCK_V = 8192
# Triton tiles (tokens, vocabulary rows, hidden columns per dot) and warps; tuned on paper only (no GPU yet).
DEFAULT_TRITON_TILES = (64, 128, 64)
DEFAULT_NUM_WARPS = 8
# Enough programs to fill an H100's 132 SMs twice: the vocabulary is split when T alone gives fewer.
_TARGET_PROGRAMS = 264


# ----------------------------------------------------------------------------------------------------------
# Triton kernels: plain functions wrapped by triton.jit at first use (see logprob_entropy._triton_kernels for
# why), reducing with tl.reduce and Triton's combine functions instead of tl.max / tl.sum, and making zeros
# with tl.full instead of tl.zeros, for the same reason (those three are @triton.jit library functions).
# Grid: (token blocks, vocabulary splits); each program walks its split's vocabulary tiles.
#
# IEEE (a constexpr) makes every tl.dot an fp32 product of operands converted to fp32: for fp32 inputs, so that
# the GPU does not round them to TF32 (which would miss the 1e-4 accuracy target), and under the interpreter
# for every dtype, whose tl.dot does not multiply bf16 correctly. bf16 values are exact in fp32, so the result
# is the bf16 tensor-core product with fp32 accumulation that the compiled bf16 path computes.
# ----------------------------------------------------------------------------------------------------------


def _fwd_kernel(
    h_ptr, stride_h, w_ptr, stride_w, targets_ptr, partials_ptr,  # partials: [n_splits, T, 4] fp32
    n_rows, n_cols, n_hidden, cols_per_split, vocab_start, inv_tau, ignore_index,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    pid_t = tl.program_id(0)
    split = tl.program_id(1)
    rows = (pid_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)  # int64: T * H and V * H pass 2**31
    row_mask = rows < n_rows
    target = tl.load(targets_ptr + rows, mask=row_mask, other=ignore_index).to(tl.int64)
    local = tl.where(target == ignore_index, -1, target - vocab_start)  # -1: no column is the target

    m = tl.full((BLOCK_T,), -float("inf"), tl.float32)  # running max of the raw logits
    s = tl.full((BLOCK_T,), 0.0, tl.float32)  # sum exp((x - m) / tau)
    a = tl.full((BLOCK_T,), 0.0, tl.float32)  # sum exp((x - m) / tau) * (x - m) / tau
    x_target = tl.full((BLOCK_T,), 0.0, tl.float32)
    ks = tl.arange(0, BLOCK_K)
    lo = split * cols_per_split
    hi = tl.minimum(lo + cols_per_split, n_cols)
    for v0 in range(lo, hi, BLOCK_V):
        cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        col_mask = cols < hi
        # fp32 logits tile [BLOCK_T, BLOCK_V] = h[rows] @ W[cols].T, BLOCK_K hidden columns per dot.
        x = tl.full((BLOCK_T, BLOCK_V), 0.0, tl.float32)
        for k0 in range(0, n_hidden, BLOCK_K):
            k = k0 + ks
            k_mask = k < n_hidden
            h = tl.load(
                h_ptr + rows[:, None] * stride_h + k[None, :],
                mask=row_mask[:, None] & k_mask[None, :],
                other=0.0,
            )
            w = tl.load(
                w_ptr + cols[None, :] * stride_w + k[:, None],
                mask=col_mask[None, :] & k_mask[:, None],
                other=0.0,
            )
            if IEEE:  # fp32 products of the (exact) fp32 values, not TF32: see the IEEE note at the top
                x = tl.dot(h.to(tl.float32), w.to(tl.float32), x, input_precision="ieee")
            else:
                x = tl.dot(h, w, x)
        x = tl.where(col_mask[None, :], x, -float("inf"))
        m_new = tl.maximum(m, tl.reduce(x, 1, tl.standard._elementwise_max))
        m_ref = tl.where(m_new == -float("inf"), 0.0, m_new)
        shift = tl.where(m == -float("inf"), 0.0, (m - m_ref) * inv_tau)  # <= 0
        scale = tl.exp(shift)
        d = (x - m_ref[:, None]) * inv_tau
        e = tl.exp(d)
        ed = e * tl.where(e > 0.0, d, 0.0)  # exp(-inf) * -inf would be nan
        a = scale * (a + shift * s) + tl.reduce(ed, 1, tl.standard._sum_combine)
        s = scale * s + tl.reduce(e, 1, tl.standard._sum_combine)
        m = m_new
        hit = (cols[None, :] == local[:, None]) & col_mask[None, :]  # the next split's columns are not ours
        x_target += tl.reduce(tl.where(hit, x, 0.0), 1, tl.standard._sum_combine)

    out = partials_ptr + (split * n_rows + rows) * 4
    tl.store(out + 0, m, mask=row_mask)
    tl.store(out + 1, s, mask=row_mask)
    tl.store(out + 2, a, mask=row_mask)
    tl.store(out + 3, x_target, mask=row_mask)


def _bwd_kernel(
    h_ptr, stride_h, w_ptr, stride_w, targets_ptr, stats_ptr, g_lp_ptr, g_ent_ptr,
    dh_ptr, dw_ptr,  # ATOMIC: fp32 accumulators [T, H] and [V_local, H], zeroed; else dh_ptr: d logits [T, V_local]
    n_rows, n_cols, n_hidden, cols_per_split, vocab_start, inv_tau, ignore_index,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
    ATOMIC: tl.constexpr,
):  # fmt: skip
    pid_t = tl.program_id(0)
    split = tl.program_id(1)
    rows = (pid_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    row_mask = rows < n_rows
    target = tl.load(targets_ptr + rows, mask=row_mask, other=ignore_index).to(tl.int64)
    local = tl.where(target == ignore_index, -1, target - vocab_start)
    m = tl.load(stats_ptr + rows * 3 + 0, mask=row_mask, other=0.0)
    log_s = tl.load(stats_ptr + rows * 3 + 1, mask=row_mask, other=0.0)
    entropy = tl.load(stats_ptr + rows * 3 + 2, mask=row_mask, other=0.0)
    m_ref = tl.where(m == -float("inf"), 0.0, m)
    g_lp = tl.load(g_lp_ptr + rows, mask=row_mask & (target != ignore_index), other=0.0)
    g_ent = tl.load(g_ent_ptr + rows, mask=row_mask, other=0.0)
    ks = tl.arange(0, BLOCK_K)

    lo = split * cols_per_split
    hi = tl.minimum(lo + cols_per_split, n_cols)
    for v0 in range(lo, hi, BLOCK_V):
        cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        col_mask = cols < hi
        # fp32 logits tile [BLOCK_T, BLOCK_V] = h[rows] @ W[cols].T, BLOCK_K hidden columns per dot.
        x = tl.full((BLOCK_T, BLOCK_V), 0.0, tl.float32)
        for k0 in range(0, n_hidden, BLOCK_K):
            k = k0 + ks
            k_mask = k < n_hidden
            h = tl.load(
                h_ptr + rows[:, None] * stride_h + k[None, :],
                mask=row_mask[:, None] & k_mask[None, :],
                other=0.0,
            )
            w = tl.load(
                w_ptr + cols[None, :] * stride_w + k[:, None],
                mask=col_mask[None, :] & k_mask[:, None],
                other=0.0,
            )
            if IEEE:  # fp32 products of the (exact) fp32 values, not TF32: see the IEEE note at the top
                x = tl.dot(h.to(tl.float32), w.to(tl.float32), x, input_precision="ieee")
            else:
                x = tl.dot(h, w, x)
        logp = (x - m_ref[:, None]) * inv_tau - log_s[:, None]
        p = tl.exp(logp)
        grad = g_lp[:, None] * (tl.where(cols[None, :] == local[:, None], 1.0, 0.0) - p)
        grad -= g_ent[:, None] * p * tl.where(p > 0.0, logp + entropy[:, None], 0.0)
        grad = tl.where(row_mask[:, None] & col_mask[None, :], grad * inv_tau, 0.0)
        # The tensor-core operand is in the inputs' dtype, as the unfused path's bf16 d logits would be.
        grad = grad.to(h_ptr.dtype.element_ty)
        if not ATOMIC:  # "gemm": hand the tile of d logits to two library matmuls (see _backward_triton)
            tile_mask = row_mask[:, None] & col_mask[None, :]
            tl.store(dh_ptr + rows[:, None] * n_cols + cols[None, :], grad, mask=tile_mask)
        else:  # "atomic": multiply the tile straight into the fp32 accumulators
            for k0 in range(0, n_hidden, BLOCK_K):
                k = k0 + ks
                k_mask = k < n_hidden
                w = tl.load(
                    w_ptr + cols[:, None] * stride_w + k[None, :],
                    mask=col_mask[:, None] & k_mask[None, :],
                    other=0.0,
                )
                h = tl.load(
                    h_ptr + rows[:, None] * stride_h + k[None, :],
                    mask=row_mask[:, None] & k_mask[None, :],
                    other=0.0,
                )
                if IEEE:
                    g32 = grad.to(tl.float32)
                    dh = tl.dot(g32, w.to(tl.float32), input_precision="ieee")
                    dw = tl.dot(tl.trans(g32), h.to(tl.float32), input_precision="ieee")
                else:
                    dh = tl.dot(grad, w)
                    dw = tl.dot(tl.trans(grad), h)
                tl.atomic_add(
                    dh_ptr + rows[:, None] * n_hidden + k[None, :],
                    dh,
                    mask=row_mask[:, None] & k_mask[None, :],
                )
                tl.atomic_add(
                    dw_ptr + cols[:, None] * n_hidden + k[None, :],
                    dw,
                    mask=col_mask[:, None] & k_mask[None, :],
                )


@functools.lru_cache(maxsize=2)
def _triton_kernels(interpret: bool):
    # `interpret` is the cache key: TRITON_INTERPRET as it is now, which triton.jit reads while decorating.
    del interpret
    return triton.jit(_fwd_kernel), triton.jit(_bwd_kernel)


def _triton_grid(n_rows: int, n_cols: int, tiles: tuple[int, int, int], n_splits: int | None):
    block_t, block_v, _ = tiles
    row_blocks = triton.cdiv(n_rows, block_t)
    col_blocks = triton.cdiv(n_cols, block_v)
    if n_splits is None:
        n_splits = max(1, min(col_blocks, triton.cdiv(_TARGET_PROGRAMS, row_blocks)))
    cols_per_split = triton.cdiv(col_blocks, n_splits) * block_v
    n_splits = triton.cdiv(n_cols, cols_per_split)  # no empty split
    return (row_blocks, n_splits), cols_per_split


def _forward_triton(hidden, weight, targets, vocab_start, inv_tau, ignore_index, tuning):
    fwd, _ = _triton_kernels(_interpreting())
    tiles, num_warps, n_splits = tuning[:3]
    (n_rows, n_hidden), n_cols = hidden.shape, weight.shape[0]
    if n_rows == 0:  # an empty grid is not a launch
        return torch.empty(0, 4, device=hidden.device, dtype=torch.float32)
    grid, cols_per_split = _triton_grid(n_rows, n_cols, tiles, n_splits)
    partials = torch.empty(grid[1], n_rows, 4, device=hidden.device, dtype=torch.float32)
    fwd[grid](
        hidden, hidden.stride(0), weight, weight.stride(0), targets, partials,
        n_rows, n_cols, n_hidden, cols_per_split, vocab_start, inv_tau, ignore_index,
        BLOCK_T=tiles[0], BLOCK_V=tiles[1], BLOCK_K=tiles[2], IEEE=hidden.dtype == torch.float32 or _interpreting(),
        num_warps=num_warps,
    )  # fmt: skip
    return partials[0] if grid[1] == 1 else _combine_partials(partials, inv_tau)


def _backward_triton(hidden, weight, targets, stats, g_lp, g_ent, vocab_start, inv_tau, ignore_index, tuning):
    """(d hidden, d weight) in one of two ways (`tuning`'s backward mode):

    - "atomic": every (token block, vocabulary split) program recomputes its logits tiles, forms d logits and
      adds d logits @ W and d logits.T @ h into fp32 [T, H] and [V_local, H] accumulators with atomics. Fully
      fused, but a d weight row gets one atomic add per token block.
    - "gemm" (default): CHUNK tokens at a time, the kernel only recomputes the logits and writes d logits
      [CHUNK, V_local] in the inputs' dtype (a fixed workspace, 1 GiB by default), and two library matmuls
      (cuBLAS on a GPU) make d hidden for the chunk and add the chunk's d weight in fp32.
    """
    _, bwd = _triton_kernels(_interpreting())
    tiles, num_warps, n_splits, mode, chunk = tuning
    (n_rows, n_hidden), n_cols = hidden.shape, weight.shape[0]
    ieee = hidden.dtype == torch.float32 or _interpreting()
    launch = dict(BLOCK_T=tiles[0], BLOCK_V=tiles[1], BLOCK_K=tiles[2], IEEE=ieee, num_warps=num_warps)
    d_weight = torch.zeros(n_cols, n_hidden, device=hidden.device, dtype=torch.float32)
    if mode == "atomic":
        d_hidden = torch.zeros(n_rows, n_hidden, device=hidden.device, dtype=torch.float32)
        if n_rows == 0:
            return d_hidden, d_weight
        grid, cols_per_split = _triton_grid(n_rows, n_cols, tiles, n_splits)
        bwd[grid](
            hidden, hidden.stride(0), weight, weight.stride(0), targets, stats, g_lp, g_ent, d_hidden, d_weight,
            n_rows, n_cols, n_hidden, cols_per_split, vocab_start, inv_tau, ignore_index, ATOMIC=True, **launch,
        )  # fmt: skip
        return d_hidden, d_weight
    d_hidden = torch.empty_like(hidden)
    block_t, block_v = tiles[0], tiles[1]
    chunk = chunk or max(block_t, (1 << 30) // (n_cols * hidden.element_size()) // block_t * block_t)
    for t0 in range(0, n_rows, chunk):
        sl = slice(t0, t0 + chunk)
        h = hidden[sl]
        d_logits = torch.empty(h.shape[0], n_cols, device=hidden.device, dtype=hidden.dtype)
        grid = (triton.cdiv(h.shape[0], block_t), triton.cdiv(n_cols, block_v))  # one tile per program
        bwd[grid](
            h, hidden.stride(0), weight, weight.stride(0), targets[sl], stats[sl], g_lp[sl], g_ent[sl],
            d_logits, d_logits, h.shape[0], n_cols, n_hidden, block_v, vocab_start, inv_tau, ignore_index,
            ATOMIC=False, **launch,
        )  # fmt: skip
        torch.mm(d_logits, weight, out=d_hidden[sl])
        _add_matmul_fp32(d_weight, d_logits.T, h)
        del d_logits
    return d_hidden, d_weight


def _add_matmul_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b with acc fp32: directly for fp32 inputs; for bf16/fp16 through torch's fp32-output matmul
    where the build has one (CUDA), else the product in the inputs' dtype, then added in fp32."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    try:
        acc += torch.mm(a, b, out_dtype=torch.float32)
    except (TypeError, RuntimeError, NotImplementedError):  # no fp32-output matmul for this dtype or device
        acc += torch.mm(a, b)


# ----------------------------------------------------------------------------------------------------------
# The torch reference: the same tiles, torch matmuls in fp32, and logprob_entropy's per-tile passes.
# ----------------------------------------------------------------------------------------------------------


def _tile_logits32(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    # bf16 values are exact in fp32, so an fp32 product of the upcast tiles is the fp32-accumulated product.
    return h.float() @ w.float().T


def _forward_reference(hidden, weight, targets, vocab_start, inv_tau, ignore_index, tuning):
    block_t, block_v = tuning
    n_rows, n_cols = hidden.shape[0], weight.shape[0]
    partials = torch.empty(n_rows, 4, device=hidden.device, dtype=torch.float32)
    for t0 in range(0, n_rows, block_t):
        h, tgt = hidden[t0 : t0 + block_t], targets[t0 : t0 + block_t]
        running = None
        for v0 in range(0, n_cols, block_v):
            x = _tile_logits32(h, weight[v0 : v0 + block_v])
            tile = _tile_partials_reference(x, tgt, vocab_start + v0, inv_tau, ignore_index)
            del x  # free the tile before the next one is made
            running = tile if running is None else _combine_partials(torch.stack([running, tile]), inv_tau)
        partials[t0 : t0 + block_t] = running
    return partials


def _backward_reference(hidden, weight, targets, stats, g_lp, g_ent, vocab_start, inv_tau, ignore_index,
                        tuning):  # fmt: skip
    block_t, block_v = tuning
    (n_rows, n_hidden), n_cols = hidden.shape, weight.shape[0]
    # fp32 weights: this is the gradient returned (no extra [V, H] buffer); others cast it at the end.
    d_weight = torch.zeros(n_cols, n_hidden, device=hidden.device, dtype=torch.float32)
    d_hidden = torch.empty_like(hidden)
    for t0 in range(0, n_rows, block_t):
        sl = slice(t0, t0 + block_t)
        h32 = hidden[sl].float()
        dh = torch.zeros_like(h32)  # one tile's rows of d h in fp32, whatever T is
        for v0 in range(0, n_cols, block_v):
            w32 = weight[v0 : v0 + block_v].float()
            x = h32 @ w32.T
            # logprob_entropy's per-tile backward, in place over the fp32 tile: x becomes d logits.
            _tile_grad_reference(x, targets[sl], stats[sl], g_lp[sl], g_ent[sl], x, vocab_start + v0, inv_tau,
                                 ignore_index)  # fmt: skip
            dh.addmm_(x, w32)
            d_weight[v0 : v0 + block_v].addmm_(x.T, h32)
            del x, w32
        d_hidden[sl] = dh
    return d_hidden, d_weight


# ----------------------------------------------------------------------------------------------------------
# The autograd wrapper.
# ----------------------------------------------------------------------------------------------------------


def _finish(partials, targets, inv_tau, ignore_index, rows_per_chunk: int = 1 << 16):
    """(logprob [T], entropy [T], stats [T, 3] = (m, log_s, entropy)) from whole-vocabulary partials [T, 4],
    a chunk of rows at a time so that the temporaries do not grow with T; stats (12 bytes per token) is all
    the backward pass keeps."""
    n_rows = partials.shape[0]
    stats = partials.new_empty(n_rows, 3)
    logprob = partials.new_empty(n_rows)
    for lo in range(0, n_rows, rows_per_chunk):
        sl = slice(lo, lo + rows_per_chunk)
        m, log_s, entropy, x_target = _finish_partials(partials[sl])
        stats[sl] = torch.stack([m, log_s, entropy], dim=-1)
        logprob[sl] = torch.where(targets[sl] == ignore_index, 0.0, (x_target - m) * inv_tau - log_s)
    return logprob, stats[:, 2].clone(), stats


class _LinearLogprobEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, tp_group, ignore_index, backend, tuning):
        inv_tau = 1.0 / temperature
        tp_size = dist.get_world_size(tp_group) if tp_group is not None else 1
        vocab_start = dist.get_rank(tp_group) * weight.shape[0] if tp_size > 1 else 0
        forward = _forward_triton if backend == "triton" else _forward_reference
        partials = forward(hidden, weight, targets, vocab_start, inv_tau, ignore_index, tuning)
        if tp_size > 1:  # the one forward collective: every rank gets every rank's packed partials
            gathered = partials.new_empty(tp_size * partials.shape[0], 4)  # concatenated: gloo needs that
            _all_gather_single(gathered, partials, group=tp_group)
            partials = _combine_partials(gathered.view(tp_size, -1, 4), inv_tau)
        logprob, entropy, stats = _finish(partials, targets, inv_tau, ignore_index)
        del partials
        ctx.save_for_backward(hidden, weight, targets, stats)
        ctx.config = (tp_group, tp_size, vocab_start, inv_tau, ignore_index, backend, tuning)
        return logprob, entropy

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        hidden, weight, targets, stats = ctx.saved_tensors
        tp_group, tp_size, vocab_start, inv_tau, ignore_index, backend, tuning = ctx.config
        # Upstream gradients may be expanded views (from a .sum(): stride 0); the kernels read dense fp32.
        g_lp, g_ent = g_lp.float().contiguous(), g_ent.float().contiguous()
        backward = _backward_triton if backend == "triton" else _backward_reference
        d_hidden, d_weight = backward(
            hidden, weight, targets, stats, g_lp, g_ent, vocab_start, inv_tau, ignore_index, tuning
        )
        if tp_size > 1:  # this rank's d h covers its vocabulary slice only: sum the slices
            dist.all_reduce(d_hidden, group=tp_group)
        d_hidden = d_hidden.to(hidden.dtype) if ctx.needs_input_grad[0] else None
        d_weight = d_weight.to(weight.dtype) if ctx.needs_input_grad[1] else None
        return d_hidden, d_weight, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------------------
# Validation and the public API.
# ----------------------------------------------------------------------------------------------------------


def _validate(hidden, weight, targets, temperature, tp_group, ignore_index, check_targets) -> None:
    tensors = (hidden, weight, targets)
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        kinds = ", ".join(type(t).__name__ for t in tensors)
        raise TypeError(f"hidden, weight and targets must be torch.Tensors, got {kinds}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden must be [T, H] and weight [V_local, H] with the same H, got shapes "
            f"{tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if hidden.dtype not in SUPPORTED_DTYPES or weight.dtype != hidden.dtype:
        names = ", ".join(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES)
        raise TypeError(
            f"hidden and weight must share one dtype of {names}, got {hidden.dtype} and {weight.dtype}"
        )
    if targets.dim() != 1 or targets.shape[0] != hidden.shape[0]:
        raise ValueError(
            f"targets must be 1-D [T] with T = hidden.shape[0] = {hidden.shape[0]}, "
            f"got shape {tuple(targets.shape)}"
        )
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets must have dtype int64 or int32, got {targets.dtype}")
    if not (hidden.device == weight.device == targets.device):
        devices = f"{hidden.device}, {weight.device}, {targets.device}"
        raise ValueError(f"hidden, weight and targets must be on one device, got {devices}")
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one vocabulary row, got shape (0, H)")
    _check_temperature_and_targets(
        targets, weight.shape[0], temperature, tp_group, ignore_index, check_targets
    )


def linear_logprob_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    tp_group: dist.ProcessGroup | None = None,
    ignore_index: int = -100,
    *,
    backend: str | None = None,
    check_targets: bool = True,
    block_t: int | None = None,
    block_v: int | None = None,
    block_k: int | None = None,
    num_warps: int = DEFAULT_NUM_WARPS,
    n_splits: int | None = None,
    triton_backward: str = "gemm",
    chunk_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log p(target) and entropy of softmax(hidden @ weight.T / temperature) over the full vocabulary,
    without materialising the logits.

    Args:
        hidden: [T, H] bf16, fp16 or fp32 final hidden states (replicated on every rank of ``tp_group``),
            differentiable.
        weight: [V_local, H], same dtype: this rank's rows [r * V_local, (r + 1) * V_local) of the output
            layer's weight, differentiable.
        targets: [T] int64/int32 global token ids in [0, V_local * TP), or ``ignore_index``.
        temperature: the sampling temperature tau > 0; logits are divided by it.
        tp_group: the tensor-parallel group the vocabulary is split over; None for the whole vocabulary here.
        ignore_index: targets equal to it get logprob 0 and no gradient through the logprob; their entropy is
            still computed.
        backend: "triton", "reference" or "auto" (default: the MEGATRON_RL_KERNEL env var, else "auto").
        check_targets: validate target ids (one host-device sync).
        block_t, block_v, block_k: tile sizes (tokens, vocabulary rows, hidden columns per Triton dot; the
            reference ignores block_k). Defaults: DEFAULT_TRITON_TILES, or REFERENCE_BLOCK_T/_V.
        num_warps, n_splits: Triton launch knobs; n_splits (vocabulary splits per token block) defaults to
            enough programs to fill the GPU.
        triton_backward, chunk_tokens: the Triton backward, "gemm" (d logits of chunk_tokens tokens at a time,
            then two library matmuls; default chunk: 1 GiB of d logits) or "atomic" (fully fused, atomic adds).

    Returns:
        (logprobs, entropy), each [T] fp32, differentiable with respect to ``hidden`` and ``weight``. In the
        backward pass d hidden is summed over ``tp_group`` (one all-reduce), d weight is this rank's shard.
    """
    _validate(hidden, weight, targets, temperature, tp_group, ignore_index, check_targets)
    chosen = _select_backend(hidden, backend)
    if chosen == "triton":
        t, v, k = DEFAULT_TRITON_TILES
        tiles = (block_t or t, block_v or v, block_k or k)
        for name, value in zip(("block_t", "block_v", "block_k"), tiles, strict=True):
            if value < 16 or value & (value - 1):  # tl.dot needs powers of two of at least 16
                raise ValueError(f"{name} must be a power of two >= 16 for the triton backend, got {value}")
        if triton_backward not in ("gemm", "atomic"):
            raise ValueError(f"triton_backward must be 'gemm' or 'atomic', got {triton_backward!r}")
        tuning = (tiles, num_warps, n_splits, triton_backward, chunk_tokens)
    else:
        tuning = (block_t or REFERENCE_BLOCK_T, block_v or REFERENCE_BLOCK_V)
        if min(tuning) <= 0:
            raise ValueError(f"block_t and block_v must be positive, got {tuning}")
    # The kernels walk rows with unit column stride.
    hidden = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    return _LinearLogprobEntropy.apply(
        hidden, weight, targets.contiguous(), float(temperature), tp_group, ignore_index, chosen, tuning
    )


def linear_logprob_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    tp_group: dist.ProcessGroup | None = None,
    ignore_index: int = -100,
    **tiles: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The tiled torch implementation of :func:`linear_logprob_entropy` (same signature and results)."""
    return linear_logprob_entropy(
        hidden, weight, targets, temperature, tp_group, ignore_index, backend="reference", **tiles
    )
