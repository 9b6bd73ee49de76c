"""Fused per-token log-prob and entropy over (vocab-parallel) logits.

For logits ``x`` of shape [T, V_local] (this rank's vocabulary slice), global target ids [T] and a temperature
``tau``, with ``z = x / tau`` over the FULL vocabulary (all tensor-parallel ranks):

    logprob[t] = z[t, target[t]] - logsumexp(z[t])
    entropy[t] = -sum_v p[t, v] * log p[t, v],       p = softmax(z)

both in fp32. One pass over the logits accumulates, per row, an online maximum ``m`` (in logit units), the sum
``s = sum exp((x - m) / tau)`` and ``a = sum exp((x - m) / tau) * (x - m) / tau``; from those
``L = log s`` (the log-sum-exp relative to ``m / tau``) and ``H = L - a / s``. Keeping everything relative to
the row maximum matters: with logits around 1e4 the entropy and the log-prob of the top token are tiny
differences of huge numbers, and ``lse - E_p[z]`` computed in absolute units would lose them to rounding.

Only the three [T] statistics (m, L, H) are kept for the backward pass, never a [T, V] softmax or an fp32 copy
of the logits. Backward, from upstream gradients g_lp and g_H (``onehot`` marks the target column):

    d logits = (g_lp * (onehot - p) - g_H * p * (log p + H)) / tau

written in the logits' dtype, optionally in place over the logits.

With a tensor-parallel group, each rank reduces its slice to per-row partials (m_r, s_r, a_r, x_target or 0)
and ONE all_gather of the packed [T, 4] partials lets every rank merge them locally; the target's raw logit
comes from the rank that owns it (the others contribute 0 to a sum). The backward needs no communication: the
gradient of the local slice depends only on the local logits and the merged (m, L, H).

Two implementations of the two per-row passes share the wrapper, the merge and the validation: Triton kernels
(CUDA, or the CPU interpreter with TRITON_INTERPRET=1) and a chunked fp32 torch reference, which is the oracle
in tests and the fallback where Triton cannot run. ``_select_backend`` is the one place that chooses.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.distributed as dist

try:  # Triton is optional: without it `import kernels` still works and the torch reference is used.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None
    tl = None

BACKEND_ENV = "MEGATRON_RL_KERNEL"  # "reference" | "triton" | "auto" (default)
DEFAULT_BLOCK_V = 4096  # vocabulary columns per Triton block; 152064 / 4096 = 37.1 blocks per row
DEFAULT_NUM_WARPS = 8
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# The reference handles this many logits at a time (64 MiB per fp32 temporary), whatever T is.
_REFERENCE_CHUNK_ELEMENTS = 1 << 24


# ----------------------------------------------------------------------------------------------------------
# Triton kernels. Plain functions here, wrapped by triton.jit on first use (see _triton_kernels): the wrapper
# decides between the compiler and the CPU interpreter from TRITON_INTERPRET at decoration time, so decorating
# at import would freeze whatever the environment said when this module happened to be imported first.
#
# For the same reason the kernels reduce with tl.reduce and Triton's own combine functions instead of
# tl.max / tl.sum: those two are @triton.jit functions made when triton is imported, and if that import
# happened before TRITON_INTERPRET=1 was set (megatron-core imports triton), the interpreter refuses to
# call them. tl.reduce is patched by the interpreter at launch and runs these two combine functions as numpy
# reductions; compiled, it is exactly what tl.max / tl.sum do for fp32.
# ----------------------------------------------------------------------------------------------------------


def _fwd_kernel(
    logits_ptr,
    stride_row,
    targets_ptr,
    out_ptr,  # FINALIZE: logprob [T], entropy [T], stats [T, 3]; else partials [T, 4]
    entropy_ptr,
    stats_ptr,
    n_cols,
    vocab_start,
    inv_tau,
    ignore_index,
    BLOCK_V: tl.constexpr,
    FINALIZE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: T * V exceeds 2**31 at production sizes
    row_ptr = logits_ptr + row * stride_row
    cols = tl.arange(0, BLOCK_V)

    m = -float("inf")  # running max of the raw logits
    s = 0.0  # sum exp((x - m) / tau)
    a = 0.0  # sum exp((x - m) / tau) * (x - m) / tau
    for start in range(0, n_cols, BLOCK_V):
        x = tl.load(row_ptr + start + cols, mask=start + cols < n_cols, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.reduce(x, 0, tl.standard._elementwise_max))
        # An all -inf prefix leaves m = -inf; shifting by 0 instead keeps (x - m) from becoming nan.
        m_ref = tl.where(m_new == -float("inf"), 0.0, m_new)
        shift = tl.where(m == -float("inf"), 0.0, (m - m_ref) * inv_tau)  # <= 0
        scale = tl.exp(shift)
        d = (x - m_ref) * inv_tau
        e = tl.exp(d)
        ed = e * tl.where(e > 0.0, d, 0.0)  # exp(-inf) * -inf would be nan
        # Rescaling a to the new max: sum e' d' = scale * (a + shift * s).
        a = scale * (a + shift * s) + tl.reduce(ed, 0, tl.standard._sum_combine)
        s = scale * s + tl.reduce(e, 0, tl.standard._sum_combine)
        m = m_new

    target = tl.load(targets_ptr + row).to(tl.int64)
    local = target - vocab_start
    owned = (local >= 0) & (local < n_cols) & (target != ignore_index)
    x_target = tl.load(row_ptr + local, mask=owned, other=0.0).to(tl.float32)

    if FINALIZE:  # the whole vocabulary is here: finish the row
        log_s = tl.log(s)
        entropy = log_s - a / s
        logprob = tl.where(target == ignore_index, 0.0, (x_target - m) * inv_tau - log_s)
        tl.store(out_ptr + row, logprob)
        tl.store(entropy_ptr + row, entropy)
        tl.store(stats_ptr + row * 3 + 0, m)
        tl.store(stats_ptr + row * 3 + 1, log_s)
        tl.store(stats_ptr + row * 3 + 2, entropy)
    else:  # partials for the cross-rank merge
        tl.store(out_ptr + row * 4 + 0, m)
        tl.store(out_ptr + row * 4 + 1, s)
        tl.store(out_ptr + row * 4 + 2, a)
        tl.store(out_ptr + row * 4 + 3, x_target)


def _bwd_kernel(
    logits_ptr,
    stride_row,
    grad_ptr,  # may equal logits_ptr (in place): each block is read before it is written
    grad_stride_row,
    targets_ptr,
    stats_ptr,
    g_lp_ptr,
    g_ent_ptr,
    n_cols,
    vocab_start,
    inv_tau,
    ignore_index,
    BLOCK_V: tl.constexpr,
    HAS_G_LP: tl.constexpr,
    HAS_G_ENT: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    grad_row_ptr = grad_ptr + row * grad_stride_row
    cols = tl.arange(0, BLOCK_V)

    m = tl.load(stats_ptr + row * 3 + 0)
    log_s = tl.load(stats_ptr + row * 3 + 1)
    entropy = tl.load(stats_ptr + row * 3 + 2)
    m_ref = tl.where(m == -float("inf"), 0.0, m)
    target = tl.load(targets_ptr + row).to(tl.int64)
    local = tl.where(target == ignore_index, -1, target - vocab_start)  # -1: no column is the target
    g_lp = 0.0
    if HAS_G_LP:
        g_lp = tl.where(target == ignore_index, 0.0, tl.load(g_lp_ptr + row))
    g_ent = 0.0
    if HAS_G_ENT:
        g_ent = tl.load(g_ent_ptr + row)

    for start in range(0, n_cols, BLOCK_V):
        offs = start + cols
        mask = offs < n_cols
        x = tl.load(row_ptr + offs, mask=mask, other=-float("inf")).to(tl.float32)
        logp = (x - m_ref) * inv_tau - log_s
        p = tl.exp(logp)
        grad = g_lp * (tl.where(offs == local, 1.0, 0.0) - p)
        if HAS_G_ENT:
            grad -= g_ent * p * tl.where(p > 0.0, logp + entropy, 0.0)  # 0 * -inf would be nan
        grad = grad * inv_tau
        tl.store(grad_row_ptr + offs, grad.to(grad_ptr.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=2)
def _triton_kernels(interpret: bool):
    # `interpret` is the cache key: TRITON_INTERPRET as it is now, which triton.jit reads while decorating.
    del interpret
    return triton.jit(_fwd_kernel), triton.jit(_bwd_kernel)


def _launch_options(block_v: int, num_warps: int) -> dict:
    # FMA fusion only helps accuracy here; naming it stops Triton 3.9+ warning about its changing default.
    return dict(BLOCK_V=block_v, num_warps=num_warps, enable_fp_fusion=True)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def _select_backend(logits: torch.Tensor, backend: str | None) -> str:
    """The one place that picks the implementation: "triton" or "reference".

    `backend` (or the MEGATRON_RL_KERNEL environment variable when it is None) may force either; "auto" takes
    Triton where it can run (a CUDA tensor, or TRITON_INTERPRET=1 on the CPU) and the reference elsewhere.
    """
    choice = (backend or os.environ.get(BACKEND_ENV) or "auto").lower()
    if choice not in ("auto", "triton", "reference"):
        raise ValueError(
            f"backend must be 'auto', 'triton' or 'reference' (or {BACKEND_ENV}), got {choice!r}"
        )
    can_run_triton = triton is not None and (logits.is_cuda or _interpreting())
    if choice == "auto":
        return "triton" if can_run_triton else "reference"
    if choice == "triton" and not can_run_triton:
        why = "triton is not installed" if triton is None else f"logits are on {logits.device}"
        raise RuntimeError(
            f"the triton backend cannot run here ({why}); use a CUDA device, set TRITON_INTERPRET=1, "
            "or choose backend='reference'"
        )
    return choice


# ----------------------------------------------------------------------------------------------------------
# The two per-row passes, in Triton and in the torch reference.
# ----------------------------------------------------------------------------------------------------------


def _forward_triton(logits, targets, vocab_start, inv_tau, ignore_index, finalize, tuning):
    fwd, _ = _triton_kernels(_interpreting())
    n_rows, n_cols = logits.shape
    f32 = dict(device=logits.device, dtype=torch.float32)
    if finalize:  # logprob, entropy, stats
        out = (torch.empty(n_rows, **f32), torch.empty(n_rows, **f32), torch.empty(n_rows, 3, **f32))
    else:
        partials = torch.empty(n_rows, 4, **f32)
        out = (partials, partials, partials)  # the kernel writes only the first pointer in this mode
    if n_rows:
        fwd[(n_rows,)](
            logits, logits.stride(0), targets, *out, n_cols, vocab_start, inv_tau, ignore_index,
            FINALIZE=finalize, **_launch_options(*tuning),
        )  # fmt: skip
    return out if finalize else partials


def _forward_reference(logits, targets, vocab_start, inv_tau, ignore_index):
    """Per-row partials (m, s, a, x_target or 0) as [T, 4] fp32, in row chunks."""
    n_rows, n_cols = logits.shape
    partials = torch.empty(n_rows, 4, device=logits.device, dtype=torch.float32)
    local = targets.long() - vocab_start
    owned = (local >= 0) & (local < n_cols) & (targets != ignore_index)
    chunk = max(1, _REFERENCE_CHUNK_ELEMENTS // max(n_cols, 1))
    for lo in range(0, n_rows, chunk):
        x = logits[lo : lo + chunk].float()
        m = x.amax(dim=-1)
        m_ref = torch.where(m == -torch.inf, 0.0, m)
        d = (x - m_ref[:, None]) * inv_tau
        e = d.exp()
        ed = e * torch.where(e > 0, d, 0.0)
        own = owned[lo : lo + chunk]
        x_target = x.gather(1, torch.where(own, local[lo : lo + chunk], 0)[:, None]).squeeze(1)
        partials[lo : lo + chunk] = torch.stack(
            [m, e.sum(-1), ed.sum(-1), torch.where(own, x_target, 0.0)], -1
        )
    return partials


def _backward_triton(logits, targets, stats, g_lp, g_ent, grad, vocab_start, inv_tau, ignore_index, tuning):
    _, bwd = _triton_kernels(_interpreting())
    n_rows, n_cols = logits.shape
    if n_rows:
        bwd[(n_rows,)](
            logits, logits.stride(0), grad, grad.stride(0), targets, stats,
            g_lp if g_lp is not None else stats, g_ent if g_ent is not None else stats,
            n_cols, vocab_start, inv_tau, ignore_index,
            HAS_G_LP=g_lp is not None, HAS_G_ENT=g_ent is not None, **_launch_options(*tuning),
        )  # fmt: skip


def _backward_reference(logits, targets, stats, g_lp, g_ent, grad, vocab_start, inv_tau, ignore_index):
    n_rows, n_cols = logits.shape
    local = torch.where(targets == ignore_index, -1, targets.long() - vocab_start)
    chunk = max(1, _REFERENCE_CHUNK_ELEMENTS // max(n_cols, 1))
    cols = torch.arange(n_cols, device=logits.device)
    for lo in range(0, n_rows, chunk):
        sl = slice(lo, lo + chunk)
        m, log_s, entropy = stats[sl].unbind(-1)
        m_ref = torch.where(m == -torch.inf, 0.0, m)
        logp = (logits[sl].float() - m_ref[:, None]) * inv_tau - log_s[:, None]
        p = logp.exp()
        g = torch.zeros_like(p)
        if g_lp is not None:
            g_row = torch.where(targets[sl] == ignore_index, 0.0, g_lp[sl])
            g += g_row[:, None] * ((cols[None, :] == local[sl, None]).float() - p)
        if g_ent is not None:
            g -= g_ent[sl, None] * p * torch.where(p > 0, logp + entropy[:, None], 0.0)
        grad[sl] = (g * inv_tau).to(grad.dtype)


def _combine_partials(partials: torch.Tensor, inv_tau: float) -> torch.Tensor:
    """Combine partials [R, T, 4] of R disjoint vocabulary slices (ranks, or tiles of one rank's slice) into
    the partials [T, 4] (m, s, a, x_target) of their union."""
    m_r, s_r, a_r, x_target_r = partials.unbind(-1)
    m = m_r.amax(dim=0)
    m_ref = torch.where(m == -torch.inf, 0.0, m)
    shift = torch.where(m_r == -torch.inf, -torch.inf, (m_r - m_ref) * inv_tau)  # <= 0; -inf for empty slices
    scale = shift.exp()
    s = (scale * s_r).sum(0)
    a = (scale * (a_r + torch.where(scale > 0, shift * s_r, 0.0))).sum(0)
    # Only the slice that owns the target has a non-zero x_target.
    return torch.stack([m, s, a, x_target_r.sum(0)], dim=-1)


def _finish_partials(partials: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Whole-vocabulary partials [T, 4] -> (m, log_s, entropy, x_target), each [T]."""
    m, s, a, x_target = partials.unbind(-1)
    log_s = s.log()
    return m, log_s, log_s - a / s, x_target


def _merge_partials(partials: torch.Tensor, inv_tau: float) -> tuple[torch.Tensor, ...]:
    """Merge per-rank partials [R, T, 4] into the global (m, log_s, entropy, x_target), each [T]."""
    return _finish_partials(_combine_partials(partials, inv_tau))


def _all_gather_single(output: torch.Tensor, tensor: torch.Tensor, group) -> None:
    # torch 2.13 renamed all_gather_into_tensor to all_gather_single (the old name warns); older ones lack it.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, tensor, group=group)


class _LogprobEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, temperature, tp_group, ignore_index, backend, inplace_backward, tuning):
        inv_tau = 1.0 / temperature
        tp_size = dist.get_world_size(tp_group) if tp_group is not None else 1
        vocab_start = dist.get_rank(tp_group) * logits.shape[1] if tp_size > 1 else 0
        if backend == "triton" and tp_size == 1:
            logprob, entropy, stats = _forward_triton(
                logits, targets, vocab_start, inv_tau, ignore_index, finalize=True, tuning=tuning
            )
        else:
            if backend == "triton":
                partials = _forward_triton(logits, targets, vocab_start, inv_tau, ignore_index, False, tuning)
            else:
                partials = _forward_reference(logits, targets, vocab_start, inv_tau, ignore_index)
            if tp_size > 1:  # the one collective: every rank gets every rank's packed partials
                gathered = partials.new_empty(tp_size * partials.shape[0], 4)  # concatenated: gloo needs that
                _all_gather_single(gathered, partials, group=tp_group)
                partials = gathered.view(tp_size, -1, 4)
            else:
                partials = partials[None]
            m, log_s, entropy, x_target = _merge_partials(partials, inv_tau)
            logprob = torch.where(targets == ignore_index, 0.0, (x_target - m) * inv_tau - log_s)
            stats = torch.stack([m, log_s, entropy], dim=-1)

        ctx.save_for_backward(logits, targets, stats)
        ctx.config = (vocab_start, inv_tau, ignore_index, backend, inplace_backward, tuning)
        ctx.set_materialize_grads(False)  # a None upstream gradient lets the kernel skip that term
        return logprob, entropy

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        logits, targets, stats = ctx.saved_tensors
        vocab_start, inv_tau, ignore_index, backend, inplace_backward, tuning = ctx.config
        if g_lp is None and g_ent is None:
            return (None,) * 8
        # Upstream gradients may be expanded views (from a .sum(): stride 0); the kernels read dense fp32.
        g_lp = g_lp.float().contiguous() if g_lp is not None else None
        g_ent = g_ent.float().contiguous() if g_ent is not None else None
        grad = logits if inplace_backward else torch.empty_like(logits)
        args = (logits, targets, stats, g_lp, g_ent, grad, vocab_start, inv_tau, ignore_index)
        if backend == "triton":
            _backward_triton(*args, tuning)
        else:
            _backward_reference(*args)
        return grad, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------------------
