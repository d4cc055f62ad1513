"""Test-suite setup.

The Triton interpreter must be switched on before any module defining ``@triton.jit``
kernels is imported, and numpy/torch must not fight over the 2 cores, so both are set
here, before the tests import dpo_fast. On a machine with a CUDA GPU set
``DPO_FAST_TEST_GPU=1`` to run the Triton tests compiled instead of interpreted.
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
if os.environ.get("DPO_FAST_TEST_GPU") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: real-model or long tests (CI runs them; -m 'not slow' skips)")
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
