"""Backends of the fused ops, all with one signature (``logprobs_forward`` /
``logprobs_backward``): ``logprobs_chunked`` (Triton row kernels + library GEMMs, the GPU
default), ``logprobs_triton`` (fully fused Triton), ``logprobs_cpu`` (C++ extension) and
``logprobs_torch`` (pure-PyTorch twin, the definition). ``triton_common`` holds the Triton
helpers both Triton backends import; ``options.HeadOptions`` is the options value the ops
layer and the scratch engines (``dpo_scratch``) carry."""

#: Triton releases CI compiles every kernel with (sm_80 / sm_90, no spills) and runs the
#: interpreter tests under: the one torch's CUDA wheel brings and the newest on PyPI.
TRITON_TESTED = ("3.8", "3.9")
