"""preference_loss / dpo_sigmoid_coefficients against an independent float64 oracle written
from the docs/losses.md table, the known answers listed there, and every validation error."""

from __future__ import annotations

import math

import pytest
import torch

from dpo_fast.losses import LOSS_TYPES, dpo_sigmoid_coefficients, preference_loss

B = 7
TOL = 1e-5  # fp32, relative to the magnitude of the truth

# ------------------------------------------------------------- the oracle (docs/losses.md)


def _sig(x):
    return 1.0 / (1.0 + torch.exp(-x))


def _logsig(x):
    return torch.log(_sig(x))


def oracle_terms(kind, pc, pr, rc, rr, lc, lr, nll, *, beta, eps,
                 gamma=0.5, tau=0.05, lam=None, alpha=1.0, ul_alpha=1.0):
    """Per-pair loss [B] straight from the docs/losses.md table, in whatever dtype it is given."""
    lam = beta if lam is None else lam
    s_w, s_l = pc - rc, pr - rr
    h = s_w - s_l
    h_avg = s_w / lc - s_l / lr
    a_w, a_l = pc / lc, pr / lr
    x = beta * h

    def cdpo(z):  # -(1-eps) log sig(z) - eps log sig(-z)
        return -(1 - eps) * _logsig(z) - eps * _logsig(-z)

    if kind == "sigmoid":
        return cdpo(x)
    if kind == "hinge":
        return torch.clamp(1 - x, min=0)
    if kind == "ipo":
        return (h_avg - 1 / (2 * beta)) ** 2
    if kind == "robust":
        return (-(1 - eps) * _logsig(x) + eps * _logsig(-x)) / (1 - 2 * eps)
    if kind == "exo_pair":
        e = eps if eps > 0 else 1e-3
        return (_sig(x) * (_logsig(x) - math.log(1 - e))
                + _sig(-x) * (_logsig(-x) - math.log(e)))
    if kind == "nca_pair":
        return -_logsig(beta * s_w) - 0.5 * _logsig(-beta * s_w) - 0.5 * _logsig(-beta * s_l)
    if kind == "bco_pair":
        return -_logsig(beta * s_w) - _logsig(-beta * s_l)
    if kind == "sppo_hard":
        return (s_w - 1 / (2 * beta)) ** 2 + (s_l + 1 / (2 * beta)) ** 2
    if kind == "aot":
        d = torch.sort(pc - pr).values - torch.sort(rc - rr).values
        return cdpo(beta * d)
    if kind == "aot_unpaired":
        d = torch.sort(s_w).values - torch.sort(s_l).values
        return cdpo(beta * d)
    if kind == "apo_zero":
        return (1 - _sig(beta * s_w)) + _sig(beta * s_l)
    if kind == "apo_down":
        return _sig(beta * s_w) + (1 - _sig(x))
    if kind == "discopop":
        m = _sig(x / tau)
        return (1 - m) * (-_logsig(x)) + m * torch.exp(-x)
    if kind == "sigmoid_norm":
        return -_logsig(beta * h_avg)
    if kind == "sft":
        return nll
    if kind == "simpo":
        return cdpo(beta * (a_w - a_l) - gamma)
    if kind == "orpo":
        log_odds = (a_w - a_l) - (torch.log(1 - torch.exp(a_w)) - torch.log(1 - torch.exp(a_l)))
        return nll - lam * _logsig(log_odds)
    if kind == "cpo":
        return cdpo(beta * (pc - pr)) + alpha * nll
    if kind == "unlikelihood":  # -log p(y_w)/|y_w| - alpha log(1 - p_bar(y_l)), naive form
        return nll - ul_alpha * torch.log(1 - torch.exp(a_l))
    raise KeyError(kind)


def make_inputs(seed=0, batch=B):
    """float32 [B] inputs: beta*h ~ O(1); averaged log-probs both above and below -ln 2."""
    g = torch.Generator().manual_seed(seed)
    pc = -(2 + 78 * torch.rand(batch, generator=g))
    pr = -(2 + 78 * torch.rand(batch, generator=g))
    rc = pc + 8 * torch.randn(batch, generator=g)
    rr = pr + 8 * torch.randn(batch, generator=g)
    lc = torch.randint(3, 60, (batch,), generator=g)
    lr = torch.randint(3, 60, (batch,), generator=g)
    nll = 0.2 + 3 * torch.rand(batch, generator=g)
    return pc, pr, rc, rr, lc, lr, nll


