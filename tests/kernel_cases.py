"""Cases and checks shared by the kernel tests (test_linear_logprobs, test_dpo_loss,
test_triton_backend) and their compiled-GPU twin test_gpu.

- ``make_case`` / ``run_and_check`` / ``SHAPES``: one ``linear_logprobs`` call against the
  float64 oracle (``tests/oracle.py``), outputs and grads.
- ``packed_batch`` / ``unfused`` / ``check_fused_loss`` / ``assert_rule``: a packed batch of
  2B sequences and ``fused_preference_loss`` against the unfused float64 reference.
- ``seq_case`` / ``both_paths``: the Triton backward's per-sequence gradient gather against
  its [N]-gradient path. ``dpo_f64``: the DPO sigmoid loss one pair at a time in float64.
"""

from __future__ import annotations

import math

import torch

import dpo_fast
from oracle import TOL, assert_close_to_truth, naive_logits, naive_logprobs


def make_case(n_shape, d, v, dtype, *, bias=False, scale=1.0, ignore_frac=0.25, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*n_shape, d, generator=g) * scale
    weight = torch.randn(v, d, generator=g) / d**0.5 * 2.0
    b = torch.randn(v, generator=g) if bias else None
    targets = torch.randint(0, v, n_shape, generator=g)
    drop = torch.rand(n_shape, generator=g) < ignore_frac
    targets[drop] = -100
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return cast(hidden), cast(weight), cast(b), targets


def run_and_check(impl, hidden, weight, bias, targets, dtype, *, softcap=None, temperature=1.0,
                  extras=True, check_grads=True, device="cpu"):
    """Runs ``impl`` on ``device`` and checks outputs and grads against the float64 oracle
    (computed on the same device; inputs are generated on the CPU so every device sees the
    same numbers)."""
    g = torch.Generator().manual_seed(1)
    ups = {"logp": torch.randn(targets.shape, generator=g)}
    if extras:
        ups["lse"] = torch.randn(targets.shape, generator=g) * 0.5
        ups["entropy"] = torch.randn(targets.shape, generator=g) * 0.5
    if device != "cpu":
        hidden, weight, targets = hidden.to(device), weight.to(device), targets.to(device)
        bias = bias.to(device) if bias is not None else None
        ups = {k: u.to(device) for k, u in ups.items()}
    kw = dict(softcap=softcap, temperature=temperature)
    truth = naive_logprobs(hidden, weight, targets, bias, grads=ups if check_grads else None, **kw)
    same = naive_logprobs(hidden, weight, targets, bias, dtype=dtype,
                          grads=ups if check_grads else None, **kw)

    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    b = bias.clone().requires_grad_() if bias is not None else None
    out = dpo_fast.linear_logprobs(h, w, targets, bias=b, return_lse=extras,
                                   return_entropy=extras, impl=impl, **kw)
    got = {"logp": out.logp, "lse": out.lse, "entropy": out.entropy} if extras else {"logp": out}
    for k in got:
        assert got[k].dtype == torch.float32 and got[k].shape == targets.shape
        assert_close_to_truth(f"{impl}/{k}", got[k].detach(), same[k], truth[k], dtype)
    ignored = targets == -100
    for k in got:
        assert (got[k].detach()[ignored] == 0).all(), f"{k} must be 0.0 at ignored positions"
    if not check_grads:
        return
    loss = sum((got[k] * ups[k]).sum() for k in got)
    loss.backward()
    assert h.grad.dtype == dtype and w.grad.dtype == dtype
    assert_close_to_truth(f"{impl}/d_hidden", h.grad, same["d_hidden"], truth["d_hidden"], dtype)
    assert_close_to_truth(f"{impl}/d_weight", w.grad, same["d_weight"], truth["d_weight"], dtype)
    if b is not None:
        assert_close_to_truth(f"{impl}/d_bias", b.grad, same["d_bias"], truth["d_bias"], dtype)


SHAPES = [  # (leading dims, D, V)
    ((1,), 63, 1),
    ((77,), 96, 3),
    ((77,), 63, 1003),
    ((1000,), 576, 1003),
    ((4, 19), 96, 1003),  # [B, T] leading dims
    ((77,), 63, 49152),
]


