"""Public op APIs; each dispatches to a backend in ``dpo_fast.kernels`` by ``impl=``."""

from .logprobs import LinearLogprobs, linear_logprobs

__all__ = ["linear_logprobs", "LinearLogprobs"]
