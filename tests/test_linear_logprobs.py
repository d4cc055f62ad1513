"""linear_logprobs: every backend against the naive float64 oracle (tests/oracle.py)."""

from __future__ import annotations

import os

import pytest
import torch

import dpo_fast
from dpo_fast.kernels import logprobs_cpu
from kernel_cases import SHAPES, make_case, run_and_check
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


@pytest.mark.parametrize("impl", _impls())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s[0]}-D{s[1]}-V{s[2]}")
def test_fp32_shapes(impl, shape):
    lead, d, v = shape
    hidden, weight, bias, targets = make_case(lead, d, v, torch.float32, bias=True)
    run_and_check(impl, hidden, weight, bias, targets, torch.float32)


@pytest.mark.parametrize("impl", _impls())
def test_fp32_large_vocab_many_tokens(impl):
    hidden, weight, _, targets = make_case((1000,), 96, 49152, torch.float32, ignore_frac=0.5)
    run_and_check(impl, hidden, weight, None, targets, torch.float32, extras=False)


@pytest.mark.parametrize("impl", _impls())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [((77,), 96, 1003), ((1000,), 576, 1003), ((3,), 63, 3)],
                         ids=lambda s: f"N{s[0]}-D{s[1]}-V{s[2]}")
def test_half_dtypes(impl, dtype, shape):
    lead, d, v = shape
    hidden, weight, bias, targets = make_case(lead, d, v, dtype, bias=True)
    run_and_check(impl, hidden, weight, bias, targets, dtype)


@pytest.mark.parametrize("impl", _impls())
@pytest.mark.parametrize("softcap,temperature", [(30.0, 1.0), (None, 0.7), (5.0, 1.7)])
@pytest.mark.parametrize("bias", [False, True])
def test_softcap_temperature(impl, softcap, temperature, bias):
    hidden, weight, b, targets = make_case((77,), 96, 1003, torch.float32, bias=bias, scale=3.0)
    run_and_check(impl, hidden, weight, b, targets, torch.float32, softcap=softcap,
                  temperature=temperature)


@pytest.mark.parametrize("impl", _impls())
def test_all_ignored(impl):
    hidden, weight, bias, targets = make_case((2, 5), 63, 1003, torch.float32, bias=True)
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
    hidden, weight, _, targets = make_case((77,), 63, 1003, torch.float32)
    hidden = hidden / hidden.norm(dim=-1, keepdim=True) * 1e4 / weight.norm(dim=-1).max()
    run_and_check(impl, hidden, weight, None, targets, torch.float32, softcap=softcap)


@pytest.mark.parametrize("impl", ["torch", "cpu"])
def test_cpu_backends_bitwise_deterministic(impl):
    if impl == "cpu" and "cpu" not in _impls():
        pytest.skip("C++ extension not built")
    hidden, weight, bias, targets = make_case((300,), 96, 3000, torch.float32, bias=True)
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
    hidden, weight, bias, targets = make_case((200,), 96, 2000, torch.float32, bias=True)
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
    hidden, weight, bias, targets = make_case((4,), 8, 11, torch.float32, bias=True)
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
    hidden, weight, _, targets = make_case((2, 40), 64, 500, torch.float32)

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

    hidden, weight, bias, targets = make_case((150,), 64, 1003, torch.float32, bias=True, seed=9)
    ups = {"logp": torch.randn(targets.shape, generator=torch.Generator().manual_seed(2))}
    truth = naive_logprobs(hidden, weight, targets, bias, grads=ups)
    same = naive_logprobs(hidden, weight, targets, bias, dtype=torch.float32, grads=ups)
    backend = ops_logprobs.backend_module(impl)
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
