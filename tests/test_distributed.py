"""Training on several processes (torchrun, gloo, CPU): DDP and FSDP2 against one process, the
fused loss's gradients under each engine, the sharded reference precompute byte for byte, a
killed job and a dead rank resumed.

Truth is the one-process trainer (itself checked against float64 full-logits oracles in
test_train.py) on the same config: 2 ranks x micro-batches of b pairs vs 1 process x 2b.
Every process runs one thread (torchrun's default), so the one-process runs do too.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from proc_util import wait_for_line  # noqa: E402
from tiny import tiny_model, tiny_tokenizer, word_rows  # noqa: E402

from dpo_fast.train import TrainConfig, Trainer  # noqa: E402
from dpo_fast.train.checkpoint import CheckpointError  # noqa: E402
from dpo_fast.train.distributed import deal_pairs, equalize  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dist_worker.py"
pytestmark = pytest.mark.slow


def _env(**extra):
    e = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", **extra)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + str(ROOT / "tests") + os.pathsep + \
        e.get("PYTHONPATH", "")
    return e


def _torchrun(n, *args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={n}", *args]


def _run(cmd, timeout=300, **env):
    p = subprocess.run(cmd, env=_env(**env), capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    return p


def metrics(d):
    return [json.loads(ln) for ln in (Path(d) / "metrics.jsonl").read_text().splitlines()
            if ln.strip()]


def losses(d):
    return [(m["step"], m["loss"]) for m in metrics(d) if "loss" in m]


def eval_losses(d):
    return [(m["step"], m["eval/loss"]) for m in metrics(d) if "eval/loss" in m]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("dist")
    for name, tied in (("untied", False), ("tied", True)):
        m = tiny_model(seed=7, tie_word_embeddings=tied)
        m.save_pretrained(base / name)
        tiny_tokenizer().save_pretrained(base / name)
    for name, n, seed in (("train", 48, 1), ("eval", 10, 2)):
        (base / f"{name}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in word_rows(n, seed=seed)))
    return base


def _config(setup, model="untied", **kw):
    cfg = dict(model=str(setup / model), train_data=str(setup / "train.jsonl"),
               eval_data=str(setup / "eval.jsonl"), data_cache_dir="", batch_size=4,
               micro_batch_size=2, max_steps=10, learning_rate=1e-3, logging_steps=1,
               save_steps=2, save_total_limit=10, max_length=64, ref_rows_per_shard=8,
               overwrite_output_dir=True)
    cfg.update(kw)
    return cfg


_RUNS = {}


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(setup, name, nproc, entry_point=False, accelerate=False, **kw):
    """`dpo-fast train` on ``nproc`` processes (torchrun, or ``accelerate launch``) or one
    (plain), once per name."""
    if name not in _RUNS:
        out = setup / name
        cfg = _config(setup, output_dir=str(out), **kw)
        y = setup / f"{name}.yaml"
        y.write_text(json.dumps(cfg))  # JSON is YAML
        args = ["train", "--config", str(y), "--quiet"]
        if accelerate:  # flags for all its questions: no accelerate config file is needed
            import importlib.util

            if importlib.util.find_spec("accelerate") is None:
                assert os.environ.get("CI") != "true", "accelerate is not installed"
                pytest.skip("accelerate is not installed")
            _run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                  f"--num_processes={nproc}", "--num_machines=1", "--mixed_precision=no",
                  "--dynamo_backend=no", f"--main_process_port={_free_port()}",
                  "-m", "dpo_fast", *args])
        elif entry_point:  # the console script, as torchrun runs it: --no-python dpo-fast
            exe = shutil.which("dpo-fast")
            if exe is None and os.environ.get("CI") != "true":
                pytest.skip("the dpo-fast entry point is not installed")
            assert exe is not None, "dpo-fast is not on PATH (pip install -e .)"
            _run(_torchrun(nproc, "--no-python", exe, *args))
        else:
            args = ["-m", "dpo_fast", *args]
            _run(_torchrun(nproc, *args) if nproc else [sys.executable, *args])
        _RUNS[name] = out
    return _RUNS[name]


def _model_params(d):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    return {n: p.detach() for n, p in m.named_parameters()}


def _same_weights(pa, pb, lr, steps):
    """The final weights of one training run on 1 and on N processes, which differ only in
    the order of floating-point sums. Adam divides by sqrt(v): an element whose gradient is
    ~0 moves by about lr a step in the direction its last bits give it, so a few such elements
    differ by up to 2 x lr x steps (CI, 59.6M elements, lr 1e-3, 4 steps: 155 past 1e-5, the
    largest 1.9e-4; the 22.7k-element tied model: 1 past 1e-5); all but 1e-4 of the elements
    agree to 1e-5. A wrong reduction or a lost rank's gradient moves most of them (a run
    against its own initial weights: 93% past 1e-5)."""
    assert sorted(pa) == sorted(pb)
    total = sum(p.numel() for p in pa.values())
    off = sum(int(((pa[n] - pb[n]).abs() > 1e-5).sum()) for n in pa)
    worst = max(float((pa[n] - pb[n]).abs().max()) for n in pa)
    assert off <= 1e-4 * total, (off, total, worst)
    assert worst <= 2 * lr * steps, (worst, off)


def _same_run(one, many, tol=1e-5):
    a, b = losses(one), losses(many)
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 11))  # rank 0 logs, once
    assert max(abs(x - y) for (_, x), (_, y) in zip(a, b)) <= tol
    ea, eb = eval_losses(one), eval_losses(many)
    assert [s for s, _ in ea] == [s for s, _ in eb] == [0, 10]
    assert max(abs(x - y) for (_, x), (_, y) in zip(ea, eb)) <= tol
    assert a[0][1] == pytest.approx(np.log(2), abs=1e-6)  # step 1: policy == reference
    assert a[-1][1] != a[0][1]  # it trained
    pa, pb = _model_params(one), _model_params(many)  # the final model: one folder
    assert sorted(pa) == sorted(pb)
    from safetensors import safe_open

    with safe_open(str(one / "model.safetensors"), "pt") as fa, \
            safe_open(str(many / "model.safetensors"), "pt") as fb:
        assert sorted(fa.keys()) == sorted(fb.keys())  # tied weights saved once
    _same_weights(pa, pb, lr=1e-3, steps=10)
    ra, rb = (json.loads((d / "summary.json").read_text()) for d in (one, many))
    assert ra["train_metrics"]["num_tokens"] == rb["train_metrics"]["num_tokens"]  # summed


def test_ddp_two_ranks_equal_one_process_and_precompute_bytes(setup):
    one = run_cli(setup, "one", 0, micro_batch_size=4)
    ddp = run_cli(setup, "ddp", 2)  # strategy auto = ddp
    _same_run(one, ddp)
    assert json.loads((ddp / "checkpoint-10" / "trainer_state.json").read_text())[
        "strategy"] == "ddp"
    # the reference precompute was dealt to both ranks and merged into the same bytes
    files = sorted(p.name for p in (one / "ref_cache").iterdir() if p.name != ".lock")
    assert files == sorted(p.name for p in (ddp / "ref_cache").iterdir() if p.name != ".lock")
    shards = [f for f in files if f.startswith("shard-")]
    assert len(shards) >= 4 and "manifest.json" in files
    for f in files:
        assert (one / "ref_cache" / f).read_bytes() == (ddp / "ref_cache" / f).read_bytes(), f
    from dpo_fast import RefLogProbCache

    c = RefLogProbCache.open(ddp / "ref_cache")
    vals = c.lookup(c.keys()).numpy()
    assert vals.size == 2 * (10 * 4 + 10)  # the pairs 10 steps of 4 visit + the eval pairs
    assert np.all(np.isfinite(vals)) and np.all(vals < -1.0)  # real sums of log-probs, not 0


def test_accelerate_launch_runs_the_same_job(setup):
    """`accelerate launch --multi_gpu` (torchrun underneath; on the CPU here) sets the same
    environment: the same DDP run as one process."""
    one = run_cli(setup, "one", 0, micro_batch_size=4)
    acc = run_cli(setup, "accelerate", 2, accelerate=True)
    _same_run(one, acc)
    st = json.loads((acc / "checkpoint-10" / "trainer_state.json").read_text())
    assert (st["strategy"], st["world_size"]) == ("ddp", 2)


@pytest.mark.parametrize("model", ["untied", "tied"])
def test_fsdp2_two_ranks_equal_one_process(setup, model):
    # tied: also samples before / after training (every rank generates in lockstep through
    # the sharded model; rank 0 keeps the texts)
    kw = dict(sample_prompts=3, sample_max_new_tokens=6) if model == "tied" else {}
    one = run_cli(setup, f"one-{model}", 0, model=model, micro_batch_size=4, **kw)
    fs = run_cli(setup, f"fsdp2-{model}", 2, model=model, strategy="fsdp2",
                 entry_point=model == "tied", **kw)
    _same_run(one, fs)
    if kw:
        sa, sb = (json.loads((d / "summary.json").read_text())["samples"] for d in (one, fs))
        assert len(sa) == len(sb) == 3
        # before training the gathered weights are the loaded ones bit for bit: the same
        # seeded samples as one process
        assert [r["before"] for r in sb] == [r["before"] for r in sa]
        assert all(isinstance(r["after"], str) for r in sb)
        assert any(r["before"] for r in sb)  # it generated text
    ck = fs / "checkpoint-10"
    assert sorted(p.name for p in (ck / "sharded").iterdir()) == [
        "shard-00001-model-00001-of-00001.safetensors",
        "shard-00002-model-00001-of-00001.safetensors"]
    assert not (ck / "model.safetensors").exists()


def _safetensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_lora_under_fsdp2_equals_one_process_merges_and_resumes(setup):
    """LoRA adapters on a sharded frozen base (tied embeddings): the same losses, adapter and
    merged model as one process; a run resumed from its step-6 checkpoint repeats the rest
    exactly."""
    kw = dict(model="tied", lora_r=4, merge_lora=True, max_steps=10)
    one = run_cli(setup, "one-lora", 0, micro_batch_size=4, **kw)
    fs = run_cli(setup, "fsdp2-lora", 2, strategy="fsdp2", **kw)
    a, b = losses(one), losses(fs)
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 11))
    assert max(abs(x - y) for (_, x), (_, y) in zip(a, b)) <= 1e-5
    assert a[-1][1] != a[0][1]
    ad_one, ad_fs = (_safetensors(d / "adapter_model.safetensors") for d in (one, fs))
    assert sorted(ad_one) == sorted(ad_fs) and any("lora_B" in k for k in ad_one)
    assert max(float((ad_one[k] - ad_fs[k]).abs().max()) for k in ad_one) <= 1e-4
    assert max(float(v.abs().max()) for k, v in ad_fs.items() if "lora_B" in k) > 1e-3
    m_one, m_fs = (_safetensors(d / "merged" / "model.safetensors") for d in (one, fs))
    base = _safetensors(setup / "tied" / "model.safetensors")
    assert sorted(m_one) == sorted(m_fs) == sorted(base)
    assert max(float((m_one[k] - m_fs[k]).abs().max()) for k in m_one) <= 1e-4
    assert max(float((m_fs[k] - base[k]).abs().max()) for k in base) > 1e-3  # merged in
    # resume from checkpoint-6 of the FSDP2 run (sharded adapter + optimizer state)
    out = setup / "lora-resumed"
    shutil.copytree(fs, out)
    for name in ("checkpoint-8", "checkpoint-10"):
        shutil.rmtree(out / name)
    (out / "adapter_model.safetensors").unlink()
    shutil.rmtree(out / "merged")
    _run(_worker_cmd(setup, out, strategy="fsdp2", resume_from_checkpoint=True,
                     overwrite_output_dir=False, **kw))
    assert losses(out) == b  # exact
    ad_r = _safetensors(out / "adapter_model.safetensors")
    assert all(torch.equal(ad_r[k], ad_fs[k]) for k in ad_fs)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2", "fsdp2-head-blocks"])
@pytest.mark.parametrize("model", ["untied", "tied"])
def test_fused_loss_and_grads_under_the_engine(setup, strategy, model):
    """Each rank takes 2 of 4 pairs; the engine's reduced head / embedding / layer gradients
    equal one process's on all 4 (FSDP2: the head gathered for the fused op, its gradient
    reduce-scattered into the shards, or, as the trainer runs it, sent block by block to the
    rank holding those vocabulary rows; tied: one parameter for both, the embeddings' part
    through FSDP2's reduce-scatter into the same shard)."""
    cfg = {"strategy": strategy.replace("-head-blocks", ""), "model": str(setup / model),
           "head_blocks": strategy.endswith("head-blocks")}
    p = _run(_torchrun(2, str(WORKER), "grads", json.dumps(cfg)))
    r = json.loads(p.stdout.split("RESULT ", 1)[1].splitlines()[0])
    assert r["names"] and r["world"] == 2 and r["tied"] == (model == "tied")
    assert r["loss"] == pytest.approx(r["loss_alone"], abs=1e-6)
    assert "lm_head.weight" in r["diffs"] or model == "tied"
    for n, d in r["diffs"].items():
        assert d <= 1e-5 * max(r["scale"][n], 1e-3), (n, d, r["scale"][n])


