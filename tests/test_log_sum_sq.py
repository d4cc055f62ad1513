"""log_sum_sq = log sum_v p_v^2 (WPO's per-token weight), the fifth output of every backend's
``logprobs_forward``, against the float64 oracle of tests/oracle.py (its TOL rule): bias,
softcap, temperature, ignored positions (exactly 0.0), fp16/bf16, logits of magnitude 1e4,
and vocabularies cut into several tiles / chunks / C++ groups so that the running max moves
(the accumulator is rescaled) and the per-group states are merged. Without ``with_sum_sq``
the output is empty and the other four outputs are bit for bit those of a run with it."""

from __future__ import annotations

import math
import os

import pytest
import torch

from dpo_fast.kernels import logprobs_chunked as lc
from dpo_fast.kernels import logprobs_cpu
from dpo_fast.kernels import logprobs_triton as lt
from dpo_fast.ops.logprobs import backend_module
from kernel_cases import make_case
from oracle import assert_close_to_truth, naive_logprobs

IGNORE = -100
HAVE_CPU = logprobs_cpu.available() or os.environ.get("DPO_FAST_REQUIRE_CPU_EXT") == "1"
IMPLS = ["torch", "triton", "triton_fused"] + (["cpu"] if HAVE_CPU else [])


def _fwd(impl, h, w, b, t, *, softcap=None, temperature=1.0, with_entropy=True,
         with_sum_sq=True):
    return backend_module(impl).logprobs_forward(
        h, w, b, t, ignore_index=IGNORE, softcap=softcap, inv_temperature=1.0 / temperature,
        with_entropy=with_entropy, with_sum_sq=with_sum_sq)


def _check(impl, h, w, b, t, dtype, *, softcap=None, temperature=1.0):
    """Runs ``impl`` and checks log_sum_sq against the oracle; returns (got, truth)."""
    out = _fwd(impl, h, w, b, t, softcap=softcap, temperature=temperature)
    assert len(out) == 5
    lsq = out[4]
    assert lsq.dtype == torch.float32 and lsq.shape == t.shape
    kw = dict(ignore_index=IGNORE, softcap=softcap, temperature=temperature)
    truth = naive_logprobs(h, w, t, b, **kw)["log_sum_sq"]
    same = naive_logprobs(h, w, t, b, dtype=dtype, **kw)["log_sum_sq"]
    assert_close_to_truth(f"{impl}/log_sum_sq", lsq, same, truth, dtype)
    ignored = t == IGNORE
    assert (lsq[ignored] == 0).all(), "log_sum_sq must be 0.0 at ignored positions"
    # log sum p^2 lies in [-log V, 0].
    valid = lsq[~ignored]
    assert (valid <= 1e-5).all() and (valid >= -math.log(w.shape[0]) - 1e-4).all()
    return lsq, truth


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [(1, 63, 1), (77, 96, 3), (77, 63, 1003), (200, 64, 3000),
                                   (40, 32, 20000)],
                         ids=lambda s: "x".join(map(str, s)))
