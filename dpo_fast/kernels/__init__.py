"""Backends of the fused ops: ``logprobs_triton`` (GPU / interpreter), ``logprobs_cpu``
(C++ extension) and ``logprobs_torch`` (pure-PyTorch twin). All share one signature."""

#: Triton releases CI compiles every kernel with (sm_80 / sm_90, no spills) and runs the
#: interpreter tests under: the one torch's CUDA wheel brings and the newest on PyPI.
TRITON_TESTED = ("3.8", "3.9")
