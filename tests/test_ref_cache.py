"""Reference log-prob cache (dpo_fast.refcache), preference examples (dpo_fast.data), CLI.

Values are checked against an independent oracle: a plain full-logits forward of the same
model in float64 (truth) and in float32 ("same fp32 computation"), one sequence at a time, with
the project's rule |cache - truth| <= |fp32 full-logits - truth| + 1e-5 * max(1, |truth|).
Crash safety is checked by SIGKILL-ing real build processes; the distributed build by two
gloo processes. The model is a tiny random Llama (fast; real-model checks are separate).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import inspect
import io
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from dpo_fast import (
    CorruptCacheError,
    FingerprintMismatchError,
    MissingRowsError,
    PreferenceExample,
    RefCacheError,
    RefLogProbCache,
    pack_pair_batch,
    tokenize_preference,
)
from dpo_fast.cli import ProgressBar, main
from dpo_fast.data import PromptTooLongError, read_rows, tokenize_dataset
from dpo_fast.refcache import BuildProgress, fingerprint
from dpo_fast.refcache.build import BuildOptions

transformers = pytest.importorskip("transformers")

from tiny import (  # noqa: E402
    VOCAB,
    WORDS,
    random_examples,
    tiny_model,
    tiny_tokenizer,
)

ROOT = Path(__file__).resolve().parents[1]
ROWS_PER_SHARD = 5
BATCH_TOKENS = 96


# ----------------------------------------------------------------------------- oracle


@torch.no_grad()
def oracle(model, examples, *, softcap=None, temperature=1.0):
    """Full-logits log-probs, one sequence at a time. Returns dict of float64 arrays:
    truth / fp32 sums [B, 2] (chosen, rejected) and per-token lists (truth, fp32)."""
    m64 = copy.deepcopy(model).double()
    out = {"truth": [], "fp32": [], "tok_truth": [], "tok_fp32": []}
    for ex in examples:
        row_t, row_f, tt, tf = [], [], [], []
        for resp in (ex.chosen_ids, ex.rejected_ids):
            ids = torch.from_numpy(np.concatenate([ex.prompt_ids, resp]).astype(np.int64))[None]
            p, n = ex.prompt_ids.size, resp.size
            tgt = torch.from_numpy(resp.astype(np.int64))[:, None]
            for m, dt, sums, toks in ((m64, torch.float64, row_t, tt),
                                      (model, torch.float32, row_f, tf)):
                z = m(input_ids=ids).logits[0].to(dt)
                if softcap is not None:
                    z = softcap * torch.tanh(z / softcap)
                z = z / temperature
                lp = torch.log_softmax(z, -1)[p - 1: p - 1 + n].gather(-1, tgt)[:, 0]
                sums.append(lp.double().sum().item())
                toks.append(lp.double().numpy())
        out["truth"].append(row_t)
        out["fp32"].append(row_f)
        out["tok_truth"].append(tt)
        out["tok_fp32"].append(tf)
    out["truth"] = np.array(out["truth"])
    out["fp32"] = np.array(out["fp32"])
    return out


def assert_rule(name, got, same, truth):
    """|got - truth| <= |same - truth| + 1e-5 * max(1, |truth|), elementwise."""
    got, same, truth = (np.asarray(x, dtype=np.float64) for x in (got, same, truth))
    assert got.shape == truth.shape, f"{name}: shape {got.shape} != {truth.shape}"
    assert np.isfinite(got).all(), f"{name}: non-finite values"
    err = np.abs(got - truth)
    bound = np.abs(same - truth) + 1e-5 * np.maximum(1.0, np.abs(truth))
    bad = err > bound
    assert not bad.any(), (f"{name}: {int(bad.sum())} value(s) out of tolerance; worst "
                           f"err {err.max():.3g} vs bound {bound[np.argmax(err - bound)]:.3g}")


def check_against_oracle(cache, examples, orc, *, per_token=False):
    c, r = cache.lookup(examples, split=True)
    assert c.dtype == torch.float32 and r.dtype == torch.float32
    assert_rule("chosen", c.numpy(), orc["fp32"][:, 0], orc["truth"][:, 0])
    assert_rule("rejected", r.numpy(), orc["fp32"][:, 1], orc["truth"][:, 1])
    lc, lr = cache.lengths(examples, split=True)
    assert lc.tolist() == [ex.chosen_ids.size for ex in examples]
    assert lr.tolist() == [ex.rejected_ids.size for ex in examples]
    if per_token:
        for i, ex in enumerate(examples):
            tc, tr = cache.token_logps(ex.key)
            assert_rule(f"tokens chosen {i}", tc.numpy(), orc["tok_fp32"][i][0],
                        orc["tok_truth"][i][0])
            assert_rule(f"tokens rejected {i}", tr.numpy(), orc["tok_fp32"][i][1],
                        orc["tok_truth"][i][1])


def dir_bytes(d: Path):
    """{relative path: bytes} of every file under ``d``."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def examples():
    return random_examples(36)


@pytest.fixture(scope="module")
def orc(model, examples):
    return oracle(model, examples)


