"""The reference cache used the way people use it: concurrent writers, kills, bad paths, bad
data, read-only copies, damaged files, compaction.

Every process here is real: ``python -m dpo_fast precompute`` (through a thin wrapper that can
slow each forward batch down and print progress events with wall-clock times), gloo ranks,
and lock holders that are SIGKILLed. The model is the tiny random Llama of
``test_ref_cache.py``; values are compared bit for bit with clean in-process builds of the same
rows (one thread, as in the subprocesses). The real-model version of the concurrent-writer
case is in ``test_ref_cache_real.py``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_ref_cache import (
    check_against_oracle,
    dir_bytes,
    oracle,
    tiny_model,
    tiny_tokenizer,
)

from dpo_fast import CacheLockedError, CorruptCacheError, RefCacheError, RefLogProbCache
from dpo_fast.data import read_rows, tokenize_dataset
from dpo_fast.refcache import fingerprint, hold_lock, store

pytestmark = pytest.mark.slow  # real processes: about 4 minutes on 2 cores
transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
MAX_LENGTH = 16
BATCH_TOKENS = 96
WORDS = ("the a movie film was is great bad good awful plot acting fun dull review write one "
         "sentence of about it and but not very").split()

# `python -m dpo_fast ...` with two test knobs: DPO_TEST_BATCH_SLEEP (seconds added to every
# forward batch, so runs overlap and can be killed mid-build) and DPO_TEST_EVENTS (print each
# progress event with its wall-clock time).
# SIGINT gets Python's default handler: a shell that starts the suite in the background
# (`... &`) leaves SIGINT ignored in its children, while the Ctrl-C test stands for a terminal.
WRAPPER = textwrap.dedent("""
    import os, runpy, signal, sys, time
    signal.signal(signal.SIGINT, signal.default_int_handler)
    pause = float(os.environ.get("DPO_TEST_BATCH_SLEEP", "0"))
    if pause:
        import dpo_fast.refcache.compute as b
        rows = b.Computer.rows
        def slow(self, exs):
            time.sleep(pause)
            return rows(self, exs)
        b.Computer.rows = slow
    if os.environ.get("DPO_TEST_EVENTS"):
        import dpo_fast.cli as cli
        draw = cli.ProgressBar.__call__
        def call(self, p):
            sys.stderr.write(f"EVENT {p.event} rows_done={p.rows_done} "
                             f"rows_saved={p.rows_saved} t={time.time():.6f}\\n")
            sys.stderr.flush()
            draw(self, p)
        cli.ProgressBar.__call__ = call
    sys.argv = ["dpo_fast"] + sys.argv[1:]
    runpy.run_module("dpo_fast", run_name="__main__", alter_sys=True)
""")


def _env(**extra):
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
               HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    env.pop("DPO_TEST_BATCH_SLEEP", None)
    env.pop("DPO_TEST_EVENTS", None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def cli(args, *, sleep=0.0, events=False, env=None, stderr=subprocess.PIPE, prefix=()):
    """Starts ``python -m dpo_fast precompute ARGS`` (through the wrapper)."""
    e = _env(**(env or {}))
    if sleep:
        e["DPO_TEST_BATCH_SLEEP"] = str(sleep)
    if events:
        e["DPO_TEST_EVENTS"] = "1"
    return subprocess.Popen(list(prefix) + [sys.executable, "-c", WRAPPER, "precompute",
                                            *map(str, args)],
                            stdout=subprocess.PIPE, stderr=stderr, text=True, env=e,
                            cwd=str(ROOT))


def run(args, **kw):
    """Runs the CLI to the end; returns (exit code, stderr)."""
    p = cli(args, **kw)
    _, err = p.communicate(timeout=300)
    return p.returncode, err


def no_traceback(err):
    assert "Traceback" not in err, err[-3000:]


def words(g, k):
    return " ".join(g.choice(WORDS, size=k))


def write_rows(path: Path, n: int, seed: int, *, fmt="jsonl"):
    """n distinct rows (chosen != rejected), each prompt unique to this seed."""
    g = np.random.default_rng(seed)
    rows = [{"prompt": f"{words(g, int(g.integers(2, 6)))} review {words(g, 2)}",
             "chosen": " " + words(g, int(g.integers(1, 6))),
             "rejected": " " + words(g, int(g.integers(1, 6)))} for _ in range(n)]
    for r in rows:
        while r["rejected"] == r["chosen"]:
            r["rejected"] = " " + words(g, 3)
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def wait_for(pred, timeout=120.0, what="condition"):
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def events(text):
    """[(event, rows_done, rows_saved, t)] printed by the wrapper."""
    return [(m[1], int(m[2]), int(m[3]), float(m[4])) for m in
            re.finditer(r"EVENT (\w+) rows_done=(\d+) rows_saved=(\d+) t=([\d.]+)", text)]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The tiny model and tokenizer saved as a folder, two disjoint data files A and B, and
    their tokenized examples."""
    d = tmp_path_factory.mktemp("robust")
    model, tok = tiny_model(), tiny_tokenizer()
    model.save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    rows_a = write_rows(d / "A.jsonl", 120, seed=11)
    rows_b = write_rows(d / "B.jsonl", 80, seed=12)
    ex_a, drop_a = tokenize_dataset(tok, rows_a, max_length=MAX_LENGTH)
    ex_b, drop_b = tokenize_dataset(tok, rows_b, max_length=MAX_LENGTH)
    assert drop_a == [] and drop_b == []
    assert not {e.key for e in ex_a} & {e.key for e in ex_b}
    return type("Setup", (), dict(dir=d, model_dir=d / "model", model=model, tok=tok,
                                  a=d / "A.jsonl", b=d / "B.jsonl", ex_a=ex_a, ex_b=ex_b,
                                  fp=fingerprint(model, tok, max_length=MAX_LENGTH,
                                                 dtype="float32")))


