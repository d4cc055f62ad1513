"""The final model on disk: ``save_pretrained`` of the policy, the tokenizer, and with
``merge_lora`` the merged model. Files are written in a temporary folder and moved in,
``config.json`` last.

Under FSDP2 no process gathers the whole model: the tensors are gathered one at a time (every
rank in the same order) and rank 0 streams each into size-capped safetensors files
(:func:`dpo_fast.safetensors_shards.write_sharded`: ``model.safetensors``, or
``model-0000k-of-0000n.safetensors`` with ``model.safetensors.index.json``), so rank 0 holds
one whole tensor at a time. LoRA: the adapter tensors (small) are gathered and saved by peft;
the merged model is streamed the same way, each adapted weight merged as it is gathered
(``W + scaling * B @ A``, peft's formula)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable, List, Optional, Tuple, Union

import torch
from torch import Tensor

from ..safetensors_shards import TensorSpec, parse_size, write_sharded
from .distributed import DistContext
from .sharding import checkpoint_name, is_dtensor, is_peft


def full(t: Tensor) -> Tensor:
    """The whole tensor of ``t`` on the CPU (a DTensor is gathered: a collective)."""
    return (t.full_tensor() if is_dtensor(t) else t).detach().cpu()


def aliases(model: torch.nn.Module) -> set:
    """Names of tied parameters after their first (``lm_head.weight`` when tied)."""
    return {n for n, _ in model.named_parameters(remove_duplicate=False)} - \
        {n for n, _ in model.named_parameters()}


Entry = Tuple[TensorSpec, Callable[[], Tensor]]


def model_entries(model: torch.nn.Module) -> List[Entry]:
    """What the model's safetensors files hold, in state-dict order: each tensor once (tied
    weights under their first name) with a function that gives it whole (gathering a
    shard)."""
    tied = aliases(model)
    out: List[Entry] = []
    for name, t in model.state_dict().items():
        if name not in tied:
            out.append((TensorSpec(name, tuple(t.shape), t.dtype), lambda t=t: full(t)))
    return out


def merged_entries(model: torch.nn.Module) -> List[Entry]:
    """The entries of the merged model of the peft ``model`` (base names; each LoRA-adapted
    linear weight gathered with its adapters and merged).

    Raises:
        ValueError for an adapted layer that is not a linear LoRA layer.
    """
    tied = {checkpoint_name(n) for n in aliases(model)}
    out: List[Entry] = []
    for name, t in model.state_dict().items():
        key = checkpoint_name(name)
        if key is None or key in tied:
            continue
        layer = None
        if name.endswith(".base_layer.weight"):
            layer = model.get_submodule(name[:-len(".base_layer.weight")])
        if layer is None:
            out.append((TensorSpec(key, tuple(t.shape), t.dtype), lambda t=t: full(t)))
        else:
            out.append((TensorSpec(key, tuple(t.shape), t.dtype),
                        lambda t=t, layer=layer, name=name: merged_weight(t, layer, name)))
    return out


def merged_weight(weight: Tensor, layer: torch.nn.Module, name: str) -> Tensor:
    """``W + sum over active adapters of scaling * (B @ A)`` (transposed for
    ``fan_in_fan_out``) for the LoRA linear ``layer`` whose base weight is ``weight``
    [out, in]; gathers each piece."""
    lora_a, lora_b = getattr(layer, "lora_A", None), getattr(layer, "lora_B", None)
    if lora_a is None or lora_b is None or getattr(layer, "use_dora", {}) and any(
            layer.use_dora.values()):
        raise ValueError(f"merge_lora under strategy='fsdp2': {name} is not a linear LoRA "
                         "layer; save the adapter and merge with peft on one process")
    w = full(weight)
    for a in layer.active_adapters:
        if a not in lora_a:
            continue
        da, db = full(lora_a[a].weight), full(lora_b[a].weight)
        delta = (db.float() @ da.float()) * layer.scaling[a]
        if getattr(layer, "fan_in_fan_out", False):
            delta = delta.T
        w = w + delta.to(w.dtype)
    return w


def write_entries(entries: List[Entry], folder: Path, *, write: bool,
                  max_shard_bytes: int) -> List[str]:
    """Streams ``entries`` into safetensors files in ``folder`` (rank 0: ``write``); every
    rank gathers each tensor in the same order."""
    produce = {spec.name: fn for spec, fn in entries}
    return write_sharded(folder, [spec for spec, _ in entries],
                         lambda spec: produce[spec.name](), max_shard_bytes=max_shard_bytes,
                         write=write)


def save_config(model: torch.nn.Module, folder: Path) -> None:
    """``config.json`` (dtype set to the saved tensors') and ``generation_config.json``."""
    floats = [p.dtype for p in model.parameters() if p.dtype.is_floating_point]
    if floats:
        model.config.dtype = floats[0]
    model.config.save_pretrained(folder)
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(folder)


def move_in(tmp: Path, out: Path) -> None:
    """Every file of ``tmp`` into ``out`` (the configs last), then ``tmp`` removed."""
    names = sorted(p.name for p in tmp.iterdir())
    for name in sorted(names, key=lambda n: n in ("config.json", "adapter_config.json")):
        os.replace(tmp / name, out / name)
    shutil.rmtree(tmp, ignore_errors=True)


def fresh_tmp(out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".final.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def save_model(model: torch.nn.Module, tokenizer, out: Path, *, dist: DistContext,
               root: Optional[torch.nn.Module], merge_lora: bool, base_model: Optional[str],
               dtype: torch.dtype, max_shard_size: Union[int, str] = "5GB"
               ) -> Optional[torch.nn.Module]:
    """Writes the policy (LoRA: the adapter) and tokenizer into ``out``; with ``merge_lora``
    also the merged model into ``out/merged``. ``root``: the FSDP2 root module (None
    otherwise); under FSDP2 every rank must call this. Returns the merged model when it
    replaces the live policy (LoRA without FSDP2), else None."""
    out = Path(out)
    cap = parse_size(max_shard_size, "TrainConfig.max_shard_size")
    if dist.strategy == "fsdp2":
        save_sharded(model, tokenizer, out, dist=dist, merge_lora=merge_lora,
                     max_shard_bytes=cap)
        return None
    if not dist.is_main:
        return None
    tmp = fresh_tmp(out)
    model.save_pretrained(tmp, safe_serialization=True, max_shard_size=cap)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    move_in(tmp, out)
    if not merge_lora:
        return None
    merged = model.merge_and_unload()
    merged.save_pretrained(out / "merged", safe_serialization=True, max_shard_size=cap)
    if tokenizer is not None:
        tokenizer.save_pretrained(out / "merged")
    return merged


def save_sharded(model: torch.nn.Module, tokenizer, out: Path, *, dist: DistContext,
                 merge_lora: bool, max_shard_bytes: int) -> None:
    """:func:`save_model` of an FSDP2-sharded ``model`` (see the module docstring)."""
    main = dist.is_main
    peft = is_peft(model)
    tmp = fresh_tmp(out) if main else None
    if peft:
        adapter = {n: full(p) for n, p in model.named_parameters()
                   if checkpoint_name(n) is None}
        if main:
            model.save_pretrained(tmp, state_dict=adapter, safe_serialization=True)
    else:
        write_entries(model_entries(model), tmp, write=main, max_shard_bytes=max_shard_bytes)
        if main:
            save_config(model, tmp)
    if main:
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        move_in(tmp, out)
    if not (peft and merge_lora):
        dist.barrier()
        return
    base = model.get_base_model()
    mtmp = fresh_tmp(out / "merged") if main else None
    write_entries(merged_entries(model), mtmp, write=main, max_shard_bytes=max_shard_bytes)
    if main:
        save_config(base, mtmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(mtmp)
        move_in(mtmp, out / "merged")
    dist.barrier()
