"""Peak extra memory of fwd+bwd, measured in a fresh process (tests/memprobe.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dpo_fast.kernels import logprobs_cpu

HERE = Path(__file__).parent
N, D, V = 2048, 256, 65536
BUDGET = 0.02 * N * V * 4  # 2% of the fp32 logits' bytes


def _probe(impl: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(HERE.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # Every allocation >= 128 KiB gets its own mapping and is unmapped on free, so RSS follows
    # live memory (glibc's dynamic threshold otherwise keeps freed tiles resident at random,
    # which moved readings by +-8 MiB between identical runs).
    env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    out = subprocess.run([sys.executable, str(HERE / "memprobe.py"), impl, str(N), str(D), str(V)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_probe_detects_materialized_logits():
    # The naive head holds [N, V] logits (and their grad): the probe must see them.
    r = _probe("naive")
    assert r["extra_bytes"] >= r["logits_bytes"], r


@pytest.mark.parametrize("impl", ["torch", "cpu"])
def test_fwd_bwd_extra_memory_within_2_percent_of_logits(impl):
    if impl == "cpu" and not logprobs_cpu.available():
        if os.environ.get("DPO_FAST_REQUIRE_CPU_EXT") == "1":
            pytest.fail(f"C++ extension required but not built: {logprobs_cpu.load_error()}")
        pytest.skip("C++ extension not built")
    r = _probe(impl)
    assert r["extra_bytes"] <= BUDGET, (
        f"{impl}: extra {r['extra_bytes'] / 2**20:.1f} MiB > budget {BUDGET / 2**20:.1f} MiB"
    )


def test_dpo_loss_default_scratch_is_bounded():
    # The C++ backend's default keeps DEFAULT_CPU_SCRATCH_BYTES of each pair's logits (here
    # 40 MiB of a pair's 256 MiB): extra memory is that plus the 2% op budget, whatever V.
    if not logprobs_cpu.available():
        if os.environ.get("DPO_FAST_REQUIRE_CPU_EXT") == "1":
            pytest.fail(f"C++ extension required but not built: {logprobs_cpu.load_error()}")
        pytest.skip("C++ extension not built")
    from dpo_fast.ops.dpo_loss import DEFAULT_CPU_SCRATCH_BYTES

    r = _probe("dpo:cpu")
    pair_logits = 1024 * V * 4
    assert DEFAULT_CPU_SCRATCH_BYTES < pair_logits / 4  # the probe could see a whole pair
    limit = DEFAULT_CPU_SCRATCH_BYTES + BUDGET
    assert r["extra_bytes"] <= limit, (
        f"extra {r['extra_bytes'] / 2**20:.1f} MiB > {limit / 2**20:.1f} MiB")
