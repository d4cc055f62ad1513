"""dpo_fast: Direct Preference Optimization with fused, memory-flat LM-head kernels."""

__version__ = "0.1.0"

from .data import (
    PreferenceExample,
    pack_pair_batch,
    tokenize_dataset,
    tokenize_preference,
)
from .losses import (
    LOSS_TYPES,
    REFERENCE_FREE_TYPES,
    PreferenceLossOutput,
    dpo_sigmoid_coefficients,
    preference_loss,
    wpo_weights,
)
from .ops.dpo_loss import (
    FusedPreferenceOutput,
    fused_preference_loss,
    fused_preference_loss_padded,
    SequenceLogprobs,
    sequence_logprobs,
)
from .ops.logprobs import LinearLogprobs, linear_logprobs
from .refcache import (
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
    "sequence_logprobs",
    "SequenceLogprobs",
    "PreferenceLossOutput",
    "dpo_sigmoid_coefficients",
    "wpo_weights",
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
