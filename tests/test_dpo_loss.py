"""fused_preference_loss against an unfused reference: full logits -> log_softmax -> gather ->
per-sequence sums -> preference_loss, in float64 (truth) and in the input dtype (the budget)."""

from __future__ import annotations

import math
import os

import pytest
import torch

import dpo_fast
from dpo_fast.kernels import dpo_scratch, logprobs_cpu
from dpo_fast.ops import dpo_loss as dpo_loss_mod
from kernel_cases import assert_rule, check_fused_loss, packed_batch, unfused

HAVE_CPU = logprobs_cpu.available() or os.environ.get("DPO_FAST_REQUIRE_CPU_EXT") == "1"
# "cpu" runs the C++ backend's default (the chunked scratch engine with the default budget),
# "cpu-flat" the same backend memory-flat (max_scratch_bytes=None).
IMPLS = ["torch", "triton", "triton_fused"] + (["cpu", "cpu-flat"] if HAVE_CPU else [])


def _scratch_path(out):
    """True if the loss came from the scratch engine (grads formed in the forward)."""
    return type(out.loss.grad_fn).__name__.startswith("ScratchPreferenceLoss")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", [
    dict(b=1, d=63, v=1003, prompt=[3, 5], resp=[4, 9]),
    dict(b=3, d=96, v=3, prompt=[2, 0, 7, 1, 1, 4], resp=[5, 1, 30, 2, 8, 11]),
    dict(b=4, d=96, v=1003, prompt=[10] * 8, resp=[17, 3, 40, 8, 9, 25, 1, 12]),
    dict(b=2, d=576, v=4099, prompt=[6, 20, 3, 9], resp=[50, 11, 70, 33]),
], ids=["B1", "V3-uneven", "B4", "D576"])
def test_fused_matches_unfused_packed(impl, case):
    batch = packed_batch(case["b"], case["d"], case["v"], prompt_lens=case["prompt"],
                         resp_lens=case["resp"], bias=True)
    check_fused_loss(batch, impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("opts", [
    dict(softcap=30.0), dict(temperature=0.7), dict(loss_type="ipo"),
    dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]),
    dict(loss_type="sigmoid", label_smoothing=0.1), dict(loss_type="apo_zero", beta=0.5),
    dict(loss_type="unlikelihood", unlikelihood_alpha=0.5),
], ids=["softcap", "temp", "ipo", "sigmoid+sft", "cdpo", "apo_zero", "unlikelihood"])
def test_fused_options(impl, opts):
    batch = packed_batch(2, 64, 777, prompt_lens=[4, 2, 6, 1], resp_lens=[9, 13, 5, 20],
                         bias=True, scale=2.0)
    check_fused_loss(batch, impl, **opts)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_fused_half_dtypes(impl, dtype):
    batch = packed_batch(2, 96, 1003, prompt_lens=[4, 2, 6, 1], resp_lens=[9, 13, 5, 20],
                         dtype=dtype)
    check_fused_loss(batch, impl, dtype=dtype)


@pytest.mark.parametrize("impl", ["torch", "cpu"][: 1 + ("cpu" in IMPLS)])
def test_padded_layout_equals_packed(impl):
    b, t, d, v = 2, 12, 48, 500
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2 * b, t, d, generator=g)
    weight = torch.randn(v, d, generator=g) / d**0.5
    targets = torch.randint(0, v, (2 * b, t), generator=g)
    resp = [5, 9, 2, 8]
    for r, n_resp in enumerate(resp):  # prompt first, response, then padding
        targets[r, :3] = -100
        targets[r, 3 + n_resp:] = -100
    ref = -torch.rand(2 * b, generator=g) * 10
    padded = dpo_fast.fused_preference_loss_padded(hidden, weight, targets, ref, impl=impl)
    keep = (targets != -100).reshape(-1)
    seq = torch.arange(2 * b).repeat_interleave(t)
    packed = dpo_fast.fused_preference_loss(hidden.reshape(-1, d)[keep], weight,
                                            targets.reshape(-1)[keep], seq[keep], ref, impl=impl)
    assert torch.equal(padded.lengths, torch.tensor(resp))
    torch.testing.assert_close(padded.loss, packed.loss, rtol=0, atol=1e-6)
    torch.testing.assert_close(padded.policy_logps, packed.policy_logps, rtol=0, atol=1e-5)


def test_known_answer_at_init_is_ln2():
    # Reference == policy log-probs: h = 0 and the sigmoid loss is ln 2, grads -beta/2, +beta/2.
    batch = packed_batch(3, 32, 300, prompt_lens=[2] * 6, resp_lens=[4, 7, 3, 5, 6, 2])
    first = dpo_fast.fused_preference_loss(batch["hidden"], batch["weight"], batch["targets"],
                                           batch["seq_index"], batch["ref_logps"], impl="torch")
    out = dpo_fast.fused_preference_loss(batch["hidden"], batch["weight"], batch["targets"],
                                         batch["seq_index"], first.policy_logps, impl="torch")
    assert abs(out.loss.item() - math.log(2)) < 1e-6
    assert (out.accuracies == 0).all() and (out.margins == 0).all()


