"""dpo_fast.sequence_logprobs against a float64 oracle: sums, gradients, per-position extras."""

import pytest
import torch

from dpo_fast import sequence_logprobs


def _case(seed=0, n=37, d=16, v=50, s=5):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g)
    w = torch.randn(v, d, generator=g) * 0.5
    t = torch.randint(0, v, (n,), generator=g)
    t[torch.rand(n, generator=g) < 0.3] = -100
    seq = torch.randint(0, s - 1, (n,), generator=g)  # sequence s-1 gets no position
    return h, w, t, seq, s


@pytest.mark.parametrize("impl", ["torch", "auto"])
def test_matches_float64_oracle(impl):
    h, w, t, seq, s = _case()
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    out = sequence_logprobs(hh, ww, t, seq, s, impl=impl)
    h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
    lp = torch.log_softmax(h64 @ w64.T, -1)
    valid = t != -100
    tok = lp.gather(1, t.clamp(min=0)[:, None])[:, 0] * valid
    want = torch.zeros(s, dtype=torch.float64).index_add(0, seq, tok)
    torch.testing.assert_close(out.logps.double(), want, atol=1e-5, rtol=1e-5)
    assert out.logps[s - 1] == 0.0 and out.lengths[s - 1] == 0
    assert out.lengths.tolist() == torch.zeros(s, dtype=torch.long).index_add(
        0, seq, valid.long()).tolist()
    ent = -(lp.exp() * lp).sum(-1) * valid
    torch.testing.assert_close(out.entropy.double(), ent.detach(), atol=1e-5, rtol=1e-5)
    top1 = ((h64 @ w64.T).argmax(-1) == t) & valid
    assert torch.equal(out.is_top1, top1)
    cot = torch.linspace(-1.0, 2.0, s)
    (out.logps * cot).sum().backward()
    (want * cot.double()).sum().backward()
    torch.testing.assert_close(hh.grad.double(), h64.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ww.grad.double(), w64.grad, atol=1e-5, rtol=1e-4)


def test_rejects_bad_sequence_ids():
    h, w, t, seq, s = _case()
    with pytest.raises(ValueError, match=r"seq_index must lie in \[0, 3\)"):
        sequence_logprobs(h, w, t, seq + 1, 3)
    with pytest.raises(ValueError, match="num_seqs"):
        sequence_logprobs(h, w, t, seq, 0)
    with pytest.raises(ValueError, match="positions"):
        sequence_logprobs(h, w, t, seq[:-1], s)


# ------------------------------------------- log sum p^2 (WPO's weights), with_sum_sq=True

import os  # noqa: E402

from dpo_fast.kernels import logprobs_cpu  # noqa: E402
from oracle import assert_close_to_truth, naive_logprobs  # noqa: E402

SUM_SQ_IMPLS = ["torch", "auto", "triton", "triton_fused"] + (
    ["cpu"] if logprobs_cpu.available() or os.environ.get("DPO_FAST_REQUIRE_CPU_EXT") == "1"
    else [])


def _run(impl, h, w, b, t, seq, s, **kw):
    hh, ww, bb = (x.clone().requires_grad_() for x in (h, w, b))
    out = sequence_logprobs(hh, ww, t, seq, s, bias=bb, impl=impl, softcap=20.0,
                            temperature=0.8, **kw)
    (out.logps * torch.linspace(-1.0, 2.0, s)).sum().backward()
    return out, (hh.grad, ww.grad, bb.grad)


@pytest.mark.parametrize("impl", SUM_SQ_IMPLS)
def test_log_sum_sq_matches_oracle_and_changes_nothing_else(impl):
    h, w, t, seq, s = _case(seed=1, n=60, d=24, v=2500)  # V = 2500: several vocabulary tiles
    b = torch.randn(w.shape[0], generator=torch.Generator().manual_seed(2))
    with_sq, g_with = _run(impl, h, w, b, t, seq, s, with_sum_sq=True)
    without, g_without = _run(impl, h, w, b, t, seq, s)
    assert without.log_sum_sq is None
    lsq = with_sq.log_sum_sq
    assert lsq.shape == t.shape and lsq.dtype == torch.float32 and not lsq.requires_grad
    kw = dict(softcap=20.0, temperature=0.8)
    truth = naive_logprobs(h, w, t, b, **kw)["log_sum_sq"]
    same = naive_logprobs(h, w, t, b, dtype=torch.float32, **kw)["log_sum_sq"]
    assert_close_to_truth("log_sum_sq", lsq, same, truth, torch.float32)
    assert (lsq[t == -100] == 0).all()
    # The flag changes no other output and no gradient, bit for bit.
    for name in ("logps", "token_logps", "entropy", "is_top1", "lengths"):
        assert torch.equal(getattr(with_sq, name), getattr(without, name)), name
    for a, c in zip(g_with, g_without):
        assert torch.equal(a, c)


def test_log_sum_sq_under_torch_compile():
    h, w, t, seq, s = _case(seed=3)

    def f(hh):
        out = sequence_logprobs(hh, w, t, seq, s, impl="torch", with_sum_sq=True)
        return out.logps.sum(), out.log_sum_sq

    eager = f(h)
    comp = torch.compile(f, backend="aot_eager", fullgraph=True)(h)
    assert torch.equal(eager[0], comp[0]) and torch.equal(eager[1], comp[1])