def _grad_or_zero(t):
    return t.grad if t.grad is not None else torch.zeros_like(t)


def oracle(kind_or_list, inputs, *, beta, eps, weights=None, dtype=torch.float64, **kw):
    """(loss, losses, grads dict) of the oracle in ``dtype`` (autograd on the oracle)."""
    pc, pr, rc, rr, lc, lr, nll = (t.detach().to(dtype) for t in inputs)
    pc.requires_grad_()
    pr.requires_grad_()
    nll.requires_grad_()
    kinds = [kind_or_list] if isinstance(kind_or_list, str) else list(kind_or_list)
    weights = weights or [1.0] * len(kinds)
    losses = sum(w * oracle_terms(k, pc, pr, rc, rr, lc, lr, nll, beta=beta, eps=eps, **kw)
                 for k, w in zip(kinds, weights))
    loss = losses.mean()
    loss.backward()
    grads = {k: _grad_or_zero(t) for k, t in (("pc", pc), ("pr", pr), ("nll", nll))}
    return loss.detach(), losses.detach(), grads


def run_impl(kind_or_list, inputs, *, beta, eps, **kw):
    pc, pr, rc, rr, lc, lr, nll = (t.clone() for t in inputs)
    pc.requires_grad_()
    pr.requires_grad_()
    nll.requires_grad_()
    out = preference_loss(pc, pr, rc, rr, loss_type=kind_or_list, beta=beta,
                          label_smoothing=eps, chosen_lengths=lc, rejected_lengths=lr,
                          chosen_nll=nll, **kw)
    out.loss.backward()
    grads = {k: _grad_or_zero(t) for k, t in (("pc", pc), ("pr", pr), ("nll", nll))}
    return out, grads


def assert_close_to_truth(name, got, same, truth):
    """|impl - truth| <= |fp32 oracle - truth| + TOL * max(1, |truth|) (STYLE.md's rule)."""
    got, same = got.detach().double(), same.double()
    err = (got - truth).abs().max().item()
    budget = (same - truth).abs().max().item() + TOL * max(1.0, truth.abs().max().item())
    assert err <= budget, f"{name}: max err {err:.3e} > budget {budget:.3e}"


# ------------------------------------------------------------------- every type vs oracle


@pytest.mark.parametrize("eps", [0.0, 0.2])
@pytest.mark.parametrize("kind", LOSS_TYPES)
def test_every_type_matches_float64_oracle(kind, eps):
    inputs = make_inputs(seed=LOSS_TYPES.index(kind))
    beta = 0.1
    truth = oracle(kind, inputs, beta=beta, eps=eps)
    same = oracle(kind, inputs, beta=beta, eps=eps, dtype=torch.float32)
    out, grads = run_impl(kind, inputs, beta=beta, eps=eps)
    assert out.loss.dtype == torch.float32 and out.losses.shape == (B,)
    assert_close_to_truth(f"{kind}/loss", out.loss, same[0], truth[0])
    assert_close_to_truth(f"{kind}/losses", out.losses, same[1], truth[1])
    for k in ("pc", "pr", "nll"):
        assert_close_to_truth(f"{kind}/d_{k}", grads[k], same[2][k], truth[2][k])
    assert len(out.terms) == 1
    torch.testing.assert_close(out.terms[0], out.losses)


@pytest.mark.parametrize("beta", [0.05, 0.5, 2.0])
@pytest.mark.parametrize("kind", ["sigmoid", "ipo", "discopop", "simpo", "orpo", "sppo_hard",
                                  "unlikelihood"])
def test_other_betas_and_type_params(kind, beta):
    inputs = make_inputs(seed=11)
    kw = dict(simpo_gamma=1.3, discopop_tau=0.2, orpo_lambda=0.7, cpo_alpha=0.3,
              unlikelihood_alpha=0.35)
    okw = dict(gamma=1.3, tau=0.2, lam=0.7, alpha=0.3, ul_alpha=0.35)
    truth = oracle(kind, inputs, beta=beta, eps=0.0, **okw)
    same = oracle(kind, inputs, beta=beta, eps=0.0, dtype=torch.float32, **okw)
    out, grads = run_impl(kind, inputs, beta=beta, eps=0.0, **kw)
    assert_close_to_truth(f"{kind}/losses", out.losses, same[1], truth[1])
    for k in ("pc", "pr", "nll"):
        assert_close_to_truth(f"{kind}/d_{k}", grads[k], same[2][k], truth[2][k])