@pytest.fixture(scope="module")
def built(model, examples, tmp_path_factory):
    d = tmp_path_factory.mktemp("built") / "cache"
    cache = RefLogProbCache.build(model, examples, d, batch_tokens=BATCH_TOKENS,
                                  rows_per_shard=ROWS_PER_SHARD, per_token=True)
    return cache


@pytest.fixture(scope="module")
def saved(model, examples, tmp_path_factory):
    """The tiny model + tokenizer saved with save_pretrained, and the examples as JSON."""
    d = tmp_path_factory.mktemp("saved")
    model.save_pretrained(d / "model")
    tiny_tokenizer().save_pretrained(d / "model")
    rows = [[ex.prompt_ids.tolist(), ex.chosen_ids.tolist(), ex.rejected_ids.tolist()]
            for ex in examples]
    (d / "examples.json").write_text(json.dumps(rows))
    return d


BUILD_SCRIPT = textwrap.dedent("""
    import json, os, signal, sys
    import torch
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM
    from dpo_fast import PreferenceExample, RefLogProbCache
    model_dir, ex_file, out, kill = sys.argv[1:5]
    exs = [PreferenceExample(*r) for r in json.load(open(ex_file))]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    event, _, at = kill.partition(":")
    def progress(p):
        if event == "shard" and p.event == "shard" and p.shards_done == int(at):
            os.kill(os.getpid(), signal.SIGKILL)
        if event == "batch" and p.event == "batch" and p.rows_done >= int(at):
            os.kill(os.getpid(), signal.SIGKILL)
    RefLogProbCache.build(model, exs, out, batch_tokens=%d, rows_per_shard=%d,
                          progress=progress)
    print("finished")
""" % (BATCH_TOKENS, ROWS_PER_SHARD))


def _env():
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
               HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    return env


def start_build(saved, out, kill="none"):
    return subprocess.Popen([sys.executable, "-c", BUILD_SCRIPT, str(saved / "model"),
                             str(saved / "examples.json"), str(out), kill],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(),
                            cwd=str(ROOT))


def finish(proc, expect_killed):
    out, err = proc.communicate(timeout=120)
    if expect_killed:
        assert proc.returncode == -signal.SIGKILL, (proc.returncode, err.decode()[-2000:])
    else:
        assert proc.returncode == 0 and b"finished" in out, err.decode()[-2000:]


@pytest.fixture(scope="module")
def reference(saved, tmp_path_factory):
    """An uninterrupted build by the subprocess script (1 thread), as the bitwise reference."""
    out = tmp_path_factory.mktemp("reference") / "cache"
    finish(start_build(saved, out), expect_killed=False)
    return out


# ----------------------------------------------------------------------------- examples


def test_key_is_documented_hash_and_type_independent():
    ex = PreferenceExample([1, 2, 3], (4,), np.array([5, 6], dtype=np.int64))
    h = hashlib.sha256(b"dpo_fast/pref/v1\0" + struct.pack("<3Q", 3, 1, 2)
                       + np.array([1, 2, 3, 4, 5, 6], dtype="<i4").tobytes())
    assert ex.key == h.digest()[:16].hex() and len(ex.key) == 32
    same = PreferenceExample(torch.tensor([1, 2, 3]), np.array([4], np.int32), [5, 6])
    assert same.key == ex.key and same == ex and hash(same) == hash(ex)
    # the same ids split differently are a different example
    assert PreferenceExample([1, 2], [3, 4], [5, 6]).key != ex.key
    assert ex.prompt_ids.dtype == np.int32 and not ex.prompt_ids.flags.writeable


@pytest.mark.parametrize("kw, msg", [
    (dict(prompt_ids=[], chosen_ids=[1], rejected_ids=[1]), "prompt_ids is empty"),
    (dict(prompt_ids=[1], chosen_ids=[], rejected_ids=[1]), "chosen_ids is empty"),
    (dict(prompt_ids=[1], chosen_ids=[-3], rejected_ids=[1]), "chosen_ids: token ids"),
    (dict(prompt_ids=[1], chosen_ids=[1], rejected_ids=[1.5]), "rejected_ids must hold integer"),
    (dict(prompt_ids=[[1]], chosen_ids=[1], rejected_ids=[1]), "prompt_ids must be a 1-D"),
])
def test_example_validation(kw, msg):
    with pytest.raises(ValueError, match=msg):
        PreferenceExample(**kw)


def test_pack_pair_batch_known_answer():
    b = pack_pair_batch([PreferenceExample([5, 6], [7], [8, 9]),
                         PreferenceExample([3], [4, 4, 4], [2])], pad_token_id=0)
    I = -100  # noqa: E741
    assert b.input_ids.tolist() == [[5, 6, 7, 0], [3, 4, 4, 4], [5, 6, 8, 9], [3, 2, 0, 0]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]]
    assert b.targets.tolist() == [[I, 7, I, I], [4, 4, 4, I], [I, 8, 9, I], [2, I, I, I]]
    assert b.lengths.tolist() == [1, 3, 2, 1]


