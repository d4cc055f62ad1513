"""dpo_fast: Direct Preference Optimization with fused, memory-flat LM-head kernels."""

__version__ = "0.1.0"

from .ops.logprobs import LinearLogprobs, linear_logprobs  # noqa: E402

__all__ = ["__version__", "linear_logprobs", "LinearLogprobs"]
