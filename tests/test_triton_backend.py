"""Triton-backend specifics (the oracle tests in test_linear_logprobs.py cover accuracy):
bitwise-reproducible backward without atomics, and backward tile filtering."""

from __future__ import annotations

import torch

from dpo_fast.kernels import logprobs_triton as lt


def _case(n=77, d=63, v=1003, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g)
    w = torch.randn(v, d, generator=g) / d**0.5 * 2
    b = torch.randn(v, generator=g)
    t = torch.randint(0, v, (n,), generator=g)
    t[::4] = -100
    ups = [torch.randn(n, generator=g) for _ in range(3)]
    return h, w, b, t, ups


def _bwd(h, w, b, t, ups, **kw):
    opts = dict(ignore_index=-100, softcap=None, inv_temperature=1.0)
    logp, row_max, ent, log_sum, _ = lt.logprobs_forward(h, w, b, t, with_entropy=True, **opts)
    grads = lt.logprobs_backward(h, w, b, t, row_max, log_sum, ent, *ups, **opts, **kw)
    return (logp, row_max + log_sum, ent) + tuple(grads)


def test_backward_bitwise_reproducible():
    case = _case()
    a, c = _bwd(*case), _bwd(*case)
    for x, y in zip(a, c):
        assert torch.equal(x, y)


def test_grad_filter_threshold_extremes():
    case = _case()
    exact = _bwd(*case)
    tiny = _bwd(*case, grad_filter_eps=1e-38)  # below every |dz|: nothing skipped
    huge = _bwd(*case, grad_filter_eps=1e30)   # above every |dz|: every GEMM skipped
    for i in (3, 4, 5):
        assert torch.equal(tiny[i], exact[i])
    assert (huge[3] == 0).all() and (huge[4] == 0).all()
    assert torch.equal(huge[5], exact[5])  # the bias gradient is never filtered


def test_kernel_specs_match_launch_configs():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        specs = lt.kernel_specs(dtype)
        assert {s["name"] for s in specs} == {"fwd", "bwd_dh", "bwd_dw"}
        for s in specs:
            want = "tf32x3" if dtype == torch.float32 else "tf32"
            assert s["constexprs"]["DOT_PRECISION"] == want
            cfg = lt.default_config(s["name"], dtype)
            assert s["options"] == {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
            for k in ("BLOCK_N", "BLOCK_V", "BLOCK_D"):
                assert s["constexprs"][k] == cfg[k]


# ------------------------------------------- per-sequence upstream grad gathered in-kernel

import pytest  # noqa: E402

from dpo_fast.kernels import dpo_triton  # noqa: E402
from kernel_cases import both_paths, dpo_f64, seq_case  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_seq_grad_matches_token_grad(dtype, with_bias, softcap):
    h, w, b, t, si, sg = seq_case([13, 31, 7, 22], dtype=dtype)
    ref, got = both_paths(h, w, b if with_bias else None, t, si, sg, softcap)
    assert (got[2] is None) == (not with_bias)
    for x, y in zip(ref, got):
        if x is None:
            continue
        assert x.dtype == y.dtype and x.shape == y.shape
        assert torch.equal(x, y), (x.float() - y.float()).abs().max()
    assert got[0].float().abs().sum() > 0 and got[1].float().abs().sum() > 0


def test_seq_grad_single_pair_with_entropy_grad():
    h, w, b, t, si, sg = seq_case([19, 6])  # B = 1: one chosen, one rejected sequence
    g_ent = torch.randn(t.shape[0], generator=torch.Generator().manual_seed(3))
    ref, got = both_paths(h, w, b, t, si, sg, None, grad_entropy=g_ent)
    for x, y in zip(ref, got):
        assert torch.equal(x, y)


def test_seq_grad_zero_sequence_grad_fp32_noise():
    # A zero sequence grad: the [N] path skips those rows, the seq path processes them with
    # coefficient 0; results agree up to fp32 summation order.
    h, w, b, t, si, sg = seq_case([9, 17, 4, 30, 11], seed=4)
    sg[1] = 0.0
    ref, got = both_paths(h, w, b, t, si, sg, None)
    for x, y in zip(ref, got):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6)
    rows1 = (si == 1) & (t != -100)
    assert (got[0][rows1] == 0).all()


def test_seq_grad_only_valid_ids_are_read():
    # Ignored positions carry an absurd sequence id: it must never be loaded.
    h, w, b, t, si, sg = seq_case([10, 12])
    si = si.clone()
    si[t == -100] = 10**9
    ref, got = both_paths(h, w, b, t, si, sg, None)
    for x, y in zip(ref, got):
        assert torch.equal(x, y)


