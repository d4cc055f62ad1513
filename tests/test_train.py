"""The trainer on tiny random models: loss at step 1, packing, accumulation, resume, saving,
memory, bad rows, heads, data formats, non-finite steps.

Truth is either a known answer (ln 2 at step 1) or an independent float64 full-logits
computation (each sequence alone through ``model(...).logits``).
"""

import copy
import gc
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from proc_util import wait_for_line  # noqa: E402
from tiny import random_examples, tiny_config, tiny_model, tiny_tokenizer, word_rows  # noqa: E402

from dpo_fast.models import head_settings, model_parts  # noqa: E402
from dpo_fast.train import (  # noqa: E402
    PACKED_EAGER,
    PACKED_FLASH,
    PACKED_SDPA,
    PACKED_SEGMENTS,
    PADDED,
    DataError,
    TrainConfig,
    Trainer,
    TrainerCallback,
    TrainingError,
)
from dpo_fast.train.batching import (  # noqa: E402
    attention_path,
    epoch_steps,
    make_micro_batch,
    mask_plan,
    split_step,
)
from dpo_fast.train.modeling import lr_lambda  # noqa: E402
from dpo_fast.train.step import HeadSpec, micro_batch_loss  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LN2 = math.log(2.0)


def config(tmp_path, rows, **kw):
    # adaptive_threads off: it lowers torch's thread count while other processes load the
    # cores, which reorders fp32 sums, and several tests here compare runs bit for bit
    base = dict(model="tiny", train_data=rows, output_dir=str(tmp_path / "run"),
                data_cache_dir="", batch_size=4, learning_rate=1e-3, logging_steps=1,
                save_steps=None, max_tokens_per_micro_batch=96, max_length=64,
                adaptive_threads=False)
    base.update(kw)
    return TrainConfig(**base)


def metrics(out_dir):
    return [json.loads(ln) for ln in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()
            if ln.strip()]


def train_losses(out_dir):
    return [(m["step"], m["loss"]) for m in metrics(out_dir) if "loss" in m]


def full_logits_logps(model, examples):
    """float64 truth: per-sequence response log-probs [2B] (chosen then rejected), each
    sequence alone through the model's own forward and LM head."""
    m64 = copy.deepcopy(model).double().eval()
    out = []
    with torch.no_grad():
        for part in ("chosen_ids", "rejected_ids"):
            for e in examples:
                resp = getattr(e, part)
                ids = torch.from_numpy(np.concatenate([e.prompt_ids, resp]).astype(np.int64))
                lp = torch.log_softmax(m64(input_ids=ids[None]).logits[0], -1)
                p = e.prompt_ids.size
                out.append(lp[p - 1:-1].gather(1, ids[p:, None]).sum())
    return torch.stack(out)


def dpo_truth(logps, ref, beta=0.1):
    b = logps.numel() // 2
    ref = ref.double()
    h = (logps[:b] - ref[:b]) - (logps[b:] - ref[b:])
    return -F.logsigmoid(beta * h).mean()


# ------------------------------------------------------------------------------ loss at step 1


def test_step_one_loss_is_ln2_with_the_initial_policy_as_reference(tmp_path):
    res = Trainer(config(tmp_path, word_rows(24), max_steps=2),
                  model=tiny_model(), tokenizer=tiny_tokenizer()).train()
    first = train_losses(res.output_dir)[0]
    assert first[0] == 1
    assert abs(first[1] - LN2) <= 1e-6, first
    assert res.attention == PACKED_SEGMENTS  # what the trainer uses on CPU for Llama


# ------------------------------------------------------------------------------ packing


def _loss_and_grads(model, examples, ref, path, groups, masks, share=False):
    model.zero_grad(set_to_none=True)
    parts = model_parts(model)
    head = HeadSpec(*head_settings(model, None, 1.0))
    b = len(examples)
    total = 0.0
    for g in groups:
        mb = make_micro_batch([examples[i] for i in g], path, masks=masks, share_prompt=share)
        assert (mb.hidden_index is not None) == share
        r = torch.cat([ref[:b][g], ref[b:][g]])
        out = micro_batch_loss(parts, mb, r, head, dict(beta=0.1))
        (out.loss * (len(g) / b)).backward()
        total += float(out.loss.detach()) * len(g) / b
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return total, grads