def test_empty_sequence_error_or_drop():
    batch = packed_batch(3, 32, 300, prompt_lens=[2] * 6, resp_lens=[4, 0, 3, 5, 6, 2])
    args = (batch["hidden"], batch["weight"], batch["targets"], batch["seq_index"],
            batch["ref_logps"])
    with pytest.raises(ValueError, match=r"no response token \(first pairs \[1\]\)"):
        dpo_fast.fused_preference_loss(*args, impl="torch")
    out = dpo_fast.fused_preference_loss(*args, impl="torch", empty_sequences="drop")
    assert out.num_dropped == 1 and out.kept.tolist() == [True, False, True]
    assert out.losses.shape == (2,)
    # Equal to the loss over the two surviving pairs computed by hand.
    pl, ref = out.policy_logps, batch["ref_logps"]
    want = dpo_fast.preference_loss(pl[[0, 2]], pl[[3, 5]], ref[[0, 2]], ref[[3, 5]]).loss
    torch.testing.assert_close(out.loss.detach(), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("mutate,match", [
    (lambda b: b.update(seq_index=torch.where(b["targets"] != -100, 9, 0)), "seq_index must be in"),
    (lambda b: b.update(ref_logps=b["ref_logps"][:5]), "2B entries"),
    (lambda b: b.update(ref_logps=torch.cat([b["ref_logps"], b["ref_logps"]])),
     "seq_index must be in|no response token"),
    (lambda b: b["ref_logps"].__setitem__(2, float("nan")), "non-finite values at sequences"),
    (lambda b: b.update(seq_index=b["seq_index"][:-1]), "seq_index shape"),
    (lambda b: b.update(seq_index=b["seq_index"].float()), "seq_index must be an integer"),
])
def test_bad_inputs(mutate, match):
    batch = packed_batch(3, 16, 50, prompt_lens=[1] * 6, resp_lens=[2] * 6)
    mutate(batch)
    with pytest.raises(ValueError, match=match):
        dpo_fast.fused_preference_loss(batch["hidden"], batch["weight"], batch["targets"],
                                       batch["seq_index"], batch["ref_logps"], impl="torch")


def test_reference_based_type_without_reference_is_refused():
    batch = packed_batch(1, 16, 50, prompt_lens=[1, 1], resp_lens=[2, 2])
    with pytest.raises(ValueError, match="ref"):
        dpo_fast.fused_preference_loss(batch["hidden"], batch["weight"], batch["targets"],
                                       batch["seq_index"], None, impl="torch")
    out = dpo_fast.fused_preference_loss(batch["hidden"], batch["weight"], batch["targets"],
                                         batch["seq_index"], None, loss_type="simpo",
                                         impl="torch")
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("impl", ["torch", "cpu"][: 1 + HAVE_CPU])
def test_torch_compile_matches_eager(impl):
    # One graph (fullgraph). On "cpu" eager runs the chunk engine (default scratch) and the
    # compiled graph the memory-flat custom op (what runs while compiling): the same math.
    batch = packed_batch(2, 32, 300, prompt_lens=[2, 3, 1, 4], resp_lens=[5, 7, 3, 6])

    def f(h, w):
        out = dpo_fast.fused_preference_loss(h, w, batch["targets"], batch["seq_index"],
                                             batch["ref_logps"], impl=impl, num_pairs=2)
        return out.loss

    h1 = batch["hidden"].clone().requires_grad_()
    h2 = batch["hidden"].clone().requires_grad_()
    eager = f(h1, batch["weight"])
    comp = torch.compile(f, backend="aot_eager", fullgraph=True)(h2, batch["weight"])
    eager.backward()
    comp.backward()
    torch.testing.assert_close(comp, eager, rtol=0, atol=1e-6)
    torch.testing.assert_close(h2.grad, h1.grad, rtol=0, atol=1e-6)


# ------------------------------------------------------------- scratch-budget (3-GEMM) mode


@pytest.mark.parametrize("budget_pairs", [1, 2, 100], ids=["1pair", "2pairs", "all"])
@pytest.mark.parametrize("opts", [
    dict(), dict(softcap=30.0, temperature=0.7), dict(loss_type="ipo"),
    dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]), dict(label_smoothing=0.1),
    dict(loss_type="unlikelihood", unlikelihood_alpha=0.5), dict(loss_type="sft"),
], ids=["sigmoid", "softcap-temp", "ipo", "sigmoid+sft", "cdpo", "unlikelihood", "sft"])
def test_scratch_mode_matches_unfused(budget_pairs, opts):
    resp = [9, 13, 5, 20, 7, 3, 11, 6]
    batch = packed_batch(4, 64, 777, prompt_lens=[3] * 8, resp_lens=resp, bias=True, scale=2.0)
    budget = budget_pairs * (max(resp) * 2) * 777 * 4
    out = check_fused_loss(batch, "torch", max_scratch_bytes=budget, **opts)
    assert _scratch_path(out)


