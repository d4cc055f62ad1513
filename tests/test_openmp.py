"""The OpenMP wait policy dpo_fast sets on import (dpo_fast/_openmp.py), read back from the
OpenMP runtime itself: libgomp's OMP_DISPLAY_ENV=VERBOSE prints the spin count it uses
(dpo_fast's short spin, or 300000 for libgomp's default). In child processes, since the runtime
reads its settings once, when torch loads it."""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


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
    from dpo_fast import _openmp
    torch.ones(1 << 20).sum()  # a parallel region: the runtime is up
    print(_openmp.wait_policy())
    print(_openmp.spinning())
"""


def test_dpo_fast_first_shortens_the_spin():
    from dpo_fast._openmp import SPIN_COUNT

    out, spin = run(PROBE.format(first="import dpo_fast"))
    assert spin == SPIN_COUNT < 300000
    assert out.startswith("short spin (GOMP_SPINCOUNT=") and out.split("\n")[1] == "False"


def test_torch_first_keeps_the_spin_and_says_so():
    out, spin = run(PROBE.format(first="import torch, dpo_fast"))
    assert spin == 300000
    assert out.startswith("long spin") and "GOMP_SPINCOUNT=" in out
    assert out.split("\n")[1] == "True"


def test_a_policy_the_user_set_is_kept():
    out, spin = run(PROBE.format(first="import dpo_fast"), OMP_WAIT_POLICY="PASSIVE")
    assert spin == 0 and out.startswith("OMP_WAIT_POLICY=PASSIVE (from the environment)")
    out, spin = run(PROBE.format(first="import dpo_fast"), GOMP_SPINCOUNT="1234")
    assert spin == 1234 and out.startswith("GOMP_SPINCOUNT=1234 (from the environment)")


def test_the_policy_does_not_change_results(tmp_path):
    # The same tiny run under both policies: bit-identical losses and gradient norms.
    code = f"""
        {{first}}
        import json, sys
        sys.path.insert(0, {str(ROOT / "tests")!r})
        import torch
        from tiny import tiny_model, tiny_tokenizer, word_rows
        from dpo_fast.train import TrainConfig, Trainer
        torch.set_num_threads(2)
        cfg = TrainConfig(model="unused", train_data=word_rows(24), output_dir={{out!r}},
                          max_steps=3, batch_size=8, learning_rate=1e-3, logging_steps=1,
                          save_steps=None, save_final_model=False, data_cache_dir="",
                          max_length=48)
        t = Trainer(cfg, model=tiny_model(), tokenizer=tiny_tokenizer())
        t.train()
        rows = [json.loads(x) for x in open({{out!r}} + "/metrics.jsonl")]
        print(json.dumps([[r["loss"], r["grad_norm"]] for r in rows if "loss" in r]))
    """
    got = []
    for i, first in enumerate(("import dpo_fast", "import torch, dpo_fast")):
        out, _ = run(code.format(first=first, out=str(tmp_path / f"run{i}")))
        got.append(json.loads(out.strip().splitlines()[-1]))
    assert len(got[0]) == 3 and got[0] == got[1]
