"""Segment attention (dpo_fast.ops.segment_attention): exact against an independent float64
oracle (a dense allowed-matrix built pair by pair from positions), through whole models against
the dense block mask and against each sequence alone, with no [L, L] tensor at 8k tokens, and
transformers' calls without a layout (generation) unchanged."""

import copy
import sys
import types

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

transformers = pytest.importorskip("transformers")

from tiny import random_examples, tiny_model  # noqa: E402

from dpo_fast.data import PreferenceExample  # noqa: E402
from dpo_fast.models import head_settings, model_parts  # noqa: E402
from dpo_fast.ops import segment_attention as sa  # noqa: E402
from dpo_fast.ops.segment_attention import SegmentLayout, segment_attention  # noqa: E402
from dpo_fast.train import batching  # noqa: E402
from dpo_fast.train.batching import (  # noqa: E402
    PACKED_EAGER,
    PACKED_SDPA,
    PACKED_SEGMENTS,
    attention_path,
    make_micro_batch,
    mask_plan,
)
from dpo_fast.train.step import HeadSpec, micro_batch_loss  # noqa: E402

CPU = torch.device("cpu")


def allowed_matrix(layout, window=None):
    """[L, L] bool, spelled out: query i of a segment sees its prefix and its own keys up to
    itself, within ``window`` positions."""
    n = layout.length
    allowed = torch.zeros(n, n, dtype=torch.bool)
    for q0, q1, p0, p1 in layout.segments:
        plen = p1 - p0
        keys = [(j, j - p0) for j in range(p0, p1)]
        for i in range(q0, q1):
            keys_i = keys + [(j, plen + j - q0) for j in range(q0, i + 1)]
            for j, pj in keys_i:
                if window is None or (plen + i - q0) - pj < window:
                    allowed[i, j] = True
    return allowed


def oracle(q, k, v, layout, scale, softcap=None, window=None):
    """float64 attention over :func:`allowed_matrix`."""
    h = q.shape[1]
    k = k.double().repeat_interleave(h // k.shape[1], 1)
    v = v.double().repeat_interleave(h // v.shape[1], 1)
    allowed = allowed_matrix(layout, window)
    s = (q.double() @ k.transpose(-1, -2)) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~allowed, float("-inf"))
    return (torch.softmax(s, -1) @ v).transpose(1, 2)


LAYOUTS = {
    "shared-pairs": SegmentLayout.of_shared_pairs([(5, 3, 4), (7, 2, 6), (1, 1, 1)]),
    "sequences": SegmentLayout.of_sequences([6, 9, 1, 3]),
}
CASES = [  # impl, softcap, window
    ("cpu-flash", None, None), ("sdpa", None, None), ("chunked", None, None),
    ("chunked", 3.0, None), ("chunked", None, 4), ("chunked", 2.0, 5), ("chunked", None, 1),
]


@pytest.mark.parametrize("chunk", [1, 3, 64])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_matches_the_float64_oracle(name, case, chunk):
    impl, softcap, window = case
    layout = LAYOUTS[name]
    n = layout.length
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, h, n, 8, generator=g, dtype=torch.float64).requires_grad_()
               for h in (4, 2, 2))  # GQA: 4 query heads over 2 key / value heads
    want = oracle(q, k, v, layout, 0.3, softcap, window)
    go = torch.randn(want.shape, generator=g, dtype=torch.float64)
    want_grads = torch.autograd.grad(want, (q, k, v), go)
    got = segment_attention(q, k, v, layout, scale=0.3, softcap=softcap, window=window,
                            impl=impl, chunk=chunk)
    assert got.shape == (1, n, 4, 8)
    grads = torch.autograd.grad(got, (q, k, v), go)
    assert (got - want).abs().max().item() <= 1e-12
    for a, b in zip(grads, want_grads):
        assert (a - b).abs().max().item() <= 1e-12


