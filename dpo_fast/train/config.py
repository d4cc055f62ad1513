"""The trainer's settings: one typed dataclass, checked field by field.

Names follow TRL's ``DPOConfig`` / ``TrainingArguments`` where a TRL user would look for them
(``beta``, ``loss_type``, ``learning_rate``, ``lr_scheduler_type``, ``warmup_ratio``,
``max_grad_norm``, ``logging_steps``, ``eval_steps``, ``save_steps``, ``save_total_limit``,
``rpo_alpha``, ...). Batching is by pairs per optimizer step (``batch_size``, TRL's
``per_device_train_batch_size x gradient_accumulation_steps``), cut into padding-free
micro-batches by a token budget (``max_tokens_per_micro_batch``) and optionally a pair cap
(``micro_batch_size``); the loss is normalized by the step's pair count, so how a step is cut
into micro-batches does not change it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional, Sequence, Union

from ..losses import F_DIVERGENCE_TYPES, F_DIVERGENCES, LOSS_TYPES, NO_REFERENCE_TYPES

OPTIMIZERS = ("adamw", "rmsprop")
SCHEDULERS = ("linear", "cosine", "constant")
BAD_ROW_POLICIES = ("skip", "error")
TRUNCATION_MODES = ("keep_start", "drop")
ATTENTION_MODES = ("auto", "packed", "segments", "block_mask", "padded")
PRECISIONS = ("fp32", "bf16")
STRATEGIES = ("auto", "ddp", "fsdp2", "none")
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class TrainConfig:
    """Everything a DPO run needs. Only ``model`` and ``train_data`` are required.

    Attributes:
        model: Policy model: a local Hugging Face model folder (config.json), a hub id already
            in the local Hugging Face cache, or bundled:smollm2-135m-instruct (the demo model).
        train_data: Training pairs: a .jsonl / .json / .csv / .parquet file, a saved datasets
            folder, a datasets name, or bundled:rotten-tomatoes/train (Python: also a
            datasets.Dataset or a list of dicts).
        tokenizer: Tokenizer path or id (default: the model's).
        ref_model: Reference model path or id (default: the initial policy). Its log-probs go
            into the reference cache before training and it is freed.
        dtype: Parameter dtype of the policy (auto = float32).
        precision: fp32, or bf16 = bf16 autocast of the body over fp32 master weights. Under
            fsdp2, bf16 is MixedPrecisionPolicy: bf16 gathered parameters and compute (the
            reference pass too), fp32 shards, optimizer state and gradient reduction.
        device: auto (CUDA if available, else CPU), cpu, cuda or cuda:N.
        adaptive_threads: On the CPU, lower torch's threads while other processes use this
            process's cores and raise them back when the cores are free (keeps a step fast
            next to other jobs; alone nothing changes). Gradients can then differ in the last
            bits from a run that kept its threads; false keeps the thread count fixed.
        attention: auto (packed rows if the model keeps packed sequences apart, else padded),
            packed (fail if it cannot), segments (packed rows through segment attention: no
            [L, L] mask, memory linear in the row), block_mask (packed rows with a dense
            [L, L] mask, the older path) or padded. auto and packed try segments first.
        share_prompt: In packed rows with segments or a block mask, lay each pair out as the
            prompt, then both responses, so the prompt is computed once (each response keeps
            to its own context; same results as two sequences).
        gradient_checkpointing: Recompute the body's activations in backward.
        checkpoint_long_pairs: For a micro-batch longer than max_tokens_per_micro_batch (a
            pair over the budget runs alone), recompute the activations of the first
            1 - budget / length of the layers in backward, so the activations kept are those
            of a budget-sized row (plus the checkpointed layers' inputs).
        torch_compile: torch.compile the model body.
        lora_r: LoRA rank; set it to train peft LoRA adapters (pip install peft) instead of
            all weights.
        lora_alpha: LoRA alpha.
        lora_dropout: LoRA dropout.
        lora_target_modules: LoRA target modules (peft's names, or all-linear).
        disable_dropout: Set every dropout probability to 0 (as TRL does).
        eval_data: Held-out pairs in any train_data form, or bundled:rotten-tomatoes/eval.
        eval_fraction: Without eval_data: the fraction of train_data held out (deterministic,
            by seed).
        eval_group_column: With eval_fraction: a column whose values are never split between
            train and eval (e.g. the movie of a review pair).
        max_eval_samples: Evaluate on at most this many held-out pairs (evenly spread over the
            split).
        prompt_column: Prompt column; if the data has none, the prompt is the shared prefix of
            chosen and rejected (implicit prompt).
        chosen_column: Chosen-response column.
        rejected_column: Rejected-response column.
        max_length: Tokens of prompt + response kept (TRL's default 1024); null = no limit.
        truncation_mode: keep_start cuts prompt + response to its first max_length tokens;
            drop leaves such rows out.
        bad_rows: skip (count and warn) or error (stop, naming the row and the field) for rows
            with a missing field, an empty or non-string response, undecodable text, a prompt
            alone over max_length, or chosen == rejected.
        data_cache_dir: Tokenized-data cache (default $DPO_FAST_CACHE/tokenized; "" = off).
        loss_type: A loss name or a list of them: sigmoid, hinge, ipo, exo_pair, nca_pair,
            robust, bco_pair, sppo_hard, aot, aot_unpaired, apo_zero, apo_down, discopop,
            sigmoid_norm, sft (also Preferred-FT), simpo, orpo, cpo, unlikelihood.
        loss_weights: One weight per loss type (TRL's loss_weights).
        beta: DPO's beta (IPO's tau, SimPO / CPO temperature).
        label_smoothing: Label smoothing eps in [0, 0.5) (cDPO, robust, exo_pair, ...).
        rpo_alpha: Weight of an SFT (NLL) term on the chosen response (RPO); null = off.
        simpo_gamma: SimPO's target margin.
        cpo_alpha: CPO's NLL weight.
        orpo_lambda: ORPO's odds-ratio weight (default: beta).
        discopop_tau: DiscoPOP's mixing temperature.
        unlikelihood_alpha: Weight of the unlikelihood term on the rejected response.
        f_divergence_type: f-DPO divergence (TRL's names): reverse_kl (standard DPO),
            forward_kl, js_divergence or alpha_divergence; other than reverse_kl only for
            sigmoid, sigmoid_norm, hinge, ipo, exo_pair, robust, discopop and sft.
        f_alpha_divergence_coef: alpha of alpha_divergence.
        ld_alpha: LD-DPO (TRL's name; in [0, 1]): each response's log-prob, policy and
            reference, is its first min(chosen, rejected) tokens plus ld_alpha times the rest
            (1 = DPO, 0 = the longer response's tail masked); null = off. The reference cache
            then keeps per-token values (per_token) to split the reference's sums.
        use_weighting: WPO (TRL's name): each pair's loss times the policy's length-normalized
            weights exp(mean log p(y_t) - log sum_v p_v^2) of both responses, without gradient.
            Not with aot / aot_unpaired.
        optimizer: adamw (default) or rmsprop (the DPO paper's).
        learning_rate: Peak learning rate.
        weight_decay: Weight decay.
        adam_beta1: AdamW beta1.
        adam_beta2: AdamW beta2.
        adam_epsilon: AdamW epsilon.
        lr_scheduler_type: linear (decay to 0), cosine or constant, after the warm-up.
        warmup_steps: Linear warm-up steps from 0 (wins over warmup_ratio).
        warmup_ratio: Warm-up as a fraction of all steps.
        num_train_epochs: Epochs (used when max_steps is -1).
        max_steps: Optimizer steps; -1 = num_train_epochs.
        batch_size: Preference pairs per optimizer step (TRL's per-device batch x gradient
            accumulation).
        micro_batch_size: At most this many pairs per forward/backward (null = token budget
            only); never changes the loss.
        max_tokens_per_micro_batch: Token budget of one packed micro-batch (prompt counted for
            both responses); a longer pair runs alone.
        max_grad_norm: Gradient clipping norm (null or 0 = off).
        seed: Data order and initialization seed.
        max_bad_steps: Stop after this many steps in a row with a non-finite loss or gradient.
        output_dir: Run directory: metrics, checkpoints, plots, the final model.
        ref_cache_dir: Reference cache folder (default <output_dir>/ref_cache).
        logging_steps: Log training metrics every this many steps.
        eval_steps: Evaluate every this many steps (null = before and after training only).
        save_steps: Checkpoint every this many steps (null = none).
        save_total_limit: Checkpoints kept (the newest).
        resume_from_checkpoint: true = the newest checkpoint in output_dir, or a checkpoint
            folder; null = start fresh.
        overwrite_output_dir: Start fresh in an output_dir that holds an earlier run's
            checkpoints (they, its metrics, plots and TensorBoard events are replaced; its
            reference cache is kept and reused). Without it such a start is an error.
        save_final_model: save_pretrained the trained model (+ tokenizer) into output_dir.
        merge_lora: With LoRA, also save the merged model in output_dir/merged.
        sample_prompts: Before and after training, sample one response for this many
            held-out prompts (0 = off) and report them.
        sample_max_new_tokens: Tokens per sampled response.
        sample_temperature: Sampling temperature.
        sample_scorer: Score the samples: vader (sentiment, pip install vaderSentiment) or
            null.
        impl: Kernel backend of the fused ops: auto, cpu, torch, triton.
        strategy: Under torchrun (WORLD_SIZE set): auto (ddp with several processes, none with
            one), ddp (DistributedDataParallel: each process holds the whole model), fsdp2
            (fully_shard: parameters, gradients and optimizer state sharded across processes)
            or none. batch_size stays the pairs of one optimizer step over all processes.
        fsdp_cpu_offload: Under fsdp2, keep the parameter shards, their gradients and the
            optimizer state in host memory (CPUOffloadPolicy); each layer is copied to the
            device for its forward and backward. On a CPU-only run there is nothing to offload
            to and it changes nothing.
        fsdp_reshard_after_forward: Under fsdp2, free each layer's gathered parameters after
            its forward and gather them again in backward; the root unit (embeddings, norm,
            head) keeps its own until backward, which needs them first (FSDP2's default).
            false: every layer keeps them until backward (more memory, fewer all-gathers).
        max_shard_size: Size cap of one safetensors file of the final model ("5GB", "500MB",
            or bytes). Under fsdp2 the files are written one tensor at a time, so no process
            holds the whole model; with several files an index names them.
        dist_timeout: Seconds a process waits in a collective for its peers before the job
            fails (a dead or hung peer ends the job instead of hanging it).
        ref_rows_per_shard: Rows per reference-cache shard file. Under torchrun the shards of
            the precompute are dealt to the processes (rank r computes shards i % N == r), so
            N processes share the work when there are at least N shards; the cache is
            byte-identical to a one-process build with the same value.
        ref_batch_tokens: Padded token budget of a reference-cache forward batch (default:
            1024 on CPU, where small batches stay in cache, 16384 on GPU).
        report_to: Extra loggers: tensorboard (when installed) and / or plots (PNG,
            matplotlib); [] = metrics.jsonl only.
    """

    model: Optional[str] = None
    train_data: Any = None
    tokenizer: Optional[str] = None
    ref_model: Optional[str] = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    precision: Literal["fp32", "bf16"] = "fp32"
    device: str = "auto"
    adaptive_threads: bool = True
    attention: Literal["auto", "packed", "segments", "block_mask", "padded"] = "auto"
    share_prompt: bool = True
    gradient_checkpointing: bool = False
    checkpoint_long_pairs: bool = True
    torch_compile: bool = False
    lora_r: Optional[int] = None
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_target_modules: Union[str, List[str]] = "all-linear"
    disable_dropout: bool = True

    eval_data: Any = None
    eval_fraction: float = 0.0
    eval_group_column: Optional[str] = None
    max_eval_samples: Optional[int] = None
    prompt_column: str = "prompt"
    chosen_column: str = "chosen"
    rejected_column: str = "rejected"
    max_length: Optional[int] = 1024
    truncation_mode: Literal["keep_start", "drop"] = "keep_start"
    bad_rows: Literal["skip", "error"] = "skip"
    data_cache_dir: Optional[str] = None

    loss_type: Union[str, List[str]] = "sigmoid"
    loss_weights: Optional[List[float]] = None
    beta: float = 0.1
    label_smoothing: float = 0.0
    rpo_alpha: Optional[float] = None
    simpo_gamma: float = 0.5
    cpo_alpha: float = 1.0
    orpo_lambda: Optional[float] = None
    discopop_tau: float = 0.05
    unlikelihood_alpha: float = 1.0
    f_divergence_type: Literal["reverse_kl", "forward_kl", "js_divergence",
                               "alpha_divergence"] = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    ld_alpha: Optional[float] = None
    use_weighting: bool = False

    optimizer: Literal["adamw", "rmsprop"] = "adamw"
    learning_rate: float = 1e-6
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    lr_scheduler_type: Literal["linear", "cosine", "constant"] = "linear"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    num_train_epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 8
    micro_batch_size: Optional[int] = None
    max_tokens_per_micro_batch: int = 4096
    max_grad_norm: Optional[float] = 1.0
    seed: int = 42
    max_bad_steps: int = 5

    output_dir: str = "dpo_fast_output"
    ref_cache_dir: Optional[str] = None
    logging_steps: int = 10
    eval_steps: Optional[int] = None
    save_steps: Optional[int] = 500
    save_total_limit: Optional[int] = 2
    resume_from_checkpoint: Union[None, bool, str] = None
    overwrite_output_dir: bool = False
    save_final_model: bool = True
    merge_lora: bool = False
    sample_prompts: int = 0
    sample_max_new_tokens: int = 32
    sample_temperature: float = 1.0
    sample_scorer: Optional[Literal["vader"]] = None
    impl: str = "auto"
    strategy: Literal["auto", "ddp", "fsdp2", "none"] = "auto"
    fsdp_cpu_offload: bool = False
    fsdp_reshard_after_forward: bool = True
    max_shard_size: Union[int, str] = "5GB"
    dist_timeout: float = 600.0
    ref_rows_per_shard: int = 4096
    ref_batch_tokens: Optional[int] = None
    report_to: List[str] = field(default_factory=list)

    # ------------------------------------------------------------------ derived values

    @property
    def loss_types(self) -> List[str]:
        """The loss types, with "sft" appended when ``rpo_alpha`` is set."""
        types = [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)
        if self.rpo_alpha is not None and "sft" not in types:
            types.append("sft")
        return types

    @property
    def loss_type_weights(self) -> Optional[List[float]]:
        """``loss_weights`` matching :attr:`loss_types` (``rpo_alpha`` last), or None."""
        types = [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)
        if self.rpo_alpha is None or "sft" in types:
            return None if self.loss_weights is None else list(self.loss_weights)
        base = list(self.loss_weights) if self.loss_weights is not None else [1.0] * len(types)
        return base + [float(self.rpo_alpha)]

    @property
    def needs_reference(self) -> bool:
        """False when every loss type is reference-free (simpo, orpo, cpo, sft,
        unlikelihood)."""
        return any(t not in NO_REFERENCE_TYPES for t in self.loss_types)

    def loss_kwargs(self) -> Dict[str, Any]:
        """Keyword arguments of :func:`dpo_fast.fused_preference_loss` for the loss."""
        types = self.loss_types
        kw: Dict[str, Any] = dict(loss_type=types[0] if len(types) == 1 else types,
                                  loss_weights=self.loss_type_weights, beta=self.beta,
                                  label_smoothing=self.label_smoothing)
        if "simpo" in types:
            kw["simpo_gamma"] = self.simpo_gamma
        if "cpo" in types:
            kw["cpo_alpha"] = self.cpo_alpha
        if "orpo" in types and self.orpo_lambda is not None:
            kw["orpo_lambda"] = self.orpo_lambda
        if "discopop" in types:
            kw["discopop_tau"] = self.discopop_tau
        if "unlikelihood" in types:
            kw["unlikelihood_alpha"] = self.unlikelihood_alpha
        if self.f_divergence_type != "reverse_kl":
            kw["f_divergence_type"] = self.f_divergence_type
            kw["f_alpha_divergence_coef"] = self.f_alpha_divergence_coef
        if self.ld_alpha is not None:
            kw["ld_alpha"] = float(self.ld_alpha)
        if self.use_weighting:
            kw["use_weighting"] = True
        return kw

    def to_dict(self) -> Dict[str, Any]:
        """JSON-able view (data objects given in memory are named by their type)."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, os.PathLike):
                v = os.fspath(v)
            if not (v is None or isinstance(v, (str, int, float, bool, list, dict))):
                v = f"<{type(v).__name__}>"
            elif isinstance(v, list) and f.name in ("train_data", "eval_data"):
                v = f"<list of {len(v)} rows>"
            out[f.name] = v
        return out

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrainConfig":
        """A config from a mapping (e.g. parsed YAML); unknown keys are an error naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            import difflib

            hints = [f"{k!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(
                k, names, 1)) else repr(k) for k in unknown]
            raise ValueError(f"unknown config key(s): {', '.join(hints)}")
        return cls(**d)

    # ------------------------------------------------------------------ validation

    def validate(self) -> "TrainConfig":
        """Checks every field; raises ValueError naming the first bad one. Returns self."""

        def bad(name: str, want: str) -> ValueError:
            return ValueError(f"TrainConfig.{name} must be {want}, got {getattr(self, name)!r}")

        def choice(name: str, options: Sequence[str]) -> None:
            if getattr(self, name) not in options:
                raise bad(name, f"one of {list(options)}")

        def integer(name: str, lo: int, optional: bool = False) -> None:
            v = getattr(self, name)
            if optional and v is None:
                return
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise bad(name, f"an int >= {lo}" + (" or None" if optional else ""))

        def number(name: str, lo: float, hi: float = math.inf, lo_open: bool = False,
                   hi_open: bool = False, optional: bool = False) -> None:
            v = getattr(self, name)
            if optional and v is None:
                return
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            ok = ok and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
            if not ok:
                lb = "(" if lo_open else "["
                ub = ")" if hi_open else "]"
                raise bad(name, f"a finite number in {lb}{lo}, {hi}{ub}"
                          + (" or None" if optional else ""))

        if self.model is None:
            raise ValueError("TrainConfig.model is required (a model directory or a hub id "
                             "in the local Hugging Face cache), unless a model object is given "
                             "to Trainer")
        if self.train_data is None:
            raise ValueError("TrainConfig.train_data is required (a data file, a datasets "
                             "Dataset, a list of dicts or a datasets name)")
        for name in ("dtype", "precision", "attention", "optimizer", "lr_scheduler_type",
                     "bad_rows", "truncation_mode", "strategy"):
            choice(name, {"strategy": STRATEGIES, "dtype": DTYPES, "precision": PRECISIONS,
                          "attention": ATTENTION_MODES, "optimizer": OPTIMIZERS,
                          "lr_scheduler_type": SCHEDULERS, "bad_rows": BAD_ROW_POLICIES,
                          "truncation_mode": TRUNCATION_MODES}[name])
        number("dist_timeout", 0.0, lo_open=True)
        from ..safetensors_shards import parse_size

        parse_size(self.max_shard_size, "TrainConfig.max_shard_size")
        integer("ref_rows_per_shard", 1)
        if not isinstance(self.device, str) or not (
                self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise bad("device", "'auto', 'cpu', 'cuda' or 'cuda:N'")
        types = [self.loss_type] if isinstance(self.loss_type, str) else self.loss_type
        if not isinstance(types, (list, tuple)) or not types or \
                any(t not in LOSS_TYPES for t in types):
            raise bad("loss_type", f"a name (or list of names) from {list(LOSS_TYPES)}")
        if self.loss_weights is not None:
            if not isinstance(self.loss_weights, (list, tuple)) or len(self.loss_weights) != \
                    len(types) or not all(isinstance(w, (int, float)) and math.isfinite(w)
                                          for w in self.loss_weights):
                raise bad("loss_weights", f"a list of {len(types)} finite numbers (one per "
                          "loss_type)")
        choice("f_divergence_type", F_DIVERGENCES)
        if self.f_divergence_type != "reverse_kl":
            outside = [t for t in self.loss_types if t not in F_DIVERGENCE_TYPES]
            if outside:
                raise bad("f_divergence_type", f"'reverse_kl' with loss_type {outside[0]!r} "
                          f"(the f-divergences apply to {sorted(F_DIVERGENCE_TYPES)})")
        number("f_alpha_divergence_coef", -math.inf)
        number("ld_alpha", 0.0, 1.0, optional=True)
        if not isinstance(self.use_weighting, bool):
            raise bad("use_weighting", "true or false")
        if self.use_weighting:
            sorted_types = [t for t in self.loss_types if t in ("aot", "aot_unpaired")]
            if sorted_types:
                raise bad("use_weighting", f"false with loss_type {sorted_types[0]!r} (its "
                          "losses are sorted over the batch, so there is no pair to weight)")
        number("beta", 0.0, lo_open=True)
        number("label_smoothing", 0.0, 0.5, hi_open=True)
        number("rpo_alpha", 0.0, optional=True)
        number("unlikelihood_alpha", 0.0)
        number("learning_rate", 0.0)
        number("weight_decay", 0.0)
        number("adam_beta1", 0.0, 1.0, hi_open=True)
        number("adam_beta2", 0.0, 1.0, hi_open=True)
        number("adam_epsilon", 0.0, lo_open=True)
        number("warmup_ratio", 0.0, 1.0)
        integer("warmup_steps", 0)
        number("num_train_epochs", 0.0, lo_open=True)
        if not isinstance(self.max_steps, int) or isinstance(self.max_steps, bool) or \
                self.max_steps == 0 or self.max_steps < -1:
            raise bad("max_steps", "-1 (use num_train_epochs) or an int >= 1")
        integer("batch_size", 1)
        integer("micro_batch_size", 1, optional=True)
        integer("max_tokens_per_micro_batch", 2)
        number("max_grad_norm", 0.0, optional=True)
        integer("seed", 0)
        integer("max_bad_steps", 1)
        integer("max_length", 2, optional=True)
        number("eval_fraction", 0.0, 1.0, hi_open=True)
        integer("logging_steps", 1)
        integer("eval_steps", 1, optional=True)
        integer("save_steps", 1, optional=True)
        integer("save_total_limit", 1, optional=True)
        integer("lora_r", 1, optional=True)
        number("lora_alpha", 0.0, lo_open=True)
        number("lora_dropout", 0.0, 1.0, hi_open=True)
        integer("ref_batch_tokens", 2, optional=True)
        integer("max_eval_samples", 1, optional=True)
        integer("sample_prompts", 0)
        integer("sample_max_new_tokens", 1)
        number("sample_temperature", 0.0, lo_open=True)
        if self.sample_scorer not in (None, "vader"):
            raise bad("sample_scorer", "'vader' or None")
        if not isinstance(self.report_to, (list, tuple)) or \
                any(r not in ("tensorboard", "plots") for r in self.report_to):
            raise bad("report_to", "a list of 'tensorboard' / 'plots'")
        for name in ("prompt_column", "chosen_column", "rejected_column"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise bad(name, "a non-empty column name")
        if self.eval_data is not None and self.eval_fraction:
            raise ValueError("TrainConfig: give eval_data or eval_fraction, not both")
        if self.eval_group_column is not None and not self.eval_fraction:
            raise ValueError("TrainConfig.eval_group_column needs eval_fraction > 0")
        if self.merge_lora and self.lora_r is None:
            raise ValueError("TrainConfig.merge_lora needs lora_r (there is no adapter to "
                             "merge)")
        if self.precision == "bf16" and self.dtype not in ("auto", "float32"):
            raise ValueError("TrainConfig.precision='bf16' autocasts fp32 weights; use "
                             f"dtype='float32' (or 'auto') with it, not {self.dtype!r}")
        return self


# ---------------------------------------------------------------------- reference table

README_START = "<!-- config-reference:start (generated from TrainConfig; do not edit) -->"
README_END = "<!-- config-reference:end -->"


def field_docs() -> Dict[str, str]:
    """Each field's description, from the ``Attributes:`` section of the class docstring."""
    import docstring_parser

    doc = docstring_parser.parse(TrainConfig.__doc__ or "")
    return {p.arg_name: " ".join((p.description or "").split()) for p in doc.params}


def _type_name(t: Any) -> str:
    text = str(t).replace("typing.", "")
    return text[len("<class '"):-2] if text.startswith("<class '") else text


def config_reference_markdown() -> str:
    """The README's config reference: one row per field (name, type, default, meaning)."""
    docs = field_docs()
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        shown = "null" if default is None else (
            default if isinstance(default, str) else json.dumps(default))
        rows.append(f"| `{f.name}` | {_type_name(f.type).replace('|', '/')} | `{shown}` | "
                    f"{docs.get(f.name, '')} |")
    return "\n".join(rows) + "\n"


def update_readme(path: str) -> bool:
    """Rewrites the generated block of ``path`` in place; True if it changed."""
    text = open(path, encoding="utf-8").read()
    a, b = text.index(README_START) + len(README_START), text.index(README_END)
    new = text[:a] + "\n" + config_reference_markdown() + text[b:]
    if new != text:
        from pathlib import Path

        from ..fileio import atomic_write

        atomic_write(Path(path), new.encode("utf-8"))
    return new != text

