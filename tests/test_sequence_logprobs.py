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