def test_gloo_threads_do_not_abort_the_exit(tmp_path):
    """Four processes each drop a gloo all-reduce's tensor just before exiting, with the group
    kept alive (as FSDP2's DTensor caches keep it): the CLI's exit (exit handlers run,
    interpreter finalization skipped) ends every one with status 0, run after run. Through the
    interpreter's own exit, 14 of 20 such jobs aborted here ("terminate called without an
    active exception")."""
    for i in range(8):
        out = tmp_path / str(i)
        out.mkdir()
        p = subprocess.run(_torchrun(4, str(WORKER), "collectives",
                                     json.dumps({"out": str(out), "n": 50})),
                           env=_env(), capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, (i, p.stderr[-3000:])
        assert sorted(f.name for f in out.iterdir()) == [f"atexit-{r}" for r in range(4)]


def test_the_cli_ends_a_process_that_ran_a_group(monkeypatch, capsys):
    """After ``teardown`` in this process, ``dpo-fast``'s ``main`` exits through
    ``end_process`` with the command's status; before it, it returns the status."""
    from dpo_fast.cli import main
    from dpo_fast.train import distributed

    ended = []
    monkeypatch.setattr(distributed, "end_process", ended.append)
    assert main(["info"]) == 0 and ended == []
    monkeypatch.setattr(distributed, "_GROUP_ENDED", True)
    assert main(["info"]) == 0 and ended == [0]
    assert main(["train", "no_such_key=1"]) == 2 and ended == [0, 2]


def _spawn_job(cmd, **env):
    return subprocess.Popen(cmd, env=_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _kill_tree(pid):
    """SIGKILL ``pid`` and all its descendants at once (torchrun starts its workers in their own
    process groups, so killing its group alone would leave them running)."""
    children = {}
    for st in Path("/proc").glob("[0-9]*/stat"):
        try:
            f = st.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(f[1]), []).append(int(st.parent.name))
        except (OSError, IndexError, ValueError):
            pass
    todo, tree = [pid], []
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return tree


def _worker_cmd(setup, out, **kw):
    return _torchrun(2, str(WORKER), json.dumps(_config(setup, output_dir=str(out), **kw)))


def test_kill_9_of_the_whole_job_then_resume_fsdp2(setup):
    want = run_cli(setup, "fsdp2-untied", 2, model="untied", strategy="fsdp2")
    out = setup / "killed"
    job = _spawn_job(_worker_cmd(setup, out, strategy="fsdp2"), HOLD_AT="5")
    wait_for_line(job, "STEP 5", timeout=240)
    assert len(_kill_tree(job.pid)) >= 3  # torchrun and both ranks at once
    job.wait(30)
    assert (out / "checkpoint-4").is_dir() and not (out / "checkpoint-6").exists()
    _run(_worker_cmd(setup, out, strategy="fsdp2", resume_from_checkpoint=True,
                     overwrite_output_dir=False))
    assert losses(out) == losses(want)  # exact
    assert eval_losses(out) == eval_losses(want)


def test_a_dead_rank_ends_the_job_then_resume_ddp(setup):
    want = run_cli(setup, "ddp", 2)
    out = setup / "dead-rank"
    t0 = time.time()
    job = _spawn_job(_worker_cmd(setup, out, dist_timeout=60.0), DIE_AT="5")
    try:
        rc = job.wait(150)  # no hang: the survivor's collective fails, torchrun stops the job
    finally:
        if job.poll() is None:
            _kill_tree(job.pid)
    assert rc != 0 and time.time() - t0 < 150
    assert (out / "checkpoint-4").is_dir() and not (out / "checkpoint-6").exists()
    _run(_worker_cmd(setup, out, resume_from_checkpoint=True, overwrite_output_dir=False))
    assert losses(out) == losses(want)
    assert eval_losses(out) == eval_losses(want)


def test_sigterm_stops_every_rank_at_one_step_with_a_checkpoint_then_resume(setup):
    want = run_cli(setup, "ddp", 2)
    out = setup / "sigterm"
    job = _spawn_job(_worker_cmd(setup, out, save_steps=None), SLOW="0.5")
    wait_for_line(job, "STEP 3", timeout=240)
    job.send_signal(signal.SIGTERM)  # to torchrun, which passes it to both ranks
    stdout, err = job.communicate(timeout=120)
    summary = json.loads(stdout.split("RESULT ", 1)[1].splitlines()[0])
    assert summary["interrupted"] is True, err[-3000:]
    step = summary["global_step"]
    assert [d.name for d in out.glob("checkpoint-*")] == [f"checkpoint-{step}"]
    assert len(list((out / f"checkpoint-{step}").glob("rng*.safetensors"))) == 2
    _run(_worker_cmd(setup, out, save_steps=None, resume_from_checkpoint=True,
                     overwrite_output_dir=False))
    assert losses(out) == losses(want)


def test_resume_needs_the_same_world_size_and_strategy(setup):
    fs = run_cli(setup, "fsdp2-untied", 2, model="untied", strategy="fsdp2")
    cfg = TrainConfig(**_config(setup, output_dir=str(fs), resume_from_checkpoint=True,
                                overwrite_output_dir=False))
    with pytest.raises(CheckpointError, match=r"2 process\(es\) with strategy='fsdp2'.*"
                                              r"nproc_per_node=2"):
        Trainer(cfg).train()


def test_strategy_without_torchrun_is_an_error(setup):
    with pytest.raises(ValueError, match="strategy='fsdp2' needs several processes"):
        Trainer(TrainConfig(**_config(setup, output_dir=str(setup / "x"), strategy="fsdp2")))


@pytest.mark.parametrize("seed", range(5))
def test_pairs_are_dealt_once_with_balanced_tokens_and_equal_micro_batch_counts(seed):
    g = np.random.default_rng(seed)
    sizes = g.integers(10, 300, size=int(g.integers(1, 40)))
    idx = list(g.permutation(len(sizes)))
    for world in (1, 2, 3, 8):
        share = deal_pairs(idx, lambda i: int(sizes[i]), world)
        assert sorted(i for s in share for i in s) == sorted(idx)  # each pair exactly once
        for s in share:  # each rank keeps the step's order
            assert s == [i for i in idx if i in set(s)]
        tok = [sum(int(sizes[i]) for i in s) for s in share]
        if len(idx) >= world:  # greedy longest-first: within one pair of perfect balance
            assert max(tok) - min(tok) <= int(sizes.max())
            assert all(share)
        mbs = [[s[k:k + 3] for k in range(0, len(s), 3)] for s in share]
        eq = equalize(mbs)
        assert len({len(m) for m in eq}) == 1
        for s, m in zip(share, eq):
            assert [i for mb in m if mb is not None for i in mb] == s  # order kept, none lost
            assert all(mb is None or mb for mb in m)


# ---------------------------------------------------------------- models bigger than one device

MID = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=16, num_attention_heads=8,
           num_key_value_heads=8, vocab_size=8000, initializer_range=0.02,
           tie_word_embeddings=False)