def test_cpo_alpha_zero_needs_no_nll():
    pc, pr, rc, rr, lc, lr, nll = make_inputs(seed=3)
    out = preference_loss(pc, pr, loss_type="cpo", cpo_alpha=0.0)
    truth = oracle_terms("cpo", *(t.double() for t in (pc, pr, rc, rr, lc, lr, nll)),
                         beta=0.1, eps=0.0, alpha=0.0)
    torch.testing.assert_close(out.losses.double(), truth, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- known answers


INIT_ANSWERS = {
    "sigmoid": math.log(2), "robust": math.log(2), "aot": math.log(2), "hinge": 1.0,
    "ipo": 25.0, "nca_pair": 2 * math.log(2), "bco_pair": 2 * math.log(2), "sppo_hard": 50.0,
    "apo_zero": 1.0, "apo_down": 1.0, "discopop": 0.846574, "exo_pair": 2.761231,
}


@pytest.mark.parametrize("kind,expected", sorted(INIT_ANSWERS.items()))
def test_known_answers_at_init(kind, expected):
    logps = torch.tensor([-5.0, -17.25, -40.5])
    lengths = torch.tensor([3, 9, 20])
    eps_list = [0.0, 0.1, 0.3] if kind in ("robust",) else [0.0]
    for eps in eps_list:
        out = preference_loss(logps, logps + 1, logps, logps + 1, loss_type=kind, beta=0.1,
                              label_smoothing=eps, chosen_lengths=lengths,
                              rejected_lengths=lengths + 2)
        assert out.losses == pytest.approx([expected] * 3, rel=1e-6, abs=1e-6), (kind, eps)
        assert out.loss.item() == pytest.approx(expected, rel=1e-6, abs=1e-6)


def test_cdpo_at_init_is_ln2():
    z = torch.tensor([-3.0])
    for eps in (0.1, 0.25, 0.45):
        out = preference_loss(z, z, z, z, label_smoothing=eps)
        assert out.loss.item() == pytest.approx(math.log(2), rel=1e-6)


def test_known_answer_sigmoid_off_init():
    pc = torch.tensor([-12.0], requires_grad=True)
    pr = torch.tensor([-10.0], requires_grad=True)
    rc = rr = torch.tensor([-11.0])
    out = preference_loss(pc, pr, rc, rr, beta=0.1)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(0.798139, abs=1e-6)
    assert pc.grad.item() == pytest.approx(-0.054983, abs=1e-6)
    assert pr.grad.item() == pytest.approx(0.054983, abs=1e-6)
    loss, d_pc, d_pr = dpo_sigmoid_coefficients(pc, pr, rc, rr, beta=0.1)
    assert loss.item() == pytest.approx(0.798139, abs=1e-6)
    assert d_pc.item() == pytest.approx(-0.054983, abs=1e-6)
    assert d_pr.item() == pytest.approx(0.054983, abs=1e-6)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_gradient_at_init_is_half_beta(beta):
    pc = torch.tensor([-7.5], requires_grad=True)
    pr = torch.tensor([-9.0], requires_grad=True)
    out = preference_loss(pc, pr, pc.detach(), pr.detach(), beta=beta)
    out.loss.backward()
    assert pc.grad.item() == pytest.approx(-beta / 2, rel=1e-6)
    assert pr.grad.item() == pytest.approx(beta / 2, rel=1e-6)


# ------------------------------------------------------------------- closed-form coefficients


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.35])
@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_dpo_sigmoid_coefficients_match_autograd(beta, eps):
    pc, pr, rc, rr, *_ = make_inputs(seed=5, batch=9)
    pc[0] = rc[0] + 400.0  # saturated pairs, both signs
    pr[1] = rr[1] + 400.0
    loss, d_pc, d_pr = dpo_sigmoid_coefficients(pc, pr, rc, rr, beta=beta, label_smoothing=eps)
    assert loss.shape == d_pc.shape == d_pr.shape == (9,)
    assert not loss.requires_grad
    p64, r64 = pc.double().requires_grad_(), pr.double().requires_grad_()
    truth = oracle_terms("sigmoid", p64, r64, rc.double(), rr.double(), 1, 1, 0, beta=beta,
                         eps=eps)
    truth.sum().backward()
    # the naive oracle's gradient underflows at saturation: pairs 0, 1 are checked by the limits
    # dL/dpc -> beta*eps (x -> +inf) and -beta*(1-eps) (x -> -inf)
    torch.testing.assert_close(loss.double()[2:], truth.detach()[2:], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(d_pc.double()[2:], p64.grad[2:], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(d_pr.double()[2:], r64.grad[2:], rtol=1e-5, atol=1e-7)
    assert d_pc[0].item() == pytest.approx(beta * eps, abs=1e-7)
    assert d_pc[1].item() == pytest.approx(-beta * (1 - eps), rel=1e-6)
    assert loss[1].item() == pytest.approx((1 - eps) * -beta * ((pc - rc) - (pr - rr))[1].item(),
                                           rel=1e-4)
    # and matches autograd through preference_loss (per pair = B * grad of the mean)
    q, s = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    out = preference_loss(q, s, rc, rr, beta=beta, label_smoothing=eps)
    out.loss.backward()
    torch.testing.assert_close(loss, out.losses.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(d_pc, q.grad * 9, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(d_pr, s.grad * 9, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- combinations


def test_combination_sigmoid_sft_is_weighted_sum():
    inputs = make_inputs(seed=21)
    w = [0.7, 2.5]
    out, grads = run_impl(["sigmoid", "sft"], inputs, beta=0.1, eps=0.0, loss_weights=w)
    parts = [run_impl(k, inputs, beta=0.1, eps=0.0) for k in ("sigmoid", "sft")]
    torch.testing.assert_close(out.losses, w[0] * parts[0][0].losses + w[1] * parts[1][0].losses)
    torch.testing.assert_close(out.loss, w[0] * parts[0][0].loss + w[1] * parts[1][0].loss)
    for k in ("pc", "pr", "nll"):
        torch.testing.assert_close(grads[k], w[0] * parts[0][1][k] + w[1] * parts[1][1][k])
    assert len(out.terms) == 2
    torch.testing.assert_close(out.terms[1], parts[1][0].losses)
    truth = oracle(["sigmoid", "sft"], inputs, beta=0.1, eps=0.0, weights=w)
    same = oracle(["sigmoid", "sft"], inputs, beta=0.1, eps=0.0, weights=w, dtype=torch.float32)
    assert_close_to_truth("combo/loss", out.loss, same[0], truth[0])


def test_mpo_triple_matches_oracle():
    inputs = make_inputs(seed=22)
    kinds, w = ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]
    truth = oracle(kinds, inputs, beta=0.1, eps=0.0, weights=w)
    same = oracle(kinds, inputs, beta=0.1, eps=0.0, weights=w, dtype=torch.float32)
    out, grads = run_impl(kinds, inputs, beta=0.1, eps=0.0, loss_weights=w)
    assert_close_to_truth("mpo/losses", out.losses, same[1], truth[1])
    for k in ("pc", "pr", "nll"):
        assert_close_to_truth(f"mpo/d_{k}", grads[k], same[2][k], truth[2][k])


def test_chosen_nll_derived_from_lengths():
    pc, pr, rc, rr, lc, lr, _ = make_inputs(seed=4)
    out = preference_loss(pc, pr, loss_type="sft", chosen_lengths=lc)
    torch.testing.assert_close(out.losses, -pc / lc.float())
    explicit = preference_loss(pc, pr, loss_type="orpo", chosen_lengths=lc, rejected_lengths=lr,
                               chosen_nll=-pc / lc.float())
    derived = preference_loss(pc, pr, loss_type="orpo", chosen_lengths=lc, rejected_lengths=lr)
    torch.testing.assert_close(explicit.losses, derived.losses)


# ---------------------------------------------------------------- rewards and output fields


def test_rewards_margins_accuracies():
    pc, pr, rc, rr, lc, lr, nll = make_inputs(seed=8)
    pc.requires_grad_()
    out = preference_loss(pc, pr, rc, rr, beta=0.3)
    cr, rj = 0.3 * (pc.detach() - rc), 0.3 * (pr - rr)
    torch.testing.assert_close(out.chosen_rewards, cr)
    torch.testing.assert_close(out.rejected_rewards, rj)
    torch.testing.assert_close(out.margins, cr - rj)
    assert torch.equal(out.accuracies, (cr > rj).float())
    assert out.accuracy.item() == pytest.approx((cr > rj).float().mean().item())
    assert 0 < out.accuracies.sum() < B  # the inputs exercise both outcomes
    for t in (out.chosen_rewards, out.rejected_rewards, out.margins, out.accuracies):
        assert not t.requires_grad and t.shape == (B,)
    tie = torch.tensor([-3.0])
    assert preference_loss(tie, tie, tie, tie).accuracies.item() == 0.0  # ties are not wins


def test_reference_free_rewards():
    pc, pr, rc, rr, lc, lr, nll = make_inputs(seed=9)
    out = preference_loss(pc, pr, loss_type="cpo", beta=0.2, chosen_nll=nll)
    torch.testing.assert_close(out.chosen_rewards, 0.2 * pc)
    out = preference_loss(pc, pr, loss_type="simpo", beta=2.0, chosen_lengths=lc,
                          rejected_lengths=lr)
    torch.testing.assert_close(out.chosen_rewards, 2.0 * pc / lc)
    torch.testing.assert_close(out.rejected_rewards, 2.0 * pr / lr)
    # any reference-based type present: the DPO implicit reward
    out = preference_loss(pc, pr, rc, rr, loss_type=["sigmoid", "cpo"], chosen_nll=nll)
    torch.testing.assert_close(out.chosen_rewards, 0.1 * (pc - rc))


def test_dtypes():
    pc, pr, rc, rr, *_ = make_inputs(seed=10)
    out64 = preference_loss(pc.double(), pr.double(), rc.double(), rr.double())
    assert out64.loss.dtype == torch.float64
    out16 = preference_loss(pc.bfloat16(), pr.bfloat16(), rc.bfloat16(), rr.bfloat16())
    assert out16.loss.dtype == torch.float32


# ------------------------------------------------------------------------------ stability


def test_orpo_stable_near_zero_logps():
    # averaged log-probs of -1e-9 and -50: the naive log(1 - exp(a)) would be -inf / nan grads
    pc = torch.tensor([-1e-8, -500.0, -0.5], requires_grad=True)
    pr = torch.tensor([-500.0, -1e-8, -0.8], requires_grad=True)
    lens = torch.tensor([10, 10, 1])
    out = preference_loss(pc, pr, loss_type="orpo", chosen_lengths=lens, rejected_lengths=lens)
    out.loss.backward()
    assert torch.isfinite(out.losses).all()
    assert torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()
    a_w, a_l = torch.tensor(-0.5, dtype=torch.float64), torch.tensor(-0.8, dtype=torch.float64)
    lo = (a_w - a_l) - (torch.log(1 - torch.exp(a_w)) - torch.log(1 - torch.exp(a_l)))
    expected = 0.5 - 0.1 * math.log(1 / (1 + math.exp(-lo.item())))
    assert out.losses[2].item() == pytest.approx(expected, rel=1e-6)


def test_large_margins_stay_finite():
    pc = torch.tensor([-1.0, -1.0e4], requires_grad=True)
    pr = torch.tensor([-1.0e4, -1.0], requires_grad=True)
    z = torch.tensor([-50.0, -50.0])
    for kind in LOSS_TYPES:
        if kind in ("sft", "simpo", "orpo", "cpo", "ipo", "sigmoid_norm", "unlikelihood"):
            continue
        out = preference_loss(pc, pr, z, z, loss_type=kind, label_smoothing=0.1)
        g = torch.autograd.grad(out.loss, (pc, pr))
        assert torch.isfinite(out.losses).all(), kind
        assert all(torch.isfinite(t).all() for t in g), kind


# ---------------------------------------------------------------------------- validation


def _ok():
    return dict(zip(("pc", "pr", "rc", "rr", "lc", "lr", "nll"), make_inputs(seed=1)))


def _call(v, **kw):
    args = dict(chosen_lengths=v["lc"], rejected_lengths=v["lr"], chosen_nll=v["nll"])
    args.update(kw)
    return preference_loss(v["pc"], v["pr"], v["rc"], v["rr"], **args)


BAD_KW = [
    (dict(loss_type="dpo"), "loss_type"),
    (dict(loss_type=["sigmoid", "kto"]), "loss_type"),
    (dict(loss_type=[]), "loss_type"),
    (dict(loss_type=None), "loss_type"),
    (dict(beta=0.0), "beta"),
    (dict(beta=-0.1), "beta"),
    (dict(beta=float("nan")), "beta"),
    (dict(beta=float("inf")), "beta"),
    (dict(beta=True), "beta"),
    (dict(label_smoothing=-0.01), "label_smoothing"),
    (dict(label_smoothing=0.5), "label_smoothing"),
    (dict(label_smoothing=float("nan")), "label_smoothing"),
    (dict(loss_type="robust", label_smoothing=0.6), "label_smoothing"),
    (dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0]), "loss_weights"),
    (dict(loss_type="sigmoid", loss_weights=[1.0, 2.0]), "loss_weights"),
    (dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, float("nan")]), "loss_weights"),
    (dict(loss_type="sigmoid", loss_weights=1.0), "loss_weights"),
    (dict(loss_type="discopop", discopop_tau=0.0), "discopop_tau"),
    (dict(loss_type="simpo", simpo_gamma=float("inf")), "simpo_gamma"),
    (dict(loss_type="orpo", orpo_lambda=-1.0), "orpo_lambda"),
    (dict(loss_type="cpo", cpo_alpha=-1.0), "cpo_alpha"),
    (dict(loss_type="unlikelihood", unlikelihood_alpha=-0.5), "unlikelihood_alpha"),
]