def test_bfloat16_is_as_close_as_dense_sdpa_in_bfloat16():
    layout = SegmentLayout.of_shared_pairs([(40, 17, 23), (9, 30, 4)])
    n = layout.length
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, h, n, 16, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    go = torch.randn(1, n, 4, 16, generator=g, dtype=torch.float64)

    def err(fn):
        x = [t.to(torch.bfloat16).requires_grad_() for t in (q, k, v)]
        out = fn(*x)
        grads = torch.autograd.grad(out, x, go.to(torch.bfloat16))
        xd = [t.clone().requires_grad_() for t in (q, k, v)]
        want = oracle(*xd, layout, 16 ** -0.5)
        wgrads = torch.autograd.grad(want, xd, go)
        return [(a.double() - b).abs().max().item()
                for a, b in zip((out, *grads), (want, *wgrads))]

    def dense(q_, k_, v_):  # the block-mask path in bf16: the precision users get today
        o = torch.nn.functional.scaled_dot_product_attention(
            q_, k_.repeat_interleave(2, 1), v_.repeat_interleave(2, 1),
            attn_mask=allowed_matrix(layout))
        return o.transpose(1, 2)

    seg = err(lambda *x: segment_attention(*x, layout, impl="cpu-flash"))
    ref = err(dense)
    for s, r in zip(seg, ref):
        assert s <= 2 * r + 1e-3, (seg, ref)


def test_layout_checks_and_shapes():
    with pytest.raises(ValueError, match="does not continue the row at 3"):
        SegmentLayout(((0, 3, 0, 0), (4, 6, 0, 0)), 6)
    with pytest.raises(ValueError, match="prefix before them"):
        SegmentLayout(((0, 3, 0, 0), (3, 6, 2, 4)), 6)
    with pytest.raises(ValueError, match="segments end at 6, the row has 7"):
        SegmentLayout(((0, 6, 0, 0),), 7)
    lay = SegmentLayout.of_shared_pairs([(3, 2, 4)])
    assert lay.segments == ((0, 5, 0, 0), (5, 9, 0, 3)) and lay.extent == 7
    q = torch.zeros(1, 2, 9, 4)
    with pytest.raises(ValueError, match="covers 9 tokens, the row has 8"):
        segment_attention(q[:, :, :8], q[:, :, :8], q[:, :, :8], lay)
    with pytest.raises(ValueError, match="one packed row"):
        segment_attention(q.expand(2, -1, -1, -1), q, q, lay)
    with pytest.raises(ValueError, match="has no softcap"):
        segment_attention(q, q, q, lay, softcap=2.0, impl="cpu-flash")
    with pytest.raises(ValueError, match="impl must be"):
        segment_attention(q, q, q, lay, impl="dense")


# ---------------------------------------------------------------------------- whole models

def _models():
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                  max_position_embeddings=256)
    return {
        "llama": lambda: tiny_model(),
        "llama-tied": lambda: transformers.LlamaForCausalLM(
            transformers.LlamaConfig(**common, tie_word_embeddings=True)),
        # softcapped scores, every other layer a window shorter than the sequences
        "gemma2-softcap-sliding": lambda: transformers.Gemma2ForCausalLM(
            transformers.Gemma2Config(**common, head_dim=8, final_logit_softcapping=2.0,
                                      attn_logit_softcapping=5.0, sliding_window=4)),
    }


def _loss_and_grads(model, examples, ref, path, share):
    model.zero_grad(set_to_none=True)
    mb = make_micro_batch(examples, path, masks=mask_plan(model), share_prompt=share)
    out = micro_batch_loss(model_parts(model), mb, ref,
                           HeadSpec(*head_settings(model, None, 1.0)), dict(beta=0.1))
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _row_and_grads(model, examples, path, share, weight):
    """The body's hidden states of the packed row [L, D] and the parameters' gradients of
    ``sum(weight * hidden)``."""
    model.zero_grad(set_to_none=True)
    mb = make_micro_batch(examples, path, masks=mask_plan(model), share_prompt=share)
    h = model_parts(model).body(**mb.model_inputs, use_cache=False).last_hidden_state[0]
    (h * weight[:h.shape[0]]).sum().backward()
    return h.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()
                        if p.grad is not None}


