"""dpo_fast: Direct Preference Optimization with fused, memory-flat LM-head kernels."""

__version__ = "0.1.0"

# Before anything loads torch (and with it the OpenMP runtime): idle OpenMP threads spin only
# briefly before they block, so CPU training keeps its speed next to other processes
# (_openmp.py).
from . import _openmp  # noqa: E402

_openmp.configure()

from .data import (  # noqa: E402
    PreferenceExample,
    pack_pair_batch,
    tokenize_dataset,
    tokenize_preference,
)
from .losses import (  # noqa: E402
    LOSS_TYPES,
    REFERENCE_FREE_TYPES,
    PreferenceLossOutput,
    dpo_sigmoid_coefficients,
    preference_loss,
)
from .ops.dpo_loss import (  # noqa: E402
    FusedPreferenceOutput,
    fused_preference_loss,
    fused_preference_loss_padded,
)
from .ops.logprobs import LinearLogprobs, linear_logprobs  # noqa: E402
from .refcache import (  # noqa: E402
    CacheLockedError,
    CorruptCacheError,
    FingerprintMismatchError,
    MissingRowsError,
    RefCacheError,
    RefLogProbCache,
)

__all__ = [
    "__version__",
    "linear_logprobs",
    "LinearLogprobs",
    "preference_loss",
    "fused_preference_loss",
    "fused_preference_loss_padded",
    "FusedPreferenceOutput",
    "PreferenceLossOutput",
    "dpo_sigmoid_coefficients",
    "LOSS_TYPES",
    "REFERENCE_FREE_TYPES",
    "PreferenceExample",
    "tokenize_preference",
    "tokenize_dataset",
    "pack_pair_batch",
    "RefLogProbCache",
    "MissingRowsError",
    "RefCacheError",
    "CorruptCacheError",
    "FingerprintMismatchError",
    "CacheLockedError",
]
