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


@pytest.fixture(autouse=True)
def _small_vocab_chunks(monkeypatch):
    """On the CPU the chunked Triton backend's vocabulary chunks are shrunk to ~30% of V
    (3-4 chunks, a partial last one), so every test crosses chunk boundaries; on a GPU the
    real defaults are tested."""
    if os.environ.get("DPO_FAST_TEST_GPU") == "1":
        return
    from dpo_fast.kernels import logprobs_chunked

    monkeypatch.setattr(logprobs_chunked, "CHUNK_BYTES_MIN", 0)
    monkeypatch.setattr(logprobs_chunked, "CHUNK_FRACTION", 0.3)
    monkeypatch.setattr(logprobs_chunked, "MIN_COLS", 128)
