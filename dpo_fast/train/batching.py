"""Padding-free batches: the data order of an epoch, micro-batches by token budget, packing.

Order: per epoch the pairs are permuted by ``(seed, epoch)``, cut into buckets of
``bucket_steps`` optimizer steps, sorted by length inside a bucket (so a step holds pairs of
similar length and packs tightly), cut into steps of ``batch_size`` pairs, and the steps are
permuted again. Everything is a function of ``(seed, epoch)``: a resumed run replays the same
order and skips the steps already done.

Packing: the 2B sequences of a micro-batch (chosen 0..B-1, then rejected 0..B-1, the fused
loss's order) are laid end to end in one row of L tokens, with position ids restarting at 0 for
each sequence and ``seq_index`` naming each position's sequence. Attention must not cross
sequences. The default is segment attention (:mod:`dpo_fast.ops.segment_attention`, registered
with transformers as the model's attention function): the row's :class:`SegmentLayout` rides
in the body's kwargs and each sequence attends causally within itself, with no ``[L, L]``
tensor. The older paths remain as fallbacks and test oracles: a block-diagonal causal mask
``[1, 1, L, L]`` (bool for sdpa, additive float for eager) or, with flash-attn, the varlen
kernels transformers picks from the restarting position ids. The padded layout
(:func:`dpo_fast.pack_pair_batch`) is the last resort.

Shared prompts (segment and mask paths, ``share_prompt=True``): each pair is laid out once as
``prompt | chosen | rejected`` (P + C + R tokens instead of 2P + C + R). The rejected response's
position ids continue from the prompt (P, P+1, ...), exactly as in its own sequence, and the
mask is a tree: prompt tokens see the earlier prompt, each response sees the prompt and its own
earlier tokens, never the other response. Every response token therefore sees exactly the
context it has in its own sequence, so hidden states, log-probs and gradients are those of the
two separate sequences (the prompt's gradient is the sum of what its two copies would get). The
last prompt position predicts the first token of both responses, so the loss reads the hidden
states through ``hidden_index`` (that row appears twice).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from ..data import PreferenceExample, pack_pair_batch
from ..models import model_parts, text_config
from ..ops import segment_attention as seg_attn
from ..ops.segment_attention import SegmentLayout

IGNORE_INDEX = -100

#: Attention paths (what :func:`attention_path` returns and the run summary reports).
PACKED_SEGMENTS = "packed-segments"
PACKED_SDPA = "packed-sdpa-block-mask"
PACKED_EAGER = "packed-eager-block-mask"
PACKED_FLASH = "packed-flash-varlen"
PADDED = "padded"
#: Paths whose rows can share a pair's prompt (a tree of segments or a tree mask).
SHARING_PATHS = (PACKED_SEGMENTS, PACKED_SDPA, PACKED_EAGER)


def pair_tokens(ex: PreferenceExample) -> int:
    """Tokens of the pair's two sequences: prompt twice plus both responses (what TRL and the
    throughput figures count)."""
    return int(2 * ex.prompt_ids.size + ex.chosen_ids.size + ex.rejected_ids.size)


def shared_pair_tokens(ex: PreferenceExample) -> int:
    """Tokens the pair occupies in a shared-prompt row: the prompt once plus both responses."""
    return int(ex.prompt_ids.size + ex.chosen_ids.size + ex.rejected_ids.size)


def epoch_steps(lengths: np.ndarray, batch_size: int, seed: int, epoch: int,
                bucket_steps: int = 16) -> List[np.ndarray]:
    """The optimizer steps of one epoch: a list of arrays of example indices (the last step
    may be short).

    Args:
        lengths: [n] tokens per pair (:func:`pair_tokens`).
        batch_size: pairs per step.
        seed, epoch: the order is a function of these alone.
        bucket_steps: steps per length-sorted bucket.
    """
    n = int(lengths.shape[0])
    rng = np.random.default_rng([int(seed), int(epoch)])
    perm = rng.permutation(n)
    chunk = batch_size * bucket_steps
    steps: List[np.ndarray] = []
    for s in range(0, n, chunk):
        idx = perm[s:s + chunk]
        idx = idx[np.argsort(lengths[idx], kind="stable")]
        steps.extend(idx[t:t + batch_size] for t in range(0, len(idx), batch_size))
    order = rng.permutation(len(steps))
    return [steps[i] for i in order]


def split_step(step: Sequence[int], cost: Callable[[Sequence[int]], int], max_tokens: int,
               max_pairs: Optional[int]) -> List[List[int]]:
    """Cuts one step's pairs (in order) into micro-batches whose ``cost`` stays within
    ``max_tokens`` and whose size within ``max_pairs``; a pair over budget runs alone."""
    out: List[List[int]] = []
    cur: List[int] = []
    for i in step:
        i = int(i)
        if cur and (cost(cur + [i]) > max_tokens or (max_pairs and len(cur) >= max_pairs)):
            out.append(cur)
            cur = []
        cur.append(i)
    if cur:
        out.append(cur)
    return out


def packed_cost(examples: Sequence[PreferenceExample], share_prompt: bool = False
                ) -> Callable[[Sequence[int]], int]:
    """Row length of a packed micro-batch of pairs ``idx``."""
    size = shared_pair_tokens if share_prompt else pair_tokens
    return lambda idx: sum(size(examples[i]) for i in idx)


def padded_cost(examples: Sequence[PreferenceExample]) -> Callable[[Sequence[int]], int]:
    return lambda idx: 2 * len(idx) * max(examples[i].max_sequence_length for i in idx)


@dataclass
class MicroBatch:
    """Model input and loss targets of B pairs.

    Attributes:
        layout: "packed" or "padded".
        num_pairs: B.
        num_tokens: real (non-padding) tokens, prompts counted per sequence (also when the
            row holds each prompt once).
        model_inputs: keyword arguments of the body: packed -> ``input_ids [1, L]``,
            ``position_ids [1, L]`` and (mask paths) ``attention_mask [1, 1, L, L]`` or
            (segments) ``segment_layout`` (a :class:`SegmentLayout`) with a zero-size
            ``attention_mask [1, 1, 0, 0]`` stand-in; padded
            -> ``input_ids [2B, T]``, ``attention_mask [2B, T]``.
        targets: packed [L] / padded [2B, T] int64 next-token ids, ``IGNORE_INDEX`` off the
            responses; shared-prompt rows: [M] targets of the rows ``hidden_index`` picks.
        seq_index: packed [L] (shared prompts: [M]) int64 sequence of each position (None for
            padded).
        keys: uint8 [B, 16] content keys of the pairs (reference-cache lookup).
        hidden_index: shared-prompt rows only: [M] int64 positions of the row whose hidden
            states predict the M response tokens (the last prompt position twice per pair).
    """

    layout: str
    num_pairs: int
    num_tokens: int
    model_inputs: Dict[str, Tensor]
    targets: Tensor
    seq_index: Optional[Tensor]
    keys: np.ndarray
    hidden_index: Optional[Tensor] = None

    def to(self, device) -> "MicroBatch":
        def move(v):
            if isinstance(v, dict):  # per-layer-type masks
                return {k: t.to(device, non_blocking=True) for k, t in v.items()}
            return v.to(device, non_blocking=True)

        mv = {k: move(v) for k, v in self.model_inputs.items()}
        return MicroBatch(self.layout, self.num_pairs, self.num_tokens, mv,
                          self.targets.to(device, non_blocking=True),
                          None if self.seq_index is None else self.seq_index.to(device),
                          self.keys,
                          None if self.hidden_index is None else self.hidden_index.to(device))


def block_causal_mask(seq: Tensor, kind: str, window: Optional[int] = None,
                      pos: Optional[Tensor] = None, branch: Optional[Tensor] = None) -> Tensor:
    """[1, 1, L, L] causal mask that keeps each sequence of ``seq [L]`` to itself (and, with
    ``window``, each query to the last ``window`` keys, transformers' sliding window): bool
    (True = attend; sdpa) or float (0 / -inf added to the scores; eager).

    Shared-prompt rows pass ``seq`` = the pair of each position, ``pos [L]`` its position id and
    ``branch [L]`` (0 prompt, 1 chosen, 2 rejected): a query sees the keys of its pair at
    positions up to its own that are prompt or on its own branch (windows count positions)."""
    n = seq.shape[0]
    allowed = seq[:, None] == seq[None, :]
    if pos is None:
        allowed &= torch.ones(n, n, dtype=torch.bool).tril_()
        if window is not None:
            allowed &= torch.ones(n, n, dtype=torch.bool).triu_(-(window - 1))
    else:
        dist = pos[:, None] - pos[None, :]
        allowed &= (dist >= 0) & ((branch[None, :] == 0) | (branch[None, :] == branch[:, None]))
        if window is not None:
            allowed &= dist < window
    if kind == "bool":
        return allowed[None, None]
    return torch.zeros(n, n).masked_fill_(~allowed, float("-inf"))[None, None]


def mask_plan(model) -> Optional[Dict[str, Optional[int]]]:
    """The block masks a packed row needs, as {layer type: sliding window or None}; the key
    "" means one mask for every layer. None if the model has attention a block mask cannot
    describe (e.g. chunked or linear attention layers)."""
    cfg = text_config(model)
    window = getattr(cfg, "sliding_window", None)
    if getattr(cfg, "use_sliding_window", True) is False or not isinstance(window, int):
        window = None
    types = getattr(cfg, "layer_types", None)
    if types:
        known = {"full_attention": None, "sliding_attention": window}
        if not set(types) <= set(known) or ("sliding_attention" in types and window is None):
            return None
        return {t: known[t] for t in sorted(set(types))}
    return {"": window}


def _masks(plan: Optional[Dict[str, Optional[int]]], kind: str, seq: Tensor,
           pos: Optional[Tensor] = None, branch: Optional[Tensor] = None):
    """One mask for all layers, or {layer type: mask} (transformers takes a dict then)."""
    plan = plan if plan is not None else {"": None}
    built = {t: block_causal_mask(seq, kind, w, pos, branch) for t, w in plan.items()}
    return built[""] if "" in built else built


def _segment_inputs(layout: SegmentLayout) -> Dict[str, object]:
    """The body's attention kwargs of a segments row: the layout and the mask stand-in."""
    return {"attention_mask": seg_attn.no_mask(), seg_attn.LAYOUT_KWARG: layout}


def _shared_micro_batch(examples: Sequence[PreferenceExample], path: str,
                        masks: Optional[Dict[str, Optional[int]]], keys: np.ndarray
                        ) -> MicroBatch:
    """Shared-prompt packed row (see the module docstring): pair i as prompt | chosen |
    rejected."""
    b = len(examples)
    total = sum(shared_pair_tokens(e) for e in examples)
    ids = np.empty(total, np.int64)
    pos = np.empty(total, np.int64)
    grp = np.empty(total, np.int64)
    branch = np.empty(total, np.int64)
    rows: List[np.ndarray] = [None] * (2 * b)
    tgts: List[np.ndarray] = [None] * (2 * b)
    o = 0
    for i, e in enumerate(examples):
        p, c, r = e.prompt_ids, e.chosen_ids, e.rejected_ids
        lp, lc, lr = p.size, c.size, r.size
        end = o + lp + lc + lr
        ids[o:end] = np.concatenate([p, c, r])
        pos[o:end] = np.concatenate([np.arange(lp), lp + np.arange(lc), lp + np.arange(lr)])
        grp[o:end] = i
        branch[o:end] = np.repeat([0, 1, 2], [lp, lc, lr])
        last = o + lp - 1  # the last prompt position predicts both responses' first token
        rows[i] = np.concatenate([[last], np.arange(o + lp, o + lp + lc - 1)])
        rows[b + i] = np.concatenate([[last], np.arange(o + lp + lc, end - 1)])
        tgts[i], tgts[b + i] = c, r
        o = end
    hidden_index = np.concatenate(rows).astype(np.int64)
    seq_index = np.repeat(np.arange(2 * b), [t.size for t in tgts])
    ids_t, pos_t, grp_t, br_t = (torch.from_numpy(a) for a in (ids, pos, grp, branch))
    inputs = {"input_ids": ids_t[None], "position_ids": pos_t[None]}
    if path == PACKED_SEGMENTS:
        inputs.update(_segment_inputs(SegmentLayout.of_shared_pairs(
            [(e.prompt_ids.size, e.chosen_ids.size, e.rejected_ids.size) for e in examples])))
    else:
        kind = "bool" if path == PACKED_SDPA else "float"
        inputs["attention_mask"] = _masks(masks, kind, grp_t, pos_t, br_t)
    return MicroBatch("packed", b, sum(pair_tokens(e) for e in examples), inputs,
                      torch.from_numpy(np.concatenate(tgts).astype(np.int64)),
                      torch.from_numpy(seq_index), keys, torch.from_numpy(hidden_index))


def make_micro_batch(examples: Sequence[PreferenceExample], path: str,
                     pad_token_id: int = 0,
                     masks: Optional[Dict[str, Optional[int]]] = None,
                     share_prompt: bool = False) -> MicroBatch:
    """Builds the :class:`MicroBatch` of ``examples`` for attention ``path`` (one of
    :data:`PACKED_SEGMENTS`, :data:`PACKED_SDPA`, :data:`PACKED_EAGER`, :data:`PACKED_FLASH`,
    :data:`PADDED`); ``masks`` is the model's :func:`mask_plan` (default: one full-attention
    mask); ``share_prompt`` lays each pair's prompt once (:data:`SHARING_PATHS` only; ignored
    otherwise)."""
    b = len(examples)
    keys = np.frombuffer(b"".join(e.key_bytes for e in examples), dtype=np.uint8).reshape(b, 16)
    if path == PADDED:
        pb = pack_pair_batch(examples, pad_token_id=pad_token_id, ignore_index=IGNORE_INDEX)
        return MicroBatch("padded", b, int(pb.attention_mask.sum()),
                          {"input_ids": pb.input_ids, "attention_mask": pb.attention_mask},
                          pb.targets, None, keys)
    if share_prompt and path in SHARING_PATHS:
        return _shared_micro_batch(examples, path, masks, keys)
    seqs = [(e.prompt_ids, e.chosen_ids) for e in examples] + \
           [(e.prompt_ids, e.rejected_ids) for e in examples]
    total = sum(p.size + y.size for p, y in seqs)
    ids = np.empty(total, np.int64)
    pos = np.empty(total, np.int64)
    seq = np.empty(total, np.int64)
    tgt = np.full(total, IGNORE_INDEX, np.int64)
    o = 0
    for s, (p, y) in enumerate(seqs):
        lp, ly = p.size, y.size
        ids[o:o + lp] = p
        ids[o + lp:o + lp + ly] = y
        pos[o:o + lp + ly] = np.arange(lp + ly)
        seq[o:o + lp + ly] = s
        tgt[o + lp - 1:o + lp + ly - 1] = y  # the position before each response token
        o += lp + ly
    ids_t, pos_t, seq_t = (torch.from_numpy(a) for a in (ids, pos, seq))
    inputs = {"input_ids": ids_t[None], "position_ids": pos_t[None]}
    if path == PACKED_SEGMENTS:
        inputs.update(_segment_inputs(SegmentLayout.of_sequences(
            [p.size + y.size for p, y in seqs])))
    elif path in (PACKED_SDPA, PACKED_EAGER):
        inputs["attention_mask"] = _masks(masks, "bool" if path == PACKED_SDPA else "float",
                                          seq_t)
    elif path != PACKED_FLASH:
        raise ValueError(f"unknown attention path {path!r}")
    return MicroBatch("packed", b, total, inputs, torch.from_numpy(tgt), seq_t, keys)


#: Attention implementations segment attention takes over (it keeps their behaviour for
#: calls without a layout: sdpa, or eager where the model soft-caps scores).
SEGMENT_BASES = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", seg_attn.ATTN_NAME)


def segments_unsupported(model) -> Optional[str]:
    """Why segment attention cannot run ``model``'s packed rows, or None if it can."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None) or "eager"
    if impl not in SEGMENT_BASES:
        return f"its attention implementation is {impl!r}"
    for name, mod in model.named_modules():
        p = getattr(mod, "attention_dropout", 0.0)
        if isinstance(p, (int, float)) and p > 0 and hasattr(mod, "q_proj"):
            return (f"{name} has attention dropout {p} (segment attention has none; "
                    "disable_dropout=True turns it off)")
    return None


def use_segments(model) -> str:
    """Registers segment attention with transformers and makes it ``model``'s attention
    implementation; returns the implementation it replaced (for :func:`restore_attention`)."""
    before = getattr(model.config, "_attn_implementation", None) or "eager"
    model.set_attn_implementation(seg_attn.register())
    return before


def restore_attention(model, impl: str) -> None:
    model.set_attn_implementation(impl)


def attention_path(model, requested: str, device: torch.device) -> str:
    """Which layout and attention a model can run packed sequences with.

    ``requested``: "auto", "packed", "segments", "block_mask" or "padded". Packed rows need
    attention that keeps the sequences apart. In order of preference:

    * segment attention (:data:`PACKED_SEGMENTS`; "auto", "packed", "segments"): each sequence
      causal within itself, no ``[L, L]`` tensor, prompts shared; the model's attention
      implementation becomes :data:`dpo_fast.ops.segment_attention.ATTN_NAME`;
    * flash-attn's varlen kernels (``flash_attention_2`` on CUDA, driven by the restarting
      position ids; no prompt sharing);
    * a block-diagonal 4D mask with ``sdpa`` (bool) or ``eager`` (float) ("block_mask" asks
      for it).

    Each candidate must pass :func:`verify_packing`. Otherwise "auto" falls back to padded rows
    and the others raise.
    """
    if requested == "padded":
        return PADDED
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None) or "eager"
    why = None
    if mask_plan(model) is None:
        why = "it has attention layers a block mask cannot describe"
    elif requested in ("auto", "packed", "segments"):
        why = segments_unsupported(model)
        if why is None:
            before = use_segments(model)
            try:
                ok, detail = verify_packing(model, PACKED_SEGMENTS, device)
            except (RuntimeError, ValueError, TypeError) as e:
                ok, detail = False, f"{type(e).__name__}: {e}"
            if ok:
                return PACKED_SEGMENTS
            restore_attention(model, before)
            why = f"a segments forward differs from separate forwards ({detail})"
            if requested != "segments":
                warnings.warn(f"{type(model).__name__}: no segment attention ({why})",
                              RuntimeWarning, stacklevel=2)
        if requested == "segments":
            raise ValueError(f"attention='segments' is not sound for {type(model).__name__}: "
                             f"{why}; use attention='block_mask', 'padded' or 'auto'")
    path = None
    if mask_plan(model) is None:
        pass
    elif impl in ("flash_attention_2", "flash_attention_3") and device.type == "cuda" \
            and requested != "block_mask":
        path = PACKED_FLASH
    elif impl == "sdpa":
        path = PACKED_SDPA
    elif impl == "eager":
        path = PACKED_EAGER
    else:
        why = f"its attention implementation is {impl!r}"
    if path is not None:
        ok, detail = verify_packing(model, path, device)
        if ok:
            return path
        why = f"a packed forward differs from separate forwards ({detail})"
    if requested != "auto":
        raise ValueError(f"attention={requested!r} is not sound for {type(model).__name__}: "
                         f"{why}; use attention='padded' or 'auto'")
    warnings.warn(f"{type(model).__name__}: padded batches ({why})", RuntimeWarning,
                  stacklevel=2)
    return PADDED


@torch.no_grad()
def verify_packing(model, path: str, device: torch.device, share_prompt: bool = False
                   ) -> Tuple[bool, str]:
    """Runs a pair's two short random sequences alone and packed (``share_prompt``: in one
    shared-prompt row) through the model's body (eval mode) and compares the hidden states: a
    leak across the sequences moves them by O(1), fp32 noise by ~1e-6."""
    body = model_parts(model).body
    was = model.training
    model.eval()
    try:
        vocab = min(int(model_parts(model).weight.shape[0]), 1000)
        g = torch.Generator().manual_seed(0)
        seqs = [torch.randint(3, vocab, (n,), generator=g) for n in (9, 6)]
        alone = [body(input_ids=s[None].to(device), use_cache=False).last_hidden_state[0]
                 for s in seqs]
        ex = PreferenceExample(seqs[0][:4].numpy(), seqs[0][4:].numpy(), seqs[1][1:].numpy())
        # Packed as one pair: (prompt + chosen) = seqs[0]; (prompt + rejected) shares the prompt.
        ref2 = torch.cat([seqs[0][:4], seqs[1][1:]])
        alone[1] = body(input_ids=ref2[None].to(device), use_cache=False).last_hidden_state[0]
        mb = make_micro_batch([ex], path, masks=mask_plan(model),
                              share_prompt=share_prompt).to(device)
        packed = body(**mb.model_inputs, use_cache=False).last_hidden_state[0]
        if mb.hidden_index is not None:  # the rejected sequence's prompt is not repeated
            alone[1] = alone[1][ex.prompt_ids.size:]
        want = torch.cat(alone).float()
        err = (packed.float() - want).abs().max().item()
        scale = want.abs().max().item()
        tol = (1e-3 if packed.dtype == torch.float32 else 5e-2) * max(scale, 1.0)
        return err <= tol, f"max |difference| {err:.3g} at hidden-state scale {scale:.3g}"
    finally:
        model.train(was)
