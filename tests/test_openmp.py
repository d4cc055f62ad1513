"""CPU threads next to other processes (dpo_fast/threads.py): dpo_fast leaves OpenMP's own
settings alone (read back from libgomp's OMP_DISPLAY_ENV report, in child processes, since the
runtime reads them once, when torch loads it); the thread governor's decisions (known answers
for given loads); its measurement of other processes' CPU use against a real neighbour; the
C++ kernel's results bit for bit the same at any thread count once its groups are pinned; and
a training run that lowers its threads next to a busy neighbour and restores them."""

import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from dpo_fast import threads
from dpo_fast.kernels import logprobs_cpu

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

BUSY = "import signal, sys\nsignal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\nwhile True: pass\n"


def run(code, **env_extra):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(OMP_DISPLAY_ENV="VERBOSE", OPENBLAS_NUM_THREADS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""), **env_extra)
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                       text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    m = re.search(r"GOMP_SPINCOUNT = '(\d+)'", p.stderr)
    if m is None:
        pytest.skip("torch's OpenMP runtime is not libgomp (no OMP_DISPLAY_ENV report)")
    return p.stdout, int(m[1])


PROBE = """
    {first}
    import torch
    from dpo_fast import threads
    torch.ones(1 << 20).sum()  # a parallel region: the runtime is up
    print(threads.wait_policy())
"""


@pytest.mark.parametrize("first", ["import dpo_fast", "import torch, dpo_fast"])
def test_openmp_keeps_its_default_spin_in_either_import_order(first):
    out, spin = run(PROBE.format(first=first))
    assert spin == 300000  # libgomp's default: the idle speed stays OpenMP's
    assert out.startswith("OpenMP's default spin") and "adaptive_threads" in out


def test_a_policy_the_user_set_is_reported():
    out, spin = run(PROBE.format(first="import dpo_fast"), OMP_WAIT_POLICY="PASSIVE")
    assert spin == 0 and out.startswith("OMP_WAIT_POLICY=PASSIVE (from the environment)")
    out, spin = run(PROBE.format(first="import dpo_fast"), GOMP_SPINCOUNT="1234")
    assert spin == 1234 and out.startswith("GOMP_SPINCOUNT=1234 (from the environment)")


# ------------------------------------------------------------------------ the decisions


def governor(monkeypatch, cpus, full):
    """A governor over ``cpus`` CPUs starting at ``full`` threads, whose thread changes are
    recorded instead of applied."""
    applied = []
    monkeypatch.setattr(torch, "set_num_threads", applied.append)
    g = threads.ThreadGovernor(enabled=False)
    g.full = g.threads = full
    g.cpus = list(range(cpus))
    return g, applied


def test_two_cores_drop_to_one_thread_and_come_back(monkeypatch):
    g, applied = governor(monkeypatch, cpus=2, full=2)
    assert g.decide(0.25) is None  # 2 - 0.25 + 0.25 = 2: the other use fits
    assert g.decide(0.30) == (2, 1) and applied == [1] and g.threads == 1
    # Between the margins (0.15 < others <= 0.25): stays at one thread.
    assert [g.decide(0.2) for _ in range(5)] == [None] * 5
    # Quiet: back to 2 after QUIET_WINDOWS windows in a row, not before.
    assert g.decide(0.1) is None
    assert g.decide(0.1) == (1, 2) and applied == [1, 2]
    assert g.switches == 2 and g.low_seconds >= 0.0
    # A busy window between quiet ones restarts the count.
    g.decide(1.0)
    assert g.decide(0.0) is None and g.decide(0.5) is None and g.decide(0.0) is None
    assert g.decide(0.0) == (1, 2)


def test_many_cores_give_back_what_others_use(monkeypatch):
    g, _ = governor(monkeypatch, cpus=8, full=8)
    assert g.decide(2.2) == (8, 6)  # floor(8 - 2.2 + 0.25) = 6
    assert g.decide(3.0) == (6, 5)
    assert g.decide(9.0) == (5, 1)  # never below one thread
    g.decide(0.0)
    assert g.decide(0.0) == (1, 8)  # never above the starting count
    g, _ = governor(monkeypatch, cpus=8, full=4)  # 4 threads on 8 CPUs: 4 are spare
    assert g.decide(3.9) is None and g.decide(4.5) == (4, 3)


def test_one_thread_or_disabled_governs_nothing():
    g = threads.ThreadGovernor(enabled=False)
    assert not g.enabled and g.poll() is None and g.summary().endswith("(fixed)")
    g.close()