def test_fp32_with_bias(impl, shape):
    # V = 3000 / 20000: several vocabulary tiles in every backend (twin chunks of 1024, the
    # fused kernel's interpreter tile of 1024, C++ tiles of 512, the chunked backend's
    # ~30% chunks under conftest).
    n, d, v = shape
    h, w, b, t = make_case((n,), d, v, torch.float32, bias=True, seed=v)
    lsq, truth = _check(impl, h, w, b, t, torch.float32)
    if v == 1:
        assert (lsq == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_dtypes(impl, dtype):
    h, w, b, t = make_case((77,), 96, 2500, dtype, bias=True, seed=3)
    _check(impl, h, w, b, t, dtype, softcap=30.0, temperature=0.7)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("softcap,temperature", [(30.0, 1.0), (None, 0.7), (5.0, 1.7)])
def test_softcap_temperature(impl, softcap, temperature):
    h, w, b, t = make_case((77,), 96, 2100, torch.float32, bias=True, scale=3.0, seed=5)
    _check(impl, h, w, b, t, torch.float32, softcap=softcap, temperature=temperature)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("softcap", [None, 50.0])
def test_huge_logits_1e4(impl, softcap):
    # |z| ~ 1e4: p is one-hot to fp32 precision; nothing may overflow or turn NaN.
    h, w, _, t = make_case((77,), 63, 2100, torch.float32, seed=8)
    h = h / h.norm(dim=-1, keepdim=True) * 2.5e4 / w.norm(dim=-1).max()
    z = h @ w.T
    assert z.abs().max() > 5e3
    _check(impl, h, w, None, t, torch.float32, softcap=softcap)


def _offset_case(n=48, d=8, v=3000, offset=10000.0, seed=0):
    """Integer h, W and bias: every fp32 logit is exact, z = 1e4 + O(30) with many ties at
    the top (a spread-out softmax, log sum p^2 well below 0). Column 0 of W is a ramp over
    the vocabulary and h[:, 0] = +-4: rows with +4 have their max in the last sixth of the
    vocabulary (the running max moves from tile to tile), rows with -4 in the first."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randint(-1, 2, (n, d), generator=g).float()
    w = torch.randint(-1, 2, (v, d), generator=g).float()
    w[:, 0] = torch.div(torch.arange(v) * 6, v, rounding_mode="floor").float()  # 0..5
    sign = torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0)
    h[:, 0] = 4.0 * sign
    b = torch.full((v,), offset)
    t = torch.randint(0, v, (n,), generator=g)
    t[3::7] = IGNORE
    return h, w, b, t, sign


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("v", [3000, 8000])
def test_exact_logits_at_1e4_offset_moving_max(impl, v):
    # A rounded fp32 lse (half an ulp of 1e4 ~ 5e-4) in p = exp(z - lse) would put ~1e-3
    # into log sum p^2; a missing exp(2 (m_old - m_new)) rescale when the max moves would
    # be off by far more. The referenced-to-max form is fp32-accurate. V = 8000 also gives
    # the chunked backend's row kernel several column blocks inside one chunk.
    h, w, b, t, sign = _offset_case(v=v)
    z = h @ w.T + b
    assert torch.equal(z, (h.double() @ w.double().T + b.double()).float())  # exact in fp32
    top = z.argmax(-1)
    assert (top[sign > 0] >= v * 5 // 6).all() and (top[sign < 0] < v // 6).all()
    lsq, truth = _check(impl, h, w, b, t, torch.float32)
    valid = t != IGNORE
    assert truth[valid].max() < -0.5  # p is spread: the test is not about a one-hot p
    assert (lsq.double() - truth).abs().max() < 1e-5


@pytest.mark.skipif(not HAVE_CPU, reason="C++ extension not built")
@pytest.mark.parametrize("groups", [1, 3, 4])
@pytest.mark.parametrize("case", ["offset", "random-V3", "random-cap"])
def test_cpu_vocab_groups_merge(groups, case):
    # Pinned groups > threads: every group's (max, sum, sum of squares) state is merged.
    # V = 3 with 4 groups leaves groups without a tile (skipped in the merge).
    prev = logprobs_cpu.pin_vocab_groups(groups)
    try:
        if case == "offset":
            h, w, b, t, _ = _offset_case(seed=groups)
            _check("cpu", h, w, b, t, torch.float32)
        elif case == "random-V3":
            h, w, b, t = make_case((50,), 16, 3, torch.float32, bias=True, seed=groups)
            _check("cpu", h, w, b, t, torch.float32)
        else:
            h, w, b, t = make_case((300,), 64, 5000, torch.float32, bias=True, scale=3.0,
                                   seed=groups)
            _check("cpu", h, w, b, t, torch.float32, softcap=30.0, temperature=0.7)
    finally:
        logprobs_cpu.pin_vocab_groups(prev)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("with_entropy", [True, False])
def test_flag_off_is_empty_and_changes_nothing_else(impl, with_entropy):
    h, w, b, t = make_case((90,), 48, 2100, torch.float32, bias=True, seed=2)
    on = _fwd(impl, h, w, b, t, softcap=30.0, with_entropy=with_entropy)
    off = _fwd(impl, h, w, b, t, softcap=30.0, with_entropy=with_entropy, with_sum_sq=False)
    default = backend_module(impl).logprobs_forward(
        h, w, b, t, ignore_index=IGNORE, softcap=30.0, inv_temperature=1.0,
        with_entropy=with_entropy)
    assert off[4].shape == (0,) and default[4].shape == (0,) and on[4].shape == t.shape
    for a, c, e in zip(on[:4], off[:4], default[:4]):
        assert torch.equal(a, c) and torch.equal(c, e)


@pytest.mark.parametrize("impl", IMPLS)
def test_all_ignored(impl):
    h, w, b, t = make_case((12,), 16, 700, torch.float32, bias=True)
    t[:] = IGNORE
    out = _fwd(impl, h, w, b, t)
    assert out[4].shape == (12,) and (out[4] == 0).all()


def test_compile_gate_specs_turn_the_flag_on_and_off():
    # The gate compiles the forward kernels with WITH_SUM_SQ in "all on" and off in "none".
    for dtype in (torch.float32, torch.bfloat16):
        for features in (True, False):
            specs = {s["name"]: s for s in lt.kernel_specs(dtype, features=features)}
            assert specs["fwd"]["constexprs"]["WITH_SUM_SQ"] is features
            assert specs["fwd"]["signature"]["LSQ"] == "*fp32"
            specs = {s["name"]: s for s in lc.kernel_specs(dtype, features=features)}
            assert specs["lse_chunk"]["constexprs"]["WITH_SUM_SQ"] is features
            assert specs["lse_chunk"]["signature"]["Q"] == "*fp32"