def test_scratch_mode_equals_memory_flat_and_falls_back():
    batch = packed_batch(3, 48, 500, prompt_lens=[2] * 6, resp_lens=[4, 7, 3, 5, 6, 2])
    args = (batch["hidden"], batch["weight"], batch["targets"], batch["seq_index"],
            batch["ref_logps"])
    grads = []
    for budget in (None, 10**9, 1):  # 1 byte: no pair fits -> memory-flat fallback
        h = batch["hidden"].clone().requires_grad_()
        out = dpo_fast.fused_preference_loss(h, *args[1:], impl="torch",
                                             max_scratch_bytes=budget)
        out.loss.backward()
        grads.append((out.loss.detach(), h.grad, out.policy_logps, out.chosen_entropy,
                      out.rejected_token_accuracy))
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            torch.testing.assert_close(a, b, rtol=0, atol=2e-6)
    with pytest.raises(ValueError, match="max_scratch_bytes"):
        dpo_fast.fused_preference_loss(*args, impl="torch", max_scratch_bytes=0)


# ------------------------------------- C++ chunk engine: part of the logits kept, any budget


def _cpu_budget(keep, rows, v):
    """Scratch bytes that keep none / part / all of an [rows]-token chunk's logit tiles."""
    _, _, full = dpo_scratch.cpp_store_plan(rows, v, 1 << 40)
    return {"none": 4, "partial": full * 4 // 2, "all": 1 << 40}[keep]


@pytest.mark.skipif(not HAVE_CPU, reason="C++ extension not built")
@pytest.mark.parametrize("keep", ["none", "partial", "all"])
@pytest.mark.parametrize("opts", [
    dict(), dict(softcap=30.0, temperature=0.7), dict(loss_type="ipo"),
    dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]), dict(label_smoothing=0.1),
    dict(loss_type="unlikelihood", unlikelihood_alpha=0.5), dict(loss_type="sft"),
], ids=["sigmoid", "softcap-temp", "ipo", "sigmoid+sft", "cdpo", "unlikelihood", "sft"])
def test_cpu_chunk_engine_matches_unfused(keep, opts, monkeypatch):
    # One pair per chunk unless several fit (the 512-token floor would make one chunk here).
    monkeypatch.setattr(dpo_scratch, "MIN_CHUNK_ROWS", 1)
    resp = [9, 13, 5, 20, 7, 3, 11, 6]
    v = 3000  # 6 vocabulary tiles of the C++ kernel: 3 per core at 2 threads
    batch = packed_batch(4, 64, v, prompt_lens=[3] * 8, resp_lens=resp, bias=True, scale=2.0)
    budget = _cpu_budget(keep, 20 + 6, v)  # the largest pair: sequences 3 and 7
    _, cols, _ = dpo_scratch.cpp_store_plan(26, v, budget)
    assert {"none": cols == 0, "partial": 0 < cols < v, "all": cols == v}[keep], cols
    out = check_fused_loss(batch, "cpu", max_scratch_bytes=budget, **opts)
    assert _scratch_path(out)


@pytest.mark.skipif(not HAVE_CPU, reason="C++ extension not built")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cpu_chunk_engine_half_dtypes(dtype, monkeypatch):
    monkeypatch.setattr(dpo_scratch, "MIN_CHUNK_ROWS", 1)
    batch = packed_batch(2, 96, 3000, prompt_lens=[4, 2, 6, 1], resp_lens=[9, 13, 5, 20],
                         dtype=dtype, bias=True)
    out = check_fused_loss(batch, "cpu", dtype=dtype,
                           max_scratch_bytes=_cpu_budget("partial", 33, 3000), softcap=30.0)
    assert _scratch_path(out)


