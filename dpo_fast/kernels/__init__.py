"""Backends of the fused ops: ``logprobs_triton`` (GPU / interpreter), ``logprobs_cpu``
(C++ extension) and ``logprobs_torch`` (pure-PyTorch twin). All share one signature."""
