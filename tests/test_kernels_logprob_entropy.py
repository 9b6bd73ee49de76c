"""Fused log-prob / entropy (kernels/logprob_entropy.py) against an fp64 oracle, on the CPU.

The Triton kernels run under the Triton interpreter (TRITON_INTERPRET=1, set per test by the `interpret`
fixture rather than for the whole process, so other test modules that call the op on the CPU keep the fast
torch reference). The kernel module wraps its kernels with triton.jit at first use for the current value of
TRITON_INTERPRET, so setting it here, after import, is enough.

Error bounds (u32 = fp32 machine epsilon 2**-23, z = logits / tau, |z|_row = max |z| over the row):
- forward, bf16 and fp32 inputs alike (both are read exactly into fp32 and everything is computed in fp32):
  |err| <= FWD_C * u32 * (|ref| + |z|_row + 1). Every output is a short sum of fp32 terms no larger than
  |z|_row (plus the log of a sum over V accumulated relative to the row max, so >= 1), each rounded once.
- backward, written in the input dtype:
  |err| <= u_in * |ref| + BWD_C * u32 * (|z|_row + 1) * (|g_lp| + |g_H|) / tau,
  with u_in = 2**-7 for bf16, 2**-10 for fp16 and u32 for fp32: one final rounding to the output dtype plus
  fp32 error in p and log p, which are exp/log of quantities of size up to |z|_row. For bf16 that is one ulp,
  not half: the Triton interpreter converts fp32 to bf16 by truncation (the GPU and torch round to nearest).
"""

import importlib
import math

import pytest
import torch

from kernels import logprob_entropy, logprob_entropy_reference

op = importlib.import_module("kernels.logprob_entropy")  # the module (the package re-exports the function)

U32 = torch.finfo(torch.float32).eps
UNIT_ROUNDOFF = {torch.float32: U32, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}  # see the docstring
FWD_C = 4.0  # observed worst: 0.54 (fp32 and bf16, both backends)
BWD_C = 4.0  # observed worst: 0.04
BLOCK_V = 1024  # test block: small enough that V = 2500 spans three blocks, the last one partial
IGNORE = -100


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv(op.BACKEND_ENV, raising=False)


def oracle(logits, targets, temperature, ignore_index=IGNORE, grads=None):
    """fp64 log_softmax / entropy with autograd: (logprob, entropy, d logits) in fp64."""
    x = logits.detach().double().requires_grad_()
    logp = torch.log_softmax(x / temperature, dim=-1)
    ignored = targets == ignore_index
    lp = logp.gather(1, torch.where(ignored, 0, targets.long())[:, None]).squeeze(1)
    lp = torch.where(ignored, 0.0, lp)
    p = logp.exp()
    entropy = -(p * torch.where(p > 0, logp, 0.0)).sum(-1)  # 0 * log 0 = 0 for -inf logits
    grad = None
    if grads is not None:
        outs = [o for o, g in zip((lp, entropy), grads, strict=True) if g is not None]
        gs = [g.double() for g in grads if g is not None]
        (grad,) = torch.autograd.grad(outs, [x], gs)
    return lp.detach(), entropy.detach(), grad


def assert_within(name, actual, expected, bound):
    err = (actual.double() - expected).abs()
    bad = ~(err <= bound)  # also catches nan
    if bad.any():
        i = int(bad.flatten().nonzero()[0, 0])
        raise AssertionError(
            f"{name}: {int(bad.sum())} elements out of bounds; first at flat index {i}: got "
            f"{actual.flatten()[i].item():.9g}, expected {expected.flatten()[i].item():.9g}, "
            f"|err| {err.flatten()[i].item():.3g} > bound {bound.flatten()[i].item():.3g}"
        )


def check_against_oracle(logits, targets, temperature, backend, g_lp, g_ent, ignore_index=IGNORE):
    x = logits.detach().clone().requires_grad_()
    lp, ent = logprob_entropy(
        x, targets, temperature, ignore_index=ignore_index, backend=backend, block_v=BLOCK_V
    )
    assert lp.dtype == ent.dtype == torch.float32 and lp.shape == ent.shape == targets.shape
    outs = [(o, g) for o, g in ((lp, g_lp), (ent, g_ent)) if g is not None]
    (grad,) = torch.autograd.grad([o for o, _ in outs], [x], [g for _, g in outs])
    assert grad.dtype == logits.dtype and grad.shape == logits.shape

    ref_lp, ref_ent, ref_grad = oracle(logits, targets, temperature, ignore_index, (g_lp, g_ent))
    z_row = (logits.double() / temperature).abs().masked_fill(logits.isinf(), 0).amax(-1)
    assert_within("logprob", lp, ref_lp, FWD_C * U32 * (ref_lp.abs() + z_row + 1))
    assert_within("entropy", ent, ref_ent, FWD_C * U32 * (ref_ent.abs() + z_row + 1))
    g_size = sum(g.abs().double() for g in (g_lp, g_ent) if g is not None)
    bound = UNIT_ROUNDOFF[logits.dtype] * ref_grad.abs()
    bound = bound + (BWD_C * U32 * (z_row + 1) * g_size / temperature)[:, None]
    assert_within("d logits", grad, ref_grad, bound)
    return lp, ent, grad