def test_tokenize_preference_follows_trl():
    tok = tiny_tokenizer()
    v = tok.get_vocab()
    ex = tokenize_preference(tok, "the movie was", " great", " very bad")
    assert ex.prompt_ids.tolist() == [1, v["the"], v["movie"], v["was"]]
    assert ex.chosen_ids.tolist() == [v["great"], 2]  # EOS appended
    assert ex.rejected_ids.tolist() == [v["very"], v["bad"], 2]
    # an EOS already present is not doubled; add_eos=False appends nothing
    assert tokenize_preference(tok, "the", " fun</s>", " dull").chosen_ids.tolist() == [v["fun"], 2]
    assert tokenize_preference(tok, "the", " fun", " dull", add_eos=False).chosen_ids.tolist() \
        == [v["fun"]]
    # (prompt + response)[:max_length], keeping the start
    cut = tokenize_preference(tok, "the movie was", " great", " very bad", max_length=5)
    assert cut.prompt_ids.size == 4 and cut.chosen_ids.tolist() == [v["great"]]
    assert cut.rejected_ids.tolist() == [v["very"]]
    with pytest.raises(PromptTooLongError):
        tokenize_preference(tok, "the movie was", " great", " bad", max_length=4)
    # conversational rows go through the chat template (no extra EOS)
    conv = tokenize_preference(tok, [{"role": "user", "content": "the movie"}],
                               [{"role": "assistant", "content": "great"}],
                               [{"role": "assistant", "content": "bad"}])
    assert conv.chosen_ids.tolist() == [v["great"], 2]
    assert conv.prompt_ids.tolist()[-2:] == [1, v["assistant"]]


def test_tokenize_dataset_drops_and_names_rows():
    tok = tiny_tokenizer()
    rows = [{"prompt": "the movie", "chosen": " great", "rejected": " bad"},
            {"prompt": "the movie was very dull and", "chosen": " fun", "rejected": " bad"},
            {"prompt": "a film", "chosen": " good", "rejected": " awful"}]
    exs, dropped = tokenize_dataset(tok, rows, max_length=5)
    assert dropped == [1] and len(exs) == 2
    assert exs[0] == tokenize_preference(tok, "the movie", " great", " bad", max_length=5)
    assert exs[1] == tokenize_preference(tok, "a film", " good", " awful", max_length=5)
    with pytest.raises(ValueError, match=r"row 1: missing column\(s\) \['rejected'\]"):
        tokenize_dataset(tok, [rows[0], {"prompt": "a", "chosen": " b"}])
    with pytest.raises(ValueError, match="row 2, column 'chosen': expected a string"):
        tokenize_dataset(tok, rows[:2] + [{"prompt": "a", "chosen": 3, "rejected": " b"}])