@pytest.mark.parametrize("requested", ["auto", "block_mask"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_equals_padded_equals_one_at_a_time(attn, requested):
    model = tiny_model(attn_implementation=attn).train()
    path = attention_path(model, requested, torch.device("cpu"))
    assert path == (PACKED_SEGMENTS if requested == "auto"
                    else {"sdpa": PACKED_SDPA, "eager": PACKED_EAGER}[attn])
    examples = random_examples(6, seed=3)
    ref = -torch.rand(12) * 10 - 30
    masks = mask_plan(model)
    everything = [list(range(6))]
    alone = [[i] for i in range(6)]
    l_packed, g_packed = _loss_and_grads(model, examples, ref, path, everything, masks)
    l_shared, g_shared = _loss_and_grads(model, examples, ref, path, everything, masks, True)
    l_padded, g_padded = _loss_and_grads(model, examples, ref, PADDED, everything, masks)
    l_alone, g_alone = _loss_and_grads(model, examples, ref, PADDED, alone, masks)
    truth = float(dpo_truth(full_logits_logps(model, examples), ref))
    for got in (l_packed, l_shared, l_padded, l_alone):
        assert abs(got - truth) <= 2e-6, (got, truth)
    for n in g_packed:
        scale = g_alone[n].abs().max().item() + 1e-12
        for g in (g_packed, g_shared, g_padded):
            assert (g[n] - g_alone[n]).abs().max().item() <= 1e-5 * scale + 1e-7, n


def test_shared_prompt_row_layout_and_tree_mask():
    from dpo_fast.data import PreferenceExample

    a = PreferenceExample(np.array([5, 6]), np.array([7, 8]), np.array([9]))
    b = PreferenceExample(np.array([10]), np.array([11]), np.array([12, 13]))
    mb = make_micro_batch([a, b], PACKED_SDPA, share_prompt=True)
    assert mb.model_inputs["input_ids"][0].tolist() == [5, 6, 7, 8, 9, 10, 11, 12, 13]
    assert mb.model_inputs["position_ids"][0].tolist() == [0, 1, 2, 3, 2, 0, 1, 1, 2]
    assert mb.num_tokens == 2 * 2 + 2 + 1 + 2 * 1 + 1 + 2  # prompts counted per sequence
    # chosen a, chosen b, rejected a, rejected b: row 1 (a's last prompt token) predicts both
    # of a's first response tokens, row 5 both of b's.
    assert mb.hidden_index.tolist() == [1, 2, 5, 1, 5, 7]
    assert mb.targets.tolist() == [7, 8, 11, 9, 12, 13]
    assert mb.seq_index.tolist() == [0, 0, 1, 2, 3, 3]
    T, F_ = True, False
    want = [[T, F_, F_, F_, F_],  # prompt 5
            [T, T, F_, F_, F_],  # prompt 6
            [T, T, T, F_, F_],  # chosen 7
            [T, T, T, T, F_],  # chosen 8
            [T, T, F_, F_, T]]  # rejected 9: the prompt and itself, not the chosen tokens
    m = mb.model_inputs["attention_mask"][0, 0]
    assert m[:5, :5].tolist() == want
    assert not m[:5, 5:].any() and not m[5:, :5].any()  # pairs never see each other
    assert m[5:, 5:].tolist() == [[T, F_, F_, F_], [T, T, F_, F_], [T, F_, T, F_],
                                  [T, F_, T, T]]
    # A sliding window counts positions, not row offsets: rejected 9 (position 2) with a
    # window of 2 sees prompt 6 (position 1) and itself.
    w = make_micro_batch([a], PACKED_EAGER, masks={"": 2}, share_prompt=True)
    mw = w.model_inputs["attention_mask"][0, 0]
    assert (mw[4] == 0).tolist() == [F_, T, F_, F_, T]
    assert make_micro_batch([a], PACKED_FLASH, share_prompt=True).hidden_index is None


def _other_models():
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                  max_position_embeddings=256)
    return {
        "llama-tied": lambda: transformers.LlamaForCausalLM(
            transformers.LlamaConfig(**common, tie_word_embeddings=True)),
        "phi-head-bias": lambda: transformers.PhiForCausalLM(transformers.PhiConfig(**common)),
        "gemma2-softcap-sliding": lambda: transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
            **common, head_dim=8, final_logit_softcapping=2.0, sliding_window=4)),
    }


@pytest.mark.parametrize("name", list(_other_models()))
def test_heads_match_full_logits(name):
    torch.manual_seed(0)
    model = _other_models()[name]().train()
    parts = model_parts(model)
    if name == "llama-tied":
        assert parts.weight is model.get_input_embeddings().weight
    if name == "phi-head-bias":
        assert parts.bias is not None
    if name.startswith("gemma2"):
        assert head_settings(model, None, 1.0)[0] == 2.0
    examples = random_examples(4, seed=5)
    ref = -torch.rand(8) * 10 - 30
    truth_logps = full_logits_logps(model, examples)
    truth = float(dpo_truth(truth_logps, ref))
    path = attention_path(model, "auto", torch.device("cpu"))
    assert path != PADDED
    for p, share in ((path, False), (path, True), (PADDED, False)):
        mb = make_micro_batch(examples, p, masks=mask_plan(model), share_prompt=share)
        out = micro_batch_loss(parts, mb, ref, HeadSpec(*head_settings(model, None, 1.0)),
                               dict(beta=0.1))
        got = float(out.loss.detach())
        assert abs(got - truth) <= 2e-6, (p, got, truth)
        assert (out.policy_logps.double() - truth_logps).abs().max().item() <= 2e-5


