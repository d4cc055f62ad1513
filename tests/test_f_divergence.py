"""f-DPO (``f_divergence_type``) in preference_loss: a per-element float64 oracle written from
docs/losses.md with the math module, float64 finite-difference gradients, the known answer at
init, the alpha -> 1 limit, the exponent clamp and TRL 1.16's refusals."""

from __future__ import annotations

import math

import pytest
import torch

from dpo_fast.losses import F_DIVERGENCES, preference_loss
from dpo_fast.train import TrainConfig

BETA = 0.2


def _score(u, kind, alpha):
    if kind == "reverse_kl":
        return u
    if kind == "forward_kl":
        return 1.0 - math.exp(-u)
    if kind == "js_divergence":
        return math.log(2.0) - math.log1p(math.exp(-u))
    return (math.exp(min((alpha - 1.0) * u, 80.0)) - 1.0) / (alpha - 1.0)


def _oracle(kind, fdiv, alpha, pc, pr, rc, rr, lc, lr):
    def logsig(x):
        return -math.log1p(math.exp(-x))

    out = []
    for i in range(len(pc)):
        sw, sl = _score(pc[i] - rc[i], fdiv, alpha), _score(pr[i] - rr[i], fdiv, alpha)
        h, h_avg = sw - sl, sw / lc[i] - sl / lr[i]
        out.append({"sigmoid": -logsig(BETA * h),
                    "hinge": max(0.0, 1.0 - BETA * h),
                    "ipo": (h_avg - 1.0 / (2.0 * BETA)) ** 2,
                    "sigmoid_norm": -logsig(BETA * h_avg)}[kind])
    return sum(out) / len(out)


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    pc, pr = -20 - 10 * torch.rand(5, generator=g, dtype=torch.float64), \
        -20 - 10 * torch.rand(5, generator=g, dtype=torch.float64)
    rc, rr = pc + torch.randn(5, generator=g, dtype=torch.float64), \
        pr + torch.randn(5, generator=g, dtype=torch.float64)
    lc, lr = (torch.randint(3, 30, (5,), generator=g).double() for _ in range(2))
    return pc, pr, rc, rr, lc, lr


@pytest.mark.parametrize("fdiv,alpha", [("forward_kl", 0.5), ("js_divergence", 0.5),
                                        ("alpha_divergence", 0.5),
                                        ("alpha_divergence", 2.5)])
@pytest.mark.parametrize("kind", ["sigmoid", "hinge", "ipo", "sigmoid_norm"])
def test_matches_float64_oracle_and_gradients(kind, fdiv, alpha):
    pc, pr, rc, rr, lc, lr = _inputs(seed=len(kind) + int(10 * alpha))

    def loss(a, b):
        return preference_loss(a, b, rc, rr, loss_type=kind, beta=BETA, chosen_lengths=lc,
                               rejected_lengths=lr, f_divergence_type=fdiv,
                               f_alpha_divergence_coef=alpha).loss

    want = _oracle(kind, fdiv, alpha, *(t.tolist() for t in (pc, pr, rc, rr, lc, lr)))
    assert loss(pc, pr).item() == pytest.approx(want, rel=1e-12, abs=1e-12)
    assert torch.autograd.gradcheck(loss, (pc.clone().requires_grad_(),
                                           pr.clone().requires_grad_()))
    # and the scores really change the loss
    plain = preference_loss(pc, pr, rc, rr, loss_type=kind, beta=BETA, chosen_lengths=lc,
                            rejected_lengths=lr).loss.item()
    assert abs(plain - want) > 1e-6


@pytest.mark.parametrize("fdiv", F_DIVERGENCES)
def test_known_answer_at_init(fdiv):
    z = torch.full((4,), -12.5, dtype=torch.float64)
    out = preference_loss(z, z, z, z, f_divergence_type=fdiv)  # every score is 0
    assert out.loss.item() == pytest.approx(math.log(2.0), rel=1e-15)
    assert out.chosen_rewards.abs().max().item() == 0.0


def test_alpha_one_is_reverse_kl_and_rewards_stay_log_ratios():
    pc, pr, rc, rr, lc, lr = _inputs(seed=3)
    a = preference_loss(pc, pr, rc, rr, f_divergence_type="alpha_divergence",
                        f_alpha_divergence_coef=1.0)
    b = preference_loss(pc, pr, rc, rr)
    assert a.loss.item() == b.loss.item()
    c = preference_loss(pc, pr, rc, rr, f_divergence_type="forward_kl")
    torch.testing.assert_close(c.chosen_rewards, 0.1 * (pc - rc), rtol=0, atol=0)  # beta 0.1


def test_alpha_exponent_is_clamped():
    one = torch.tensor([0.0], dtype=torch.float64)
    out = preference_loss(one + 500.0, one, one, one, loss_type="hinge",
                          f_divergence_type="alpha_divergence", f_alpha_divergence_coef=2.0)
    # score = exp(min(500, 80)) - 1: finite; hinge relu(1 - beta (score - 0)) = 0
    assert math.isfinite(out.losses.item()) and out.losses.item() == 0.0


def test_refusals_name_the_argument():
    z = torch.zeros(2)
    with pytest.raises(ValueError, match="f_divergence_type must be one of"):
        preference_loss(z, z, z, z, f_divergence_type="kl")
    with pytest.raises(ValueError, match="'bco_pair'"):
        preference_loss(z, z, z, z, loss_type=["sigmoid", "bco_pair"],
                        f_divergence_type="js_divergence")
    with pytest.raises(ValueError, match="TrainConfig.f_divergence_type"):
        TrainConfig(model="m", train_data=[], loss_type="apo_zero",
                    f_divergence_type="forward_kl").validate()
    cfg = TrainConfig(model="m", train_data=[], loss_type="ipo",
                      f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3)
    assert cfg.validate().loss_kwargs()["f_alpha_divergence_coef"] == 0.3


@pytest.mark.parametrize("scratch", [None, "auto"])
def test_fused_loss_passes_the_divergence_through(scratch):
    """fused_preference_loss (memory-flat path and the CPU scratch engine, which forms the
    gradient inside the forward) equals preference_loss on the same sequence log-probs."""
    from dpo_fast import fused_preference_loss, sequence_logprobs

    g = torch.Generator().manual_seed(0)
    n, d, v, b = 40, 16, 64, 3
    h = torch.randn(n, d, generator=g)
    w = torch.randn(v, d, generator=g) * 0.3
    t = torch.randint(0, v, (n,), generator=g)
    seq = torch.arange(n) % (2 * b)
    ref = -torch.rand(2 * b, generator=g) * 20
    kw = dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3)
    hh = h.clone().requires_grad_()
    out = fused_preference_loss(hh, w, t, seq, ref, loss_type="sigmoid", beta=BETA,
                                max_scratch_bytes=scratch, **kw)
    out.loss.backward()
    h2 = h.clone().requires_grad_()
    s = sequence_logprobs(h2, w, t, seq, 2 * b).logps
    want = preference_loss(s[:b], s[b:], ref[:b], ref[b:], beta=BETA, **kw).loss
    want.backward()
    torch.testing.assert_close(out.loss, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hh.grad, h2.grad, rtol=1e-4, atol=1e-6)
    plain = fused_preference_loss(h, w, t, seq, ref, loss_type="sigmoid", beta=BETA).loss
    assert abs(plain.item() - want.item()) > 1e-4
