"""linear_logprobs: every backend against the naive float64 oracle (tests/oracle.py)."""

from __future__ import annotations

import os

import pytest
import torch

import dpo_fast
from dpo_fast.kernels import logprobs_cpu
from oracle import assert_close_to_truth, naive_logprobs

REQUIRE_CPU_EXT = os.environ.get("DPO_FAST_REQUIRE_CPU_EXT") == "1"


def _impls():
    out = ["torch", "triton", "triton_fused"]
    if logprobs_cpu.available() or REQUIRE_CPU_EXT:
        out.append("cpu")
    return out


def test_cpu_extension_built_when_required():
    if not REQUIRE_CPU_EXT:
        pytest.skip("set DPO_FAST_REQUIRE_CPU_EXT=1 to require the C++ extension")
    assert logprobs_cpu.available(), f"dpo_fast._C not importable: {logprobs_cpu.load_error()}"


def _make(n_shape, d, v, dtype, *, bias=False, scale=1.0, ignore_frac=0.25, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*n_shape, d, generator=g) * scale
    weight = torch.randn(v, d, generator=g) / d**0.5 * 2.0
    b = torch.randn(v, generator=g) if bias else None
    targets = torch.randint(0, v, n_shape, generator=g)
    drop = torch.rand(n_shape, generator=g) < ignore_frac
    targets[drop] = -100
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return cast(hidden), cast(weight), cast(b), targets


def _run_and_check(impl, hidden, weight, bias, targets, dtype, *, softcap=None, temperature=1.0,
                   extras=True, check_grads=True, device="cpu"):
    """Runs ``impl`` on ``device`` and checks outputs and grads against the float64 oracle
    (computed on the same device; inputs are generated on the CPU so every device sees the
    same numbers)."""
    g = torch.Generator().manual_seed(1)
    ups = {"logp": torch.randn(targets.shape, generator=g)}
    if extras:
        ups["lse"] = torch.randn(targets.shape, generator=g) * 0.5
        ups["entropy"] = torch.randn(targets.shape, generator=g) * 0.5
    if device != "cpu":
        hidden, weight, targets = hidden.to(device), weight.to(device), targets.to(device)
        bias = bias.to(device) if bias is not None else None
        ups = {k: u.to(device) for k, u in ups.items()}
    kw = dict(softcap=softcap, temperature=temperature)
    truth = naive_logprobs(hidden, weight, targets, bias, grads=ups if check_grads else None, **kw)
    same = naive_logprobs(hidden, weight, targets, bias, dtype=dtype,
                          grads=ups if check_grads else None, **kw)

    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    b = bias.clone().requires_grad_() if bias is not None else None
    out = dpo_fast.linear_logprobs(h, w, targets, bias=b, return_lse=extras,
                                   return_entropy=extras, impl=impl, **kw)
    got = {"logp": out.logp, "lse": out.lse, "entropy": out.entropy} if extras else {"logp": out}
    for k in got:
        assert got[k].dtype == torch.float32 and got[k].shape == targets.shape
        assert_close_to_truth(f"{impl}/{k}", got[k].detach(), same[k], truth[k], dtype)
    ignored = targets == -100
    for k in got:
        assert (got[k].detach()[ignored] == 0).all(), f"{k} must be 0.0 at ignored positions"
    if not check_grads:
        return
    loss = sum((got[k] * ups[k]).sum() for k in got)
    loss.backward()
    assert h.grad.dtype == dtype and w.grad.dtype == dtype
    assert_close_to_truth(f"{impl}/d_hidden", h.grad, same["d_hidden"], truth["d_hidden"], dtype)
    assert_close_to_truth(f"{impl}/d_weight", w.grad, same["d_weight"], truth["d_weight"], dtype)
    if b is not None:
        assert_close_to_truth(f"{impl}/d_bias", b.grad, same["d_bias"], truth["d_bias"], dtype)


SHAPES = [  # (leading dims, D, V)
    ((1,), 63, 1),
    ((77,), 96, 3),
    ((77,), 63, 1003),
    ((1000,), 576, 1003),
    ((4, 19), 96, 1003),  # [B, T] leading dims
    ((77,), 63, 49152),
]


@pytest.mark.parametrize("impl", _impls())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s[0]}-D{s[1]}-V{s[2]}")
def test_fp32_shapes(impl, shape):
    lead, d, v = shape
    hidden, weight, bias, targets = _make(lead, d, v, torch.float32, bias=True)
    _run_and_check(impl, hidden, weight, bias, targets, torch.float32)


