"""``HeadOptions``: the head transform and backend of one fused-op call, as one frozen value.

Built (validated, ``impl`` resolved) by :func:`dpo_fast.ops.logprobs.prepare_inputs`; carried
by the ops layer (``ops/logprobs.py``, ``ops/dpo_loss.py``) and the scratch engines
(``kernels/dpo_scratch.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional


@dataclass(frozen=True)
class HeadOptions:
    """How the LM head is applied, and by which backend: validated and resolved.

    Attributes:
        ignore_index: the target id of positions to skip.
        softcap: soft-capping value c (z -> c tanh(z / c)), or None.
        inv_temperature: 1 / temperature (logits are multiplied by it after the softcap).
        impl: the concrete backend: "triton", "triton_fused", "cpu" or "torch".

    The custom ops' schemas take no dataclass: :meth:`op_kwargs` flattens the value into
    their keyword-only arguments and ``HeadOptions(**kwargs)`` rebuilds it.
    """

    ignore_index: int
    softcap: Optional[float]
    inv_temperature: float
    impl: str

    def op_kwargs(self) -> Dict[str, Any]:
        """The fields as keyword arguments of the ``dpo_fast::*`` custom ops."""
        return dict(ignore_index=self.ignore_index, softcap=self.softcap,
                    inv_temperature=self.inv_temperature, impl=self.impl)