@pytest.mark.parametrize("kw,name", BAD_KW)
def test_bad_options_raise(kw, name):
    with pytest.raises(ValueError, match=name):
        _call(_ok(), **kw)


@pytest.mark.parametrize("kind", [k for k in LOSS_TYPES if k not in ("simpo", "orpo", "cpo",
                                                                       "sft", "unlikelihood")])
def test_reference_types_need_reference(kind):
    v = _ok()
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        preference_loss(v["pc"], v["pr"], loss_type=kind, chosen_lengths=v["lc"],
                        rejected_lengths=v["lr"])
    with pytest.raises(ValueError, match="ref_rejected_logps"):
        preference_loss(v["pc"], v["pr"], v["rc"], None, loss_type=kind)
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        preference_loss(v["pc"], v["pr"], None, v["rr"], loss_type=kind)


@pytest.mark.parametrize("kind", ["simpo", "orpo", "cpo", "sft", "unlikelihood"])
def test_reference_free_types_run_without_reference(kind):
    v = _ok()
    out = preference_loss(v["pc"], v["pr"], loss_type=kind, chosen_lengths=v["lc"],
                          rejected_lengths=v["lr"], chosen_nll=v["nll"])
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("kind", ["ipo", "sigmoid_norm", "simpo", "orpo", "unlikelihood"])
def test_averaging_types_need_lengths(kind):
    v = _ok()
    with pytest.raises(ValueError, match="chosen_lengths"):
        _call(v, loss_type=kind, chosen_lengths=None)
    with pytest.raises(ValueError, match="rejected_lengths"):
        _call(v, loss_type=kind, rejected_lengths=None)
    for bad in (0, -3):
        lc = v["lc"].clone()
        lc[2] = bad
        with pytest.raises(ValueError, match="chosen_lengths"):
            _call(v, loss_type=kind, chosen_lengths=lc)
    with pytest.raises(ValueError, match="rejected_lengths"):
        _call(v, loss_type=kind, rejected_lengths=v["lr"].float() * 0)
    with pytest.raises(ValueError, match="chosen_lengths"):
        _call(v, loss_type=kind, chosen_lengths=v["lc"] > 0)  # bool is not a count
    with pytest.raises(ValueError, match="rejected_lengths"):
        _call(v, loss_type=kind, rejected_lengths=v["lr"][:-1])