def test_a_leaking_packed_path_is_refused_or_replaced(monkeypatch):
    from dpo_fast.ops.segment_attention import SegmentLayout
    from dpo_fast.train import batching

    model = tiny_model()
    # A mask that lets sequences see each other: the startup check must catch it.
    real = batching.block_causal_mask
    monkeypatch.setattr(batching, "block_causal_mask",
                        lambda seq, kind, window=None, pos=None, branch=None:
                        real(torch.zeros_like(seq), kind, window, pos, branch))
    with pytest.raises(ValueError, match="attention='block_mask' is not sound"):
        attention_path(model, "block_mask", torch.device("cpu"))
    assert attention_path(model, "auto", torch.device("cpu")) == PACKED_SEGMENTS
    # Segments that run the row as one sequence leak too: auto falls back to the (leaking)
    # mask, then to padded rows; "segments" refuses.
    model = tiny_model()
    monkeypatch.setattr(SegmentLayout, "of_sequences",
                        classmethod(lambda cls, n: cls(((0, sum(n), 0, 0),), sum(n))))
    with pytest.warns(RuntimeWarning, match="no segment attention"):
        with pytest.warns(RuntimeWarning, match="padded batches"):
            assert attention_path(model, "auto", torch.device("cpu")) == PADDED
    assert model.config._attn_implementation == "sdpa"  # put back
    with pytest.raises(ValueError, match="attention='segments' is not sound"):
        attention_path(model, "segments", torch.device("cpu"))
    with pytest.raises(ValueError, match="attention='packed' is not sound"):
        attention_path(model, "packed", torch.device("cpu"))


def test_epoch_order_and_micro_batches():
    lengths = np.arange(50) % 17 + 5
    a = epoch_steps(lengths, 4, seed=1, epoch=0)
    assert a == a and [x.tolist() for x in a] == [x.tolist() for x in
                                                   epoch_steps(lengths, 4, seed=1, epoch=0)]
    assert sorted(np.concatenate(a).tolist()) == list(range(50))
    assert sum(len(s) < 4 for s in a) == 1
    b = epoch_steps(lengths, 4, seed=1, epoch=1)
    assert [x.tolist() for x in a] != [x.tolist() for x in b]
    cost = lambda idx: sum(int(lengths[i]) for i in idx)  # noqa: E731
    for step in a:
        mbs = split_step(step, cost, 30, None)
        assert sum(mbs, []) == step.tolist()
        assert all(cost(m) <= 30 or len(m) == 1 for m in mbs)
        assert all(len(m) <= 2 for m in split_step(step, cost, 10**6, 2))


# ------------------------------------------------------------------------------ accumulation


def test_gradient_accumulation_4x1_equals_1x4(tmp_path):
    rows = word_rows(32, seed=2)
    runs = {}
    for name, mbs in (("4x1", 1), ("1x4", None)):
        cfg = config(tmp_path / name, rows, max_steps=5, micro_batch_size=mbs,
                     max_tokens_per_micro_batch=4096, ref_cache_dir=str(tmp_path / "ref"))
        t = Trainer(cfg, model=tiny_model(), tokenizer=tiny_tokenizer())
        t.train()
        runs[name] = (train_losses(cfg.output_dir), dict(t.model.named_parameters()))
    (la, pa), (lb, pb) = runs["4x1"], runs["1x4"]
    assert [s for s, _ in la] == [1, 2, 3, 4, 5]
    for (_, x), (_, y) in zip(la, lb):
        assert abs(x - y) <= 1e-5
    assert la[-1][1] != la[0][1]  # the weights moved
    for n in pa:
        assert (pa[n] - pb[n]).abs().max().item() <= 1e-5, n


# ------------------------------------------------------------------------------ resume

_SCRIPT = textwrap.dedent("""
    import json, os, sys, time
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    from tiny import tiny_tokenizer, word_rows
    from dpo_fast.train import TrainConfig, Trainer, TrainerCallback

    class Pace(TrainerCallback):
        def on_step_end(self, trainer, state):
            print("STEP", state.global_step, flush=True)
            if state.global_step == int(os.environ.get("HOLD_AT", "0")):
                time.sleep(120)
            if os.environ.get("SLOW"):
                time.sleep(float(os.environ["SLOW"]))

    cfg = TrainConfig(model={model!r}, train_data=word_rows(40, seed=4), eval_fraction=0.2,
                      output_dir=sys.argv[1], data_cache_dir="", batch_size=4,
                      learning_rate=1e-3, logging_steps=1, save_steps=2, max_steps=9,
                      max_tokens_per_micro_batch=64, max_length=64,
                      ref_cache_dir={ref!r}, resume_from_checkpoint=len(sys.argv) > 2)
    res = Trainer(cfg, callbacks=[Pace()]).train()
    print("RESULT", json.dumps(res.to_dict()), flush=True)
""")


