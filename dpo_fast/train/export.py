"""The final model on disk: ``save_pretrained`` of the policy (under FSDP2 every rank gathers
and rank 0 writes one folder), the tokenizer, and with ``merge_lora`` the merged model.
Files are written in a temporary folder and moved in, ``config.json`` last."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Dict, Optional

import torch

from ..models import load_model
from .distributed import DistContext


def gathered_state_dict(root: torch.nn.Module, model: torch.nn.Module
                        ) -> Dict[str, torch.Tensor]:
    """The full (unsharded, CPU) state dict of the FSDP2 ``root`` wrapping ``model``, under
    ``model``'s names; a tied weight keeps only its first name. Every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(root, options=StateDictOptions(full_state_dict=True,
                                                               cpu_offload=True))
    state = {k[len("lm."):] if k.startswith("lm.") else k: v for k, v in full.items()}
    # the gathered copies of a tied weight are separate tensors: keep its first name
    aliases = {n for n, _ in model.named_parameters(remove_duplicate=False)} - \
        {n for n, _ in model.named_parameters()}
    return {k: v for k, v in state.items() if k not in aliases}


def merged_from_saved_adapter(adapter_dir: Path, base_model: Optional[str],
                              dtype: torch.dtype) -> torch.nn.Module:
    """The base model (on the CPU) with the adapter saved in ``adapter_dir`` merged into its
    weights (rank 0 under FSDP2, where the live weights are shards)."""
    from peft import PeftModel

    if base_model is None:
        raise ValueError("TrainConfig.merge_lora with strategy='fsdp2' needs "
                         "TrainConfig.model (the base weights to merge into)")
    base = load_model(base_model, dtype=dtype, device=torch.device("cpu"),
                      what="TrainConfig.model")
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()


def save_model(model: torch.nn.Module, tokenizer, out: Path, *, dist: DistContext,
               root: Optional[torch.nn.Module], merge_lora: bool, base_model: Optional[str],
               dtype: torch.dtype) -> Optional[torch.nn.Module]:
    """Writes the policy (LoRA: the adapter) and tokenizer into ``out``; with ``merge_lora``
    also the merged model into ``out/merged``. ``root``: the FSDP2 root module (None
    otherwise). Returns the merged model when it replaces the live policy (LoRA without
    FSDP2), else None."""
    out = Path(out)
    fsdp = dist.strategy == "fsdp2"
    state_dict = gathered_state_dict(root, model) if fsdp else None
    if not dist.is_main:
        return None
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".final.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True,
                          **({"state_dict": state_dict} if state_dict else {}))
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    names = sorted(p.name for p in tmp.iterdir())
    for name in sorted(names, key=lambda n: n in ("config.json", "adapter_config.json")):
        os.replace(tmp / name, out / name)
    shutil.rmtree(tmp, ignore_errors=True)
    if not merge_lora:
        return None
    merged = (merged_from_saved_adapter(out, base_model, dtype) if fsdp
              else model.merge_and_unload())
    merged.save_pretrained(out / "merged", safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out / "merged")
    return None if fsdp else merged
