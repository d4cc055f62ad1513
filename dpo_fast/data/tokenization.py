"""Tokenization of preference rows the way TRL 1.16's ``DPOTrainer`` does it.

String rows: EOS is appended to each response string (unless it already ends with it), the
prompt and ``prompt + response`` are tokenized separately with the tokenizer's default special
tokens (so they are joined with no separator: give responses a leading space), the response is
what follows the longest common prefix of the prompt ids and both ``prompt + response`` ids,
``(prompt + response)[:max_length]`` keeps the start, and a row whose prompt alone reaches
``max_length`` is dropped. Conversational rows (lists of ``{"role", "content"}`` messages)
go through the tokenizer's chat template the same way TRL does (``add_generation_prompt=True``
for the prompt; the template supplies the end of turn, so no EOS is appended).

:func:`tokenize_dataset` says which rows it left out and why (:class:`DroppedRows`).
"""

from __future__ import annotations

import warnings
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from torch import Tensor

from .checks import IDENTICAL_POLICIES, describe_dropped, is_messages, refusal
from .examples import PreferenceExample


PROMPT_TOO_LONG = "prompt_too_long"
IDENTICAL = "identical"


class PromptTooLongError(ValueError):
    """The tokenized prompt alone reaches ``max_length``: no response token would remain."""


def _common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _split_ids(prompt_ids: Sequence[int], prompt_chosen_ids: Sequence[int],
               prompt_rejected_ids: Sequence[int], max_length: Optional[int]) -> PreferenceExample:
    """TRL 1.16's split of tokenized ``prompt`` / ``prompt + response`` into an example."""
    plen = min(_common_prefix_length(prompt_ids, prompt_chosen_ids),
               _common_prefix_length(prompt_ids, prompt_rejected_ids))
    prompt = list(prompt_ids[:plen])
    chosen = list(prompt_chosen_ids[plen:])
    rejected = list(prompt_rejected_ids[plen:])
    if max_length is not None:
        if plen >= max_length:
            raise PromptTooLongError(
                f"the prompt has {plen} tokens, max_length={max_length}: no response token "
                "would remain (TRL drops such rows)")
        chosen = chosen[: max_length - plen]
        rejected = rejected[: max_length - plen]
    return PreferenceExample(prompt, chosen, rejected)


def _check_max_length(max_length: Optional[int]) -> None:
    if max_length is not None and (not isinstance(max_length, int) or isinstance(max_length, bool)
                                   or max_length < 2):
        raise ValueError(f"max_length must be None or an int >= 2, got {max_length!r}")


def _input_ids(encoded) -> List[int]:
    ids = encoded["input_ids"] if isinstance(encoded, Mapping) or hasattr(encoded, "keys") \
        else encoded
    if isinstance(ids, Tensor):
        ids = ids.tolist()
    if ids and isinstance(ids[0], list):  # a batch dimension of 1
        if len(ids) != 1:
            raise ValueError("expected one tokenized sequence, got a batch")
        ids = ids[0]
    return list(ids)


def _eos_token(tokenizer) -> str:
    eos = getattr(tokenizer, "eos_token", None)
    if not eos:
        raise ValueError("add_eos=True needs tokenizer.eos_token, which is not set; set it or "
                         "pass add_eos=False")
    return eos


def tokenize_preference(tokenizer, prompt, chosen, rejected, *, max_length: Optional[int] = None,
                        add_eos: bool = True) -> PreferenceExample:
    """Tokenizes one preference row the way TRL 1.16's ``DPOTrainer`` does.

    Args:
        tokenizer: a Hugging Face tokenizer (``__call__`` / ``apply_chat_template``).
        prompt, chosen, rejected: strings, or (conversational rows) lists of message dicts;
            the three must be of the same kind.
        max_length: if set, each ``prompt + response`` is cut to its first ``max_length``
            tokens (the prompt is kept whole); a prompt of ``max_length`` tokens or more raises
            :class:`PromptTooLongError`.
        add_eos: append ``tokenizer.eos_token`` to string responses that do not end with it.

    Returns:
        the :class:`PreferenceExample`.
    """
    _check_max_length(max_length)
    kinds = {name: ("str" if isinstance(v, str) else "conversation" if is_messages(v)
                    else type(v).__name__)
             for name, v in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected))}
    bad = {k: v for k, v in kinds.items() if v not in ("str", "conversation")}
    if bad:
        raise ValueError("prompt / chosen / rejected must be strings or lists of message dicts; "
                         + ", ".join(f"{k} is {v}" for k, v in bad.items()))
    if len(set(kinds.values())) != 1:
        raise ValueError("prompt / chosen / rejected must all be strings or all be "
                         f"conversations, got {kinds}")
    if kinds["prompt"] == "conversation":
        def chat(messages, **kw):
            return _input_ids(tokenizer.apply_chat_template(messages, tokenize=True,
                                                            return_dict=True, **kw))

        p = chat(list(prompt), add_generation_prompt=True)
        pc = chat(list(prompt) + list(chosen))
        pr = chat(list(prompt) + list(rejected))
        return _split_ids(p, pc, pr, max_length)
    if add_eos:
        eos = _eos_token(tokenizer)
        chosen = chosen if chosen.endswith(eos) else chosen + eos
        rejected = rejected if rejected.endswith(eos) else rejected + eos
    p = _input_ids(tokenizer(prompt))
    pc = _input_ids(tokenizer(prompt + chosen))
    pr = _input_ids(tokenizer(prompt + rejected))
    return _split_ids(p, pc, pr, max_length)