@pytest.fixture(scope="module")
def mid(setup):
    """A 59.5M-parameter model (238 MB fp32; 86% in its 16 decoder layers): its weights and
    AdamW state dominate a process's memory, so sharding shows in RSS."""
    d = setup / "mid"
    if not d.exists():
        m = tiny_model(seed=3, **MID)
        m.save_pretrained(d)
        tiny_tokenizer().save_pretrained(d)
    nbytes = sum(p.numel() * 4 for p in tiny_model(seed=3, **MID).parameters())
    return d, nbytes


def _summary(d):
    return json.loads((Path(d) / "summary.json").read_text())


def _run_peak(s):
    """Per rank: the whole run's peak RSS (MiB) above its start-phase peak (imports,
    launch)."""
    phases = s["phase_memory_mb"]
    ranks = len(phases["start"])
    return [max(v[r] for v in phases.values()) - phases["start"][r] for r in range(ranks)]


def test_sharded_memory_falls_with_processes_and_the_run_equals_one_process(setup, mid):
    """A 238 MB model on 1 / 2 / 4 processes (FSDP2): no process loads it whole, the
    reference pass runs through the shards in lockstep (26 rows in cache shards of 20 and 6
    rows: ranks run different numbers of batches, and at 4 processes two ranks have none),
    the run equals one process, and the final model (in several files with an index)
    reloads with from_pretrained to the same weights."""
    d, nbytes = mid
    mib = nbytes / 2**20
    kw = dict(model="mid", ref_rows_per_shard=20, max_steps=4, max_shard_size="40MB",
              save_steps=None)
    one = run_cli(setup, "mid-one", 0, micro_batch_size=4, **kw)
    two = run_cli(setup, "mid-fsdp2x2", 2, strategy="fsdp2", **kw)
    four = run_cli(setup, "mid-fsdp2x4", 4, strategy="fsdp2", micro_batch_size=1, **kw)
    s1, s2, s4 = (_summary(x) for x in (one, two, four))
    # the load phase's own cost (imports of the model code, FSDP2, peft) measured on the
    # tiny model, whose weights are nothing
    ph = _summary(run_cli(setup, "fsdp2-untied", 2, model="untied", strategy="fsdp2"))[
        "phase_memory_mb"]
    imports = max(ph["load"][r] - ph["data"][r] for r in range(2))
    # load: each process reads its half / quarter of each tensor (a whole load is >= 1x)
    for s, n in ((s2, 2), (s4, 4)):
        ph = s["phase_memory_mb"]
        for r in range(n):
            grew = ph["load"][r] - ph["data"][r] - imports
            assert grew < (0.75 if n == 2 else 0.5) * mib, (n, r, grew, imports, mib)
        # the export gathers one tensor at a time (the largest is 7% of the model), not
        # the model
        for r in range(n):
            assert ph["finish"][r] - ph["train"][r] < 0.6 * mib, (n, r, ph)
        # parameters + AdamW moments (12 bytes per parameter between steps): 1/n each
        for r in range(n):
            assert s["model_state_mb"][r] < 1.1 * 3 * mib / n, s["model_state_mb"]
    assert s1["model_state_mb"][0] == pytest.approx(3 * mib, rel=0.01)
    whole = _run_peak(s1)[0]
    assert max(_run_peak(s2)) < 0.8 * whole, (_run_peak(s2), whole)
    assert max(_run_peak(s4)) < 0.6 * whole, (_run_peak(s4), whole)
    # the same run
    for many in (two, four):
        a, b = losses(one), losses(many)
        assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3, 4]
        assert max(abs(x - y) for (_, x), (_, y) in zip(a, b)) <= 1e-5
    assert losses(one)[-1][1] != losses(one)[0][1]
    files = sorted(p.name for p in four.glob("model*.safetensors"))
    assert len(files) >= 5 and (four / "model.safetensors.index.json").is_file(), files
    _same_weights(_model_params(one), _model_params(four), lr=1e-3, steps=4)
    # the reference cache: the bytes of the one-process build (same batches and shards)
    files = sorted(p.name for p in (one / "ref_cache").iterdir() if p.name != ".lock")
    assert files == sorted(p.name for p in (four / "ref_cache").iterdir() if p.name != ".lock")
    assert len([f for f in files if f.startswith("shard-")]) == 2
    for f in files:
        assert (one / "ref_cache" / f).read_bytes() == (four / "ref_cache" / f).read_bytes(), f


