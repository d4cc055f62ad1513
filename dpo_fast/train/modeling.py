"""The policy made trainable: loading, dropout, LoRA, activation checkpointing, optimizer
and learning-rate schedule. Each function takes what it needs and returns one value."""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Callable, List, Optional

import torch

from ..models import load_model, model_parts
from .config import TrainConfig
from .distributed import FsdpSettings
from .sharding import init_lora

DTYPES = {"auto": torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16,
          "float16": torch.float16}


def model_dtype(cfg: TrainConfig) -> torch.dtype:
    """The dtype models are loaded in (``TrainConfig.dtype``; ``auto`` is float32)."""
    return DTYPES[cfg.dtype]


def load_policy(cfg: TrainConfig, model: Optional[torch.nn.Module], device: torch.device,
                stage: Callable[[str], None]) -> torch.nn.Module:
    """``model`` moved to ``device``, or ``cfg.model`` loaded there; refuses a model whose LM
    head cannot be found (by class name) and turns the KV cache off."""
    if model is None:
        stage(f"loading {cfg.model}")
        model = load_model(cfg.model, dtype=model_dtype(cfg), device=device,
                           what="TrainConfig.model")
    else:
        model.to(device)
    return checked_policy(model)


def checked_policy(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with its KV cache off; refuses a model whose LM head cannot be found (by
    class name)."""
    model_parts(model)
    cfg_obj = getattr(model, "config", None)
    if cfg_obj is not None and hasattr(cfg_obj, "use_cache"):
        cfg_obj.use_cache = False
    return model


def fsdp_settings(cfg: TrainConfig, device: torch.device) -> FsdpSettings:
    """The ``fully_shard`` settings of ``cfg`` on ``device`` (``precision=bf16`` -> bf16 mixed
    precision; ``fsdp_cpu_offload`` only where the device is not the CPU already)."""
    return FsdpSettings(bf16=cfg.precision == "bf16",
                        cpu_offload=cfg.fsdp_cpu_offload and device.type != "cpu",
                        reshard_after_forward=cfg.fsdp_reshard_after_forward)


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout probability 0 everywhere (modules and attention-dropout attributes)."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        for attr in ("attention_dropout", "dropout", "hidden_dropout"):
            if isinstance(getattr(m, attr, None), float):
                setattr(m, attr, 0.0)


def make_trainable(model: torch.nn.Module, cfg: TrainConfig) -> torch.nn.Module:
    """Dropout off (``disable_dropout``), LoRA adapters (``lora_r``; returns the PEFT model;
    initial values from the seed and each tensor's name, :func:`.sharding.init_lora`),
    activation checkpointing (``gradient_checkpointing``), train mode. Also on a model
    whose parameters are still on the meta device (before sharding)."""
    if cfg.disable_dropout:
        disable_dropout(model)
    if cfg.lora_r is not None:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as e:
            raise ValueError("TrainConfig.lora_r needs peft: pip install peft") from e
        lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                          lora_dropout=cfg.lora_dropout, target_modules=cfg.lora_target_modules,
                          task_type="CAUSAL_LM")
        model = get_peft_model(model, lcfg)
        init_lora(model, cfg.seed)  # the same start for every strategy and world size
    if cfg.gradient_checkpointing or cfg.checkpoint_long_pairs:
        kw = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
        else:  # its name before transformers 5.2x
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
        if not cfg.gradient_checkpointing:  # armed, off until a long pair's micro-batch
            set_layer_checkpointing(model, False)
    model.train()
    return model


def checkpointed_layers(model: torch.nn.Module) -> List[torch.nn.Module]:
    """The modules transformers checkpoints (given a checkpoint function), in model order:
    the decoder layers (and the base model, whose flag transformers sets too)."""
    return [m for m in model.modules() if hasattr(m, "_gradient_checkpointing_func")
            and hasattr(m, "gradient_checkpointing")]


def set_layer_checkpointing(model: torch.nn.Module, on: bool) -> None:
    for m in checkpointed_layers(model):
        m.gradient_checkpointing = on


@contextlib.contextmanager
def checkpointing(model: torch.nn.Module, fraction: float = 1.0):
    """Activation checkpointing switched on for one forward (the checkpoint is taken at
    forward time, so the backward follows it), then put back: for the first
    ``ceil(fraction x n)`` of the n decoder layers (the rest keep their activations)."""
    mods = checkpointed_layers(model)
    layers = [m for m in mods if not any(c is not m and c in mods for c in m.modules())]
    k = min(len(layers), math.ceil(fraction * len(layers) - 1e-9))
    before = [m.gradient_checkpointing for m in mods]
    for i, m in enumerate(layers):
        m.gradient_checkpointing = m.gradient_checkpointing or i < k
    try:
        yield
    finally:
        for m, b in zip(mods, before):
            m.gradient_checkpointing = b


def trainable_parameters(module: torch.nn.Module) -> List[torch.nn.Parameter]:
    """The parameters with ``requires_grad`` (ValueError if there is none)."""
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameter")
    return params


def state_bytes(module: Optional[torch.nn.Module],
                optimizer: Optional[torch.optim.Optimizer]) -> int:
    """Bytes of ``module``'s parameters and ``optimizer``'s state tensors held by this process
    (the local shards of FSDP2 DTensors)."""

    def nbytes(t: torch.Tensor) -> int:
        local = t.to_local() if hasattr(t, "to_local") else t
        return local.numel() * local.element_size()

    n = sum(nbytes(p) for p in module.parameters()) if module is not None else 0
    if optimizer is not None:
        for st in optimizer.state.values():
            n += sum(nbytes(v) for v in st.values() if isinstance(v, torch.Tensor))
    return n


def make_optimizer(params: List[torch.nn.Parameter], cfg: TrainConfig,
                   device: torch.device) -> torch.optim.Optimizer:
    """AdamW (fused where torch has a fused kernel for the device and dtypes: TRL's default
    ``adamw_torch_fused``, one pass per tensor, ~5x faster than foreach on CPU) or RMSprop."""
    if cfg.optimizer == "adamw":
        fused = device.type in ("cpu", "cuda") and all(
            p.dtype in (torch.float32, torch.bfloat16, torch.float16) for p in params)
        return torch.optim.AdamW(params, lr=cfg.learning_rate,
                                 betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
                                 weight_decay=cfg.weight_decay, fused=fused or None)
    return torch.optim.RMSprop(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


def lr_lambda(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    """Multiplier of the base learning rate at scheduler step ``s`` (0-based): linear warm-up
    from 0 over ``warmup`` steps, then linear decay to 0 / cosine to 0 / constant."""

    def f(s: int) -> float:
        if warmup and s < warmup:
            return s / warmup
        if kind == "constant":
            return 1.0
        frac = (s - warmup) / max(1, total - warmup)
        frac = min(max(frac, 0.0), 1.0)
        if kind == "linear":
            return 1.0 - frac
        return 0.5 * (1.0 + math.cos(math.pi * frac))

    return f


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                   total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """``lr_scheduler_type`` with ``warmup_steps`` (or ``warmup_ratio`` of the run)."""
    warmup = cfg.warmup_steps or int(math.ceil(cfg.warmup_ratio * total_steps))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(cfg.lr_scheduler_type, warmup, total_steps))


def warn_compile_under_fsdp(cfg: TrainConfig, strategy: str, is_main: bool) -> None:
    if strategy == "fsdp2" and cfg.torch_compile and is_main:
        warnings.warn("torch_compile is not applied under strategy='fsdp2' (the body runs "
                      "eagerly)", UserWarning, stacklevel=3)