def _alone_row_and_grads(model, examples, share, weight):
    """The same row and gradients from each sequence through the body on its own (float64
    truth): chosen sequences, then rejected ones; with shared prompts, per pair the chosen
    sequence then the rejected response's rows (its prompt rows are the chosen's)."""
    body = model_parts(model).body
    model.zero_grad(set_to_none=True)

    def run(ids):
        return body(input_ids=torch.from_numpy(ids.astype(np.int64))[None],
                    use_cache=False).last_hidden_state[0]

    parts = []
    if share:
        for e in examples:
            parts.append(run(np.concatenate([e.prompt_ids, e.chosen_ids])))
            parts.append(run(np.concatenate([e.prompt_ids, e.rejected_ids]))[e.prompt_ids.size:])
    else:
        for part in ("chosen_ids", "rejected_ids"):
            parts += [run(np.concatenate([e.prompt_ids, getattr(e, part)])) for e in examples]
    h = torch.cat(parts)
    (h * weight[:h.shape[0]]).sum().backward()
    return h.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()
                        if p.grad is not None}


@pytest.mark.parametrize("name", list(_models()))
def test_models_match_the_dense_mask_and_separate_sequences_in_float64(name):
    """Body hidden states and parameter gradients of a packed row, float64: segments = the
    dense block mask = each sequence alone, to rounding (1e-10 relative)."""
    torch.manual_seed(0)
    model = _models()[name]().double().train()
    mask_model = copy.deepcopy(model)
    assert attention_path(model, "segments", CPU) == PACKED_SEGMENTS
    assert model.config._attn_implementation == sa.ATTN_NAME
    mask_path = attention_path(mask_model, "block_mask", CPU)
    assert mask_path in (PACKED_SDPA, PACKED_EAGER)
    eager = mask_path == PACKED_EAGER
    examples = random_examples(4, seed=11)
    assert max(e.max_sequence_length for e in examples) > 4  # past gemma2's window
    weight = torch.randn(1000, 32, dtype=torch.float64)
    for share in (False, True):
        h, g = _row_and_grads(model, examples, PACKED_SEGMENTS, share, weight)
        h_m, g_m = _row_and_grads(mask_model, examples, mask_path, share, weight)
        h_a, g_a = _alone_row_and_grads(mask_model, examples, share, weight)
        assert h.shape == h_a.shape
        # Float32 inside float64 models sets the bounds: Gemma 2's eager attention (the
        # oracles' path) takes its softmax in float32; and alone, a shared prompt's gradient
        # arrives as two copies, each through an RMSNorm computing in float32, so their sum
        # carries float32 rounding (~1e-7 relative). A leak between sequences moves things
        # by O(1).
        f32 = 1e-6
        tol_h = f32 if eager else 1e-12
        tol_m = f32 if eager else 1e-10
        tol_a = f32 if eager or share else 1e-10
        scale = h_a.abs().max().item()
        assert (h - h_m).abs().max().item() <= tol_h * scale
        assert (h - h_a).abs().max().item() <= tol_h * scale
        assert g.keys() == g_a.keys()
        for n in g:
            top = g_a[n].abs().max().item() + 1e-30
            assert (g[n] - g_m[n]).abs().max().item() <= tol_m * top, (n, share)
            assert (g[n] - g_a[n]).abs().max().item() <= tol_a * top, (n, share)