@pytest.mark.parametrize("impl", _impls())
def test_fp32_large_vocab_many_tokens(impl):
    hidden, weight, _, targets = _make((1000,), 96, 49152, torch.float32, ignore_frac=0.5)
    _run_and_check(impl, hidden, weight, None, targets, torch.float32, extras=False)


@pytest.mark.parametrize("impl", _impls())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [((77,), 96, 1003), ((1000,), 576, 1003), ((3,), 63, 3)],
                         ids=lambda s: f"N{s[0]}-D{s[1]}-V{s[2]}")
def test_half_dtypes(impl, dtype, shape):
    lead, d, v = shape
    hidden, weight, bias, targets = _make(lead, d, v, dtype, bias=True)
    _run_and_check(impl, hidden, weight, bias, targets, dtype)


@pytest.mark.parametrize("impl", _impls())
@pytest.mark.parametrize("softcap,temperature", [(30.0, 1.0), (None, 0.7), (5.0, 1.7)])
@pytest.mark.parametrize("bias", [False, True])
def test_softcap_temperature(impl, softcap, temperature, bias):
    hidden, weight, b, targets = _make((77,), 96, 1003, torch.float32, bias=bias, scale=3.0)
    _run_and_check(impl, hidden, weight, b, targets, torch.float32, softcap=softcap,
                   temperature=temperature)


@pytest.mark.parametrize("impl", _impls())
def test_all_ignored(impl):
    hidden, weight, bias, targets = _make((2, 5), 63, 1003, torch.float32, bias=True)
    targets[:] = -100
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    b = bias.clone().requires_grad_()
    out = dpo_fast.linear_logprobs(h, w, targets, bias=b, return_lse=True, return_entropy=True,
                                   impl=impl)
    for t in out:
        assert t.shape == (2, 5) and (t == 0).all()
    (out.logp.sum() + out.lse.sum() + out.entropy.sum()).backward()
    assert (h.grad == 0).all() and (w.grad == 0).all() and (b.grad == 0).all()


@pytest.mark.parametrize("impl", _impls())
@pytest.mark.parametrize("softcap", [None, 50.0])
def test_huge_logits_stay_finite(impl, softcap):
    # logits of magnitude ~1e4: the online logsumexp must not overflow or produce NaN.
    hidden, weight, _, targets = _make((77,), 63, 1003, torch.float32)
    hidden = hidden / hidden.norm(dim=-1, keepdim=True) * 1e4 / weight.norm(dim=-1).max()
    _run_and_check(impl, hidden, weight, None, targets, torch.float32, softcap=softcap)


@pytest.mark.parametrize("impl", ["torch", "cpu"])
def test_cpu_backends_bitwise_deterministic(impl):
    if impl == "cpu" and "cpu" not in _impls():
        pytest.skip("C++ extension not built")
    hidden, weight, bias, targets = _make((300,), 96, 3000, torch.float32, bias=True)
    runs = []
    for _ in range(2):
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_()
        b = bias.clone().requires_grad_()
        out = dpo_fast.linear_logprobs(h, w, targets, bias=b, return_entropy=True, impl=impl)
        (out.logp.sum() + out.entropy.sum()).backward()
        runs.append([out.logp, out.entropy, h.grad, w.grad, b.grad])
    for a, b2 in zip(*runs):
        assert torch.equal(a, b2)


def test_backends_agree_with_each_other():
    """The three backends implement one definition: fp32 results agree to fp32 noise."""
    hidden, weight, bias, targets = _make((200,), 96, 2000, torch.float32, bias=True)
    outs = {}
    for impl in _impls():
        out = dpo_fast.linear_logprobs(hidden, weight, targets, bias=bias, return_lse=True,
                                       impl=impl)
        outs[impl] = out
    base = outs["torch"]
    for impl, out in outs.items():
        torch.testing.assert_close(out.logp, base.logp, rtol=0, atol=2e-5)
        torch.testing.assert_close(out.lse, base.lse, rtol=0, atol=2e-5)


# ----------------------------------------------------------------------------- errors