# Validation and the public API.
# ----------------------------------------------------------------------------------------------------------


def _validate(logits, targets, temperature, tp_group, ignore_index, check_targets) -> None:
    if not isinstance(logits, torch.Tensor) or not isinstance(targets, torch.Tensor):
        kinds = f"{type(logits).__name__} and {type(targets).__name__}"
        raise TypeError(f"logits and targets must be torch.Tensors, got {kinds}")
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D [T, V_local], got shape {tuple(logits.shape)}")
    if logits.dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES)
        raise TypeError(f"logits must have dtype {names}, got {logits.dtype}")
    if targets.dim() != 1 or targets.shape[0] != logits.shape[0]:
        raise ValueError(
            f"targets must be 1-D [T] with T = logits.shape[0] = {logits.shape[0]}, "
            f"got shape {tuple(targets.shape)}"
        )
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets must have dtype int64 or int32, got {targets.dtype}")
    if targets.device != logits.device:
        raise ValueError(f"targets must be on the logits' device ({logits.device}), got {targets.device}")
    if logits.shape[1] == 0:
        raise ValueError("logits must have at least one vocabulary column, got shape (T, 0)")
    _check_temperature_and_targets(
        targets, logits.shape[1], temperature, tp_group, ignore_index, check_targets
    )