# ---------------------------------------------------------------------- the measurement


def _measure(seconds):
    cpus = threads.affinity_cpus()
    a = threads.sample_ticks(cpus)
    if a is None:
        pytest.skip("no /proc/stat and /proc/self/stat on this system")
    t_end = time.monotonic() + seconds
    while time.monotonic() < t_end:  # this process busy too: its own time must not count
        pass
    return threads.other_cores(a, threads.sample_ticks(cpus))


def test_other_processes_cpu_use_is_measured_and_own_use_is_not():
    if len(threads.affinity_cpus()) < 2:
        pytest.skip("needs 2 CPUs: this process and the neighbour each busy on one")
    assert _measure(1.0) < 0.3  # alone: this process's own busy loop is not "others"
    p = subprocess.Popen([sys.executable, "-c", BUSY])
    try:
        time.sleep(0.5)
        others = _measure(1.5)
    finally:
        p.terminate()
        p.wait(timeout=30)
    assert 0.7 < others < 1.3  # one busy neighbour: one core


# ------------------------------------------------------- results at any thread count


@pytest.mark.skipif(not logprobs_cpu.available(), reason="the C++ kernel is not built")
def test_pinned_groups_give_the_same_bits_at_any_thread_count():
    from dpo_fast.ops import linear_logprobs

    g = torch.Generator().manual_seed(0)
    h = torch.randn(150, 64, generator=g)
    w = torch.randn(5000, 64, generator=g) * 0.1
    t = torch.randint(0, 5000, (150,), generator=g)
    t[::7] = -100
    before = torch.get_num_threads()

    def run(threads):
        torch.set_num_threads(threads)
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        lp = linear_logprobs(hh, ww, t)
        (lp * torch.linspace(-1, 1, 150)).sum().backward()
        return lp.detach(), hh.grad, ww.grad

    try:
        assert logprobs_cpu.pin_vocab_groups(4) == 0
        ref = run(4)
        for n in (1, 2, 3):
            got = run(n)
            assert all(torch.equal(a, b) for a, b in zip(ref, got)), n
        # Against float64: the pinned plan is still the right answer.
        lp64 = torch.log_softmax(h.double() @ w.double().t(), -1)
        want = lp64.gather(1, t.clamp(min=0)[:, None])[:, 0] * (t != -100)
        assert torch.allclose(ref[0].double(), want, atol=1e-4)
        assert logprobs_cpu.pin_vocab_groups(0) == 4
        assert not torch.equal(run(1)[2], ref[2])  # unpinned: 1 group, another order
    finally:
        logprobs_cpu.pin_vocab_groups(0)
        torch.set_num_threads(before)


# ------------------------------------------------------------------------ a training run


def test_training_next_to_a_busy_neighbour_lowers_its_threads_and_restores_them(tmp_path):
    if len(threads.affinity_cpus()) < 2 or threads.sample_ticks(threads.affinity_cpus()) is None:
        pytest.skip("needs 2 CPUs and /proc")
    from tiny import tiny_model, tiny_tokenizer, word_rows

    from dpo_fast.train import TrainConfig, Trainer, TrainerCallback

    stages, counts = [], []

    class Watch(TrainerCallback):
        def on_stage(self, trainer, message):
            stages.append(message)

        def on_step_end(self, trainer, state):
            counts.append(torch.get_num_threads())

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    p = subprocess.Popen([sys.executable, "-c", BUSY])
    try:
        time.sleep(0.5)
        cfg = TrainConfig(model="unused", train_data=word_rows(64), output_dir=str(tmp_path),
                          max_steps=1000, batch_size=8, learning_rate=1e-3, logging_steps=50,
                          save_steps=None, save_final_model=False, data_cache_dir="",
                          max_length=48, device="cpu")
        t = Trainer(cfg, model=tiny_model(), tokenizer=tiny_tokenizer(),
                    callbacks=[Watch()])
        t0 = time.monotonic()
        res = t.train()
        seconds = time.monotonic() - t0
        after = torch.get_num_threads()
    finally:
        p.terminate()
        p.wait(timeout=30)
        torch.set_num_threads(before)
    assert seconds > 2.0, "the run was too short to measure anything"
    assert 1 in counts, (counts[:20], res.cpu_threads)
    assert "fewer for" in res.cpu_threads
    assert any("CPU threads 2 -> 1" in s for s in stages)
    assert after == 2  # close() restored the starting count
    assert logprobs_cpu.pin_vocab_groups(0) == 0  # and unpinned the kernel