class DroppedRows(list):
    """The rows :func:`tokenize_dataset` left out: a sorted list of their indices (0-based,
    in input order), with ``reasons[i]`` saying why: ``"prompt_too_long"`` (the prompt alone
    reaches ``max_length``; TRL drops these too) or ``"identical"`` (chosen and rejected
    tokenize to the same ids, so the pair's DPO gradient is zero)."""

    def __init__(self, reasons: Optional[Mapping[int, str]] = None,
                 names: Optional[Sequence[str]] = None):
        reasons = dict(reasons or {})
        super().__init__(sorted(reasons))
        self.reasons = reasons
        self._names = names

    def of(self, reason: str) -> List[int]:
        """The indices dropped for ``reason``."""
        return [i for i in self if self.reasons[i] == reason]

    def name(self, i: int) -> str:
        return self._names[i] if self._names is not None else f"row {i}"

    def describe(self, limit: int = 5) -> str:
        """One line per reason: the count, why, and the first ``limit`` rows by name."""
        by_reason: Dict[str, List[str]] = {}
        for i in self:
            by_reason.setdefault(self.reasons[i], []).append(self.name(i))
        return describe_dropped(by_reason, limit=limit)


def tokenize_dataset(tokenizer, rows: Iterable[Mapping[str, Any]], *,
                     max_length: Optional[int] = None, add_eos: bool = True,
                     columns: Tuple[str, str, str] = ("prompt", "chosen", "rejected"),
                     batch_size: int = 1024, identical: str = "skip",
                     row_names: Optional[Sequence[str]] = None,
                     ) -> Tuple[List[PreferenceExample], DroppedRows]:
    """Tokenizes preference rows (mappings with prompt / chosen / rejected columns).

    String rows are tokenized in batches (same ids as one call per row);
    conversational rows one by one through the chat template.

    Args:
        tokenizer: a Hugging Face tokenizer.
        rows: iterable of mappings (dicts, dataset rows).
        max_length, add_eos: as in :func:`tokenize_preference`.
        columns: names of the prompt, chosen and rejected columns.
        batch_size: rows per tokenizer call.
        identical: what to do with a row whose chosen and rejected responses tokenize to the
            same ids (after truncation): ``"skip"`` it with a warning (default), raise an
            ``"error"``, or ``"keep"`` it (its DPO gradient is zero, but it still counts in
            a batch mean, as in TRL).
        row_names: how messages name row i (e.g. ``"line 7"`` of a file); default
            ``"row i"``.

    Returns:
        ``(examples, dropped)``: the examples of the kept rows in input order, and a
        :class:`DroppedRows` (a sorted list of the indices of the rows left out, with their
        reasons).

    Raises:
        ValueError naming the row and column for a row that is not a mapping, lacks a
        column, holds a value that is neither a string nor a list of messages, mixes kinds, or
        tokenizes to an empty prompt / response; and for identical responses if
        ``identical="error"``.
    """
    _check_max_length(max_length)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if identical not in IDENTICAL_POLICIES:
        raise ValueError(f"identical must be one of {IDENTICAL_POLICIES}, got {identical!r}")
    pcol, ccol, rcol = columns
    eos = _eos_token(tokenizer) if add_eos else None
    examples: List[Optional[PreferenceExample]] = []
    reasons: Dict[int, str] = {}
    pending: List[Tuple[int, str, str, str]] = []  # (row, prompt, prompt+chosen, prompt+rejected)

    def name(i: int) -> str:
        return row_names[i] if row_names is not None else f"row {i}"

    def finish(i: int, make) -> None:
        try:
            ex = make()
        except PromptTooLongError:
            reasons[i] = PROMPT_TOO_LONG
            return
        except ValueError as e:
            raise ValueError(f"{name(i)}: {e}") from e
        if identical != "keep" and ex.identical:
            reasons[i] = IDENTICAL
            return
        examples[i] = ex

    def flush() -> None:
        if not pending:
            return
        texts = [t for _, p, c, r in pending for t in (p, c, r)]
        ids = tokenizer(texts)["input_ids"]
        for j, (i, _, _, _) in enumerate(pending):
            p, pc, pr = ids[3 * j: 3 * j + 3]
            finish(i, lambda: _split_ids(list(p), list(pc), list(pr), max_length))
        pending.clear()

    for i, row in enumerate(rows):
        examples.append(None)
        if not isinstance(row, Mapping):
            raise ValueError(f"{name(i)}: expected a mapping with columns {list(columns)}, got "
                             f"{type(row).__name__}")
        missing = [c for c in columns if c not in row]
        if missing:
            raise ValueError(f"{name(i)}: missing column(s) {missing}; it has {sorted(row)}")
        vals = [row[c] for c in columns]
        for c, v in zip(columns, vals):
            if not (isinstance(v, str) or is_messages(v)):
                raise ValueError(f"{name(i)}, column {c!r}: expected a string or a list of "
                                 f"message dicts, got {type(v).__name__}")
        if all(isinstance(v, str) for v in vals):
            p, c, r = vals
            if eos is not None:
                c = c if c.endswith(eos) else c + eos
                r = r if r.endswith(eos) else r + eos
            pending.append((i, p, p + c, p + r))
            if len(pending) >= batch_size:
                flush()
        else:
            p, c, r = vals
            finish(i, lambda: tokenize_preference(tokenizer, p, c, r, max_length=max_length,
                                                  add_eos=add_eos))
    flush()
    dropped = DroppedRows(reasons, row_names)
    same = dropped.of(IDENTICAL)
    if same and identical == "error":
        raise ValueError(refusal(IDENTICAL, [name(i) for i in same]))
    if same:
        warnings.warn(DroppedRows({i: IDENTICAL for i in same}, row_names).describe(),
                      UserWarning, stacklevel=2)
    return [e for e in examples if e is not None], dropped