class _Largest(TorchDispatchMode):
    """The most elements of any tensor an op produced (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest, self.op = 0, None
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.add(str(func))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.numel() > self.largest:
                self.largest, self.op = t.numel(), str(func)
        return out


@pytest.mark.parametrize("name", ["llama", "gemma2-softcap-sliding"])
def test_no_quadratic_tensor_in_a_step_at_8k_tokens(name):
    """A pair of 8k-token sequences (prompt 6k, responses 2k each: a 10k-token shared row)
    forward and backward: no tensor reaches L^2 / 4 elements on the segments path (the
    largest are the chunked path's score tiles, at most 2^24 elements), while the block-mask
    path makes an [L, L] one (the check can fail)."""
    torch.manual_seed(0)
    model = _models()[name]().train()
    g = np.random.default_rng(0)
    ex = PreferenceExample(g.integers(3, 128, 6144), g.integers(3, 128, 2048),
                           g.integers(3, 128, 2048))
    ref = torch.tensor([-30.0, -31.0])
    runs = []
    if name == "llama":  # (Gemma 2's eager block mask would need ~8 GB here)
        mask_model = copy.deepcopy(model)
        runs.append((mask_model, attention_path(mask_model, "block_mask", CPU)))
    runs.append((model, attention_path(model, "segments", CPU)))
    n = 6144 + 2048 + 2048
    for m, p in runs:
        with _Largest() as seen:
            _loss_and_grads(m, [ex], ref, p, True)
        assert any("backward" in o for o in seen.ops)  # the backward ran under the mode
        if p == PACKED_SEGMENTS:
            assert seen.largest < n * n // 4, (seen.largest, seen.op)
        else:
            assert seen.largest >= n * n, (seen.largest, seen.op)


# ------------------------------------------------------------------ calls without a layout

@pytest.mark.parametrize("name", ["llama", "gemma2-softcap-sliding"])
def test_generation_and_padded_batches_are_unchanged(name):
    torch.manual_seed(0)
    model = _models()[name]().eval()
    base = model.config._attn_implementation
    prompts = torch.tensor([[0, 0, 5, 6, 7, 8, 9], [1, 2, 3, 4, 5, 6, 7]])
    mask = (prompts != 0).long()
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    want = model.generate(prompts, **kw)
    h_want = model(input_ids=prompts, attention_mask=mask).logits
    batching.use_segments(model)
    assert model.config._attn_implementation == sa.ATTN_NAME
    assert torch.equal(model.generate(prompts, **kw), want)
    h = model(input_ids=prompts, attention_mask=mask).logits
    assert (h - h_want)[mask.bool()].abs().max().item() <= 1e-5
    batching.restore_attention(model, base)
    assert model.config._attn_implementation == base


def test_flash_varlen_arguments_and_call(monkeypatch):
    """The CUDA flash-attn path's plumbing, with a stand-in ``flash_attn_varlen_func`` that
    computes each (query segment, key segment) pair densely, bottom-right causal: the gathered
    keys, cu_seqlens and window / softcap arguments must give the oracle's answer."""
    layout = SegmentLayout.of_shared_pairs([(5, 3, 4), (2, 6, 1)])
    idx, cq, ck, lq, lk = sa.varlen_arguments(layout, CPU)
    assert cq.tolist() == [0, 8, 12, 20, 21] and ck.tolist() == [0, 8, 17, 25, 28]
    assert idx.tolist()[8:17] == [0, 1, 2, 3, 4, 8, 9, 10, 11] and (lq, lk) == (8, 9)

    def fake(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, softmax_scale, causal,
             window_size, softcap):
        assert causal and dropout_p == 0.0
        outs = []
        for a, b, c, d in zip(cu_q[:-1], cu_q[1:], cu_k[:-1], cu_k[1:]):
            qs, ks, vs = q[a:b].transpose(0, 1), k[c:d].transpose(0, 1), v[c:d].transpose(0, 1)
            ks = ks.repeat_interleave(qs.shape[0] // ks.shape[0], 0)
            vs = vs.repeat_interleave(qs.shape[0] // vs.shape[0], 0)
            s = qs @ ks.transpose(1, 2) * softmax_scale
            if softcap:
                s = softcap * torch.tanh(s / softcap)
            i = torch.arange(b - a)[:, None] + (d - c) - (b - a)  # bottom-right alignment
            j = torch.arange(d - c)[None]
            ok = j <= i
            if window_size[0] >= 0:
                ok &= j >= i - window_size[0]
            outs.append((torch.softmax(s.masked_fill(~ok, float("-inf")), -1) @ vs
                         ).transpose(0, 1))
        return torch.cat(outs)

    monkeypatch.setitem(sys.modules, "flash_attn",
                        types.SimpleNamespace(flash_attn_varlen_func=fake))
    g = torch.Generator().manual_seed(1)
    n = layout.length
    q, k, v = (torch.randn(1, h, n, 8, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    for softcap, window in ((None, None), (2.0, 3)):
        got = segment_attention(q, k, v, layout, scale=0.3, softcap=softcap, window=window,
                                impl="flash-varlen")
        want = oracle(q, k, v, layout, 0.3, softcap, window)
        assert (got - want).abs().max().item() <= 1e-12