@pytest.mark.skipif(not HAVE_CPU, reason="C++ extension not built")
def test_cpu_default_budget_and_its_fallbacks(monkeypatch):
    batch = packed_batch(2, 32, 500, prompt_lens=[2] * 4, resp_lens=[4, 7, 3, 5])
    args = (batch["targets"], batch["seq_index"], batch["ref_logps"])
    h = batch["hidden"].clone().requires_grad_()
    auto = dpo_fast.fused_preference_loss(h, batch["weight"], *args, impl="cpu")
    assert _scratch_path(auto)  # the chunk engine, by default
    auto.loss.backward()
    flat = dpo_fast.fused_preference_loss(batch["hidden"].clone().requires_grad_(),
                                          batch["weight"], *args, impl="cpu",
                                          max_scratch_bytes=None)
    assert not _scratch_path(flat)
    torch.testing.assert_close(flat.loss, auto.loss, rtol=0, atol=1e-6)
    # Its grads are formed once: a second backward is refused, not silently scaled twice.
    again = dpo_fast.fused_preference_loss(h, batch["weight"], *args, impl="cpu")
    again.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        again.loss.backward()
    # A batch-coupled type falls back to memory-flat.
    aot = dpo_fast.fused_preference_loss(h, batch["weight"], *args, impl="cpu", loss_type="aot")
    assert not _scratch_path(aot)
    # No gradient wanted (evaluation): forward only, no gradient formed in the forward.
    def _refuse(*a, **k):
        raise AssertionError("the scratch engine ran under no_grad")
    monkeypatch.setattr(dpo_loss_mod, "scratch_preference_loss", _refuse)
    with torch.no_grad():
        ev = dpo_fast.fused_preference_loss(h, batch["weight"], *args, impl="cpu")
    torch.testing.assert_close(ev.loss, auto.loss.detach(), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="max_scratch_bytes"):
        dpo_fast.fused_preference_loss(h, batch["weight"], *args, impl="cpu",
                                       max_scratch_bytes="big")


@pytest.mark.parametrize("impl", IMPLS)
def test_frozen_head_gets_no_weight_gradient(impl, monkeypatch):
    # LoRA-style: the LM head is frozen. No dW is formed (the scratch engines get dw=None,
    # the memory-flat backends need_dw=False) and d_hidden still meets the oracle.
    from dpo_fast.ops import logprobs as ops_logprobs

    batch = packed_batch(2, 64, 3000, prompt_lens=[4, 2, 6, 1], resp_lens=[9, 13, 5, 20],
                         bias=True)
    truth = unfused(batch, torch.float64)
    same = unfused(batch, torch.float32)
    seen = []
    for cls in (dpo_scratch.TorchChunks, dpo_scratch.CppChunks):
        orig_bwd = cls.backward

        def spy_engine(self, h, tgt, g, dh_rows, dw, db, first, _orig=orig_bwd):
            seen.append(("engine", dw is None))
            return _orig(self, h, tgt, g, dh_rows, dw, db, first)
        monkeypatch.setattr(cls, "backward", spy_engine)
    name = "cpu" if impl == "cpu-flat" else impl
    backend = ops_logprobs.backend_module(name)
    orig = backend.logprobs_backward

    def spy(*args, **kwargs):
        seen.append(("flat", kwargs.get("need_dw", True) is False))
        return orig(*args, **kwargs)
    monkeypatch.setattr(backend, "logprobs_backward", spy)
    kw = dict(max_scratch_bytes=None) if impl == "cpu-flat" else {}
    h = batch["hidden"].clone().requires_grad_()
    w = batch["weight"].clone()
    out = dpo_fast.fused_preference_loss(h, w, batch["targets"], batch["seq_index"],
                                         batch["ref_logps"], bias=batch["bias"], impl=name, **kw)
    out.loss.backward()
    assert seen and all(skipped for _, skipped in seen), seen
    assert w.grad is None
    assert_rule("d_hidden", h.grad, same["d_hidden"], truth["d_hidden"], torch.float32)


def test_torch_compile_refusals():
    batch = packed_batch(2, 16, 50, prompt_lens=[1] * 4, resp_lens=[2] * 4)
    args = (batch["hidden"], batch["weight"], batch["targets"], batch["seq_index"])

    def no_b(h):  # B cannot be read from the data while tracing
        return dpo_fast.fused_preference_loss(h, *args[1:], None, loss_type="simpo",
                                              impl="torch").loss

    def drop(h):
        return dpo_fast.fused_preference_loss(h, *args[1:], batch["ref_logps"], impl="torch",
                                              empty_sequences="drop").loss

    for fn, match in ((no_b, "num_pairs"), (drop, "drop")):
        with pytest.raises(Exception, match=match):
            torch.compile(fn, backend="aot_eager", fullgraph=True)(args[0])
    # An empty pair cannot raise the eager ValueError inside a graph: a runtime assert fires.
    empty = packed_batch(2, 16, 50, prompt_lens=[1] * 4, resp_lens=[2, 0, 2, 2])

    def f(h):
        return dpo_fast.fused_preference_loss(h, empty["weight"], empty["targets"],
                                              empty["seq_index"], empty["ref_logps"],
                                              impl="torch").loss

    with pytest.raises(RuntimeError, match="no response token"):
        torch.compile(f, backend="aot_eager", fullgraph=True)(empty["hidden"])