def packed_batch(b, d, v, *, prompt_lens, resp_lens, seed=0, dtype=torch.float32, bias=False,
                 scale=1.0):
    """2B sequences packed back to back; prompt positions ignored; returns dict of tensors."""
    g = torch.Generator().manual_seed(seed)
    seq, tgt = [], []
    for s in range(2 * b):
        p, r = prompt_lens[s], resp_lens[s]
        seq += [s] * (p + r)
        tgt += [-100] * p + torch.randint(0, v, (r,), generator=g).tolist()
    n = len(seq)
    return dict(
        hidden=(torch.randn(n, d, generator=g) * scale).to(dtype),
        weight=(torch.randn(v, d, generator=g) / d**0.5 * 2).to(dtype),
        bias=torch.randn(v, generator=g).to(dtype) if bias else None,
        targets=torch.tensor(tgt),
        seq_index=torch.tensor(seq),
        ref_logps=-torch.rand(2 * b, generator=g) * 20 - 5,
    )


def unfused(batch, dtype, *, loss_type="sigmoid", beta=0.1, softcap=None, temperature=1.0,
            **kw):
    """The reference: every step materialized, computed in ``dtype``; returns loss, grads, stats."""
    h = batch["hidden"].detach().to(dtype).requires_grad_()
    w = batch["weight"].detach().to(dtype).requires_grad_()
    bias = batch["bias"]
    bb = bias.detach().to(dtype).requires_grad_() if bias is not None else None
    t, s = batch["targets"], batch["seq_index"]
    z = naive_logits(h, w, bb, softcap=softcap, temperature=temperature)
    logsm = torch.log_softmax(z, dim=-1)
    valid = t != -100
    tok = logsm.gather(1, t.clamp(min=0)[:, None])[:, 0] * valid
    n_seq = batch["ref_logps"].numel()
    b = n_seq // 2
    seq_logps = torch.stack([tok[(s == i) & valid].sum() for i in range(n_seq)])
    lens = torch.stack([((s == i) & valid).sum() for i in range(n_seq)])
    ref = batch["ref_logps"].to(dtype)
    out = dpo_fast.preference_loss(seq_logps[:b], seq_logps[b:], ref[:b], ref[b:],
                                   loss_type=loss_type, beta=beta, chosen_lengths=lens[:b],
                                   rejected_lengths=lens[b:], **kw)
    out.loss.backward()
    ent = -(logsm.exp() * logsm).sum(-1)
    top2 = z.detach().topk(min(2, z.shape[1]), dim=1).values
    gap = top2[:, 0] - top2[:, 1] if z.shape[1] > 1 else torch.full_like(top2[:, 0], math.inf)
    hit = (z.detach().argmax(1) == t) & valid
    return dict(loss=out.loss.detach(), d_hidden=h.grad, d_weight=w.grad,
                d_bias=bb.grad if bb is not None else None, policy_logps=seq_logps.detach(),
                lengths=lens, rewards=(out.chosen_rewards, out.rejected_rewards), ent=ent.detach(),
                hit=hit, gap=gap, valid=valid, b=b)


def assert_rule(name, got, same, truth, dtype):
    err = (got.double() - truth.double()).abs().max().item()
    ref = (same.double() - truth.double()).abs().max().item()
    assert err <= ref + TOL[dtype], f"{name}: err {err:.3g} > same-dtype {ref:.3g} + {TOL[dtype]}"


