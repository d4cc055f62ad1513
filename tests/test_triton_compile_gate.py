"""Compile gate: every Triton kernel builds for sm_80 and sm_90 (fp16, bf16, fp32) with
tensor-core mma/wgmma and no register spills, on a machine without a GPU.

The suite runs with TRITON_INTERPRET=1 (set by conftest), under which kernels cannot be
compiled, so the gate runs in a subprocess without it.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[1]


def test_compile_gate_sm80_sm90():
    import triton

    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    if not (tools / "cuobjdump").exists() or not (tools / "ptxas").exists():
        pytest.skip("this triton wheel ships no ptxas/cuobjdump")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silence the 3.9 default-change warning
    proc = subprocess.run(
        [sys.executable, "-m", "dpo_fast.kernels.compile_gate"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    print(proc.stdout)
    assert proc.returncode == 0, f"compile gate failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    m = re.search(r"compile gate: (\d+)/(\d+) ok", proc.stdout)
    assert m and m.group(1) == m.group(2) and int(m.group(2)) >= 62, proc.stdout