def make_case(n_rows, vocab, scale, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n_rows, vocab, generator=gen, dtype=torch.float64) * scale).to(dtype)
    targets = torch.randint(0, vocab, (n_rows,), generator=gen)
    if n_rows > 3:
        targets[1] = IGNORE  # a masked token
        targets[2] = logits[2].float().argmax()  # log-prob near 0: tests the accuracy near the max
        targets[3] = vocab - 1  # the last column, in the partial block
    g_lp = torch.randn(n_rows, generator=gen)
    g_ent = torch.randn(n_rows, generator=gen)
    return logits, targets, g_lp, g_ent


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("scale", [1.0, 30.0, 1e4])
@pytest.mark.parametrize("temperature", [0.6, 1.0, 1.3])
def test_forward_backward_match_fp64(interpret, backend, dtype, scale, temperature):
    logits, targets, g_lp, g_ent = make_case(12, 2500, scale, dtype)
    lp, _, grad = check_against_oracle(logits, targets, temperature, backend, g_lp, g_ent)
    assert lp[1] == 0.0  # the ignored token
    # The masked token's gradient is the entropy term only.
    _, _, ent_only = oracle(logits[1:2], targets[1:2], temperature, grads=(None, g_ent[1:2]))
    torch.testing.assert_close(grad[1:2].double(), ent_only, rtol=UNIT_ROUNDOFF[dtype], atol=1e-6)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("vocab", [2500, 700], ids=["multi-block", "one-partial-block"])
def test_single_token(interpret, backend, vocab):
    logits, targets, g_lp, g_ent = make_case(1, vocab, 3.0, torch.float32)
    check_against_oracle(logits, targets, 1.0, backend, g_lp, g_ent)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_fp16_logits(interpret, backend):
    logits, targets, g_lp, g_ent = make_case(8, 2500, 10.0, torch.float16)
    check_against_oracle(logits, targets, 1.3, backend, g_lp, g_ent)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("which", ["logprob", "entropy"])
def test_gradient_of_one_output(interpret, backend, which):
    # The other output's gradient is None: the kernel drops that term instead of multiplying zeros.
    logits, targets, g_lp, g_ent = make_case(8, 1500, 5.0, torch.float32)
    grads = (g_lp, None) if which == "logprob" else (None, g_ent)
    check_against_oracle(logits, targets, 0.8, backend, *grads)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_all_targets_ignored_custom_index(interpret, backend):
    logits, _, g_lp, g_ent = make_case(6, 1500, 2.0, torch.bfloat16)
    targets = torch.full((6,), -1)
    lp, _, grad = check_against_oracle(logits, targets, 1.0, backend, g_lp, g_ent, ignore_index=-1)
    assert torch.equal(lp, torch.zeros(6))
    x = logits.clone().requires_grad_()
    lp, _ = logprob_entropy(x, targets, ignore_index=-1, backend=backend, block_v=BLOCK_V)
    (grad_lp_only,) = torch.autograd.grad(lp, x, g_lp)
    assert torch.count_nonzero(grad_lp_only) == 0


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_minus_inf_logits(interpret, backend):
    # Masked vocabulary entries (-inf), a whole block of them included: finite results and zero gradient.
    logits, targets, g_lp, g_ent = make_case(6, 2500, 4.0, torch.float32)
    logits[:, 1024:2048] = -torch.inf
    logits[0, :1024] = -torch.inf  # row 0: the first block is all -inf, so the running max starts at -inf
    targets = torch.where((targets >= 1024) & (targets < 2048), 5, targets)
    targets[0] = 2100
    _, _, grad = check_against_oracle(logits, targets, 1.0, backend, g_lp, g_ent)
    assert torch.count_nonzero(grad[:, 1024:2048]) == 0