def check_fused_loss(batch, impl, dtype=torch.float32, max_scratch_bytes=None, device="cpu",
                     **kw):
    if device != "cpu":
        batch = {k: (t.to(device) if t is not None else None) for k, t in batch.items()}
    truth = unfused(batch, torch.float64, **kw)
    same = unfused(batch, dtype, **kw)
    if max_scratch_bytes is not None:
        kw["max_scratch_bytes"] = max_scratch_bytes
    if impl == "cpu-flat":
        impl, kw["max_scratch_bytes"] = "cpu", None
    h = batch["hidden"].clone().requires_grad_()
    w = batch["weight"].clone().requires_grad_()
    bias = batch["bias"].clone().requires_grad_() if batch["bias"] is not None else None
    out = dpo_fast.fused_preference_loss(h, w, batch["targets"], batch["seq_index"],
                                         batch["ref_logps"], bias=bias, impl=impl, **kw)
    out.loss.backward()
    assert_rule("loss", out.loss.detach(), same["loss"], truth["loss"], dtype)
    assert_rule("policy_logps", out.policy_logps, same["policy_logps"], truth["policy_logps"],
                 dtype)
    assert_rule("chosen_rewards", out.chosen_rewards, same["rewards"][0], truth["rewards"][0],
                 dtype)
    assert torch.equal(out.lengths, truth["lengths"])
    assert_rule("d_hidden", h.grad, same["d_hidden"], truth["d_hidden"], dtype)
    assert_rule("d_weight", w.grad, same["d_weight"], truth["d_weight"], dtype)
    if bias is not None:
        assert_rule("d_bias", bias.grad, same["d_bias"], truth["d_bias"], dtype)
    # Metrics from the same pass: entropy means and target-is-argmax accuracy.
    b = truth["b"]
    seq = batch["seq_index"]
    for part, m in (("chosen", truth["valid"] & (seq < b)), ("rejected", truth["valid"] & (seq >= b))):
        ent_truth = truth["ent"][m].mean()
        ent_same = same["ent"][m].mean()
        assert_rule(f"{part}_entropy", getattr(out, f"{part}_entropy"), ent_same, ent_truth,
                     dtype)
        # Near-ties (top-2 logits within 1e-4) may round either way in low precision.
        ties = (truth["gap"][m] < 1e-4).sum().item()
        acc_truth = truth["hit"][m].double().mean().item()
        acc = getattr(out, f"{part}_token_accuracy").item()
        assert abs(acc - acc_truth) <= ties / m.sum().item() + 1e-6, (part, acc, acc_truth)  # fp32 mean
    return out


def seq_case(lengths, d=40, v=301, dtype=torch.float32, seed=1):
    """Packed sequences of the given lengths; every 5th position ignored with seq id -1."""
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    h = torch.randn(n, d, generator=g).to(dtype)
    w = (torch.randn(v, d, generator=g) / d**0.5 * 2).to(dtype)
    b = torch.randn(v, generator=g).to(dtype)
    t = torch.randint(0, v, (n,), generator=g)
    seq_index = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    t[::5] = -100
    seq_index[::5] = -1
    # Nonzero per-sequence grads (so the [N] path skips no valid row: bitwise comparable).
    seq_grad = (torch.rand(len(lengths), generator=g) + 0.1) * torch.tensor(
        [(-1.0) ** i for i in range(len(lengths))])
    return h, w, b, t, seq_index, seq_grad


def both_paths(h, w, b, t, seq_index, seq_grad, softcap, grad_entropy=None):
    from dpo_fast.kernels import logprobs_triton as lt  # here: the other cases need no triton

    opts = dict(ignore_index=-100, softcap=softcap, inv_temperature=1.0 / 0.7)
    _, row_max, ent, log_sum, _ = lt.logprobs_forward(h, w, b, t, with_entropy=True, **opts)
    valid = t != -100
    # The [N]-grad reference: seq_grad[seq_index] * valid (ids of ignored rows masked out).
    g_n = seq_grad[seq_index.clamp(0, seq_grad.numel() - 1)] * valid
    ref = lt.logprobs_backward(h, w, b, t, row_max, log_sum, ent, g_n, None, grad_entropy,
                               **opts)
    got = lt.logprobs_backward(h, w, b, t, row_max, log_sum, ent, None, None, grad_entropy,
                               seq_index=seq_index, seq_grad=seq_grad, **opts)
    return ref, got


def dpo_f64(p, r, beta, eps):
    """Float64 reference, one pair at a time with math's log1p/exp (no torch kernels)."""
    b = p.shape[0] // 2
    out = [[] for _ in range(5)]
    for j in range(b):
        pc, pr, rc, rr = (float(p[j]), float(p[b + j]), float(r[j]), float(r[b + j]))
        x = beta * ((pc - rc) - (pr - rr))

        def logsig(y):
            return min(y, 0.0) - math.log1p(math.exp(-abs(y)))

        def sig(y):
            return 1.0 / (1.0 + math.exp(-y)) if y >= 0 else math.exp(y) / (1.0 + math.exp(y))

        g = beta * (eps * sig(x) - (1 - eps) * sig(-x))
        vals = (-(1 - eps) * logsig(x) - eps * logsig(-x), g, -g, beta * (pc - rc),
                beta * (pr - rr))
        for o, val in zip(out, vals):
            o.append(val)
    return [torch.tensor(o, dtype=torch.float64) for o in out]