def _check_temperature_and_targets(
    targets, vocab_local, temperature, tp_group, ignore_index, check_targets
) -> None:
    """The checks both kernels make: a positive finite temperature, every target in the whole vocabulary
    (`vocab_local` x the TP size) or ignore_index."""
    if not (isinstance(temperature, (int, float)) and temperature > 0 and temperature != float("inf")):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    vocab = vocab_local * (dist.get_world_size(tp_group) if tp_group is not None else 1)
    if check_targets and targets.numel():
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
        if bad.any():  # one host sync; pass check_targets=False to skip it in a hot loop
            pos = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"targets must be in [0, {vocab}) or equal ignore_index={ignore_index}; "
                f"targets[{pos}] = {int(targets[pos])}"
            )


def logprob_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    tp_group: dist.ProcessGroup | None = None,
    ignore_index: int = -100,
    *,
    backend: str | None = None,
    inplace_backward: bool = False,
    check_targets: bool = True,
    block_v: int = DEFAULT_BLOCK_V,
    num_warps: int = DEFAULT_NUM_WARPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log p(target) and entropy of softmax(logits / temperature) over the full vocabulary.

    Args:
        logits: [T, V_local] bf16, fp16 or fp32; this rank's contiguous vocabulary slice (rank r holds the ids
            [r * V_local, (r + 1) * V_local) of ``tp_group``), differentiable.
        targets: [T] int64/int32 global token ids in [0, V_local * TP), or ``ignore_index``.
        temperature: the sampling temperature tau > 0; logits are divided by it.
        tp_group: the tensor-parallel group the vocabulary is split over; None for the whole vocabulary here.
        ignore_index: targets equal to it get logprob 0 and no gradient through the logprob; their entropy is
            still computed (it does not depend on the target), and the caller masks it as it sees fit.
        backend: "triton", "reference" or "auto" (default: the MEGATRON_RL_KERNEL env var, else "auto").
        inplace_backward: write d logits over the logits themselves in the backward pass, saving a
            [T, V_local] buffer. Only safe when nothing else needs the logits after this op's backward.
        check_targets: validate target ids (one host-device sync).
        block_v, num_warps: Triton tuning knobs, vocabulary columns per block and warps per row (powers of 2).

    Returns:
        (logprobs, entropy), each [T] fp32, differentiable with respect to ``logits``.
    """
    _validate(logits, targets, temperature, tp_group, ignore_index, check_targets)
    for name, value in (("block_v", block_v), ("num_warps", num_warps)):
        if value <= 0 or value & (value - 1):
            raise ValueError(f"{name} must be a positive power of two, got {value}")
    chosen = _select_backend(logits, backend)
    if logits.stride(-1) != 1:  # the kernels walk rows with unit column stride
        logits = logits.contiguous()
    return _LogprobEntropy.apply(
        logits,
        targets.contiguous(),
        float(temperature),
        tp_group,
        ignore_index,
        chosen,
        inplace_backward,
        (block_v, num_warps),
    )


def logprob_entropy_reference(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    tp_group: dist.ProcessGroup | None = None,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunked fp32 torch implementation of :func:`logprob_entropy` (same signature and results)."""
    return logprob_entropy(logits, targets, temperature, tp_group, ignore_index, backend="reference")