def args_for(s, data, out, *more, rows_per_shard=16):
    return ["--model", s.model_dir, "--data", data, "--out", out, "--max-length", MAX_LENGTH,
            "--batch-tokens", BATCH_TOKENS, "--rows-per-shard", rows_per_shard,
            "--device", "cpu", *more]


@contextlib.contextmanager
def one_thread():
    """Runs the block on one thread, as the subprocesses do (the values' last bits depend on
    the thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def clean(setup, tmp_path_factory):
    """Clean in-process builds of A and of B alone."""
    with one_thread():
        return {name: RefLogProbCache.build(
            setup.model, exs, tmp_path_factory.mktemp("clean") / name, fingerprint=setup.fp,
            batch_tokens=BATCH_TOKENS, rows_per_shard=16)
            for name, exs in (("a", setup.ex_a), ("b", setup.ex_b))}


@pytest.fixture(scope="module")
def oracles(setup):
    """Float64 full-logits oracles of A's and B's rows (one sequence at a time)."""
    return {"a": oracle(setup.model, setup.ex_a), "b": oracle(setup.model, setup.ex_b)}


def assert_holds_clean_values(path, setup, clean, which=("a", "b"), oracles=None):
    """The cache at ``path`` holds exactly the rows of ``which``, with the clean builds'
    values bit for bit -- or, with ``oracles`` (a build of the same rows in other batches:
    another padding width can change a value's last bits), within the float64 oracle's rule."""
    cache = RefLogProbCache.open(path, expect=setup.fp)
    want = {k for w in which for k in clean[w].keys()}
    assert set(cache.keys()) == want
    for w in which:
        exs = setup.ex_a if w == "a" else setup.ex_b
        if oracles is None:
            assert torch.equal(cache.lookup(exs), clean[w].lookup(exs)), w
        else:
            check_against_oracle(cache, exs, oracles[w])
        assert torch.equal(cache.lengths(exs), clean[w].lengths(exs)), w
    assert not [f for f in os.listdir(path) if store.TMP_MARK in f or f.startswith("seg-")]
    return cache


# ----------------------------------------------------------------------------- the lock

HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from dpo_fast.refcache import hold_lock
    d = Path(sys.argv[1])
    d.mkdir(parents=True, exist_ok=True)
    with hold_lock(d):
        print("held", flush=True)
        sys.stdin.read()  # until the test closes stdin (or kills us)
""")


def start_holder(d: Path):
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(d)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, env=_env(), cwd=str(ROOT))
    assert p.stdout.readline().strip() == "held"
    return p


def test_lock_excludes_names_the_holder_and_dies_with_it(setup, clean, tmp_path):
    d = tmp_path / "cache"
    holder = start_holder(d)
    try:
        kw = dict(fingerprint=setup.fp, batch_tokens=BATCH_TOKENS, rows_per_shard=16)
        with pytest.raises(CacheLockedError, match=rf"locked by another writer: pid {holder.pid} "):
            RefLogProbCache.ensure(setup.model, setup.ex_a[:4], d, lock_timeout=0, **kw)
        heard = []
        t0 = time.monotonic()
        with pytest.raises(CacheLockedError, match=r"still locked after \d+ s: pid"):
            RefLogProbCache.ensure(setup.model, setup.ex_a[:4], d, lock_timeout=0.5,
                                   on_lock_wait=heard.append, **kw)
        assert time.monotonic() - t0 >= 0.5
        assert len(heard) == 1 and f"pid {holder.pid} " in heard[0]
        # the CLI refuses at once, before loading the model, and says who holds the lock
        code, err = run(args_for(setup, setup.a, d, "--no-wait"))
        assert code == 1 and f"locked by another writer: pid {holder.pid} " in err, err
        assert "drop --no-wait to wait" in err and "loaded LlamaForCausalLM" not in err
        no_traceback(err)
        assert not (d / "manifest.json").exists()
    finally:
        holder.kill()  # SIGKILL: the OS drops its lock
        holder.wait()
    # the dead holder's owner record is still there, but its lock is gone
    assert "no longer running" in store.lock_owner(d)
    with one_thread():
        cache = RefLogProbCache.ensure(setup.model, setup.ex_a, d, lock_timeout=0, **kw)
    assert torch.equal(cache.lookup(setup.ex_a), clean["a"].lookup(setup.ex_a))
    assert not (d / store.LOCK_OWNER).exists()  # released