def test_triton_matches_reference(interpret):
    # The reference is the oracle for the kernels: same math, so they agree to a few fp32 roundings.
    logits, targets, g_lp, g_ent = make_case(16, 3000, 8.0, torch.bfloat16, seed=1)
    results = {}
    for backend in ("triton", "reference"):
        x = logits.clone().requires_grad_()
        lp, ent = logprob_entropy(x, targets, 1.3, backend=backend, block_v=BLOCK_V)
        results[backend] = (lp, ent, *torch.autograd.grad([lp, ent], [x], [g_lp, g_ent]))
    for a, b in zip(results["triton"][:2], results["reference"][:2], strict=True):
        torch.testing.assert_close(a, b, rtol=4 * U32, atol=4 * U32)
    # bf16 gradients: one ulp apart at most (the interpreter truncates where torch rounds to nearest).
    torch.testing.assert_close(results["triton"][2], results["reference"][2], rtol=2.0**-7, atol=1e-7)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_inplace_backward(interpret, backend):
    logits, targets, g_lp, g_ent = make_case(8, 2500, 3.0, torch.bfloat16)
    base = logits.clone().requires_grad_()
    _, _, expected = check_against_oracle(logits, targets, 0.6, backend, g_lp, g_ent)
    x = base * 1  # a non-leaf, like the output layer's logits in the trainer
    lp, ent = logprob_entropy(x, targets, 0.6, backend=backend, inplace_backward=True, block_v=BLOCK_V)
    x_ptr = x.data_ptr()
    (grad,) = torch.autograd.grad([lp, ent], [x], [g_lp, g_ent])
    assert grad.data_ptr() == x_ptr  # written over the logits: no [T, V] buffer allocated
    assert torch.equal(grad, expected)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_strided_logits(interpret, backend):
    logits, targets, g_lp, g_ent = make_case(6, 1500, 3.0, torch.float32)
    wide = torch.zeros(6, 1600)
    wide[:, :1500] = logits
    row_strided = wide[:, :1500].requires_grad_()  # row stride 1600: handled by the kernel directly
    lp, ent = logprob_entropy(row_strided, targets, backend=backend, block_v=BLOCK_V)
    ref_lp, ref_ent = logprob_entropy(logits, targets, backend=backend, block_v=BLOCK_V)
    assert torch.equal(lp, ref_lp) and torch.equal(ent, ref_ent)
    col_strided = torch.zeros(1500, 6).t()  # column stride 6: copied to contiguous first
    col_strided.copy_(logits)
    lp, ent = logprob_entropy(col_strided, targets, backend=backend, block_v=BLOCK_V)
    assert torch.equal(lp, ref_lp) and torch.equal(ent, ref_ent)


def test_empty_batch(interpret):
    x = torch.zeros(0, 100, requires_grad=True)
    lp, ent = logprob_entropy(x, torch.zeros(0, dtype=torch.long), backend="triton")
    assert lp.shape == ent.shape == (0,)
    (grad,) = torch.autograd.grad([lp.sum() + ent.sum()], [x])
    assert grad.shape == (0, 100)


def test_reference_function_is_the_reference_backend(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    logits, targets, _, _ = make_case(4, 300, 1.0, torch.float32)
    a = logprob_entropy_reference(logits, targets, 0.7)
    b = logprob_entropy(logits, targets, 0.7, backend="reference")
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))