def test_seq_grad_argument_errors():
    h, w, b, t, si, sg = seq_case([8, 8])
    opts = dict(ignore_index=-100, softcap=None, inv_temperature=1.0)
    _, row_max, ent, log_sum, _ = lt.logprobs_forward(h, w, b, t, with_entropy=False, **opts)
    args = (h, w, b, t, row_max, log_sum, None)
    with pytest.raises(ValueError):  # grad_lse has no meaning with seq_grad
        lt.logprobs_backward(*args, None, torch.ones(t.shape[0]), None, seq_index=si,
                             seq_grad=sg, **opts)
    with pytest.raises(ValueError):  # both or neither
        lt.logprobs_backward(*args, None, None, None, seq_grad=sg, **opts)
    bad = si.clone()
    bad[1] = 2  # a valid position pointing past S = 2
    with pytest.raises(ValueError):
        lt.logprobs_backward(*args, None, None, None, seq_index=bad, seq_grad=sg, **opts)


def test_kernel_specs_compile_both_seq_grad_variants():
    for dtype in (torch.float32, torch.bfloat16):
        for features in (True, False):
            for s in lt.kernel_specs(dtype, features=features):
                if s["name"] == "fwd":
                    assert "SEQ_GRAD" not in s["constexprs"]
                else:
                    assert s["constexprs"]["SEQ_GRAD"] is features
                    assert s["signature"]["SIDX"] == "*i64"
                    assert s["signature"]["SEQG"] == "*fp32"
    (spec,) = dpo_triton.kernel_specs()
    assert spec["gemm"] is False and spec["name"] == "dpo_sigmoid"


# ------------------------------------------------------------------ DPO sigmoid loss kernel


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("beta", [0.1, 2.5])
def test_dpo_sigmoid_kernel_matches_references(beta, eps):
    import dpo_fast

    g = torch.Generator().manual_seed(7)
    nb = 37
    p = -torch.rand(2 * nb, generator=g) * 300
    r = p + torch.randn(2 * nb, generator=g) * 20
    out = dpo_triton.dpo_sigmoid_loss(p, r, beta, eps)
    assert len(out) == 5 and all(o.shape == (nb,) and o.dtype == torch.float32 for o in out)
    loss, gc, gr = dpo_fast.dpo_sigmoid_coefficients(p[:nb], p[nb:], r[:nb], r[nb:], beta, eps)
    torch.testing.assert_close(out[0], loss, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(out[1], gc, rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(out[2], gr, rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(out[3], beta * (p[:nb] - r[:nb]))
    torch.testing.assert_close(out[4], beta * (p[nb:] - r[nb:]))
    ref = dpo_f64(p, r, beta, eps)
    for o, want in zip(out, ref):
        # fp32 inputs: x itself carries fp32 rounding of the log-prob differences.
        torch.testing.assert_close(o.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_dpo_sigmoid_kernel_extreme_x(eps):
    beta = 1.0
    # x = (pc - rc) - (pr - rr) in {+-1e4, +-1e3, +-30, +-12, 0, +-1e-6}.
    xs = [1e4, -1e4, 1e3, -1e3, 30.0, -30.0, 12.0, -12.0, 0.0, 1e-6, -1e-6]
    nb = len(xs)
    pc = torch.tensor(xs, dtype=torch.float32)
    p = torch.cat([pc, torch.zeros(nb)])
    r = torch.zeros(2 * nb)
    out = dpo_triton.dpo_sigmoid_loss(p, r, beta, eps)
    for o in out:
        assert torch.isfinite(o).all()
    ref = dpo_f64(p, r, beta, eps)
    for o, want in zip(out, ref):
        torch.testing.assert_close(o.double(), want, rtol=1e-6, atol=1e-30)
    # Plain DPO at x = +1e4: loss exp(-1e4) underflows to 0, grad exactly 0; at -1e4: loss 1e4.
    if eps == 0.0:
        assert out[0][0] == 0 and out[1][0] == 0 and out[0][1] == 1e4 and out[1][1] == -beta


def test_dpo_sigmoid_kernel_argument_errors():
    p = torch.zeros(4)
    with pytest.raises(ValueError):
        dpo_triton.dpo_sigmoid_loss(p, torch.zeros(6), 0.1, 0.0)
    with pytest.raises(ValueError):
        dpo_triton.dpo_sigmoid_loss(torch.zeros(3), torch.zeros(3), 0.1, 0.0)
    with pytest.raises(ValueError):
        dpo_triton.dpo_sigmoid_loss(p, p, 0.0, 0.0)
    with pytest.raises(ValueError):
        dpo_triton.dpo_sigmoid_loss(p, p, 0.1, 0.5)
    empty = dpo_triton.dpo_sigmoid_loss(torch.zeros(0), torch.zeros(0), 0.1, 0.0)
    assert all(o.shape == (0,) for o in empty)
