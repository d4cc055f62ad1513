"""The head's weight gradient by vocabulary blocks (``dpo_fast.ops.head_grad``): the blocks
put together are the op's dW, dh is unchanged, against the float64 oracle; through
``fused_preference_loss`` the blocks replace the weight's gradient."""

import pytest
import torch

from dpo_fast import fused_preference_loss
from dpo_fast.ops.head_grad import blockwise_backward, weight_grad_sink
from dpo_fast.ops.logprobs import backend_module
from oracle import assert_close_to_truth, naive_logprobs

IGNORE = -100


class Collect:
    """A sink that keeps each block (in the order received)."""

    def __init__(self, bounds):
        self.bounds = bounds
        self.got = []

    def __call__(self, block, grad):
        self.got.append((block, grad.clone()))

    def weight_grad(self):
        assert [b for b, _ in self.got] == list(range(len(self.bounds)))
        for (start, stop), (_, g) in zip(self.bounds, self.got):
            assert g.shape[0] == stop - start and g.dtype == torch.float32
        return torch.cat([g for _, g in self.got])


def _case(n=37, d=24, v=203, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g)
    w = torch.randn(v, d, generator=g) * 0.5
    t = torch.randint(0, v, (n,), generator=g)
    t[::5] = IGNORE
    t[3] = v - 1  # the last row, in the last block
    return h, w, t, g


# uneven blocks (torch.chunk of 203 rows over 4 ranks: 51, 51, 51, 50), and one with an
# empty block (5 rows over 4 ranks: 2, 2, 1, 0)
BOUNDS = [(0, 51), (51, 102), (102, 153), (153, 203)]


@pytest.mark.parametrize("impl", ["cpu", "torch"])
@pytest.mark.parametrize("softcap,temperature", [(None, 1.0), (3.0, 0.7)])
def test_blocks_are_the_weight_gradient(impl, softcap, temperature):
    h, w, t, g = _case()
    up = torch.randn(t.shape[0], generator=g)
    backend = backend_module(impl)
    inv_t = 1.0 / temperature
    logp, row_max, _, log_sum, _ = backend.logprobs_forward(
        h, w, None, t, ignore_index=IGNORE, softcap=softcap, inv_temperature=inv_t,
        with_entropy=False)
    sink = Collect(BOUNDS)
    dh = blockwise_backward(backend, h, w, t, row_max, log_sum, up, ignore_index=IGNORE,
                            softcap=softcap, inv_temperature=inv_t, need_dh=True,
                            bounds=BOUNDS, emit=sink)
    kw = dict(ignore_index=IGNORE, softcap=softcap, temperature=temperature,
              grads={"logp": up})
    truth = naive_logprobs(h, w, t, **kw)
    same = naive_logprobs(h, w, t, dtype=torch.float32, **kw)
    assert_close_to_truth("dh", dh, same["d_hidden"], truth["d_hidden"], torch.float32)
    assert_close_to_truth("dW", sink.weight_grad(), same["d_weight"], truth["d_weight"],
                          torch.float32)
    # the oracle's gradient is not trivially small: a dropped block or target term shows
    assert truth["d_weight"][153:].abs().max() > 1e-2
    assert truth["d_weight"][t[3]].abs().max() > 1e-2


def test_an_empty_block_is_still_handed_over():
    h, w, t, g = _case(n=9, d=8, v=5)
    up = torch.randn(9, generator=g)
    backend = backend_module("torch")
    _, row_max, _, log_sum, _ = backend.logprobs_forward(
        h, w, None, t, ignore_index=IGNORE, softcap=None, inv_temperature=1.0,
        with_entropy=False)
    bounds = [(0, 2), (2, 4), (4, 5), (5, 5)]
    sink = Collect(bounds)
    blockwise_backward(backend, h, w, t, row_max, log_sum, up, ignore_index=IGNORE,
                       softcap=None, inv_temperature=1.0, need_dh=False, bounds=bounds,
                       emit=sink)
    truth = naive_logprobs(h, w, t, ignore_index=IGNORE, grads={"logp": up})
    same = naive_logprobs(h, w, t, ignore_index=IGNORE, dtype=torch.float32,
                          grads={"logp": up})
    assert sink.got[-1][1].shape == (0, 8)
    assert_close_to_truth("dW", sink.weight_grad(), same["d_weight"], truth["d_weight"],
                          torch.float32)


@pytest.mark.parametrize("impl", ["cpu", "torch"])
def test_the_preference_loss_sends_its_weight_gradient_to_the_sink(impl):
    """Two pairs packed in one row (sigmoid DPO with reference log-probs): with a sink the
    loss and dh are those without one, the weight gets no gradient and the blocks are its
    gradient (the CPU default's scratch engine, which forms dW in the forward, is skipped)."""
    h, w, t, g = _case(n=40, d=16, v=203, seed=3)
    t[:] = torch.randint(0, 203, (40,), generator=g)
    t[:4] = IGNORE
    seq = torch.tensor([0] * 9 + [1] * 9 + [2] * 9 + [3] * 13)
    with torch.no_grad():  # reference log-probs near the policy's: the loss is not saturated
        pol = fused_preference_loss(h, w, t, seq, torch.zeros(4), impl=impl,
                                    ignore_index=IGNORE).policy_logps
    ref = pol + torch.randn(4, generator=g)

    def run(sink):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        with weight_grad_sink(sink):
            out = fused_preference_loss(hh, ww, t, seq, ref, beta=0.3, impl=impl,
                                        ignore_index=IGNORE)
        out.loss.backward()
        return out.loss.detach(), hh.grad, ww.grad

    loss0, dh0, dw0 = run(None)
    sink = Collect(BOUNDS)
    loss1, dh1, dw1 = run(sink)
    assert dw1 is None and dw0 is not None
    assert float(loss1) == float(loss0)
    assert (dh1 - dh0).abs().max() <= 1e-6 * dh0.abs().max()
    assert (sink.weight_grad() - dw0).abs().max() <= 1e-6 * dw0.abs().max()
    assert dw0.abs().max() > 1e-3