def test_lock_is_reentrant_in_a_thread(tmp_path):
    with hold_lock(tmp_path):
        with hold_lock(tmp_path, timeout=0):
            assert (tmp_path / store.LOCK_OWNER).exists()
        assert (tmp_path / store.LOCK_OWNER).exists()  # still held by the outer block
    assert not (tmp_path / store.LOCK_OWNER).exists()
    with hold_lock(tmp_path, timeout=0):
        pass


# ----------------------------------------------------------------------------- concurrency


@pytest.mark.parametrize("offset", ["together", "mid-build", "after", "mid-build-no-wait"])
def test_two_cli_writers_into_one_folder(setup, clean, tmp_path, offset):
    """A and B (disjoint rows) into one --out. Both finish (the second waits for the lock) or,
    with --no-wait, the second is refused naming the first; the cache then holds exactly the
    rows of every run that reported success, with the values of clean builds."""
    out = tmp_path / "conc"
    a_err = tmp_path / "a.err"
    with open(a_err, "w") as fa:
        # A runs ~10 s of batches, longer than B takes to start and reach the lock
        a = cli(args_for(setup, setup.a, out), sleep=0.2, events=True, stderr=fa)
        if offset == "together":
            b = cli(args_for(setup, setup.b, out), sleep=0.03)
        elif offset.startswith("mid-build"):
            wait_for(lambda: "EVENT batch" in a_err.read_text(), what="A's first batch")
            more = ["--no-wait"] if offset.endswith("no-wait") else []
            b = cli(args_for(setup, setup.b, out, *more), sleep=0.03)
        a.wait(timeout=300)
        if offset == "after":
            b = cli(args_for(setup, setup.b, out), sleep=0.03)
        _, b_err = b.communicate(timeout=300)
    err_a = a_err.read_text()
    assert a.returncode == 0, err_a[-3000:]
    no_traceback(err_a)
    no_traceback(b_err)
    if offset == "mid-build-no-wait":
        assert b.returncode == 1 and f"locked by another writer: pid {a.pid} " in b_err, b_err
        assert_holds_clean_values(out, setup, clean, which=("a",))
        return
    assert b.returncode == 0, b_err[-3000:]
    if offset == "mid-build":
        assert "waiting for the reference cache" in b_err and f"pid {a.pid} " in b_err
    cache = assert_holds_clean_values(out, setup, clean)
    assert len(cache) == len(setup.ex_a) + len(setup.ex_b)
    assert len(cache.manifest["builds"]) == 2


def test_killed_writer_does_not_block_and_its_work_is_kept(setup, clean, tmp_path):
    """A is SIGKILLed mid-build (a segment after every batch); B (other rows) then runs at
    once, and keeps what A saved as a finished build; A's re-run computes only the rest."""
    out = tmp_path / "c"
    a_err = tmp_path / "a.err"
    with open(a_err, "w") as fa:
        a = cli(args_for(setup, setup.a, out, "--checkpoint-seconds", 0), sleep=0.03,
                events=True, stderr=fa)
        wait_for(lambda: len(events(a_err.read_text())) > 12, what="A's progress")
        a.send_signal(signal.SIGKILL)
        a.wait()
    man = json.loads((out / "manifest.json").read_text())
    saved = sum(r["rows"] for r in man["shards"] + man["segments"])
    assert saved >= events(a_err.read_text())[-1][2] > 0
    code, err = run(args_for(setup, setup.b, out, "--no-wait"))  # not blocked by the dead A
    assert code == 0, err
    no_traceback(err)
    man = json.loads((out / "manifest.json").read_text())
    assert man["builds"][0]["kind"] == "sealed" and man["builds"][0]["rows"] == saved
    code, err = run(args_for(setup, setup.a, out, "--no-wait"))
    assert code == 0, err
    n = len(setup.ex_a)
    assert f"{n} examples ({n - saved} computed, {saved} already cached)" in err, err
    cache = RefLogProbCache.open(out, expect=setup.fp)
    assert set(cache.keys()) == set(clean["a"].keys()) | set(clean["b"].keys())
    assert torch.equal(cache.lookup(setup.ex_b), clean["b"].lookup(setup.ex_b))
    # A's rows came from two runs with other batches: checked against the float64 oracle
    check_against_oracle(cache, setup.ex_a, oracle(setup.model, setup.ex_a))