def test_fsdp2_without_safetensors_broadcasts_from_rank_0(setup):
    """A .bin checkpoint cannot be read by slices: rank 0 loads it and sends each tensor;
    the run is the same as one process on the safetensors copy."""
    from transformers import AutoModelForCausalLM

    d = setup / "untied-bin"
    if not d.exists():
        m = AutoModelForCausalLM.from_pretrained(setup / "untied")
        m.config.save_pretrained(d)
        torch.save(m.state_dict(), d / "pytorch_model.bin")  # read with weights_only=True
        tiny_tokenizer().save_pretrained(d)
    assert not list(d.glob("*.safetensors"))
    one = run_cli(setup, "one-untied", 0, model="untied", micro_batch_size=4)
    fs = run_cli(setup, "fsdp2-bin", 2, model="untied-bin", strategy="fsdp2")
    _same_run(one, fs)


def test_fsdp2_settings_reshard_and_checkpointing_keep_the_run(setup):
    """reshard_after_forward=false and activation checkpointing with sharding change memory,
    not numbers: the same run as one process. (CPU offload is accepted and, with the CPU as
    the device, has nothing to move: FSDP2 offloads from an accelerator only.)"""
    one = run_cli(setup, "one-untied", 0, model="untied", micro_batch_size=4)
    fs = run_cli(setup, "fsdp2-settings", 2, model="untied", strategy="fsdp2",
                 fsdp_reshard_after_forward=False, gradient_checkpointing=True,
                 fsdp_cpu_offload=True)
    _same_run(one, fs)


