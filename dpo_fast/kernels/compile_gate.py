"""Compile gate: builds every Triton kernel ahead of time for sm_80 and sm_90, no GPU needed.

For each kernel (at its default GPU config; feature flags all on, then all off), arch and
dtype it checks that the PTX holds tensor-core instructions (``mma`` on sm_80, ``wgmma`` on sm_90)
and that ``cuobjdump --dump-resource-usage`` reports STACK:0 and LOCAL:0 (no spills).
The chunked backend's row kernels (:mod:`dpo_fast.kernels.logprobs_chunked`, GEMMs done by
the library) and the DPO sigmoid-loss kernel (:mod:`dpo_fast.kernels.dpo_triton`, fp32) have
no tl.dot and are checked for spills only. The summary line gives the total and the count per kernel group.

Must run WITHOUT ``TRITON_INTERPRET=1`` (under the interpreter kernels cannot be compiled);
``main()`` refuses to run otherwise. Usage: ``python -m dpo_fast.kernels.compile_gate``.
Exit status 0 when every row passes; prints one table row per (kernel, arch, dtype).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from typing import List

ARCHS = (80, 90)


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _resource_usage(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    usage = {}
    for key in ("REG", "STACK", "SHARED", "LOCAL"):
        m = re.search(rf"\b{key}:(\d+)", out)
        usage[key] = int(m.group(1)) if m else -1
    return usage


def check_all() -> List[dict]:
    """Compiles everything; one dict per (kernel, flags, arch, dtype), with ``ok``."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dpo_fast.kernels import dpo_triton as dt
    from dpo_fast.kernels import logprobs_chunked as lc
    from dpo_fast.kernels import logprobs_triton as lt

    jobs = []  # (group, dtype, features, spec)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        jobs += [("logprobs", dtype, True, s) for s in lt.kernel_specs(dtype, features=True)]
        jobs += [("logprobs", dtype, False, s) for s in lt.kernel_specs(dtype, features=False)]
        jobs += [("chunked", dtype, f, s) for f in (True, False)
                 for s in lc.kernel_specs(dtype, features=f)]
    jobs += [("dpo", torch.float32, False, s) for s in dt.kernel_specs()]
    rows = []
    for group, dtype, features, spec in jobs:
        for cc in ARCHS:
            src = ASTSource(fn=spec["fn"], signature=spec["signature"],
                            constexprs=spec["constexprs"], attrs=spec["attrs"])
            k = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=spec["options"])
            ptx = k.asm["ptx"]
            usage = _resource_usage(k.asm["cubin"])
            mma_re = r"\bwgmma\.mma_async" if cc >= 90 else r"\bmma\.sync"
            n_mma = len(re.findall(mma_re, ptx))
            ok = usage["STACK"] == 0 and usage["LOCAL"] == 0
            if spec["gemm"]:
                ok = ok and n_mma > 0
            rows.append(dict(
                group=group, kernel=spec["name"], flags="all" if features else "none",
                arch=f"sm_{cc}", dtype=str(dtype).replace("torch.", ""),
                # input_precision only acts on fp32 operands; fp16/bf16 use native mma.
                precision=("-" if not spec["gemm"] else
                           spec["constexprs"]["DOT_PRECISION"] if dtype == torch.float32
                           else "native"), regs=usage["REG"],
                stack=usage["STACK"], local=usage["LOCAL"], shared=k.metadata.shared,
                mma=n_mma, warps=spec["options"]["num_warps"],
                stages=spec["options"]["num_stages"], ok=ok,
            ))
    return rows


def format_table(rows: List[dict]) -> str:
    cols = ["kernel", "flags", "arch", "dtype", "precision", "warps", "stages", "regs", "stack",
            "local", "shared", "mma", "ok"]
    width = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    lines = ["  ".join(c.ljust(width[c]) for c in cols)]
    lines += ["  ".join(str(r[c]).ljust(width[c]) for c in cols) for r in rows]
    return "\n".join(lines)


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("compile_gate: unset TRITON_INTERPRET (kernels cannot be compiled under the "
              "interpreter)", file=sys.stderr)
        return 2
    rows = check_all()
    print(format_table(rows))
    bad = [r for r in rows if not r["ok"]]
    groups = "; ".join(
        f"{g}: {sum(r['ok'] for r in rows if r['group'] == g)}/"
        f"{sum(r['group'] == g for r in rows)} ok"
        for g in dict.fromkeys(r["group"] for r in rows))
    print(f"compile gate: {len(rows) - len(bad)}/{len(rows)} ok ({groups}) "
          "(mma = sm_80 mma.sync / sm_90 wgmma.mma_async lines in PTX; stack/local > 0 = spills)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