# ----------------------------------------------------------------------------- kills


def test_kill_at_a_random_time_loses_at_most_one_checkpoint_interval(setup, clean, oracles,
                                                                    tmp_path):
    """SIGKILL at a random time, twice, then resume: a kill loses at most one checkpoint
    interval (plus the batch in flight), and the resumed cache is byte-identical to an
    uninterrupted build (and stays so after compaction). One shard holds every row, so only
    the time budget saves anything before the end."""
    budget, pause = 0.25, 0.1
    out = tmp_path / "c"
    args = args_for(setup, setup.a, out, "--checkpoint-seconds", budget, rows_per_shard=200)
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    saved = 0
    for round_, window in enumerate(((1.0, 1.6), (0.5, 0.8))):
        log = tmp_path / f"a{round_}.err"
        with open(log, "w") as f:
            p = cli(args, sleep=pause, events=True, stderr=f)
            wait_for(lambda: "EVENT start" in log.read_text(), what="the build to start")
            time.sleep(rng.uniform(*window))
            t_kill = time.time()
            p.send_signal(signal.SIGKILL)
            p.wait()
        ev = events(log.read_text())
        assert ev[-1][0] != "done", f"seed {seed}: the run finished before the kill"
        man = json.loads((out / "manifest.json").read_text())
        assert man["shards"] == [] and man["segments"], seed
        now = sum(r["rows"] for r in man["segments"])
        assert now > saved, (seed, now, saved)
        saved = now
        # the last save followed the event at which rows_done reached `saved`
        t_saved = min(e[3] for e in ev if e[1] >= saved)
        batch = max(b[3] - a_[3] for a_, b in zip(ev, ev[1:]) if b[0] == "batch")
        lost = t_kill - t_saved
        assert lost <= budget + 2 * batch + 0.3, (seed, lost, budget, batch)
    code, err = run(args)
    assert code == 0, err
    n = len(setup.ex_a)
    assert f"{n} examples ({n - saved} computed, {saved} already cached)" in err, (seed, err)
    # one 200-row shard batches rows unlike `clean`'s 16-row shards: the oracle's rule here,
    # and byte for byte what an uninterrupted run of the same plan writes (also after a
    # compaction) below
    assert_holds_clean_values(out, setup, clean, which=("a",), oracles=oracles)
    ref = tmp_path / "ref"
    assert run(args_for(setup, setup.a, ref, "--checkpoint-seconds", budget,
                        rows_per_shard=200))[0] == 0
    assert dir_bytes(out) == dir_bytes(ref)
    for d in (out, ref):
        code, err = run(["--out", d, "--compact", "--rows-per-shard", 32])
        assert code == 0 and "compacted" in err, err
    assert dir_bytes(out) == dir_bytes(ref)
    assert len(json.loads((out / "manifest.json").read_text())["shards"]) == 4


def test_ctrl_c_says_what_was_kept_and_a_rerun_resumes(setup, tmp_path):
    out = tmp_path / "c"
    args = args_for(setup, setup.a, out, "--checkpoint-seconds", 0.2, rows_per_shard=64)
    log = tmp_path / "a.err"
    with open(log, "w") as f:
        p = cli(args, sleep=0.03, events=True, stderr=f)
        wait_for(lambda: "EVENT checkpoint" in log.read_text(), what="a checkpoint")
        p.send_signal(signal.SIGINT)
        p.wait(timeout=60)
    err = log.read_text()
    assert p.returncode == 130, err[-2000:]
    no_traceback(err)
    m = re.search(r"interrupted: (\d+) of (\d+) examples are saved in \S+; run the same "
                  r"command again to resume", err)
    assert m, err[-2000:]
    kept, total = int(m[1]), int(m[2])
    assert 0 < kept < total
    code, err = run(args)
    assert code == 0 and f"({total - kept} computed, {kept} already cached)" in err, err