def _bad_call(**over):
    hidden, weight, bias, targets = _make((4,), 8, 11, torch.float32, bias=True)
    kw = dict(hidden=hidden, weight=weight, targets=targets, bias=bias, impl="torch")
    kw.update(over)
    h, w, t = kw.pop("hidden"), kw.pop("weight"), kw.pop("targets")
    return dpo_fast.linear_logprobs(h, w, t, **kw)


@pytest.mark.parametrize("over,match", [
    (dict(weight=torch.randn(11, 9)), "hidden's last dim"),
    (dict(weight=torch.randn(11, 8, dtype=torch.float64)), "weight dtype"),
    (dict(hidden=torch.randn(4, 8, dtype=torch.float64),
          weight=torch.randn(11, 8, dtype=torch.float64)), "hidden must be float32"),
    (dict(targets=torch.zeros(5, dtype=torch.long)), "targets shape"),
    (dict(targets=torch.zeros(4)), "targets must be an integer"),
    (dict(targets=torch.tensor([0, 11, 2, -100])), r"targets must be in \[0, 11\)"),
    (dict(targets=torch.tensor([0, -1, 2, 3])), "1 bad ids"),
    (dict(bias=torch.randn(10)), "bias must be"),
    (dict(softcap=0.0), "softcap"),
    (dict(softcap=float("inf")), "softcap"),
    (dict(temperature=0.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(impl="cuda"), "impl must be one of"),
    (dict(weight=torch.randn(11)), "weight must be"),
])
def test_bad_input_raises_value_error_naming_argument(over, match):
    with pytest.raises(ValueError, match=match):
        _bad_call(**over)


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        _bad_call(impl="triton")


# ------------------------------------------------------------------------ torch.compile


@pytest.mark.parametrize("impl", ["torch", "cpu"])
def test_torch_compile_fullgraph_matches_eager(impl):
    if impl == "cpu" and "cpu" not in _impls():
        pytest.skip("C++ extension not built")
    hidden, weight, _, targets = _make((2, 40), 64, 500, torch.float32)

    def f(h, w, t):
        return dpo_fast.linear_logprobs(h, w, t, impl=impl).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    h1 = hidden.clone().requires_grad_()
    h2 = hidden.clone().requires_grad_()
    eager = f(h1, weight, targets)
    comp = compiled(h2, weight, targets)
    eager.backward()
    comp.backward()
    assert torch.equal(eager, comp)
    assert torch.equal(h1.grad, h2.grad)


@pytest.mark.parametrize("impl", _impls())
@pytest.mark.parametrize("frozen", ["weight", "hidden"])
def test_frozen_input_gets_no_gradient_gemm(impl, frozen, monkeypatch):
    # A frozen LM head (LoRA) or frozen hidden states: the backend is told, skips that GEMM
    # (returns None for it), and the other gradients still meet the oracle.
    from dpo_fast.ops import logprobs as ops_logprobs

    hidden, weight, bias, targets = _make((150,), 64, 1003, torch.float32, bias=True, seed=9)
    ups = {"logp": torch.randn(targets.shape, generator=torch.Generator().manual_seed(2))}
    truth = naive_logprobs(hidden, weight, targets, bias, grads=ups)
    same = naive_logprobs(hidden, weight, targets, bias, dtype=torch.float32, grads=ups)
    backend = ops_logprobs._backend(impl)
    calls = []
    orig = backend.logprobs_backward

    def spy(*args, **kwargs):
        out = orig(*args, **kwargs)
        calls.append((kwargs.get("need_dh", True), kwargs.get("need_dw", True), out))
        return out

    monkeypatch.setattr(backend, "logprobs_backward", spy)
    h = hidden.clone().requires_grad_(frozen != "hidden")
    w = weight.clone().requires_grad_(frozen != "weight")
    b = bias.clone().requires_grad_()
    logp = dpo_fast.linear_logprobs(h, w, targets, bias=b, impl=impl)
    (logp * ups["logp"]).sum().backward()
    (need_dh, need_dw, (dh, dw, db)), = calls
    if frozen == "weight":
        assert need_dh and not need_dw and dw is None and w.grad is None
        assert_close_to_truth("d_hidden", h.grad, same["d_hidden"], truth["d_hidden"],
                              torch.float32)
    else:
        assert need_dw and not need_dh and dh is None and h.grad is None
        assert_close_to_truth("d_weight", w.grad, same["d_weight"], truth["d_weight"],
                              torch.float32)
    assert_close_to_truth("d_bias", b.grad, same["d_bias"], truth["d_bias"], torch.float32)