def test_backend_selection(monkeypatch):
    x = torch.zeros(2, 3)
    monkeypatch.delenv(op.BACKEND_ENV, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert op._select_backend(x, None) == "reference"  # CPU without the interpreter: Triton cannot run
    with pytest.raises(RuntimeError, match="triton backend cannot run here"):
        op._select_backend(x, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert op._select_backend(x, None) == "triton"
    monkeypatch.setenv(op.BACKEND_ENV, "reference")
    assert op._select_backend(x, None) == "reference"
    assert op._select_backend(x, "triton") == "triton"  # the argument wins over the environment
    with pytest.raises(ValueError, match="backend must be"):
        op._select_backend(x, "cuda")


def _bad_inputs():
    x, t = torch.zeros(4, 10), torch.zeros(4, dtype=torch.long)
    oob = t.clone()
    oob[2] = 10
    neg = t.clone()
    neg[3] = -5
    return [
        (
            "3-D logits",
            torch.zeros(2, 3, 4),
            t,
            {},
            ValueError,
            r"logits must be 2-D \[T, V_local\], got shape \(2, 3, 4\)",
        ),
        (
            "int logits",
            torch.zeros(4, 10, dtype=torch.long),
            t,
            {},
            TypeError,
            "logits must have dtype bfloat16",
        ),
        ("fp64 logits", x.double(), t, {}, TypeError, "got torch.float64"),
        (
            "2-D targets",
            x,
            t[:, None],
            {},
            ValueError,
            r"targets must be 1-D \[T\] with T = logits.shape\[0\] = 4",
        ),
        ("short targets", x, t[:3], {}, ValueError, r"got shape \(3,\)"),
        (
            "float targets",
            x,
            t.float(),
            {},
            TypeError,
            "targets must have dtype int64 or int32, got torch.float32",
        ),
        (
            "targets elsewhere",
            x,
            t.to("meta"),
            {},
            ValueError,
            r"targets must be on the logits' device \(cpu\)",
        ),
        ("target too big", x, oob, {}, ValueError, r"must be in \[0, 10\).*targets\[2\] = 10"),
        ("target negative", x, neg, {}, ValueError, r"targets\[3\] = -5"),
        ("zero temperature", x, t, {"temperature": 0.0}, ValueError, "temperature must be a positive"),
        ("nan temperature", x, t, {"temperature": math.nan}, ValueError, "temperature must be a positive"),
        (
            "block not power of 2",
            x,
            t,
            {"block_v": 1000},
            ValueError,
            "block_v must be a positive power of two",
        ),
        ("list logits", [[0.0]], t, {}, TypeError, "must be torch.Tensors, got list"),
    ]


@pytest.mark.parametrize("case", _bad_inputs(), ids=lambda c: c[0])
def test_invalid_inputs_raise(case):
    _, logits, targets, kwargs, error, message = case
    with pytest.raises(error, match=message):
        logprob_entropy(logits, targets, **kwargs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_compiled_kernels_on_cuda(monkeypatch, dtype):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    logits, targets, g_lp, g_ent = make_case(256, 152064 // 8, 4.0, dtype)
    logits, targets, g_lp, g_ent = (t.cuda() for t in (logits, targets, g_lp, g_ent))
    lp, ent, _ = check_against_oracle(logits, targets, 0.7, "triton", g_lp, g_ent)
    ref_lp, ref_ent = logprob_entropy_reference(logits, targets, 0.7)
    # Different summation orders over V = 19008 columns: a few fp32 roundings of the sums apart.
    torch.testing.assert_close(lp, ref_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-5, atol=1e-5)


def test_kernels_compile_for_h100(monkeypatch):
    # The interpreter accepts some code the compiler rejects: compile every variant for sm_90 (no GPU needed,
    # Triton ships ptxas) and check the logits are read with 16-byte vector loads and one exp per logit.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    triton = pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError:
        pytest.skip("this Triton has no ASTSource / GPUTarget")
    if not isinstance(triton.language.standard._sum_combine, triton.runtime.JITFunction):
        pytest.skip("triton was imported with TRITON_INTERPRET=1: its library is interpreted in this process")
    block_v, num_warps = op.DEFAULT_BLOCK_V, op.DEFAULT_NUM_WARPS
    per_thread = block_v // (32 * num_warps)
    aligned = [
        ["tt.divisibility", 16]
    ]  # what the JIT infers for 16-byte aligned pointers and strides of V=152064
    variants = [
        (op._fwd_kernel, {"FINALIZE": True}),
        (op._fwd_kernel, {"FINALIZE": False}),
        (op._bwd_kernel, {"HAS_G_LP": True, "HAS_G_ENT": True}),
        (op._bwd_kernel, {"HAS_G_LP": True, "HAS_G_ENT": False}),
        (op._bwd_kernel, {"HAS_G_LP": False, "HAS_G_ENT": True}),
    ]
    for fn, flags in variants:
        kernel = triton.jit(fn)
        types = {"logits_ptr": "*bf16", "grad_ptr": "*bf16", "targets_ptr": "*i64", "stride_row": "i64"}
        types |= {"grad_stride_row": "i64", "inv_tau": "fp32"}
        signature = {}
        for name in kernel.arg_names:
            if name == "BLOCK_V" or name in flags:
                signature[name] = "constexpr"
            else:
                signature[name] = types.get(name, "*fp32" if name.endswith("_ptr") else "i32")
        attrs = {
            (i,): aligned for i, name in enumerate(kernel.arg_names) if name.endswith(("_ptr", "stride_row"))
        }
        attrs[(kernel.arg_names.index("n_cols"),)] = aligned
        src = ASTSource(kernel, signature, constexprs={"BLOCK_V": block_v, **flags}, attrs=attrs)
        compiled = triton.compile(
            src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "enable_fp_fusion": True}
        )
        ptx = compiled.asm["ptx"]
        assert "cubin" in compiled.asm
        assert "ld.global.v4.b32" in ptx, f"{fn.__name__} {flags}: logits not read with vector loads"
        assert ptx.count("ex2.approx") <= per_thread + 1, (
            f"{fn.__name__} {flags}: more than one exp per logit"
        )