def test_on_a_terminal_the_bar_draws_at_once_and_ctrl_c_says_how_to_resume(setup, tmp_path):
    # As a user at a terminal sees it: the bar is on the screen as soon as the build starts
    # and moves while it runs; Ctrl-C gives the resume message and exit status 130.
    from proc_util import PtyProcess

    out = tmp_path / "tty"
    args = args_for(setup, setup.a, out, "--checkpoint-seconds", 0.2, rows_per_shard=64)
    env = _env(DPO_TEST_BATCH_SLEEP="0.1", DPO_TEST_EVENTS="1")
    term = PtyProcess([sys.executable, "-c", WRAPPER, "precompute", *map(str, args)], env=env,
                      cwd=str(ROOT))
    loaded = term.read_until(r"dpo-fast: loaded ")
    drawn = term.read_until(r"precompute \[[.#]+\] \d+/120 examples \| [\d,]+ tok/s \| ETA")
    assert drawn - loaded < 5.0, term.output  # drawn when the build starts, not at its end
    first = int(re.findall(r"\] (\d+)/120 examples", term.output)[-1])
    term.read_until(r"\] (?!%d/)(\d+)/120 examples" % first)  # redrawn as rows are computed
    term.read_until(r"EVENT checkpoint rows_done=\d+ rows_saved=[1-9]")  # some rows on disk
    term.proc.send_signal(signal.SIGINT)
    code = term.wait(timeout=60)
    text = term.output
    assert code == 130, text[-3000:]
    no_traceback(text)
    m = re.search(r"\n(?:\r)?dpo-fast precompute: interrupted: (\d+) of 120 examples are saved "
                  r"in \S+; run the same command again to resume from there", text)
    assert m and 0 < int(m[1]) < 120, text[-3000:]
    code, err = run(args)
    assert code == 0 and f"({120 - int(m[1])} computed, {m[1]} already cached)" in err, err


# ----------------------------------------------------------------------------- bad input


def _unshare_ro_prefix(d: Path):
    """A command prefix that runs a command with ``d`` mounted read-only (a private mount
    namespace), or None if this machine does not allow it."""
    if not shutil.which("unshare"):
        return None
    prefix = ["unshare", "-rm", "sh", "-c",
              f'mount --bind "{d}" "{d}" && mount -o remount,bind,ro "{d}" && exec "$@"', "sh"]
    probe = subprocess.run(prefix + ["sh", "-c", f'touch "{d}/.probe"'], capture_output=True,
                           text=True)
    (d / ".probe").unlink(missing_ok=True)
    ok = probe.returncode != 0 and "Read-only" in probe.stderr
    return prefix if ok else None


