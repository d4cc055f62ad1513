"""LD-DPO (``ld_alpha``) and WPO (``use_weighting``) in dpo_fast's own loss and trainer.

Truth is an independent float64 computation from full logits (``oracle.naive_logits``): the
per-token log-probs and ``log sum_v p_v^2`` of every position, LD-DPO's shared / tail split by
position, WPO's weights as TRL 1.16 writes them, and the loss's gradients by autograd through
all of it. TRL parity on the real model is in ``tests/test_trl_parity.py`` (``sigmoid_ld``,
``sigmoid_wpo``) and ``tests/test_trl_dropin.py``.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kernel_cases import packed_batch
from oracle import naive_logits
from tiny import random_examples, tiny_model, tiny_tokenizer, word_rows

from dpo_fast import RefLogProbCache, fused_preference_loss, preference_loss, wpo_weights
from dpo_fast.train import TrainConfig, Trainer
from dpo_fast.train.reference import ld_pair_table, pair_table

LN2 = math.log(2.0)


# ------------------------------------------------------------------------------ the oracle


def oracle_loss(batch, *, ld_alpha=None, use_weighting=False, beta=0.1, loss_type="sigmoid",
                rejected_first=False):
    """float64 loss from full logits, TRL 1.16's formulas spelled out per position; returns
    (loss, d_hidden, d_weight)."""
    h = batch["hidden"].detach().double().requires_grad_()
    w = batch["weight"].detach().double().requires_grad_()
    z = naive_logits(h, w)
    logsm = torch.log_softmax(z, -1)
    t, seq = batch["targets"], batch["seq_index"]
    valid = t != -100
    lp = logsm.gather(1, t.clamp(min=0)[:, None])[:, 0]
    lssp = torch.logsumexp(2 * logsm, -1)
    s = int(seq.max()) + 1
    b = s // 2
    counts = [int(((seq == i) & valid).sum()) for i in range(s)]
    shared_len = [min(counts[i % b], counts[i % b + b]) for i in range(s)]
    logps, plain, aligned = [], [], []
    for i in range(s):
        idx = ((seq == i) & valid).nonzero().flatten()
        x = lp[idx]
        plain.append(x.sum())
        if ld_alpha is None:
            logps.append(x.sum())
        else:
            k = shared_len[i]
            logps.append(x[:k].sum() + ld_alpha * x[k:].sum())
        aligned.append(((x - lssp[idx]).sum() / max(counts[i], 1)).detach())
    logps, plain = torch.stack(logps), torch.stack(plain)
    ref = batch["ref_logps"].double()
    hh = (logps[:b] - ref[:b]) - (logps[b:] - ref[b:])
    if loss_type == "sigmoid":
        per = -F.logsigmoid(beta * hh)
    elif loss_type == "sft":  # dpo_fast's per-pair form: each chosen's mean NLL
        per = -plain[:b] / torch.tensor(counts[:b], dtype=torch.float64)
    else:
        raise AssertionError(loss_type)
    if use_weighting:
        aligned = torch.stack(aligned)
        per = per * torch.exp(aligned[:b] + aligned[b:])
    loss = per.mean()
    loss.backward()
    return loss.detach(), h.grad, w.grad


def _batch(seed=0, v=301, d=24):
    # Unequal chosen / rejected lengths in every pair, so every sequence has a tail or not.
    return packed_batch(3, d, v, prompt_lens=[3, 5, 2, 4, 1, 6], resp_lens=[7, 2, 9, 4, 6, 5],
                        seed=seed)


def _fused(batch, impl, **kw):
    h = batch["hidden"].clone().requires_grad_()
    w = batch["weight"].clone().requires_grad_()
    out = fused_preference_loss(h, w, batch["targets"], batch["seq_index"], batch["ref_logps"],
                                impl=impl, **kw)
    out.loss.backward()
    return out, h.grad, w.grad


IMPLS = ["torch", "cpu"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("ld_alpha,use_weighting", [(0.5, False), (0.0, False), (None, True),
                                                    (0.3, True), (1.0, False)])
def test_fused_loss_and_gradients_match_float64(impl, ld_alpha, use_weighting):
    batch = _batch()
    truth, dh, dw = oracle_loss(batch, ld_alpha=ld_alpha, use_weighting=use_weighting)
    out, gh, gw = _fused(batch, impl, ld_alpha=ld_alpha, use_weighting=use_weighting)
    assert abs(float(out.loss) - float(truth)) <= 1e-5 * max(1.0, abs(float(truth)))
    torch.testing.assert_close(gh.double(), dh, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gw.double(), dw, rtol=1e-4, atol=1e-6)


def test_ld_alpha_one_is_plain_dpo_and_zero_differs():
    batch = _batch(seed=3)
    plain = _fused(batch, "cpu")[0].loss
    one = _fused(batch, "cpu", ld_alpha=1.0)[0].loss
    zero = _fused(batch, "cpu", ld_alpha=0.0)[0].loss
    assert abs(float(one) - float(plain)) <= 1e-6
    assert abs(float(zero) - float(plain)) > 1e-3  # the tails really were masked


def test_wpo_sft_weights_pair_by_pair():
    batch = _batch(seed=5)
    truth, dh, _ = oracle_loss(batch, use_weighting=True, loss_type="sft")
    out, gh, _ = _fused(batch, "cpu", use_weighting=True, loss_type="sft")
    assert abs(float(out.loss) - float(truth)) <= 1e-5 * max(1.0, abs(float(truth)))
    torch.testing.assert_close(gh.double(), dh, rtol=1e-4, atol=1e-6)


def test_policy_logps_are_the_ld_weighted_sums():
    batch = _batch(seed=7)
    out = _fused(batch, "cpu", ld_alpha=0.25)[0]
    h, w = batch["hidden"].double(), batch["weight"].double()
    lp = torch.log_softmax(naive_logits(h, w), -1)
    t, seq = batch["targets"], batch["seq_index"]
    valid = t != -100
    tok = lp.gather(1, t.clamp(min=0)[:, None])[:, 0]
    n = [int(((seq == i) & valid).sum()) for i in range(6)]
    for i in range(6):
        x = tok[((seq == i) & valid).nonzero().flatten()]
        k = min(n[i % 3], n[i % 3 + 3])
        assert abs(float(out.policy_logps[i]) - float(x[:k].sum() + 0.25 * x[k:].sum())) <= 1e-4
    assert out.lengths.tolist() == n  # full response lengths, not the shared part


def test_fused_refusals():
    batch = _batch()
    with pytest.raises(ValueError, match="ld_alpha"):
        _fused(batch, "cpu", ld_alpha=float("nan"))
    with pytest.raises(ValueError, match="aot"):
        _fused(batch, "cpu", use_weighting=True, loss_type="aot")


# ------------------------------------------------------------------------------ the weights


def test_wpo_weights_known_answers():
    one = torch.ones(2)
    # uniform over V: log p(y) = log sum p^2 = -log V for every token -> w = 1 exactly
    v = 1000.0
    lp = torch.full((2,), -5 * math.log(v), dtype=torch.float64)
    assert torch.equal(wpo_weights(lp, lp, lp, lp, 5 * one, 5 * one),
                       torch.ones(2, dtype=torch.float64))
    # p(y) = 1/2, the rest spread over many tokens: aligned log-prob log 2 per token
    half = torch.tensor([math.log(0.5)], dtype=torch.float64)
    quarter = torch.tensor([math.log(0.25)], dtype=torch.float64)
    got = wpo_weights(half, half, quarter, quarter, torch.ones(1), torch.ones(1))
    assert abs(float(got) - 4.0) <= 1e-12
    # lengths clamp to >= 1 (TRL's clamp_min(1)): an empty response contributes exp(0) = 1
    zero = torch.zeros(1, dtype=torch.float64)
    assert float(wpo_weights(zero, zero, zero, zero, torch.zeros(1), torch.zeros(1))) == 1.0


def test_wpo_weights_have_no_gradient():
    pc = torch.tensor([-3.0, -4.0], requires_grad=True)
    w = wpo_weights(pc, pc, pc * 0.5, pc * 0.5, torch.tensor([2, 3]), torch.tensor([2, 3]))
    assert not w.requires_grad


def test_pair_weights_scale_each_pair_and_stay_constant():
    g = torch.Generator().manual_seed(0)
    pc, pr = (-torch.rand(5, generator=g, dtype=torch.float64) * 20 for _ in range(2))
    rc, rr = (-torch.rand(5, generator=g, dtype=torch.float64) * 20 for _ in range(2))
    pw = torch.rand(5, generator=g, dtype=torch.float64).requires_grad_()
    a = pc.clone().requires_grad_()
    base = preference_loss(a, pr, rc, rr, loss_type=["sigmoid", "hinge"], loss_weights=[1, .5])
    b = pc.clone().requires_grad_()
    weighted = preference_loss(b, pr, rc, rr, loss_type=["sigmoid", "hinge"],
                               loss_weights=[1, .5], pair_weights=pw)
    torch.testing.assert_close(weighted.losses, base.losses * pw.detach(), rtol=0, atol=1e-15)
    weighted.loss.backward()
    base.loss.backward()
    torch.testing.assert_close(b.grad, a.grad * pw.detach(), rtol=1e-12, atol=0)
    assert pw.grad is None  # constants: no gradient reaches them
    with pytest.raises(ValueError, match="pair_weights.*aot_unpaired"):
        preference_loss(pc, pr, rc, rr, loss_type="aot_unpaired", pair_weights=pw)
    with pytest.raises(ValueError, match="pair_weights"):
        preference_loss(pc, pr, rc, rr, pair_weights=pw[:3])


# ------------------------------------------------------------------------------ the trainer


def test_config_fields_validate_and_reach_the_loss():
    base = dict(model="m", train_data="d.jsonl")
    kw = TrainConfig(**base, ld_alpha=0.5, use_weighting=True).validate().loss_kwargs()
    assert kw["ld_alpha"] == 0.5 and kw["use_weighting"] is True
    assert "ld_alpha" not in TrainConfig(**base).validate().loss_kwargs()
    with pytest.raises(ValueError, match=r"TrainConfig\.ld_alpha"):
        TrainConfig(**base, ld_alpha=1.5).validate()
    with pytest.raises(ValueError, match=r"TrainConfig\.use_weighting.*aot"):
        TrainConfig(**base, use_weighting=True, loss_type="aot").validate()
    with pytest.raises(ValueError, match=r"TrainConfig\.use_weighting"):
        TrainConfig(**base, use_weighting="yes").validate()


@torch.no_grad()
def _token_logps_f64(model, ex):
    m64 = copy.deepcopy(model).double()
    out = []
    for resp in (ex.chosen_ids, ex.rejected_ids):
        ids = torch.from_numpy(np.concatenate([ex.prompt_ids, resp]).astype(np.int64))[None]
        lp = torch.log_softmax(m64(input_ids=ids).logits[0], -1)
        p = ex.prompt_ids.size
        out.append(lp[p - 1:-1].gather(1, ids[0, p:, None])[:, 0].numpy())
    return out


def test_ld_pair_table_splits_the_per_token_cache(tmp_path):
    model = tiny_model()
    examples = random_examples(12, seed=4)
    cache = RefLogProbCache.build(model, examples, tmp_path / "c", per_token=True,
                                  batch_tokens=128)
    table = ld_pair_table(cache, examples, 0.3)
    for i, ex in enumerate(examples):
        c, r = _token_logps_f64(model, ex)
        k = min(c.size, r.size)
        want = [c[:k].sum() + 0.3 * c[k:].sum(), r[:k].sum() + 0.3 * r[k:].sum()]
        np.testing.assert_allclose(table[i], want, rtol=1e-5, atol=1e-5)
    # ld_alpha = 1 gives the plain sums of the same cache
    np.testing.assert_allclose(ld_pair_table(cache, examples, 1.0), pair_table(cache, examples),
                               rtol=1e-6, atol=1e-5)
    plain = RefLogProbCache.build(model, examples, tmp_path / "p", batch_tokens=128)
    with pytest.raises(ValueError, match="per-token"):
        ld_pair_table(plain, examples, 0.3)


def _config(tmp_path, rows, **kw):
    base = dict(model="tiny", train_data=rows, output_dir=str(tmp_path / "run"),
                data_cache_dir="", batch_size=4, learning_rate=1e-3, logging_steps=1,
                save_steps=None, max_tokens_per_micro_batch=96, max_length=64,
                adaptive_threads=False, max_steps=3)
    base.update(kw)
    return TrainConfig(**base)


def test_trainer_trains_with_ld_alpha_and_wpo(tmp_path):
    """A 3-step run with both modifiers: the reference table is the LD split of the initial
    policy (float64 oracle), step 1 is the known answer ln 2 x the first batch's mean WPO
    weight (policy == reference), which is not ln 2, and the losses move."""
    model = tiny_model()
    trainer = Trainer(_config(tmp_path, word_rows(16), ld_alpha=0.5, use_weighting=True),
                      model=copy.deepcopy(model), tokenizer=tiny_tokenizer())
    res = trainer.train()
    table = trainer.reference.train
    seen = ~np.isnan(table[:, 0])
    assert seen.any()
    for i in np.flatnonzero(seen):
        ex = trainer.train_data.examples[i]
        c, r = _token_logps_f64(model, ex)
        k = min(c.size, r.size)
        want = [c[:k].sum() + 0.5 * c[k:].sum(), r[:k].sum() + 0.5 * r[k:].sum()]
        np.testing.assert_allclose(table[i], want, rtol=1e-5, atol=1e-5)
    import json
    from pathlib import Path

    ms = [json.loads(x) for x in (Path(res.output_dir) / "metrics.jsonl").read_text().split("\n")
          if x.strip() and "loss" in json.loads(x)]
    assert len(ms) == 3 and all(math.isfinite(m["loss"]) for m in ms)
    assert abs(ms[0]["rewards/margins"]) <= 1e-5  # policy == reference at step 1
    assert abs(ms[0]["loss"] - LN2) > 1e-3  # the WPO weights act
    assert RefLogProbCache.open(Path(res.output_dir) / "ref_cache").per_token