@pytest.mark.parametrize("kind", ["sft", "orpo", "cpo"])
def test_nll_types_need_chosen_nll(kind):
    v = _ok()
    with pytest.raises(ValueError, match="chosen_nll"):
        preference_loss(v["pc"], v["pr"], v["rc"], v["rr"], loss_type=kind,
                        rejected_lengths=v["lr"])
    with pytest.raises(ValueError, match="chosen_nll"):
        _call(v, loss_type=kind, chosen_nll=v["nll"][:3])
    with pytest.raises(ValueError, match="chosen_nll"):
        _call(v, loss_type=kind, chosen_nll=torch.ones(B, dtype=torch.long))


def test_unlikelihood_known_answer_and_gradient():
    # pr = -2 over 4 tokens: a_l = -0.5, p_bar = e^-0.5; nll = 1.25, alpha = 0.5.
    pc = torch.tensor([-5.0], dtype=torch.float64, requires_grad=True)
    pr = torch.tensor([-2.0], dtype=torch.float64, requires_grad=True)
    n = torch.tensor([4.0], dtype=torch.float64)
    out = preference_loss(pc, pr, loss_type="unlikelihood", unlikelihood_alpha=0.5,
                          chosen_lengths=n, rejected_lengths=n)
    p = math.exp(-0.5)
    assert out.loss.item() == pytest.approx(1.25 - 0.5 * math.log(1 - p), rel=1e-12)
    gc, gr = torch.autograd.grad(out.loss, (pc, pr))
    assert gc.item() == pytest.approx(-0.25, rel=1e-12)  # d(-pc/4)/dpc
    assert gr.item() == pytest.approx(0.5 * p / (1 - p) / 4, rel=1e-12)  # pushes y_l down
    # alpha = 0 is Preferred-FT's / SFT's loss exactly.
    sft = preference_loss(pc, pr, loss_type="sft", chosen_lengths=n, rejected_lengths=n)
    zero = preference_loss(pc, pr, loss_type="unlikelihood", unlikelihood_alpha=0.0,
                           chosen_lengths=n, rejected_lengths=n)
    assert zero.loss.item() == sft.loss.item()


