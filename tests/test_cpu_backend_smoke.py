"""The C++ CPU kernel (dpo_fast._C, csrc/logprobs.cpp) called directly, against the float64
oracle in tests/oracle.py: dtypes, odd shapes, bias, softcap / temperature, entropy and lse
grads, all-ignored rows, 1e4-magnitude logits, the block / fp32-accumulator paths, and
bitwise determinism. Skipped when the extension is not built (unless
DPO_FAST_REQUIRE_CPU_EXT=1, then the calls fail and say why)."""

from __future__ import annotations

import math
import os

import pytest
import torch

from dpo_fast.kernels import logprobs_cpu
from oracle import assert_close_to_truth, naive_logprobs

if not logprobs_cpu.available() and os.environ.get("DPO_FAST_REQUIRE_CPU_EXT") != "1":
    pytest.skip(f"C++ extension not built: {logprobs_cpu.load_error()}", allow_module_level=True)

IGNORE = -100


def _make(n, d, v, dtype, *, bias=False, scale=1.0, ignore_frac=0.25, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g) * scale
    weight = torch.randn(v, d, generator=g) / d**0.5 * 2.0
    b = torch.randn(v, generator=g) if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    targets[torch.rand(n, generator=g) < ignore_frac] = IGNORE
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return cast(hidden), cast(weight), cast(b), targets