def _spawn(script, out, *extra, env=None):
    e = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", **(env or {}))
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    return subprocess.Popen([sys.executable, str(script), str(out), *extra], env=e,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny") / "model"
    tiny_model(seed=7).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


def test_kill_and_sigint_resume_bitwise(tmp_path, saved_tiny):
    script = tmp_path / "run.py"
    script.write_text(_SCRIPT.format(tests=str(ROOT / "tests"), model=str(saved_tiny),
                                     ref=str(tmp_path / "ref")))
    full = _spawn(script, tmp_path / "full")
    assert full.wait(300) == 0, full.stderr.read()[-3000:]
    want = train_losses(tmp_path / "full")
    assert [s for s, _ in want] == list(range(1, 10))

    # kill -9 while step 5 is being followed (checkpoint-4 is the last one written)
    p = _spawn(script, tmp_path / "killed", env={"HOLD_AT": "5"})
    wait_for_line(p, "STEP 5")
    p.kill()
    p.wait(30)
    assert (tmp_path / "killed" / "checkpoint-4").is_dir()
    assert not (tmp_path / "killed" / "checkpoint-6").exists()
    r = _spawn(script, tmp_path / "killed", "resume")
    assert r.wait(300) == 0, r.stderr.read()[-3000:]
    assert train_losses(tmp_path / "killed") == want  # bitwise: floats compared exactly
    ev_full = [m for m in metrics(tmp_path / "full") if "eval/loss" in m]
    ev_killed = [m for m in metrics(tmp_path / "killed") if "eval/loss" in m]
    assert ev_full == ev_killed

    # SIGINT: a checkpoint is written and the process exits cleanly
    p = _spawn(script, tmp_path / "sigint", env={"SLOW": "0.5"})
    wait_for_line(p, "STEP 3")
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-3000:]
    summary = json.loads(out.split("RESULT ", 1)[1])
    assert summary["interrupted"] is True
    step = summary["global_step"]
    assert (tmp_path / "sigint" / f"checkpoint-{step}").is_dir()
    r = _spawn(script, tmp_path / "sigint", "resume")
    assert r.wait(300) == 0, r.stderr.read()[-3000:]
    assert train_losses(tmp_path / "sigint") == want