def test_unlikelihood_needs_negative_rejected_logps():
    v = _ok()
    pr = v["pr"].clone()
    pr[1] = 0.0
    with pytest.raises(ValueError, match="policy_rejected_logps"):
        preference_loss(v["pc"], pr, loss_type="unlikelihood", chosen_lengths=v["lc"],
                        rejected_lengths=v["lr"])


def test_orpo_needs_negative_logps():
    v = _ok()
    pc = v["pc"].clone()
    pc[0] = 0.0
    with pytest.raises(ValueError, match="policy_chosen_logps"):
        preference_loss(pc, v["pr"], loss_type="orpo", chosen_lengths=v["lc"],
                        rejected_lengths=v["lr"])


@pytest.mark.parametrize("name", ["pc", "pr", "rc", "rr"])
def test_bad_tensors_raise(name):
    arg = {"pc": "policy_chosen_logps", "pr": "policy_rejected_logps",
           "rc": "ref_chosen_logps", "rr": "ref_rejected_logps"}[name]
    bads = [
        lambda t: t[:-1] if name != "pc" else t[:-1].unsqueeze(0),  # wrong B (pc: 2-D)
        lambda t: t.unsqueeze(1),  # [B, 1]
        lambda t: t.long(),  # integer
        lambda t: t.bool(),
        lambda t: t.tolist(),  # not a tensor
        lambda t: torch.empty(t.shape, device="meta"),  # other device
    ]
    if name == "pc":
        bads[-1] = lambda t: t[:0]  # (pc defines the device) empty batch
    for i, bad in enumerate(bads):
        v = _ok()
        v[name] = bad(v[name])
        with pytest.raises(ValueError, match=arg):
            _call(v)
        if name in ("pc", "pr") and i < 5:
            with pytest.raises(ValueError, match=arg):
                w = _ok()
                w[name] = bad(w[name])
                dpo_sigmoid_coefficients(w["pc"], w["pr"], w["rc"], w["rr"])


def test_dpo_sigmoid_coefficients_validation():
    v = _ok()
    with pytest.raises(ValueError, match="beta"):
        dpo_sigmoid_coefficients(v["pc"], v["pr"], v["rc"], v["rr"], beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_sigmoid_coefficients(v["pc"], v["pr"], v["rc"], v["rr"], label_smoothing=0.5)
    with pytest.raises(ValueError, match="ref_rejected_logps"):
        dpo_sigmoid_coefficients(v["pc"], v["pr"], v["rc"], v["rr"][:2])