def test_fsdp2_separate_ref_model_is_sharded_too(setup):
    """A separate reference model (here: the tied model as reference of the untied one) is
    loaded sharded, used in lockstep and freed: the same run as one process."""
    kw = dict(model="untied", ref_model=str(setup / "tied"), max_steps=10)
    one = run_cli(setup, "one-refmodel", 0, micro_batch_size=4, **kw)
    fs = run_cli(setup, "fsdp2-refmodel", 2, strategy="fsdp2", **kw)
    a, b = losses(one), losses(fs)
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 11))
    assert max(abs(x - y) for (_, x), (_, y) in zip(a, b)) <= 1e-5
    assert abs(a[0][1] - np.log(2)) > 1e-3  # another reference: step 1 is not log 2
    ca, cb = (json.loads((d / "ref_cache" / "manifest.json").read_text())["fingerprint"]
              for d in (one, fs))
    assert ca == cb


def test_fsdp2_bf16_mixed_precision(setup):
    """precision=bf16 under FSDP2: bf16 gathered parameters and compute over fp32 shards and
    fp32 gradient reduction. Close to one process under bf16 autocast (bf16 rounding apart),
    the reference computed in bf16 (the cache says so) and the saved weights fp32."""
    kw = dict(model="untied", precision="bf16", max_steps=6, save_steps=None)
    one = run_cli(setup, "one-bf16", 0, micro_batch_size=4, **kw)
    fs = run_cli(setup, "fsdp2-bf16", 2, strategy="fsdp2", **kw)
    a, b = losses(one), losses(fs)
    assert [s for s, _ in a] == [s for s, _ in b]
    assert max(abs(x - y) for (_, x), (_, y) in zip(a, b)) <= 2e-2
    assert a[-1][1] != a[0][1] and b[-1][1] != b[0][1]
    fp = json.loads((fs / "ref_cache" / "manifest.json").read_text())["fingerprint"]
    assert fp["dtype"] == "bfloat16"
    assert json.loads((one / "ref_cache" / "manifest.json").read_text())[
        "fingerprint"]["dtype"] == "float32"
    from safetensors import safe_open

    with safe_open(str(fs / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
