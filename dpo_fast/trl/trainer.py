"""TRL 1.16's ``DPOTrainer`` with dpo_fast's LM head: the drop-in for existing TRL scripts.

What changes against ``trl.DPOTrainer``: the policy's per-sequence log-probs come from
:func:`dpo_fast.sequence_logprobs` on the body's last hidden states and the head weight (no
``[tokens, vocab]`` logits, the backward recomputes them tile by tile, with dpo_fast's C++ /
Triton kernels), and the loss is dpo_fast's :func:`dpo_fast.preference_loss` on them, with
TRL 1.16's conventions where the two differ (``sigmoid`` ignores ``label_smoothing``, ``sft``
is the token-weighted mean over the batch, ``ipo`` / ``sigmoid_norm`` clamp the completion
length to >= 1). ``precompute_ref_log_probs=True`` fills dpo_fast's on-disk reference cache
(``DPOConfig.ref_cache_dir``) instead of TRL's per-run arrow file. Everything else is TRL's:
the data preparation, the collator (unless ``padding_free``), the live reference pass, PEFT,
gradient checkpointing, logging and checkpoints. The metrics have TRL's names and values
(``rewards/*``, ``logps/*``, ``logits/*``, ``entropy``, ``mean_token_accuracy``,
``num_tokens``).

The model is called through whatever wraps it (DDP / FSDP / accelerate, under the trainer's
autocast): the head runs inside the wrapped model's forward, so gradient synchronisation
sees every parameter it uses.

``f_divergence_type`` (f-DPO) is dpo_fast's too (``preference_loss``), ``ld_alpha``
(LD-DPO) splits each sequence's positions at the pair's shared length inside the fused op, and
``use_weighting`` (WPO) takes ``log sum_v p_v^2`` per position from the same kernel pass
(:func:`dpo_fast.wpo_weights`). Settings the fast path does not cover run TRL's own loss
unchanged (same results at TRL's speed), named in one warning at start: a MoE auxiliary loss,
vision-language data, and heads whose logits TRL scales or soft-caps
(``final_logit_softcapping``, ``logit_scale`` and kin: TRL's ``logits/*`` metrics average every
logit).

``padding_free=True`` (which TRL 1.16 switches off) packs each micro-batch's pairs into one row
as ``dpo-fast train`` does: each prompt once, followed by its chosen and its rejected response,
attended through dpo_fast's segment attention (no ``[L, L]`` mask; a block mask or
flash-attn varlen where segments are not sound for the model, both checked against separate
forwards at start). Truncation is TRL's ``keep_start`` per sequence. The losses are the padded
ones: packing does not change the math.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor

try:
    import trl
    from trl.trainer.dpo_config import DPOConfig as _TRLDPOConfig
    from trl.models.utils import disable_gradient_checkpointing
    from trl.trainer.dpo_trainer import DPOTrainer as _TRLDPOTrainer
    from trl.trainer.utils import use_adapter
except ImportError as e:  # pragma: no cover - exercised only without trl installed
    raise ImportError("dpo_fast.trl subclasses TRL 1.16's DPOTrainer: "
                      "pip install -e '.[trl]' from a clone (trl==1.16.0)") from e

from ..data.examples import PreferenceExample
from ..losses import preference_loss, wpo_weights
from ..refcache import RefLogProbCache, fingerprint
from ..ops.dpo_loss import SequenceLogprobs, ld_split, sequence_logprobs
from ..train import batching
from ..train.reference import pair_table, reference_view
from ..train.sharding import base_state, is_peft

logger = logging.getLogger(__name__)

#: The TRL release whose DPOTrainer this module subclasses and is tested against.
TRL_VERSION = "1.16.0"
#: ``DPOConfig.loss_type`` values of TRL 1.16 (dpo_fast's own trainer has more).
TRL_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair",
                  "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft",
                  "sigmoid_norm")
# The TRL 1.16 loss types that read label_smoothing (its sigmoid does not).
_SMOOTHED = frozenset(("robust", "exo_pair", "aot", "aot_unpaired"))
# Config fields by which TRL's fused head scales the logits (trl.trainer.utils.add_fused_lm_head).
_LOGIT_SCALES = ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")
_NON_MODEL_KEYS = frozenset(("completion_mask", "ref_chosen_logps", "ref_rejected_logps"))
# What the padding-free collator adds next to the body's inputs (never passed to the model).
_PACKED_KEYS = ("dpo_fast_targets", "dpo_fast_seq_index", "dpo_fast_hidden_index",
                "completion_lengths", "num_real_tokens")

if trl.__version__ != TRL_VERSION:
    logger.warning("dpo_fast.trl is built and tested against trl==%s; trl %s is installed",
                   TRL_VERSION, trl.__version__)


@dataclass
class DPOConfig(_TRLDPOConfig):
    """TRL 1.16's ``DPOConfig``, field for field, plus:

    ``ref_cache_dir``: where ``precompute_ref_log_probs=True`` keeps the reference log-probs
    (dpo_fast's on-disk cache, keyed by each pair's token ids and the reference model's
    fingerprint): a later run of the same script finds them there and computes only the pairs
    it lacks. Default ``<output_dir>/ref_cache``.
    """

    ref_cache_dir: Optional[str] = field(
        default=None, metadata={"help": "dpo_fast reference-cache directory for "
                                        "precompute_ref_log_probs (default: "
                                        "<output_dir>/ref_cache)"})


@dataclass
class _HeadResult:
    """What the patched forward returns on the fast path. ``S`` = 2B sequences (chosen rows
    first, as TRL's collator stacks them), ``N`` = scored positions."""

    seq: SequenceLogprobs   # logps [S] differentiable (LD-DPO-weighted), per-position extras [N]
    seq_index: Tensor       # [N] int64, the row of each scored position
    mean_logits: Tensor     # [N] fp32 mean over the vocabulary of the logits (detached)
    plain_logps: Tensor     # [S] unweighted sums (= seq.logps without ld_alpha), for sft / WPO
    log_sum_sq: Optional[Tensor] = None  # [S] sums of log sum_v p_v^2 (WPO), detached


def _slow_path_reason(trainer: "DPOTrainer") -> Optional[str]:
    """Why the fast path cannot give TRL's results for this trainer's settings, or None."""
    if trainer.aux_loss_enabled:
        return "a MoE router auxiliary loss"
    if getattr(trainer, "_is_vlm", False) or getattr(trainer, "_is_vision_dataset", False):
        return "a vision-language model or dataset"
    cfg = trainer.model.config.get_text_config()
    if getattr(cfg, "final_logit_softcapping", None) is not None:
        return "final_logit_softcapping (TRL's logits/* metrics average the capped logits)"
    for name in _LOGIT_SCALES:
        if getattr(cfg, name, None) not in (None, 1, 1.0):
            return f"config.{name}={getattr(cfg, name)!r} (scaled logits)"
    return None


def _install_head(model: torch.nn.Module) -> None:
    """Adds the ``dpo_fast_head=`` keyword to ``model``'s forward (TRL has already added
    ``fused_lm_head=``): given it, the forward runs the body and hands its last hidden states
    and output embedding to that callable, inside the forward (so DDP / FSDP hooks see the head
    weight used); without it, the previous forward runs unchanged (generation, TRL's paths)."""
    previous = model.forward

    @functools.wraps(type(model).forward)
    def forward(self, *args, dpo_fast_head=None, **kwargs):
        if dpo_fast_head is None:
            return previous(*args, **kwargs)
        kwargs["use_cache"] = False
        body = self.base_model(*args, **kwargs)
        return dpo_fast_head(body.last_hidden_state, self.get_output_embeddings())

    model.forward = types.MethodType(forward, model)


def _padded_rows(targets: Tensor):
    """Row selection of TRL's padded batch: ``targets`` [S, T-1] next-token ids (-100 off the
    completions) for hidden states [S, T', D] (T' >= T: prompt-learning PEFT prepends virtual
    tokens, dropped here as TRL does). Returns hidden -> (rows [N, D], targets [N], seq [N])."""

    def select(hidden: Tensor):
        h = hidden[:, :-1][:, -targets.shape[1]:]
        scored = targets != -100
        rows = torch.arange(targets.shape[0], device=targets.device)[:, None].expand_as(targets)
        return h[scored.to(h.device)], targets[scored], rows[scored]

    return select


def _packed_rows(targets: Tensor, seq_index: Tensor, hidden_index: Optional[Tensor]):
    """Row selection of a packed row (``batching.MicroBatch``): hidden [1, L, D]; shared-prompt
    rows pick ``hidden_index`` [M] (all M targets scored), others keep the scored positions of
    ``targets`` [L]."""

    def select(hidden: Tensor):
        h = hidden[0]
        if hidden_index is not None:
            return h.index_select(0, hidden_index.to(h.device)), targets, seq_index
        scored = targets != -100
        return h[scored.to(h.device)], targets[scored], seq_index[scored]

    return select


def _head_fn(select, num_seqs: int, ld_alpha: Optional[float] = None,
             with_sum_sq: bool = False):
    """The callable the patched forward runs on the body's last hidden states: ``select``
    (:func:`_padded_rows` / :func:`_packed_rows`) picks the scored rows. ``ld_alpha``
    (LD-DPO): each sequence's log-prob is its shared part plus ``ld_alpha`` times the rest.
    ``with_sum_sq`` (WPO): also each sequence's sum of ``log sum_v p_v^2``."""

    def head(hidden: Tensor, lm_head: torch.nn.Module) -> _HeadResult:
        hs, t, seq_index = select(hidden)
        weight, bias = lm_head.weight, lm_head.bias
        if hasattr(weight, "full_tensor"):  # FSDP2 shards the head as DTensors
            weight = weight.full_tensor()
            bias = bias.full_tensor() if bias is not None else None
        dev = hs.device.type
        if torch.is_autocast_enabled(dev):  # the head's matmuls in the autocast dtype, as TRL's
            hs = hs.to(torch.get_autocast_dtype(dev))
        if weight.dtype != hs.dtype:
            weight = weight.to(hs.dtype)
            bias = bias.to(hs.dtype) if bias is not None else None
        t, seq_index = t.to(hs.device), seq_index.to(hs.device)
        if ld_alpha is None:
            out = sequence_logprobs(hs, weight, t, seq_index, num_seqs, bias=bias,
                                    with_sum_sq=with_sum_sq)
            plain = out.logps
        else:
            split = sequence_logprobs(hs, weight, t, ld_split(seq_index, num_seqs),
                                      2 * num_seqs, bias=bias, with_sum_sq=with_sum_sq)
            shared, tail = split.logps[:num_seqs], split.logps[num_seqs:]
            plain = shared + tail
            out = split._replace(logps=shared + ld_alpha * tail,
                                 lengths=split.lengths[:num_seqs] + split.lengths[num_seqs:])
        sum_sq = None
        if with_sum_sq:  # per-sequence sums of log sum_v p_v^2 (0.0 at unscored positions)
            sum_sq = torch.zeros(num_seqs, dtype=torch.float64, device=hs.device).index_add(
                0, seq_index, out.log_sum_sq.double()).float()
        with torch.no_grad():  # mean_v(h . W_v + b_v) = h . mean_v(W_v) + mean(b)
            mean_logits = hs.float() @ weight.mean(0, dtype=torch.float32)  # no fp32 head copy
            if bias is not None:
                mean_logits = mean_logits + bias.float().mean()
        return _HeadResult(out, seq_index, mean_logits, plain, sum_sq)

    return head


def truncated_example(row: Dict[str, Any], max_length: Optional[int]):
    """TRL's tokenized row as the :class:`PreferenceExample` its collator feeds the model
    (``keep_start``: each of prompt + chosen / prompt + rejected cut to ``max_length``), or a
    message saying why it is none (an empty prompt or response)."""
    p, c, r = (list(row[k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids"))
    if max_length is not None:
        p = p[:max_length]
        room = max(0, max_length - len(p))
        c, r = c[:room], r[:room]
    try:
        return PreferenceExample(p, c, r)
    except ValueError as e:
        return (f"{e}; prompt {len(p)}, chosen {len(c)}, rejected {len(r)} tokens after "
                f"max_length={max_length}")


class PackedPreferenceCollator:
    """``padding_free=True``: a micro-batch of TRL's tokenized rows (``prompt_ids``,
    ``chosen_ids``, ``rejected_ids``, optionally ``ref_*_logps``) as one packed row for
    attention ``path`` (``batching.make_micro_batch``), truncated as TRL's collator truncates
    (``keep_start``: each sequence's first ``max_length`` tokens)."""

    def __init__(self, path: str, masks, max_length: Optional[int], share_prompt: bool):
        self.path, self.masks = path, masks
        self.max_length, self.share_prompt = max_length, share_prompt

    def _example(self, row: Dict[str, Any]) -> PreferenceExample:
        ex = truncated_example(row, self.max_length)
        if isinstance(ex, str):
            raise ValueError(f"padding_free=True cannot pack this row ({ex}); set "
                             "padding_free=False")
        return ex

    def __call__(self, rows):
        exs = [self._example(r) for r in rows]
        mb = batching.make_micro_batch(exs, self.path, masks=self.masks,
                                       share_prompt=self.share_prompt)
        out: Dict[str, Any] = dict(mb.model_inputs)
        out.update(dpo_fast_targets=mb.targets, dpo_fast_seq_index=mb.seq_index,
                   completion_lengths=torch.tensor([e.chosen_ids.size for e in exs]
                                                   + [e.rejected_ids.size for e in exs]),
                   num_real_tokens=torch.tensor(mb.num_tokens))
        if mb.hidden_index is not None:
            out["dpo_fast_hidden_index"] = mb.hidden_index
        for k in ("ref_chosen_logps", "ref_rejected_logps"):
            if k in rows[0]:
                out[k] = torch.tensor([r[k] for r in rows])
        return out


class DPOTrainer(_TRLDPOTrainer):
    """``trl.DPOTrainer`` (1.16) with dpo_fast's LM head; same arguments, same results.

    ``from dpo_fast.trl import DPOConfig, DPOTrainer`` in place of ``from trl import ...``, or
    ``python -m dpo_fast.trl script.py [args]`` for a script left as it is. See the module
    docstring for what runs where.
    """

    def __init__(self, *args, **kwargs):
        cfg = kwargs.get("args") if "args" in kwargs else (args[2] if len(args) > 2 else None)
        padding_free = bool(getattr(cfg, "padding_free", False))
        if padding_free:  # TRL 1.16 would switch it off with a warning: the drop-in packs
            cfg.padding_free = False
        try:
            super().__init__(*args, **kwargs)
        finally:
            if padding_free:
                cfg.padding_free = True
        unknown = [t for t in self.loss_types if t not in TRL_LOSS_TYPES]
        if unknown:
            raise ValueError(f"loss_type {unknown} is not one of TRL 1.16's DPO loss types "
                             f"{list(TRL_LOSS_TYPES)} (dpo-fast train has simpo, orpo, cpo "
                             "and unlikelihood)")
        self.dpo_fast_slow_reason = _slow_path_reason(self)
        self.dpo_fast_attention = batching.PADDED
        if self.dpo_fast_slow_reason is not None:
            if padding_free:
                raise ValueError(f"padding_free=True needs the fused path, which "
                                 f"{self.dpo_fast_slow_reason} is outside; set "
                                 "padding_free=False (TRL's padded loss then runs)")
            logger.warning("dpo_fast.trl: %s is outside the fused path; TRL's own loss runs "
                           "(TRL's results and speed)", self.dpo_fast_slow_reason)
            return
        _install_head(self._policy_body_model())
        if self.ref_model is not None:
            _install_head(self.ref_model)
        if padding_free:
            self._setup_packing()

    def _policy_body_model(self):
        """The transformers model under a PEFT wrapper (TRL patches the same one)."""
        return self.model.get_base_model() if is_peft(self.model) else self.model

    def _setup_packing(self) -> None:
        """Picks the packed attention for the policy (and the reference model), checked
        against separate forwards (``batching.attention_path``), and swaps in the packing
        collator."""
        if self.args.truncation_mode != "keep_start":
            raise ValueError("padding_free=True truncates as truncation_mode='keep_start'; got "
                             f"truncation_mode={self.args.truncation_mode!r}")
        device = self.args.device
        policy = self._policy_body_model()
        path = batching.attention_path(policy, "auto", device)
        if path == batching.PADDED:
            logger.warning("dpo_fast.trl: padding_free=True: %s cannot run packed rows here "
                           "(the warning above says why); padded batches", type(policy).__name__)
            return
        if self.ref_model is not None:
            ref_path = batching.attention_path(self.ref_model, "auto", device)
            if ref_path != path:
                raise ValueError(f"padding_free=True: the policy packs as {path!r}, the "
                                 f"reference model as {ref_path!r}; give both the same "
                                 "attn_implementation")
        self.dpo_fast_attention = path
        self.data_collator = PackedPreferenceCollator(
            path, batching.mask_plan(policy), self.args.max_length,
            share_prompt=path in batching.SHARING_PATHS)
        logger.info("dpo_fast.trl: padding_free=True packs micro-batches (%s)", path)

    def _precompute_ref_logps(self, dataset, name: str, batch_size: int):
        """``precompute_ref_log_probs=True``: the reference log-probs from dpo_fast's on-disk
        cache (``ref_cache_dir``), computed there for the pairs it lacks; TRL's own precompute
        where the fused path does not apply (the warning at start names why)."""
        why = _slow_path_reason(self) or self._cache_unusable(dataset)
        if why is not None:
            logger.info("dpo_fast.trl: TRL's reference precompute for %s (%s)", name, why)
            return super()._precompute_ref_logps(dataset, name, batch_size)
        examples = [truncated_example(row, self.args.max_length) for row in
                    dataset.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"])]
        bad = [i for i, e in enumerate(examples) if isinstance(e, str)]
        if bad:
            logger.info("dpo_fast.trl: TRL's reference precompute for %s (row %d: %s)", name,
                        bad[0], examples[bad[0]])
            return super()._precompute_ref_logps(dataset, name, batch_size)
        ref = self.ref_model if self.ref_model is not None else self.model
        view, adapters_off = reference_view(ref)
        path = Path(getattr(self.args, "ref_cache_dir", None) or
                    Path(self.args.output_dir) / "ref_cache")
        fp = fingerprint(view, self.processing_class, max_length=self.args.max_length,
                         state_dict=base_state(ref) if is_peft(ref) else None)
        with adapters_off:
            cache = RefLogProbCache.ensure(view, examples, path, fingerprint=fp,
                                           batch_tokens=1024 if self.args.device.type == "cpu"
                                           else 16384, per_token=self.ld_alpha is not None)
        # [n, 2]; with ld_alpha the shared + ld_alpha * tail split of the per-token values, as
        # TRL's precompute stores it
        table = pair_table(cache, examples, self.ld_alpha)
        c, r = table[:, 0], table[:, 1]
        self.dpo_fast_ref_cache = cache
        done = getattr(cache, "last_build", None)
        logger.info("dpo_fast.trl: reference log-probs of %d %s pairs from %s (%s computed)",
                    len(examples), name, path,
                    getattr(done, "rows_computed", "?") if done is not None else 0)
        return dataset.add_column("ref_chosen_logps", c.tolist()).add_column(
            "ref_rejected_logps", r.tolist())

    def _cache_unusable(self, dataset) -> Optional[str]:
        """Why the reference cache cannot stand in for TRL's precompute here, or None."""
        if not hasattr(dataset, "select_columns") or not hasattr(dataset, "add_column"):
            return f"a {type(dataset).__name__}"  # TRL refuses iterable datasets itself
        ref = self.ref_model if self.ref_model is not None else self.model
        if is_peft(ref) and "ref" in getattr(ref, "peft_config", {}):
            return "a peft model with a 'ref' adapter"
        if self.is_deepspeed_enabled:
            return "DeepSpeed"
        return None

    def _compute_loss(self, model, inputs, return_outputs):
        if self.dpo_fast_slow_reason is not None or return_outputs:
            return super()._compute_loss(model, inputs, return_outputs)
        return self._fused_loss(model, inputs)

    # ------------------------------------------------------------------ fast path

    def _reference_logps(self, inputs: Dict[str, Any], model_kwargs: Dict[str, Any],
                         head) -> Tuple[Tensor, Tensor]:
        if self.precompute_ref_logps:
            return inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        if "dpo_fast_targets" not in inputs:
            # TRL's own reference pass: the reference model, or the policy with its adapter off.
            return self.compute_ref_log_probs(
                self.ref_model if self.ref_model is not None else self.model, inputs)
        # A packed row: the same row through the reference (TRL's choices of model / adapter).
        adapter = contextlib.nullcontext()
        model = self.ref_model
        if model is None:
            model = self.model
            unwrapped = self.accelerator.unwrap_model(self.model)
            if is_peft(unwrapped):
                adapter = use_adapter(unwrapped, adapter_name="ref" if "ref" in
                                      unwrapped.peft_config else None)
        with torch.no_grad(), adapter, self.accelerator.autocast(), \
                disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            logps = model(**model_kwargs, dpo_fast_head=head).seq.logps
        return logps.chunk(2)

    def _pair_loss(self, loss_type: str, pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor,
                   seq: SequenceLogprobs, plain: Tensor, completion_lengths: Tensor,
                   weights: Optional[Tensor]) -> Tensor:
        b = pc.shape[0]
        if loss_type == "sft":  # TRL: mean log-prob over every chosen token of the batch
            loss = -(plain[:b].sum() / seq.lengths[:b].sum())
            # TRL expands it to every pair before WPO's per-pair weights: the mean weight
            return loss if weights is None else loss * weights.mean()
        lengths = completion_lengths.clamp(min=1).to(pc.dtype)
        out = preference_loss(
            pc, pr, rc, rr, loss_type=loss_type, beta=self.beta,
            label_smoothing=self.label_smoothing if loss_type in _SMOOTHED else 0.0,
            chosen_lengths=lengths[:b], rejected_lengths=lengths[b:],
            discopop_tau=self.args.discopop_tau, f_divergence_type=self.f_divergence_type,
            f_alpha_divergence_coef=self.f_alpha_divergence_coef, pair_weights=weights)
        return out.loss

    def _fused_loss(self, model, inputs: Dict[str, Any]) -> Tensor:
        mode = "train" if self.model.training else "eval"
        if "dpo_fast_targets" in inputs:  # padding_free: one packed row
            lengths = inputs["completion_lengths"]
            b = lengths.shape[0] // 2
            select = _packed_rows(inputs["dpo_fast_targets"], inputs["dpo_fast_seq_index"],
                                  inputs.get("dpo_fast_hidden_index"))
            num_tokens = inputs["num_real_tokens"]
            skip = _NON_MODEL_KEYS.union(_PACKED_KEYS)
        else:  # TRL's padded batch
            completion_mask = inputs["completion_mask"]
            input_ids = inputs["input_ids"]
            b = input_ids.shape[0] // 2
            lengths = completion_mask.sum(1)
            select = _padded_rows(input_ids[:, 1:].masked_fill(completion_mask[:, 1:] == 0, -100))
            num_tokens = inputs["attention_mask"].sum()
            skip = _NON_MODEL_KEYS
        model_kwargs = {k: v for k, v in inputs.items() if k not in skip}
        model_kwargs["use_cache"] = False
        res: _HeadResult = model(**model_kwargs, dpo_fast_head=_head_fn(
            select, 2 * b, self.ld_alpha, with_sum_sq=self.use_weighting))
        seq = res.seq
        pc, pr = seq.logps[:b], seq.logps[b:]
        rc, rr = self._reference_logps(inputs, model_kwargs, _head_fn(select, 2 * b,
                                                                      self.ld_alpha))
        rc, rr = rc.to(pc.device, pc.dtype), rr.to(pc.device, pc.dtype)
        weights = None
        if self.use_weighting:  # WPO: TRL's weights from the unweighted per-token log-probs
            n = seq.lengths.to(pc.device)
            weights = wpo_weights(res.plain_logps[:b], res.plain_logps[b:],
                                  res.log_sum_sq[:b], res.log_sum_sq[b:], n[:b], n[b:])
        loss = 0.0
        for loss_type, weight in zip(self.loss_types, self.loss_weights, strict=True):
            loss = loss + self._pair_loss(loss_type, pc, pr, rc, rr, seq, res.plain_logps,
                                          lengths.to(pc.device), weights) * weight
        self._log_fused_metrics(mode, num_tokens, res, pc.detach(), pr.detach(), rc, rr, b)
        return loss

    def _log_fused_metrics(self, mode, num_tokens: Tensor, res: _HeadResult, pc, pr, rc, rr,
                           b) -> None:
        """TRL 1.16's metrics, by name and definition, from the fused outputs."""
        acc = self.accelerator
        metrics = self._metrics[mode]
        seq = res.seq
        chosen = res.seq_index < b

        def token_mean(total: Tensor, count: Tensor) -> float:
            total, count = acc.gather_for_metrics(total).sum(), acc.gather_for_metrics(count).sum()
            return (total / count).item() if count > 0 else 0.0

        n = torch.tensor(seq.entropy.numel(), device=seq.entropy.device)
        metrics["entropy"].append(token_mean(seq.entropy.sum(), n))
        if mode == "train":
            # TRL counts the padded batch's attention mask: both sequences' prompts
            tokens = acc.gather_for_metrics(num_tokens).sum().item()
            self._total_train_tokens += tokens // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]
        n_chosen, n_rejected = chosen.sum(), (~chosen).sum()
        metrics["logits/chosen"].append(token_mean(res.mean_logits[chosen].sum(), n_chosen))
        metrics["logits/rejected"].append(token_mean(res.mean_logits[~chosen].sum(), n_rejected))
        metrics["mean_token_accuracy"].append(
            token_mean(seq.is_top1[chosen].sum(), n_chosen))
        chosen_rewards = self.beta * (pc - rc)
        rejected_rewards = self.beta * (pr - rr)
        metrics["rewards/chosen"].append(acc.gather(chosen_rewards).mean().item())
        metrics["rewards/rejected"].append(acc.gather(rejected_rewards).mean().item())
        metrics["rewards/accuracies"].append(
            acc.gather((chosen_rewards > rejected_rewards).float()).mean().item())
        metrics["rewards/margins"].append(
            acc.gather(chosen_rewards - rejected_rewards).mean().item())
        metrics["logps/chosen"].append(acc.gather(pc).mean().item())
        metrics["logps/rejected"].append(acc.gather(pr).mean().item())


__all__ = ["DPOConfig", "DPOTrainer", "PackedPreferenceCollator", "TRL_VERSION",
           "TRL_LOSS_TYPES"]