def test_bad_paths_and_inputs_give_one_message_each(setup, tmp_path):
    s, d = setup, tmp_path
    good = args_for(s, s.a, d / "out-good")
    (d / "afile").write_text("x")
    (d / "nomodel").mkdir()
    (d / "empty.jsonl").write_text("")
    (d / "bad-utf8.jsonl").write_bytes(s.a.read_bytes().split(b"\n", 2)[0] + b"\n"
                                       + b'{"prompt": "caf\xe9", "chosen": " a", "rejected": '
                                       + b'" b"}\n')
    rows = read_rows(s.a)[:6]
    with open(d / "bom.csv", "w", encoding="utf-8-sig", newline="") as f:
        import csv

        w = csv.DictWriter(f, ["prompt", "chosen", "rejected"])
        w.writeheader()
        w.writerows(rows)
    same = [dict(r) for r in rows]
    same[2]["rejected"] = same[2]["chosen"]
    same[4]["rejected"] = same[4]["chosen"]
    (d / "same.jsonl").write_text("".join(json.dumps(r) + "\n" for r in same))
    long_prompt = [dict(r, prompt=r["prompt"] + " the" * 20) for r in rows]
    (d / "long.jsonl").write_text("".join(json.dumps(r) + "\n" for r in long_prompt))

    def with_data(data, *more):
        a = list(good)
        a[a.index("--data") + 1] = data
        a[a.index("--out") + 1] = d / f"out-{Path(data).stem}"
        return a + list(more)

    def with_model(model):
        a = list(good)
        a[a.index("--model") + 1] = model
        return a

    hub = "HuggingFaceTB/SmolLM2-135M-Instruct"
    # a hub id whose files are in the local Hugging Face cache (as a download leaves them)
    snap = d / "hf" / "hub" / "models--acme--tiny" / "snapshots" / "abc123"
    shutil.copytree(s.model_dir, snap)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("abc123")
    cached_hub = {"HF_HOME": d / "hf", "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}
    cases = {  # name: (args, env, expected exit code, message regex)
        "model path missing": (with_model(d / "no-such-model"), {}, 1,
                               r"--model \S+no-such-model: no such file or directory"),
        "model folder without config": (with_model(d / "nomodel"), {}, 1,
                                        r"no config\.json \(not a Hugging Face model folder\)"),
        "model a plain file": (with_model(d / "afile"), {}, 1, r"a file that is not a \.gguf"),
        "hub name offline": (with_model(hub), {}, 1, r"not found locally .* HF_HUB_OFFLINE"),
        "hub name, hub unreachable": (with_model(hub), {"HF_HUB_OFFLINE": "0",
                                                        "HF_ENDPOINT": "http://127.0.0.1:9"}, 1,
                                      r"not found locally .* hub cannot be reached"),
        "out is a file": (good[:good.index("--out") + 1] + [d / "afile"]
                          + good[good.index("--out") + 2:], {}, 1,
                          r"--out \S+afile exists and is not a directory"),
        "data missing": (with_data(d / "none.jsonl"), {}, 1, r"--data \S+none\.jsonl: no such"),
        "data empty": (with_data(d / "empty.jsonl"), {}, 1, r"empty\.jsonl: no rows"),
        "data not utf-8": (with_data(d / "bad-utf8.jsonl"), {}, 1,
                           r"bad-utf8\.jsonl:2: not valid UTF-8 \(byte 0xe9 at column 16\)"),
        "all rows dropped": (with_data(d / "long.jsonl"), {}, 1,
                             r"none of its 6 rows is usable"),
        "identical, error policy": (with_data(d / "same.jsonl", "--identical", "error"), {}, 1,
                                    r"2 row\(s\) have chosen == rejected .*same\.jsonl line 3, "
                                    r"\S+same\.jsonl line 5"),
        "bad --rows-per-shard": (good + ["--rows-per-shard", "0"], {}, 2,
                                 r"--rows-per-shard must be >= 1"),
        # these succeed, with what they did said plainly
        "data empty, allowed": (with_data(d / "empty.jsonl", "--allow-empty"), {}, 0,
                                r"0 rows from"),
        "identical rows skipped": (with_data(d / "same.jsonl"), {}, 0,
                                   r"warning: 2 row\(s\) dropped, chosen == rejected after "
                                   r"tokenization .*: \S+same\.jsonl line 3, \S+same\.jsonl "
                                   r"line 5"),
        "dropped rows named": (with_data(d / "long.jsonl", "--allow-empty"), {}, 0,
                               r"6 row\(s\) dropped, the prompt alone reaches --max-length 16: "
                               r"\S+long\.jsonl line 1, .*line 5, \.\.\. \(1 more\)"),
        "csv with a byte-order mark": (with_data(d / "bom.csv"), {}, 0,
                                       r"6 examples \(6 computed, 0 already cached\)"),
        "hub id in the local cache": (with_model("acme/tiny"), cached_hub, 0,
                                      r"120 examples \(120 computed, 0 already cached\)"),
    }

    def go(item):
        name, (a, env, _, _) = item
        t0 = time.monotonic()
        code, err = run(a, env=env)
        return name, code, err, time.monotonic() - t0

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        results = list(pool.map(go, cases.items()))
    for name, code, err, took in results:
        _, _, want_code, pattern = cases[name]
        assert code == want_code, (name, code, err[-2000:])
        assert re.search(pattern, err), (name, err[-2000:])
        no_traceback(err)
        if want_code:
            assert "loaded LlamaForCausalLM" not in err, name  # refused before the model
        if name.startswith("hub"):
            assert took < 60, (name, took)
    assert len(RefLogProbCache.open(d / "out-same")) == 4


def test_read_only_folder(setup, tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    prefix = _unshare_ro_prefix(d)
    if prefix is None:
        if os.geteuid() == 0:
            pytest.skip("no private read-only mount here (unshare -rm refused) and root "
                        "ignores permissions")
        prefix = ()
    # an empty read-only folder: refused before the model loads
    if not prefix:
        d.chmod(0o555)
    try:
        code, err = run(args_for(setup, setup.a, d), prefix=prefix)
    finally:
        d.chmod(0o755)
    assert code == 1 and "cannot be written" in err and "holds no reference cache" in err, err
    no_traceback(err)
    # a finished cache there: a re-run succeeds without writing anything
    cache = d / "cache"
    assert run(args_for(setup, setup.a, cache))[0] == 0
    before = {f: (f.stat().st_mtime_ns, f.read_bytes()) for f in cache.iterdir()}
    if not prefix:
        cache.chmod(0o555)
    try:
        code, err = run(args_for(setup, setup.a, cache), prefix=prefix)
        assert code == 0 and "(0 computed, 120 already cached)" in err, err
        no_traceback(err)
        # new rows cannot go there: one message saying so
        code, err = run(args_for(setup, setup.b, cache), prefix=prefix)
        assert code == 1 and "80 of 80 examples are not in the reference cache" in err, err
        assert "Copy the cache to a writable place" in err
        no_traceback(err)
    finally:
        cache.chmod(0o755)
    assert {f: (f.stat().st_mtime_ns, f.read_bytes()) for f in cache.iterdir()} == before


def test_damaged_cache_messages_and_repair(setup, clean, tmp_path):
    out = tmp_path / "c"
    args = args_for(setup, setup.a, out)
    assert run(args)[0] == 0
    reference = dir_bytes(out)
    man_path = out / "manifest.json"
    man_text = man_path.read_text()
    man = json.loads(man_text)

    # a re-run of a complete cache writes nothing (not even the manifest)
    st = man_path.stat()
    assert run(args)[0] == 0
    assert man_path.stat().st_mtime_ns == st.st_mtime_ns and man_path.stat().st_ino == st.st_ino

    # a wrong SHA-256 written into the manifest is blamed on the manifest, not the shard
    bad = json.loads(man_text)
    bad["shards"][1]["sha256"] = "0" * 64
    man_path.write_text(json.dumps(bad))
    code, err = run(args)
    assert code == 1 and "manifest.json: the manifest's own SHA-256 does not match" in err, err
    assert "--overwrite" in err and "shard-00001" not in err
    with pytest.raises(CorruptCacheError, match="was edited or damaged"):
        RefLogProbCache.open(out)
    # ... and a file name that leaves the directory is refused too
    bad = json.loads(man_text)
    bad["shards"][0]["file"] = "../outside.safetensors"
    bad.pop("manifest_sha256")
    man_path.write_text(json.dumps(bad))
    with pytest.raises(CorruptCacheError, match=r"shards\[0\] is not a valid file record"):
        RefLogProbCache.open(out)
    man_path.write_text(man_text)

    # another fingerprint: the CLI says --overwrite, not overwrite=True
    code, err = run(args_for(setup, setup.a, out, "--max-length", "24"))
    assert code == 1 and "differing field(s): max_length" in err, err
    assert "Rerun with --overwrite" in err and "overwrite=True" not in err

    # a flipped byte in a shard: named, with the way out
    f = out / man["shards"][2]["file"]
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x10
    f.write_bytes(bytes(data))
    code, err = run(args)
    assert code == 1 and re.search(r"shard \S+shard-00002\.safetensors: SHA-256", err), err
    assert "with --repair to recompute the damaged rows" in err
    no_traceback(err)
    code, err = run(args + ["--repair"])
    assert code == 0 and "(16 computed, 104 already cached)" in err, err
    assert "repair: dropped the damaged shard(s) ['shard-00002.safetensors']" in err
    cache = assert_holds_clean_values(out, setup, clean, which=("a",))
    assert cache.manifest["generation"] == 1
    assert dir_bytes(out) != reference  # compacted, then the lost rows appended


# ----------------------------------------------------------------------------- compaction


COMPACT_KILL = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import dpo_fast.refcache.store as st
    from dpo_fast import RefLogProbCache
    out, at = Path(sys.argv[1]), sys.argv[2]
    write, unlink = st.atomic_write, Path.unlink
    def atomic_write(path, data):
        write(path, data)
        if (at == "shard" and "-g" in path.name) or (at == "manifest" and path.name ==
                                                     "manifest.json"):
            os.kill(os.getpid(), signal.SIGKILL)
    st.atomic_write = atomic_write
    RefLogProbCache.compact(out, rows_per_shard=32)
""")


def test_compaction_keeps_values_survives_kills_and_readers(setup, oracles, tmp_path):
    kw = dict(fingerprint=setup.fp, batch_tokens=BATCH_TOKENS, rows_per_shard=16,
              compact=False)
    d = tmp_path / "c"
    exs = setup.ex_a + setup.ex_b
    for i in range(0, len(exs), 25):  # 8 small ensures: 8 builds, 16 shards
        RefLogProbCache.ensure(setup.model, exs[:i + 25], d, **kw)
    before = RefLogProbCache.open(d)
    assert len(before.manifest["builds"]) == 8
    want = before.lookup(exs)

    # killed after writing a new shard, and after the new manifest (old files not yet
    # deleted): the cache opens with every row either way, and a re-run finishes it
    for at in ("shard", "manifest"):
        c = tmp_path / f"kill-{at}"
        shutil.copytree(d, c)
        p = subprocess.run([sys.executable, "-c", COMPACT_KILL, str(c), at], env=_env(),
                           cwd=str(ROOT), capture_output=True, text=True)
        assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
        assert torch.equal(RefLogProbCache.open(c).lookup(exs), want)
        RefLogProbCache.compact(c, rows_per_shard=32)

    after = RefLogProbCache.compact(d, rows_per_shard=32)
    assert torch.equal(after.lookup(exs), want)
    assert torch.equal(after.lengths(exs), before.lengths(exs))
    assert len(after.manifest["shards"]) == -(-len(exs) // 32)
    assert after.manifest["builds"][0]["kind"] == "compacted"
    assert sorted(f.name for f in d.glob("*.safetensors")) == sorted(
        s["file"] for s in after.manifest["shards"])
    for at in ("shard", "manifest"):
        assert dir_bytes(tmp_path / f"kill-{at}") == dir_bytes(d)
    # idempotent: nothing written the second time
    st = (d / "manifest.json").stat()
    RefLogProbCache.compact(d, rows_per_shard=32)
    assert (d / "manifest.json").stat().st_mtime_ns == st.st_mtime_ns

    # "auto": an ensure that leaves more than max(16, 2 x compacted) shards compacts them,
    # and every row keeps the value it was computed with, bit for bit (these 5-row builds
    # batch rows unlike the 25-row ones above, so their values are their own)
    e = tmp_path / "auto"
    counts, held = [], torch.empty(0, 2)
    for i in range(0, len(exs), 5):  # 40 ensures of 5 rows: a 5-row shard each
        last = RefLogProbCache.ensure(setup.model, exs[:i + 5], e, **dict(kw, compact="auto"))
        counts.append(len(last.manifest["shards"]))
        now = torch.stack(last.lookup(exs[:i + 5], split=True), 1)  # [rows, 2]
        assert torch.equal(now[:i], held), i
        held = now
    for k, c in enumerate(counts, 1):  # never more than max(16, 2 x the compacted count)
        assert c <= max(16, 2 * -(-5 * k // 16)), counts
    assert counts[15:17] == [16, -(-85 // 16)], counts  # the 17th compacted its 85 rows
    assert last.manifest["generation"] == 2, counts
    both = {k: np.concatenate([oracles["a"][k], oracles["b"][k]]) for k in ("truth", "fp32")}
    for x in (d, e):
        check_against_oracle(RefLogProbCache.open(x), exs, both)


def test_reader_retries_when_a_writer_replaces_the_cache(setup, tmp_path, monkeypatch):
    d = tmp_path / "c"
    kw = dict(fingerprint=setup.fp, batch_tokens=BATCH_TOKENS, rows_per_shard=16,
              compact=False)
    RefLogProbCache.ensure(setup.model, setup.ex_a[:50], d, **kw)
    RefLogProbCache.ensure(setup.model, setup.ex_a, d, **kw)
    want = RefLogProbCache.open(d).lookup(setup.ex_a)
    read = store.read_shard
    calls = []

    def read_then_compact(path, rec):
        calls.append(rec["file"])
        if len(calls) == 2:  # the reader has the old manifest; a writer compacts now
            RefLogProbCache.compact(d, rows_per_shard=64)
        return read(path, rec)

    monkeypatch.setattr(store, "read_shard", read_then_compact)
    cache = RefLogProbCache.open(d)
    assert cache.manifest["generation"] == 1 and torch.equal(cache.lookup(setup.ex_a), want)
    assert any("-g1" in c for c in calls)


# ----------------------------------------------------------------------------- ranks


def _rank_worker(rank, model_dir, exs_file, out, init_file, result_dir):
    import torch.distributed as dist

    from dpo_fast import PreferenceExample

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir,
                                                                  dtype=torch.float32)
        exs = [PreferenceExample(*r) for r in json.loads(Path(exs_file).read_text())]
        try:
            RefLogProbCache.build(model, exs, out, batch_tokens=BATCH_TOKENS, rows_per_shard=16,
                                  lock_timeout=0)
            res = "ok"
        except RefCacheError as e:
            res = f"{type(e).__name__}: {e.message}"
        (Path(result_dir) / f"rank{rank}").write_text(res)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ranks_refused_together_when_another_writer_holds_the_folder(setup, tmp_path):
    import torch.multiprocessing as mp

    out = tmp_path / "cache"
    exs_file = tmp_path / "exs.json"
    exs_file.write_text(json.dumps([[e.prompt_ids.tolist(), e.chosen_ids.tolist(),
                                     e.rejected_ids.tolist()] for e in setup.ex_a[:20]]))
    holder = start_holder(out)
    try:
        mp.spawn(_rank_worker, args=(str(setup.model_dir), str(exs_file), str(out),
                                     str(tmp_path / "init"), str(tmp_path)), nprocs=2,
                 join=True)
    finally:
        holder.kill()
        holder.wait()
    r0 = (tmp_path / "rank0").read_text()
    r1 = (tmp_path / "rank1").read_text()
    assert r0.startswith("CacheLockedError") and f"pid {holder.pid} " in r0, r0
    assert r1.startswith("RefCacheError: rank 0 could not lock"), r1
    assert not (out / "manifest.json").exists() and not list(out.glob("part-*"))
    # with the holder gone, the same job builds
    mp.spawn(_rank_worker, args=(str(setup.model_dir), str(exs_file), str(out),
                                 str(tmp_path / "init2"), str(tmp_path)), nprocs=2, join=True)
    assert (tmp_path / "rank0").read_text() == "ok" == (tmp_path / "rank1").read_text()
    assert len(RefLogProbCache.open(out)) == 20
