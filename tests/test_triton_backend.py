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
    logp, row_max, ent, log_sum = lt.logprobs_forward(h, w, b, t, with_entropy=True, **opts)
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