def test_read_rows_formats_and_errors(tmp_path):
    rows = [{"prompt": "p1", "chosen": " c1", "rejected": " r1"},
            {"prompt": "p2, with comma", "chosen": " c2", "rejected": " r2"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    (tmp_path / "d.json").write_text(json.dumps(rows))
    import csv

    with open(tmp_path / "d.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["prompt", "chosen", "rejected"])
        w.writeheader()
        w.writerows(rows)
    for name in ("d.jsonl", "d.json", "d.csv"):
        assert read_rows(tmp_path / name) == rows, name
        assert read_rows(tmp_path / name, limit=1) == rows[:1], name
    (tmp_path / "bad.jsonl").write_text(json.dumps(rows[0]) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not valid JSON"):
        read_rows(tmp_path / "bad.jsonl")
    (tmp_path / "bad.json").write_text(json.dumps([rows[0], 5]))
    with pytest.raises(ValueError, match=r"bad\.json: item 1: expected a JSON object"):
        read_rows(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="unknown data format"):
        read_rows(tmp_path / "d.txt")


# ----------------------------------------------------------------------------- values


def test_values_match_float64_oracle(built, examples, orc):
    assert len(built) == len(examples)
    assert len(built.manifest["shards"]) == -(-len(examples) // ROWS_PER_SHARD)
    check_against_oracle(built, examples, orc, per_token=True)


def test_softcap_temperature_and_head_check(model, examples, tmp_path):
    exs = examples[:8]
    with pytest.raises(RefCacheError, match="disagree with the fused head"):
        # the Llama's own logits carry no softcap: the head check must notice
        RefLogProbCache.build(model, exs, tmp_path / "a", softcap=2.0, batch_tokens=BATCH_TOKENS)
    cache = RefLogProbCache.build(model, exs, tmp_path / "b", softcap=2.0, temperature=0.7,
                                  batch_tokens=BATCH_TOKENS, verify_head=False, per_token=True)
    assert cache.fingerprint["softcap"] == 2.0 and cache.fingerprint["temperature"] == 0.7
    check_against_oracle(cache, exs, oracle(model, exs, softcap=2.0, temperature=0.7),
                         per_token=True)


@pytest.mark.parametrize("arch, extra, softcap, temperature", [
    ("Gemma2", dict(final_logit_softcapping=3.0, head_dim=8), 3.0, 1.0),
    ("Granite", dict(logits_scaling=4.0), None, 4.0),  # logits / 4
    ("Cohere", dict(logit_scale=0.25), None, 4.0),     # logits * 0.25
])
def test_model_logit_transforms_are_taken_from_the_config(arch, extra, softcap, temperature,
                                                          tmp_path):
    cfg = getattr(transformers, f"{arch}Config")(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, initializer_range=0.2, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, **extra)
    torch.manual_seed(0)
    m = getattr(transformers, f"{arch}ForCausalLM")(cfg).eval()
    exs = random_examples(6, seed=3)
    cache = RefLogProbCache.build(m, exs, tmp_path / "c", batch_tokens=BATCH_TOKENS)
    assert (cache.fingerprint["softcap"], cache.fingerprint["temperature"]) == (softcap,
                                                                                 temperature)
    check_against_oracle(cache, exs, oracle(m, exs))  # the model's own logits carry the transform


def test_shuffled_duplicated_and_filtered_lists(model, examples, built, orc, tmp_path):
    g = np.random.default_rng(1)
    shuffled = [examples[i] for i in g.permutation(len(examples))] + examples[:5]
    again = RefLogProbCache.build(model, shuffled, tmp_path / "shuffled",
                                  batch_tokens=BATCH_TOKENS, rows_per_shard=ROWS_PER_SHARD,
                                  per_token=True)
    # same set of examples -> same plan -> the same bytes
    assert dir_bytes(again.path) == dir_bytes(built.path)
    keep = [i for i in range(len(examples)) if i % 3 != 0]
    sub = [examples[i] for i in keep][::-1]
    filt = RefLogProbCache.build(model, sub, tmp_path / "filtered", batch_tokens=BATCH_TOKENS,
                                 rows_per_shard=ROWS_PER_SHARD)
    assert sorted(filt.keys()) == sorted(ex.key for ex in sub)
    sub_orc = {k: orc[k][keep] for k in ("truth", "fp32")}
    check_against_oracle(filt, [examples[i] for i in keep], sub_orc)


def test_lookup_order_split_and_key_forms(built, examples):
    picks = [examples[7], examples[0], examples[20]]
    both = built.lookup(picks)
    c, r = built.lookup(picks, split=True)
    assert both.shape == (6,) and torch.equal(both, torch.cat([c, r]))
    singles = [built.lookup([ex], split=True) for ex in picks]
    assert torch.equal(c, torch.cat([s[0] for s in singles]))
    assert torch.equal(r, torch.cat([s[1] for s in singles]))
    assert not torch.equal(c, c.flip(0))  # the order matters (values differ)
    hexes = [ex.key for ex in picks]
    raw = np.frombuffer(b"".join(ex.key_bytes for ex in picks), np.uint8).reshape(3, 16)
    for form in (hexes, [ex.key_bytes for ex in picks], raw):
        assert torch.equal(built.lookup(form), both)
    assert torch.equal(built.lengths(picks),
                       torch.tensor([ex.chosen_ids.size for ex in picks]
                                    + [ex.rejected_ids.size for ex in picks]))
    assert examples[3] in built and examples[3].key in built and "00" * 16 not in built
    assert sorted(built.keys()) == built.keys() == sorted(ex.key for ex in examples)


def test_missing_rows_error(built, examples):
    strangers = random_examples(7, seed=99)
    with pytest.raises(MissingRowsError) as ei:
        built.lookup([examples[0], strangers[0], examples[1], strangers[1]])
    msg = str(ei.value)
    assert isinstance(ei.value, KeyError)
    assert msg.startswith("2 of 4 key(s) are not in the reference cache")
    assert strangers[0].key in msg and strangers[1].key in msg and "ensure" in msg
    assert ei.value.missing == [strangers[0].key, strangers[1].key]
    with pytest.raises(MissingRowsError, match=r"7 of 7 key\(s\).*, \.\.\."):
        built.lookup(strangers)
    with pytest.raises(ValueError, match=r"keys\[1\] = 'xyz' is not a 32-hex-digit key"):
        built.lookup([examples[0].key, "xyz"])


# ----------------------------------------------------------------------------- integrity


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_corrupted_or_truncated_shard_is_named(built, tmp_path):
    d = _copy(built.path, tmp_path / "flip")
    f = d / "shard-00002.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(CorruptCacheError, match=r"shard-00002\.safetensors: SHA-256"):
        RefLogProbCache.open(d)

    d = _copy(built.path, tmp_path / "trunc")
    f = d / "shard-00004.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(CorruptCacheError, match=r"shard-00004\.safetensors has \d+ bytes"):
        RefLogProbCache.open(d)

    d = _copy(built.path, tmp_path / "gone")
    (d / "shard-00001.safetensors").unlink()
    with pytest.raises(CorruptCacheError, match=r"shard-00001\.safetensors is listed .* missing"):
        RefLogProbCache.open(d)

    d = _copy(built.path, tmp_path / "manifest")
    (d / "manifest.json").write_text('{"format": "dpo_fast.refcache", ')
    with pytest.raises(CorruptCacheError, match=r"manifest\.json: not valid JSON"):
        RefLogProbCache.open(d)
    with pytest.raises(FileNotFoundError, match="no reference cache"):
        RefLogProbCache.open(tmp_path / "nothing")


def test_fingerprint_mismatch_names_fields_and_override(model, examples, tmp_path):
    exs = examples[:6]
    fp = fingerprint(model, max_length=64)
    cache = RefLogProbCache.build(model, exs, tmp_path / "c", fingerprint=fp,
                                  batch_tokens=BATCH_TOKENS)
    assert cache.fingerprint == fp
    assert RefLogProbCache.open(tmp_path / "c", expect=fingerprint(copy.deepcopy(model),
                                                                    max_length=64))
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.model.layers[1].mlp.down_proj.weight[3, 5] += 1e-3
    fp_w = fingerprint(changed, max_length=64)
    assert {k for k in fp if fp[k] != fp_w[k]} == {"model_weights"}
    with pytest.raises(FingerprintMismatchError) as ei:
        RefLogProbCache.open(tmp_path / "c", expect=fp_w)
    assert "model_weights" in str(ei.value) and fp["model_weights"] in str(ei.value)
    assert fp_w["model_weights"] in str(ei.value)
    assert set(ei.value.differences) == {"model_weights"}

    fp_l = fingerprint(changed, max_length=128)
    with pytest.raises(FingerprintMismatchError) as ei:
        RefLogProbCache.open(tmp_path / "c", expect=fp_l)
    assert set(ei.value.differences) == {"model_weights", "max_length"}
    assert "max_length: cache has 64, this run has 128" in str(ei.value)
    with pytest.raises(FingerprintMismatchError, match="max_length"):
        RefLogProbCache.open(tmp_path / "c", expect=fp_l, allow_mismatch=("model_weights",))
    with pytest.warns(RuntimeWarning, match="allowed by allow_mismatch"):
        ok = RefLogProbCache.open(tmp_path / "c", expect=fp_l,
                                  allow_mismatch=("model_weights", "max_length"))
    assert torch.equal(ok.lookup(exs), cache.lookup(exs))
    with pytest.warns(RuntimeWarning):
        RefLogProbCache.open(tmp_path / "c", expect=fp_l, allow_mismatch=True)
    with pytest.raises(ValueError, match="unknown fingerprint field"):
        RefLogProbCache.open(tmp_path / "c", expect=fp_l, allow_mismatch=("max_len",))
    # a build or ensure into the directory with another model is refused too
    with pytest.raises(FingerprintMismatchError, match="model_weights"):
        RefLogProbCache.ensure(changed, exs, tmp_path / "c", fingerprint=fp_w)


def test_fingerprint_fields(model, saved):
    fp = fingerprint(model)
    assert fp["model_weights_method"].startswith("sample-v1")
    assert fp["dtype"] == "float32" and fp["softcap"] is None and fp["tokenizer"] is None
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(saved / "model",
                                                                 dtype=torch.float32)
    fp2 = fingerprint(reloaded)
    assert fp2["model_weights"] == fp["model_weights"]
    assert fp2["model_config"] == fp["model_config"]
    tok = transformers.AutoTokenizer.from_pretrained(saved / "model")
    assert fingerprint(model, tok)["tokenizer"] == fingerprint(model, tok)["tokenizer"]
    assert fingerprint(model, tok)["tokenizer"] is not None
    tok2 = transformers.AutoTokenizer.from_pretrained(saved / "model")
    tok2.chat_template = "{{ messages }}"
    assert fingerprint(model, tok2)["tokenizer"] != fingerprint(model, tok)["tokenizer"]
    # The tokenization pipeline counts, not the class it was loaded through, nor runtime
    # truncation settings; a changed normalizer is a different tokenizer.
    from tokenizers import normalizers

    class OtherClass(transformers.PreTrainedTokenizerFast):
        pass

    tok3 = OtherClass.from_pretrained(saved / "model")
    tok3.backend_tokenizer.enable_truncation(7)
    assert type(tok3).__name__ != type(tok).__name__
    assert fingerprint(model, tok3)["tokenizer"] == fingerprint(model, tok)["tokenizer"]
    tok3.backend_tokenizer.normalizer = normalizers.Lowercase()
    assert fingerprint(model, tok3)["tokenizer"] != fingerprint(model, tok)["tokenizer"]
    capped = copy.deepcopy(model)
    capped.config.final_logit_softcapping = 30.0
    fc = fingerprint(capped)
    assert fc["softcap"] == 30.0 and fc["model_config"] != fp["model_config"]
    files = fingerprint(reloaded, weights="files")
    assert files["model_weights_method"].startswith("files-v1")
    with pytest.raises(ValueError, match="local directory"):
        fingerprint(model, weights="files")
    # a change to one element outside the strided sample still changes the hash
    lin = torch.nn.Linear(300, 100)
    h0 = fingerprint(lin)["model_weights"]
    with torch.no_grad():
        lin.weight.view(-1)[1] += 1e-6
    assert fingerprint(lin)["model_weights"] != h0


def test_build_argument_checks(model, examples, tmp_path):
    with pytest.raises(ValueError, match="dtype=bfloat16 but the model is float32"):
        RefLogProbCache.build(model, examples[:2], tmp_path / "a", dtype=torch.bfloat16)
    fp = fingerprint(model, temperature=2.0)
    with pytest.raises(ValueError, match="temperature: fingerprint has 2.0, the build uses 1.0"):
        RefLogProbCache.build(model, examples[:2], tmp_path / "a", fingerprint=fp)
    big = PreferenceExample([1], [VOCAB + 3], [2])
    with pytest.raises(ValueError, match=rf"examples\[1\] .* token id {VOCAB + 3}, outside"):
        RefLogProbCache.build(model, [examples[0], big], tmp_path / "a")
    with pytest.raises(ValueError, match="batch_tokens must be an int >= 1"):
        RefLogProbCache.build(model, examples[:2], tmp_path / "a", batch_tokens=0)
    with pytest.raises(ValueError, match="compact must be True, False or 'auto'"):
        RefLogProbCache.ensure(model, examples[:2], tmp_path / "a", compact="yes")
    with pytest.raises(TypeError, match="unexpected keyword argument 'batch_size'"):
        RefLogProbCache.ensure(model, examples[:2], tmp_path / "a", batch_size=8)


def test_build_keywords_are_the_build_options():
    """build's keywords and their defaults are BuildOptions' fields (ensure takes them too)."""
    params = inspect.signature(RefLogProbCache.build).parameters.values()
    keywords = {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY}
    assert keywords == {f.name: f.default for f in dataclasses.fields(BuildOptions)}


# ----------------------------------------------------------------------------- building


def test_build_refuses_other_plan_and_reopens_same(model, examples, tmp_path):
    d = tmp_path / "c"
    first = RefLogProbCache.build(model, examples[:10], d, batch_tokens=BATCH_TOKENS,
                                  rows_per_shard=4)
    assert first.last_build.rows_computed == 10
    again = RefLogProbCache.build(model, examples[:10][::-1], d, batch_tokens=BATCH_TOKENS,
                                  rows_per_shard=4)
    assert again.last_build.rows_computed == 0
    with pytest.raises(RefCacheError, match="already holds a reference cache of other examples"):
        RefLogProbCache.build(model, examples[:11], d, batch_tokens=BATCH_TOKENS, rows_per_shard=4)
    with pytest.raises(RefCacheError, match="per_token=False; this run asks per_token=True"):
        RefLogProbCache.ensure(model, examples[:10], d, per_token=True)
    over = RefLogProbCache.build(model, examples[:11], d, batch_tokens=BATCH_TOKENS,
                                 rows_per_shard=4, overwrite=True)
    assert len(over) == 11 and over.last_build.rows_computed == 11


def test_ensure_computes_only_missing_rows(model, examples, orc, tmp_path):
    rows_seen = []
    hook = model.get_decoder().register_forward_hook(
        lambda mod, args, kwargs, out: rows_seen.append(kwargs["input_ids"].shape[0] // 2),
        with_kwargs=True)
    try:
        d = tmp_path / "c"
        half = examples[::2]
        c1 = RefLogProbCache.ensure(model, half, d, batch_tokens=BATCH_TOKENS, rows_per_shard=4,
                                    verify_head=False)
        assert sum(rows_seen) == len(half) == c1.last_build.rows_computed == len(c1)
        rows_seen.clear()
        c2 = RefLogProbCache.ensure(model, examples + half, d, batch_tokens=BATCH_TOKENS,
                                    rows_per_shard=4, verify_head=False)
        assert sum(rows_seen) == len(examples) - len(half) == c2.last_build.rows_computed
        assert len(c2) == len(examples) and len(c2.manifest["builds"]) == 2
        check_against_oracle(c2, examples, orc)
        rows_seen.clear()
        c3 = RefLogProbCache.ensure(model, examples, d, batch_tokens=BATCH_TOKENS,
                                    rows_per_shard=4, verify_head=False)
        assert rows_seen == [] and c3.last_build.rows_computed == 0
        assert torch.equal(c3.lookup(examples), c2.lookup(examples))
    finally:
        hook.remove()


def test_ensure_resumes_after_interruption(model, examples, tmp_path):
    base = examples[:9]
    full_dir = tmp_path / "full"
    RefLogProbCache.ensure(model, base, full_dir, batch_tokens=BATCH_TOKENS, rows_per_shard=4)
    full = RefLogProbCache.ensure(model, examples, full_dir, batch_tokens=BATCH_TOKENS,
                                  rows_per_shard=4)

    class Stop(Exception):
        pass

    def stop_after_two(p):
        if p.event == "shard" and p.shards_done == 2:
            raise Stop

    d = tmp_path / "interrupted"
    RefLogProbCache.ensure(model, base, d, batch_tokens=BATCH_TOKENS, rows_per_shard=4)
    with pytest.raises(Stop):
        RefLogProbCache.ensure(model, examples, d, batch_tokens=BATCH_TOKENS, rows_per_shard=4,
                               progress=stop_after_two)
    # a reader meanwhile gets the finished build's rows, and is told about the rest
    with pytest.warns(RuntimeWarning, match=r"unfinished build of 27 row\(s\)"):
        partial = RefLogProbCache.open(d)
    assert len(partial) == len(base) and partial.pending_rows == len(examples) - len(base)
    assert torch.equal(partial.lookup(base), full.lookup(base))
    done = RefLogProbCache.ensure(model, examples, d, batch_tokens=BATCH_TOKENS,
                                  rows_per_shard=4)
    assert done.last_build.rows_computed == len(examples) - len(base) - 2 * 4
    assert dir_bytes(d) == dir_bytes(full_dir)
    assert torch.equal(done.lookup(examples), full.lookup(examples))


def test_sigkill_at_several_points_then_resume_is_bit_identical(saved, reference, tmp_path):
    out = tmp_path / "cache"
    n_shards = len(json.loads((reference / "manifest.json").read_text())["shards"])
    assert n_shards >= 6
    # 1) killed right after shard 2 became durable
    finish(start_build(saved, out, "shard:2"), expect_killed=True)
    man = json.loads((out / "manifest.json").read_text())
    assert [s["index"] for s in man["shards"]] == [0, 1] and not man["complete"]
    with pytest.raises(RefCacheError, match="incomplete"):
        RefLogProbCache.open(out)
    # an unlisted shard file (as after a kill between a rename and the manifest update, here
    # with wrong contents) and a stray temp file: both must go
    (out / "shard-00002.safetensors").write_bytes(b"partial garbage")
    (out / ".shard-00003.safetensors.tmp-123-abcd").write_bytes(b"half-written")
    # 2) killed in the middle of shard 3 (after a batch, before the shard is written)
    finish(start_build(saved, out, f"batch:{3 * ROWS_PER_SHARD + 2}"), expect_killed=True)
    man = json.loads((out / "manifest.json").read_text())
    assert [s["index"] for s in man["shards"]] == [0, 1, 2]
    # 3) killed right after the last shard, before the build was marked complete
    finish(start_build(saved, out, f"shard:{n_shards}"), expect_killed=True)
    # 4) resumed to the end
    finish(start_build(saved, out), expect_killed=False)
    assert dir_bytes(out) == dir_bytes(reference)
    RefLogProbCache.open(out)


def _dist_worker(rank, saved, out, init_file):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(saved / "model",
                                                                  dtype=torch.float32)
        exs = [PreferenceExample(*r) for r in json.loads((saved / "examples.json").read_text())]
        cache = RefLogProbCache.build(model, exs, out, batch_tokens=BATCH_TOKENS,
                                      rows_per_shard=ROWS_PER_SHARD)
        assert cache is not None and len(cache) == len(exs)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_distributed_gloo_build_equals_single_process(saved, reference, tmp_path):
    import torch.multiprocessing as mp

    out = tmp_path / "cache"
    env_keys = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
    old = {k: os.environ.get(k) for k in env_keys}
    os.environ.update({k: "1" for k in env_keys})
    try:
        mp.spawn(_dist_worker, args=(saved, out, str(tmp_path / "init")), nprocs=2, join=True)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert dir_bytes(out) == dir_bytes(reference)  # no part-* left, same shards and manifest


def test_explicit_ranks_and_merge(model, examples, built, tmp_path):
    d = tmp_path / "c"
    kw = dict(batch_tokens=BATCH_TOKENS, rows_per_shard=ROWS_PER_SHARD, per_token=True)
    assert RefLogProbCache.build(model, examples, d, rank=1, world_size=3, **kw) is None
    assert RefLogProbCache.build(model, examples, d, rank=0, world_size=3, **kw) is None
    with pytest.raises(FileNotFoundError, match="part"):
        RefLogProbCache.merge(d, 3)
    assert RefLogProbCache.build(model, examples, d, rank=2, world_size=3, **kw) is None
    assert sorted(p.name for p in d.iterdir() if p.name != ".lock") == [
        "part-00000", "part-00001", "part-00002"]
    merged = RefLogProbCache.merge(d, 3)
    assert dir_bytes(d) == dir_bytes(built.path)
    assert torch.equal(merged.lookup(examples), built.lookup(examples))
    assert RefLogProbCache.merge(d, 3).keys() == built.keys()  # idempotent


# ----------------------------------------------------------------------------- CLI


def test_progress_bar_format():
    s = io.StringIO()
    bar = ProgressBar(s, total=10, min_interval=0, log_interval=0)

    def ev(event, rows, toks, t):
        bar(BuildProgress(event, rows, 8, toks, 800, 0, 2, rows, toks, t))

    ev("start", 0, 0, 0.0)
    ev("batch", 4, 400, 0.5)
    ev("done", 8, 800, 1.0)
    bar.finish("summary line")
    frames = [f.strip() for f in s.getvalue().replace("\n", "\r").split("\r") if f.strip()]
    # 2 of 10 examples were cached already; 400 of 800 tokens in 0.5 s; 400 left at 800 tok/s
    assert any(f.startswith("precompute [######") and "6/10 examples | 800 tok/s | ETA 00:00"
               in f for f in frames), frames
    assert "precompute [" + "#" * 28 + "] 10/10 examples | 800 tok/s | ETA 00:00" in frames
    assert frames[-1] == "summary line"


def _write_jsonl(path, n, seed=0, bad_row=None):
    g = np.random.default_rng(seed)

    def words(k):
        return " ".join(g.choice(WORDS[:-2], size=k))

    rows = [{"prompt": words(int(g.integers(2, 9))), "chosen": " " + words(int(g.integers(1, 6))),
             "rejected": " " + words(int(g.integers(1, 6)))} for _ in range(n)]
    if bad_row is not None:
        del rows[bad_row]["rejected"]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_cli_precompute_end_to_end(saved, tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    rows = _write_jsonl(data, 14)
    out = tmp_path / "cache"
    args = ["precompute", "--model", str(saved / "model"), "--data", str(data), "--out", str(out),
            "--batch-tokens", "64", "--max-length", "10", "--rows-per-shard", "4",
            "--device", "cpu", "--per-token"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "precompute [" in err and "examples |" in err and "tok/s" in err and "ETA" in err
    tok = transformers.AutoTokenizer.from_pretrained(saved / "model")
    examples, dropped = tokenize_dataset(tok, rows, max_length=10)
    n = len({ex.key for ex in examples})
    assert f"dpo-fast precompute: {n} examples ({n} computed, 0 already cached)" in err
    model = transformers.AutoModelForCausalLM.from_pretrained(saved / "model",
                                                              dtype=torch.float32)
    cache = RefLogProbCache.open(out, expect=fingerprint(model, tok, max_length=10,
                                                         dtype="float32"))
    assert cache.per_token and len(cache) == n
    check_against_oracle(cache, examples, oracle(model, examples), per_token=True)
    # a re-run computes nothing; --limit takes a prefix
    assert main(args + ["--limit", "5"]) == 0
    err = capsys.readouterr().err
    assert "5 rows from" in err and "(0 computed, 5 already cached)" in err
    # a bad row is named with the file
    bad = tmp_path / "bad.jsonl"
    _write_jsonl(bad, 5, bad_row=3)
    assert main(["precompute", "--model", str(saved / "model"), "--data", str(bad),
                 "--out", str(tmp_path / "c2")]) == 1
    err = capsys.readouterr().err
    assert "bad.jsonl line 4: field 'rejected' is missing" in err


def test_cli_precompute_reads_what_train_reads(saved, tmp_path, capsys):
    """precompute and train share one reader: the same pairs as Parquet, and as JSONL
    without a prompt column (TRL's implicit prompt), fill caches with exactly the keys and
    values of the explicit JSONL, and those keys are the trainer's."""
    import datasets

    from dpo_fast.data import extract_prompt
    from dpo_fast.train import TrainConfig, Trainer

    rows = _write_jsonl(tmp_path / "pairs.jsonl", 9, seed=3)
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "pairs.parquet"))
    implicit = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]}
                for r in rows]
    (tmp_path / "implicit.jsonl").write_text("".join(json.dumps(r) + "\n" for r in implicit))
    tok = transformers.AutoTokenizer.from_pretrained(saved / "model")
    expect = {
        "pairs.jsonl": {e.key for e in tokenize_dataset(tok, rows, max_length=12)[0]},
        "pairs.parquet": {e.key for e in tokenize_dataset(tok, rows, max_length=12)[0]},
        "implicit.jsonl": {e.key for e in tokenize_dataset(
            tok, [dict(zip(("prompt", "chosen", "rejected"),
                           extract_prompt(r["chosen"], r["rejected"]))) for r in implicit],
            max_length=12)[0]},
    }
    caches = {}
    for name, keys in expect.items():
        out = tmp_path / f"cache-{name}"
        assert main(["precompute", "--model", str(saved / "model"), "--data",
                     str(tmp_path / name), "--out", str(out), "--max-length", "12",
                     "--device", "cpu"]) == 0, capsys.readouterr().err
        caches[name] = RefLogProbCache.open(out)
        assert set(caches[name].keys()) == keys, name
        t = Trainer(TrainConfig(model=str(saved / "model"), train_data=str(tmp_path / name),
                                max_length=12, data_cache_dir="", output_dir=str(tmp_path)))
        t.prepare_data()
        assert {e.key for e in t.train_data.examples} == keys, name
    keys = sorted(expect["pairs.jsonl"])
    assert torch.equal(caches["pairs.parquet"].lookup(keys), caches["pairs.jsonl"].lookup(keys))
    capsys.readouterr()


def test_python_dash_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "dpo_fast", "precompute", "--help"],
                       capture_output=True, text=True, env=_env(), cwd=str(ROOT), timeout=120)
    assert r.returncode == 0 and "--batch-tokens" in r.stdout
