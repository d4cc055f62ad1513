"""Existing TRL scripts on dpo_fast's LM head: a drop-in ``DPOTrainer`` / ``DPOConfig``.

One changed import::

    from dpo_fast.trl import DPOConfig, DPOTrainer   # was: from trl import DPOConfig, DPOTrainer

or none, for a script that cannot be edited::

    python -m dpo_fast.trl train_dpo.py --model_name_or_path ... (the script's own arguments)

or, in a notebook, :func:`patch` before the script's cells import TRL's classes.
"""

from __future__ import annotations

from .trainer import TRL_LOSS_TYPES, TRL_VERSION, DPOConfig, DPOTrainer

_PATCH_SITES = ("trl", "trl.trainer", "trl.trainer.dpo_trainer", "trl.trainer.dpo_config")
_saved: dict = {}


def patch() -> None:
    """Makes ``trl.DPOTrainer`` / ``trl.DPOConfig`` (and their ``trl.trainer`` spellings)
    dpo_fast's, so code that imports them afterwards gets the drop-in. Idempotent;
    :func:`unpatch` restores TRL's."""
    import importlib

    for name in _PATCH_SITES:
        mod = importlib.import_module(name)
        for attr, new in (("DPOTrainer", DPOTrainer), ("DPOConfig", DPOConfig)):
            if not hasattr(mod, attr) and name.endswith(("dpo_trainer", "dpo_config")):
                continue
            old = getattr(mod, attr, None)
            if old is not new:
                _saved.setdefault((name, attr), old)
                setattr(mod, attr, new)


def unpatch() -> None:
    """Undoes :func:`patch`."""
    import importlib

    for (name, attr), old in list(_saved.items()):
        setattr(importlib.import_module(name), attr, old)
        del _saved[(name, attr)]


__all__ = ["DPOConfig", "DPOTrainer", "patch", "unpatch", "TRL_VERSION", "TRL_LOSS_TYPES"]