def test_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path, saved_tiny):
    cfg = config(tmp_path, word_rows(24), model=str(saved_tiny), max_steps=4, save_steps=2,
                 save_total_limit=3)
    Trainer(cfg).train()
    want = train_losses(cfg.output_dir)
    last = Path(cfg.output_dir) / "checkpoint-4" / "model.safetensors"
    last.write_bytes(last.read_bytes()[:-8] + b"\0" * 8)
    with open(Path(cfg.output_dir) / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 0.6')  # a line cut by a kill mid-write
    cfg2 = config(tmp_path, word_rows(24), model=str(saved_tiny), max_steps=4, save_steps=2,
                  resume_from_checkpoint=True)
    with pytest.warns(RuntimeWarning, match="damaged checkpoint"):
        res = Trainer(cfg2).train()
    assert res.global_step == 4
    assert train_losses(cfg.output_dir) == want


# ------------------------------------------------------------------------------ saving


def test_saved_model_reloads_with_from_pretrained(tmp_path):
    cfg = config(tmp_path, word_rows(24), max_steps=3)
    t = Trainer(cfg, model=tiny_model(), tokenizer=tiny_tokenizer())
    res = t.train()
    assert res.model_dir == cfg.output_dir
    loaded = transformers.AutoModelForCausalLM.from_pretrained(res.model_dir,
                                                               dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(res.model_dir)
    assert tok("the movie")["input_ids"] == tiny_tokenizer()("the movie")["input_ids"]
    for (n, a), (m, b) in zip(t.model.state_dict().items(), loaded.state_dict().items()):
        assert n == m and torch.equal(a, b), n
    ex = t.train_data.examples[:3]
    assert torch.equal(full_logits_logps(t.model, ex), full_logits_logps(loaded, ex))
    assert not torch.equal(full_logits_logps(tiny_model(), ex), full_logits_logps(loaded, ex))


# ------------------------------------------------------------------------------ memory


def test_no_reference_model_alive_during_the_loop(tmp_path, saved_tiny):
    def causal_lms():  # whole models (their bodies are PreTrainedModels too)
        gc.collect()
        return [o for o in gc.get_objects() if isinstance(o, transformers.LlamaForCausalLM)]

    seen = []

    class Count(TrainerCallback):
        def on_ref_progress(self, trainer, progress):
            seen.append(("ref", len(causal_lms())))

        def on_step_end(self, trainer, state):
            lms = causal_lms()
            seen.append(("step", len(lms)))
            assert lms[0] is trainer.model

    cfg = config(tmp_path, word_rows(24), model=str(saved_tiny), ref_model=str(saved_tiny),
                 max_steps=3)
    assert causal_lms() == []
    Trainer(cfg, callbacks=[Count()]).train()
    assert ("ref", 2) in seen  # the reference model existed while the cache was built ...
    assert [n for kind, n in seen if kind == "step"] == [1, 1, 1]  # ... and not after


_MEMORY = textwrap.dedent("""
    import ctypes, json, re, sys
    ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)  # no transparent huge pages: RSS in 4 KiB pages
    import torch
    torch.set_num_threads(2)
    import numpy as np
    import transformers
    from dpo_fast import PreferenceExample
    from dpo_fast.train import TrainConfig, Trainer, TrainerCallback

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    def hwm():
        with open("/proc/self/status") as f:
            return int(re.search(r"VmHWM:\\s+(\\d+)", f.read()).group(1)) * 1024

    V, D, N = 65536, 64, 2048
    cfg = transformers.LlamaConfig(hidden_size=D, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   vocab_size=V, tie_word_embeddings=True,
                                   max_position_embeddings=4096)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    g = np.random.default_rng(0)
    # 8 pairs of prompt 28 + responses 100 each: 2048 tokens, 1600 of them response tokens
    rows = [dict(prompt=g.integers(3, V, 28), chosen=g.integers(3, V, 100),
                 rejected=g.integers(3, V, 100)) for _ in range(16)]
    examples = [PreferenceExample(r["prompt"], r["chosen"], r["rejected"]) for r in rows]
    out = {{}}

    class Probe(TrainerCallback):
        def on_train_begin(self, trainer, state):
            out["base"] = rss()
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        def on_step_end(self, trainer, state):
            out["peak"] = hwm()

    class Tr(Trainer):
        def prepare_data(self):
            from dpo_fast.data import PreparedData
            self.train_data = PreparedData(examples, [str(i) for i in range(16)])
            self.eval_data = None

    tc = TrainConfig(model="mem", train_data=[{{}}], output_dir=sys.argv[1], batch_size=8,
                     max_steps=3, max_tokens_per_micro_batch=N, learning_rate=1e-4,
                     save_steps=None, save_final_model=False, max_length=None)
    Tr(tc, model=model, tokenizer=None, callbacks=[Probe()]).train()
    params = sum(p.numel() * 4 for p in model.parameters())
    out.update(params=params, logits=N * V * 4)
    print(json.dumps(out))
""")


def test_step_peak_memory_is_policy_state_plus_activations(tmp_path):
    script = tmp_path / "mem.py"
    script.write_text(_MEMORY.format())
    e = dict(os.environ, OPENBLAS_NUM_THREADS="1",
             PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, str(script), str(tmp_path / "out")], env=e,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads(r.stdout.strip().splitlines()[-1])
    extra = m["peak"] - m["base"]
    # grads (1x) + AdamW state (2x) of the weights, activations of 2048 tokens (the [L, L]
    # block mask is 4 MiB), the fused loss's bounded scratch (40 MiB), and 64 MiB of slack.
    bound = 3 * m["params"] + (40 << 20) + (64 << 20) + (16 << 20)
    print(f"peak extra {extra / 2**20:.0f} MiB, bound {bound / 2**20:.0f} MiB, fp32 logits "
          f"{m['logits'] / 2**20:.0f} MiB")
    assert extra <= bound
    assert extra < 0.5 * m["logits"]


# ------------------------------------------------------------------------------ bad rows

BAD_CASES = {
    "missing_field": ({"prompt": "the movie", "chosen": " good"}, "field 'rejected' is missing"),
    "empty": ({"prompt": "the movie", "chosen": " ", "rejected": " bad"},
              "field 'chosen' is empty"),
    "bad_type": ({"prompt": "the movie", "chosen": 5, "rejected": " bad"},
                 "field 'chosen' must be a string"),
    "undecodable": ({"prompt": "the movie", "chosen": " good \ud800", "rejected": " bad"},
                    "cannot be encoded as UTF-8"),
    "not_a_mapping": ("the movie was good", "expected a mapping"),
    "prompt_too_long": ({"prompt": " ".join(["the"] * 80), "chosen": " good",
                         "rejected": " bad"}, "the prompt alone reaches max_length"),
    "identical": ({"prompt": "the movie", "chosen": " good", "rejected": " good"},
                  "chosen == rejected"),
}


@pytest.mark.parametrize("reason", list(BAD_CASES))
def test_bad_rows_error_or_skip(tmp_path, reason):
    row, message = BAD_CASES[reason]
    rows = word_rows(6, seed=1)
    rows.insert(3, row)
    t = Trainer(config(tmp_path, rows, bad_rows="error"), model=tiny_model(),
                tokenizer=tiny_tokenizer())
    with pytest.raises(DataError) as e:
        t.prepare_data()
    assert "train_data row 3" in str(e.value) and message in str(e.value)
    t = Trainer(config(tmp_path, rows, bad_rows="skip"), model=tiny_model(),
                tokenizer=tiny_tokenizer())
    with pytest.warns(UserWarning, match="1 of 7 rows skipped"):
        t.prepare_data()
    assert t.train_data.skipped == {reason: 1}
    assert t.train_data.skipped_rows[reason] == ["train_data row 3"]
    assert len(t.train_data.examples) == 6


def test_bad_utf8_line_in_a_file(tmp_path):
    rows = word_rows(5, seed=1)
    lines = [json.dumps(r).encode() for r in rows]
    lines.insert(2, b'{"prompt": "the \xff movie", "chosen": " a", "rejected": " b"}')
    f = tmp_path / "d.jsonl"
    f.write_bytes(b"\n".join(lines) + b"\n")
    t = Trainer(config(tmp_path, str(f), bad_rows="error"), model=tiny_model(),
                tokenizer=tiny_tokenizer())
    with pytest.raises(DataError, match=r"d.jsonl:3: not valid UTF-8 \(byte 0xff at column 17"):
        t.prepare_data()
    t = Trainer(config(tmp_path, str(f)), model=tiny_model(), tokenizer=tiny_tokenizer())
    t.prepare_data()
    assert t.train_data.skipped == {"undecodable": 1}
    assert t.train_data.skipped_rows["undecodable"] == ["d.jsonl line 3"]
    assert t.train_data.row_names[2] == "d.jsonl line 4"


def test_no_usable_rows_is_an_error(tmp_path):
    rows = [{"prompt": "a", "chosen": " good", "rejected": " good"}] * 3
    t = Trainer(config(tmp_path, rows), model=tiny_model(), tokenizer=tiny_tokenizer())
    with pytest.raises(DataError, match="no usable rows"), pytest.warns(UserWarning):
        t.train()


# ------------------------------------------------------------------------------ data formats


def _examples(tmp_path, data, **kw):
    t = Trainer(config(tmp_path, data, **kw), model=tiny_model(), tokenizer=tiny_tokenizer())
    t.prepare_data()
    return t


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet", "dataset", "list"])
def test_data_sources_give_the_same_examples(tmp_path, fmt):
    import datasets

    rows = word_rows(12, seed=6)
    want = [e.key for e in _examples(tmp_path, rows).train_data.examples]
    ds = datasets.Dataset.from_list(rows)
    src = {"dataset": ds, "list": rows}.get(fmt)
    if src is None:
        src = str(tmp_path / f"d.{fmt}")
        if fmt == "jsonl":
            Path(src).write_text("".join(json.dumps(r) + "\n" for r in rows))
        elif fmt == "json":
            Path(src).write_text(json.dumps(rows))
        elif fmt == "csv":
            ds.to_csv(src, index=False)
        else:
            ds.to_parquet(src)
    assert [e.key for e in _examples(tmp_path, src).train_data.examples] == want


def test_conversational_implicit_and_renamed_columns(tmp_path):
    conv = [{"prompt": [{"role": "user", "content": "the movie"}],
             "chosen": [{"role": "assistant", "content": "good"}],
             "rejected": [{"role": "assistant", "content": "bad"}]}]
    t = _examples(tmp_path, conv)
    tok = tiny_tokenizer()
    ex = t.train_data.examples[0]
    full = tok.apply_chat_template(conv[0]["prompt"] + conv[0]["chosen"], tokenize=True,
                                   return_dict=True)["input_ids"]
    assert list(ex.prompt_ids) + list(ex.chosen_ids) == list(full)
    implicit = [{"chosen": conv[0]["prompt"] + conv[0]["chosen"],
                 "rejected": conv[0]["prompt"] + conv[0]["rejected"]}]
    assert _examples(tmp_path, implicit).train_data.examples[0].key == ex.key
    s_implicit = [{"chosen": "the movie was good", "rejected": "the movie was bad"}]
    e2 = _examples(tmp_path, s_implicit).train_data.examples[0]
    e3 = _examples(tmp_path, [{"prompt": "the movie was", "chosen": " good",
                               "rejected": " bad"}]).train_data.examples[0]
    assert e2.key == e3.key
    renamed = [{"q": "the movie was", "good": " good", "bad": " bad"}]
    e4 = _examples(tmp_path, renamed, prompt_column="q", chosen_column="good",
                   rejected_column="bad").train_data.examples[0]
    assert e4.key == e3.key


def test_tokenized_data_is_cached(tmp_path, monkeypatch):
    from dpo_fast.data import pipeline

    rows = word_rows(10, seed=8)
    cache = str(tmp_path / "tok")
    first = _examples(tmp_path, rows, data_cache_dir=cache).train_data
    assert not first.from_cache
    calls = []
    real = pipeline.tokenize_rows
    monkeypatch.setattr(pipeline, "tokenize_rows",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    second = _examples(tmp_path, rows, data_cache_dir=cache).train_data
    assert second.from_cache and not calls
    assert [e.key for e in second.examples] == [e.key for e in first.examples]
    third = _examples(tmp_path, rows, data_cache_dir=cache, max_length=6).train_data
    assert not third.from_cache and calls  # another setting, another entry


def test_eval_split_by_group_is_deterministic(tmp_path):
    rows = [dict(r, movie=f"m{i % 7}") for i, r in enumerate(word_rows(42, seed=9))]
    a = _examples(tmp_path, rows, eval_fraction=0.3, eval_group_column="movie")
    b = _examples(tmp_path, rows, eval_fraction=0.3, eval_group_column="movie")
    assert a.eval_data.row_names == b.eval_data.row_names
    ev = {int(n.split()[-1]) for n in a.eval_data.row_names}
    tr = {int(n.split()[-1]) for n in a.train_data.row_names}
    assert not ev & tr and len(ev) + len(tr) == 42
    assert not {rows[i]["movie"] for i in ev} & {rows[i]["movie"] for i in tr}
    assert len({rows[i]["movie"] for i in ev}) == 2  # round(0.3 * 7) movies held out


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="TrainConfig.beta must be"):
        TrainConfig(model="m", train_data=[], beta=0).validate()
    with pytest.raises(ValueError, match="TrainConfig.loss_type must be"):
        TrainConfig(model="m", train_data=[], loss_type="dpo").validate()
    with pytest.raises(ValueError, match="'learning_rat' \\(did you mean 'learning_rate'"):
        TrainConfig.from_dict({"model": "m", "learning_rat": 1e-3})
    with pytest.raises(ValueError, match="TrainConfig.train_data is required"):
        TrainConfig(model="m").validate()


# ------------------------------------------------------------------------------ loop details


def test_schedules():
    lin = lr_lambda("linear", 2, 10)
    assert [lin(s) for s in (0, 1, 2, 6, 10)] == [0.0, 0.5, 1.0, 0.5, 0.0]
    cos = lr_lambda("cosine", 0, 10)
    assert cos(0) == 1.0 and abs(cos(5) - 0.5) < 1e-12 and abs(cos(10)) < 1e-12
    assert lr_lambda("constant", 3, 10)(1) == pytest.approx(1 / 3)
    assert lr_lambda("constant", 3, 10)(7) == 1.0


@pytest.mark.parametrize("loss_type,extra", [("ipo", {}), ("simpo", {}), ("sigmoid",
                                                                         {"rpo_alpha": 0.5}),
                                              ("orpo", {"optimizer": "rmsprop"}),
                                              ("unlikelihood", {"unlikelihood_alpha": 0.5}),
                                              ("sft", {})])
def test_loss_types_and_options_train(tmp_path, loss_type, extra):
    res = Trainer(config(tmp_path, word_rows(16), max_steps=2, loss_type=loss_type, **extra),
                  model=tiny_model(), tokenizer=tiny_tokenizer()).train()
    ms = train_losses(res.output_dir)
    assert len(ms) == 2 and all(math.isfinite(v) for _, v in ms)
    ref_free = loss_type in ("simpo", "orpo", "unlikelihood", "sft")
    assert (Path(res.output_dir) / "ref_cache").exists() != ref_free
    if loss_type == "ipo":
        assert abs(ms[0][1] - 1 / (4 * 0.1 ** 2)) <= 1e-3  # h = 0 at step 1: 1/(4 beta^2)


def test_gradient_checkpointing_gives_the_same_losses(tmp_path):
    out = {}
    for gc_on in (False, True):
        cfg = config(tmp_path / str(gc_on), word_rows(16), max_steps=3,
                     gradient_checkpointing=gc_on, ref_cache_dir=str(tmp_path / "ref"))
        Trainer(cfg, model=tiny_model(), tokenizer=tiny_tokenizer()).train()
        out[gc_on] = train_losses(cfg.output_dir)
    for (_, a), (_, b) in zip(out[False], out[True]):
        assert abs(a - b) <= 1e-6


def test_a_pair_over_the_token_budget_is_checkpointed_with_the_same_result(tmp_path):
    """checkpoint_long_pairs: a micro-batch longer than max_tokens_per_micro_batch (here every
    pair) recomputes each layer in backward (the layer runs twice per micro-batch), micro-
    batches within the budget do not; weights after training equal a run without it."""
    weights, calls = {}, {}
    for budget, armed in ((8, True), (8, False), (4096, True)):
        model = tiny_model()
        n = [0]
        model.model.layers[0].self_attn.register_forward_pre_hook(  # training (re)computes
            lambda *a: n.__setitem__(0, n[0] + torch.is_grad_enabled()))
        cfg = config(tmp_path / f"{budget}{armed}", word_rows(8), max_steps=2, batch_size=2,
                     max_tokens_per_micro_batch=budget, checkpoint_long_pairs=armed,
                     ref_cache_dir=str(tmp_path / "ref"))
        t = Trainer(cfg, model=model, tokenizer=tiny_tokenizer())
        n[0] = 0
        t.train()
        weights[budget, armed] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        calls[budget, armed] = n[0]
    assert calls[8, True] == 2 * calls[8, False] > 0  # 2 steps x 2 pairs, each recomputed
    assert calls[4096, True] < calls[8, False]  # within the budget: one row per step, once
    for k, v in weights[8, False].items():
        assert torch.equal(weights[8, True][k], v), k


class _Poison(TrainerCallback):
    """Makes the loss of the steps in ``bad`` NaN (through the public micro-batch hook)."""

    def __init__(self, bad):
        self.bad = bad

    def on_micro_batch(self, trainer, state, batch, out):
        if state.global_step + 1 in self.bad:
            object.__setattr__(out, "loss", out.loss * float("nan"))
            object.__setattr__(out, "losses", out.losses * float("nan"))
        return out


def test_non_finite_steps_are_skipped_then_stop(tmp_path):
    t = Trainer(config(tmp_path, word_rows(24), max_steps=4), model=tiny_model(),
                tokenizer=tiny_tokenizer(), callbacks=[_Poison((2,))])
    before = {}

    class Snap(TrainerCallback):
        def on_step_end(self, trainer, state):
            before[state.global_step] = trainer.parts.weight.detach().clone()

    t.callbacks.append(Snap())
    with pytest.warns(RuntimeWarning, match="step 2: non-finite loss"):
        res = t.train()
    assert res.skipped_steps == 1 and res.global_step == 4
    assert torch.equal(before[1], before[2])  # the skipped step changed nothing
    assert not torch.equal(before[2], before[3])
    assert all(math.isfinite(p.detach().sum().item()) for p in t.model.parameters())
    t = Trainer(config(tmp_path / "b", word_rows(24), max_steps=8, max_bad_steps=3),
                model=tiny_model(), tokenizer=tiny_tokenizer(),
                callbacks=[_Poison((3, 4, 5, 6))])
    with pytest.raises(TrainingError, match="3 steps in a row had a non-finite"), \
            pytest.warns(RuntimeWarning):
        t.train()


# ------------------------------------------------------------------------------ options


def test_lora_adapters_train_save_reload_and_merge(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_model()
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    cfg = config(tmp_path, word_rows(24), max_steps=3, lora_r=4, lora_alpha=8.0,
                 merge_lora=True, save_steps=2)
    t = Trainer(cfg, model=base, tokenizer=tiny_tokenizer())
    res = t.train()
    assert t.parts.weight.requires_grad is False  # frozen head: no dW GEMM in the fused op
    assert train_losses(res.output_dir)[0][1] == pytest.approx(LN2, abs=1e-6)
    out = Path(res.output_dir)
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    ex = t.train_data.examples[:3]
    reloaded = peft.PeftModel.from_pretrained(tiny_model(), str(out))
    merged = transformers.AutoModelForCausalLM.from_pretrained(out / "merged",
                                                               dtype=torch.float32)
    want = full_logits_logps(t.model, ex)  # t.model is the merged model after save_model
    assert (full_logits_logps(reloaded, ex) - want).abs().max().item() <= 1e-5
    assert (full_logits_logps(merged, ex) - want).abs().max().item() <= 1e-5
    assert (full_logits_logps(tiny_model(), ex) - want).abs().max().item() > 1e-4
    # the base weights never moved; the checkpoint holds the adapters only
    from safetensors.torch import load_file

    names = load_file(str(out / "checkpoint-2" / "model.safetensors"))
    assert names and all("lora_" in n for n in names)
    fresh = reloaded.get_base_model()
    for n, p in fresh.named_parameters():
        if "lora_" not in n and n in before:
            assert torch.equal(p, before[n]), n


def test_bf16_autocast_tracks_fp32(tmp_path):
    rows = word_rows(16)
    got = {}
    for prec in ("fp32", "bf16"):
        cfg = config(tmp_path / prec, rows, max_steps=3, precision=prec,
                     ref_cache_dir=str(tmp_path / "ref"))
        Trainer(cfg, model=tiny_model(), tokenizer=tiny_tokenizer()).train()
        got[prec] = [v for _, v in train_losses(cfg.output_dir)]
    assert all(abs(a - b) <= 2e-2 for a, b in zip(got["fp32"], got["bf16"])), got
    assert got["fp32"] != got["bf16"]  # bf16 really ran


def test_torch_compile_of_the_body_gives_the_same_losses(tmp_path):
    rows = word_rows(16)
    got = {}
    for comp in (False, True):
        cfg = config(tmp_path / str(comp), rows, max_steps=2, torch_compile=comp,
                     ref_cache_dir=str(tmp_path / "ref"), micro_batch_size=4,
                     max_tokens_per_micro_batch=4096)
        Trainer(cfg, model=tiny_model(), tokenizer=tiny_tokenizer()).train()
        got[comp] = [v for _, v in train_losses(cfg.output_dir)]
    assert all(abs(a - b) <= 1e-5 for a, b in zip(got[False], got[True])), got


def test_a_model_without_a_known_head_is_refused_by_name(tmp_path):
    body = transformers.LlamaModel(tiny_config())  # a body without an LM head
    with pytest.raises(ValueError, match="LlamaModel is not supported"):
        Trainer(config(tmp_path, word_rows(8), max_steps=1), model=body,
                tokenizer=tiny_tokenizer()).train()