def _upstream(n, *, lse, entropy, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = {"logp": torch.randn(n, generator=g)}
    if lse:
        out["lse"] = torch.randn(n, generator=g)
    if entropy:
        out["entropy"] = torch.randn(n, generator=g)
    return out


def _run(hidden, weight, bias, targets, grads, *, softcap=None, temperature=1.0):
    kw = dict(ignore_index=IGNORE, softcap=softcap, inv_temperature=1.0 / temperature)
    with_ent = "entropy" in grads
    logp, row_max, ent, log_sum, _ = logprobs_cpu.logprobs_forward(
        hidden, weight, bias, targets, with_entropy=with_ent, **kw)
    dh, dw, db = logprobs_cpu.logprobs_backward(
        hidden, weight, bias, targets, row_max, log_sum, ent if with_ent else None,
        grads["logp"], grads.get("lse"), grads.get("entropy"), **kw)
    out = {"logp": logp, "lse": row_max + log_sum, "d_hidden": dh, "d_weight": dw,
           "row_max": row_max, "log_sum": log_sum}
    if with_ent:
        out["entropy"] = ent
    if bias is not None:
        out["d_bias"] = db
    else:
        assert db is None
    return out


def _check(hidden, weight, bias, targets, grads, dtype, **opts):
    got = _run(hidden, weight, bias, targets, grads, **opts)
    kw = dict(ignore_index=IGNORE, softcap=opts.get("softcap"),
              temperature=opts.get("temperature", 1.0), grads=grads)
    truth = naive_logprobs(hidden, weight, targets, bias, dtype=torch.float64, **kw)
    same = naive_logprobs(hidden, weight, targets, bias, dtype=dtype, **kw)
    for name in ("logp", "lse", "entropy"):
        if name in got:
            assert got[name].dtype == torch.float32
            assert_close_to_truth(name, got[name], same[name], truth[name], dtype)
    for name, ref in (("d_hidden", hidden), ("d_weight", weight), ("d_bias", bias)):
        if name in got:
            assert got[name].dtype == ref.dtype and got[name].shape == ref.shape, name
            assert_close_to_truth(name, got[name], same[name], truth[name], dtype)
    valid = targets != IGNORE
    for name in ("logp", "lse", "row_max", "log_sum"):
        assert (got[name][~valid] == 0).all(), f"{name} not 0.0 at ignored positions"
    # log_sum = log sum exp(z - max) lies in [0, log V].
    ls = got["log_sum"][valid]
    assert (ls >= 0).all() and (ls <= math.log(weight.shape[0]) + 1e-5).all()
    return got


SHAPES = [(1, 63, 1), (77, 96, 3), (1000, 576, 1003), (77, 63, 49152)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("cap_temp", [(None, 1.0), (30.0, 0.7)], ids=["plain", "cap30_t0.7"])
def test_fp32_against_float64(shape, bias, cap_temp):
    n, d, v = shape
    h, w, b, t = _make(n, d, v, torch.float32, bias=bias, seed=n + v)
    grads = _upstream(n, lse=True, entropy=True)
    _check(h, w, b, t, grads, torch.float32, softcap=cap_temp[0], temperature=cap_temp[1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", [(77, 96, 3), (300, 128, 1003), (77, 63, 4099)],
                         ids=lambda s: "x".join(map(str, s)))
def test_half_dtypes_against_float64(dtype, shape):
    n, d, v = shape
    h, w, b, t = _make(n, d, v, dtype, bias=True, seed=v)
    grads = _upstream(n, lse=True, entropy=True)
    _check(h, w, b, t, grads, dtype, softcap=30.0, temperature=0.7)


def test_logp_grad_only_no_entropy():
    h, w, _, t = _make(300, 64, 5000, torch.float32)
    _check(h, w, None, t, _upstream(300, lse=False, entropy=False), torch.float32)


def test_all_positions_ignored():
    h, w, b, t = _make(40, 32, 100, torch.float32, bias=True, ignore_frac=1.0)
    assert (t == IGNORE).all()
    got = _run(h, w, b, t, _upstream(40, lse=True, entropy=True))
    for name, x in got.items():
        assert torch.isfinite(x).all() and (x == 0).all(), name


def test_huge_logits_1e4():
    # |z| ~ 1e4: p is one-hot to fp32 precision; a rounded lse must not leak into p.
    h, w, _, t = _make(64, 64, 2000, torch.float32, scale=3000.0, seed=5)
    got = _run(h, w, None, t, _upstream(64, lse=True, entropy=True))
    assert got["lse"].abs().max() > 5e3
    for name, x in got.items():
        assert torch.isfinite(x).all(), name
    _check(h, w, None, t, _upstream(64, lse=True, entropy=True), torch.float32)


def test_exact_integer_logits_1e4():
    # Integer h and W make the fp32 logits exact (|z| up to ~1e4), so the GEMM's rounding
    # cannot hide the half-ulp rounding of a summed lse (~5e-4 at 1e4); the backward must
    # use the separate row max and log-sum.
    g = torch.Generator().manual_seed(7)
    h = torch.randint(-40, 41, (64, 8), generator=g).float()
    w = torch.randint(-40, 41, (512, 8), generator=g).float()
    t = torch.randint(0, 512, (64,), generator=g)
    assert (h @ w.T).abs().max() > 5e3
    _check(h, w, None, t, _upstream(64, lse=True, entropy=True), torch.float32)


def test_multi_block_and_fp32_dw_accumulator():
    # fp32, ~1100 valid rows of D=576: several token blocks, dW accumulated across them.
    h, w, b, t = _make(1500, 576, 200, torch.float32, bias=True, seed=11)
    _check(h, w, b, t, _upstream(1500, lse=True, entropy=False), torch.float32)
    # bf16 with more rows than one block may hold: the whole dW is accumulated in fp32.
    h, w, b, t = _make(12000, 576, 64, torch.bfloat16, bias=True, ignore_frac=0.05, seed=12)
    _check(h, w, b, t, _upstream(12000, lse=False, entropy=False), torch.bfloat16)


def test_zero_upstream_rows_get_zero_grad():
    h, w, _, t = _make(50, 32, 300, torch.float32, ignore_frac=0.0)
    grads = _upstream(50, lse=True, entropy=False)
    grads["logp"][10:] = 0.0
    grads["lse"][10:] = 0.0
    got = _check(h, w, None, t, grads, torch.float32)
    assert (got["d_hidden"][10:] == 0).all()


def test_non_contiguous_inputs():
    h, w, b, t = _make(90, 48, 700, torch.float32, bias=True)
    w_nc = w.t().contiguous().t()  # same values, column-major storage
    h_nc = torch.cat([h, h], dim=1)[:, ::2]
    h_nc.copy_(h)
    assert not w_nc.is_contiguous() and not h_nc.is_contiguous()
    grads = _upstream(90, lse=True, entropy=True)
    a = _run(h, w, b, t, grads, softcap=30.0)
    c = _run(h_nc, w_nc, b, t, grads, softcap=30.0)
    for k in a:
        assert torch.equal(a[k], c[k]), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_bitwise_deterministic(dtype):
    h, w, b, t = _make(700, 96, 3000, dtype, bias=True, seed=3)
    grads = _upstream(700, lse=True, entropy=True)
    a = _run(h, w, b, t, grads, softcap=30.0, temperature=0.7)
    c = _run(h, w, b, t, grads, softcap=30.0, temperature=0.7)
    for k in a:
        assert torch.equal(a[k], c[k]), f"{k} differs between two identical runs"


# ----------------------------------------------- chunk ops: logits kept from the forward


def _run_chunk(hidden, weight, bias, targets, g_logp, keep, *, softcap=None, temperature=1.0):
    """chunk_fwd + chunk_bwd with none / part / all of the logit tiles kept; dh, dW and db
    start from known values (dh rows of ignored positions must stay, dW / db are added to)."""
    from dpo_fast.kernels.dpo_scratch import cpp_store_plan

    ops = torch.ops.dpo_fast_cpu
    n, d = hidden.shape
    v = weight.shape[0]
    nv = int((targets != IGNORE).sum())
    _, _, full = cpp_store_plan(nv, v, 1 << 40)
    budget = {"none": 0, "partial": full // 2, "all": full}[keep] * 4
    used, cols, _ = cpp_store_plan(nv, v, budget)
    assert {"none": cols == 0, "partial": 0 < cols < v, "all": cols == v}[keep], cols
    store = torch.full((used + 5,), math.nan)  # a larger buffer: only whole tiles are used
    inv_t = 1.0 / temperature
    logp, row_max, ent, log_sum = ops.chunk_fwd(hidden, weight, bias, targets, IGNORE, softcap,
                                               inv_t, store)
    dh = torch.full((n, d), 7.0)
    dw = torch.full((v, d), 0.5)
    db = torch.full((v,), 3.0) if bias is not None else None
    ops.chunk_bwd(hidden, weight, bias, targets, row_max, log_sum, g_logp, IGNORE, softcap, inv_t,
                  store, dh, dw, db, False)
    valid = targets != IGNORE
    assert (dh[~valid] == 7.0).all(), "chunk_bwd wrote dh rows of ignored positions"
    out = {"logp": logp, "lse": row_max + log_sum, "entropy": ent,
           "d_hidden": torch.where(valid[:, None], dh, 0.0), "d_weight": dw - 0.5}
    if db is not None:
        out["d_bias"] = db - 3.0
    return out


@pytest.mark.parametrize("keep", ["none", "partial", "all"])
@pytest.mark.parametrize("case", [
    # fp32, D=576: three 512-row token chunks, and the backward cuts other token blocks
    # than the forward (the store is indexed by valid row, not by block).
    dict(n=1500, d=576, v=3000, dtype=torch.float32, bias=True, softcap=30.0, temperature=0.7),
    dict(n=300, d=64, v=5000, dtype=torch.float32, bias=False, softcap=None, temperature=1.0),
    dict(n=200, d=96, v=3000, dtype=torch.bfloat16, bias=True, softcap=30.0, temperature=1.0),
], ids=["fp32-blocks-cap-temp", "fp32-plain", "bf16-cap"])
def test_chunk_ops_against_float64(keep, case):
    n, d, v, dtype = case["n"], case["d"], case["v"], case["dtype"]
    h, w, b, t = _make(n, d, v, dtype, bias=case["bias"], seed=n + v)
    g = _upstream(n, lse=False, entropy=False)["logp"]
    g[5:40] = 0.0  # rows with no upstream grad stay in the row set of a kept store
    opts = dict(softcap=case["softcap"], temperature=case["temperature"])
    got = _run_chunk(h, w, b, t, g, keep, **opts)
    kw = dict(ignore_index=IGNORE, grads={"logp": g}, **opts)
    truth = naive_logprobs(h, w, t, b, dtype=torch.float64, **kw)
    same = naive_logprobs(h, w, t, b, dtype=dtype, **kw)
    for name in ("logp", "lse", "entropy", "d_hidden", "d_weight", "d_bias"):
        if name in got:
            assert_close_to_truth(name, got[name], same[name].float(), truth[name], dtype)


def test_chunk_ops_kept_logits_equal_recomputed():
    # No softcap: a kept logit is the recomputed one bit for bit, so all outputs agree exactly.
    h, w, b, t = _make(700, 96, 3000, torch.float32, bias=True, seed=3)
    g = _upstream(700, lse=False, entropy=False)["logp"]
    runs = [_run_chunk(h, w, b, t, g, keep) for keep in ("none", "partial", "all")]
    for other in runs[1:]:
        for k in runs[0]:
            assert torch.equal(runs[0][k], other[k]), k


def test_chunk_bwd_overwrite_ignores_old_contents():
    h, w, b, t = _make(300, 64, 3000, torch.float32, bias=True, seed=4)
    g = _upstream(300, lse=False, entropy=False)["logp"]
    ops = torch.ops.dpo_fast_cpu
    store = torch.empty(0)
    _, row_max, _, log_sum = ops.chunk_fwd(h, w, b, t, IGNORE, None, 1.0, store)
    outs = []
    for fill, overwrite in ((0.0, False), (math.nan, True)):
        dh, dw, db = torch.zeros(300, 64), torch.full((3000, 64), fill), torch.full((3000,), fill)
        ops.chunk_bwd(h, w, b, t, row_max, log_sum, g, IGNORE, None, 1.0, store, dh, dw, db,
                      overwrite)
        outs.append((dh, dw, db))
    for x, y in zip(*outs):
        assert torch.equal(x, y)


def test_need_flags_skip_one_gradient_and_keep_the_other_bitwise():
    # logprobs_bwd(need_dh / need_dw) and chunk_bwd(dh / dw = None): the skipped gradient
    # comes back empty (its GEMM never ran); the other is the full run's, bit for bit.
    h, w, b, t = _make(700, 96, 3000, torch.float32, bias=True, seed=6)
    g = _upstream(700, lse=False, entropy=False)["logp"]
    ops = torch.ops.dpo_fast_cpu
    _, row_max, _, log_sum, _ = ops.logprobs_fwd(h, w, b, t, IGNORE, 30.0, 1.0, False)
    args = (h, w, b, t, row_max, log_sum, None, g, None, None, IGNORE, 30.0, 1.0)
    full = ops.logprobs_bwd(*args)
    no_dw = ops.logprobs_bwd(*args, need_dw=False)
    no_dh = ops.logprobs_bwd(*args, need_dh=False)
    assert no_dw[1].numel() == 0 and no_dh[0].numel() == 0
    assert torch.equal(no_dw[0], full[0]) and torch.equal(no_dh[1], full[1])
    assert torch.equal(no_dw[2], full[2]) and torch.equal(no_dh[2], full[2])
    store = torch.empty(0)
    outs = []
    for want_dh, want_dw in ((True, True), (True, False), (False, True)):
        dh = torch.zeros(700, 96) if want_dh else None
        dw = torch.zeros(3000, 96) if want_dw else None
        db = torch.zeros(3000)
        ops.chunk_bwd(h, w, b, t, row_max, log_sum, g, IGNORE, 30.0, 1.0, store, dh, dw, db,
                      False)
        outs.append((dh, dw, db))
    assert torch.equal(outs[1][0], outs[0][0]) and torch.equal(outs[2][1], outs[0][1])
    assert torch.equal(outs[1][2], outs[0][2]) and torch.equal(outs[2][2], outs[0][2])
