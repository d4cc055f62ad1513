"""Row checks: what makes a preference row usable, the one table of reasons a row is left out,
the bad-row policy, and the texts that name left-out rows.

Row formats (TRL's):

- standard: ``prompt``, ``chosen``, ``rejected`` strings;
- conversational: lists of ``{"role", "content"}`` messages (:func:`is_messages`), rendered
  with the tokenizer's chat template;
- implicit prompt: only ``chosen`` / ``rejected`` (strings or conversations) sharing a prefix,
  which becomes the prompt (:func:`extract_prompt`, TRL's ``extract_prompt``).

A row fails a check for one of the :data:`REASONS`; the policy (``bad_rows``) says per
reason whether it stops the run (``"error"``, :class:`DataError` naming the row and the field)
or is left out and counted (``"skip"``); ``"identical"`` may also be ``"keep"``.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Sequence, Tuple, Union

#: Why a row was left out: reason code -> text. The codes are stable (the tokenized-data
#: cache stores them by their sorted position); the order is the order rows are described.
REASONS = {
    "not_a_mapping": "not a mapping of columns",
    "missing_field": "a field is missing",
    "bad_type": "a field is neither a string nor a list of messages",
    "empty": "an empty prompt or response",
    "undecodable": "text that is not valid UTF-8",
    "no_prompt": "implicit prompt: chosen and rejected share no prefix",
    "prompt_too_long": "the prompt alone reaches max_length",
    "too_long": "prompt + response over max_length (truncation_mode='drop')",
    "identical": "chosen == rejected after tokenization (no preference to learn)",
    "tokenizer_error": "the tokenizer refused the row",
}
#: Reasons found by :func:`check_rows` (before tokenization).
CHECK_REASONS = ("not_a_mapping", "missing_field", "bad_type", "empty", "undecodable",
                 "no_prompt")
BAD_ROW_POLICIES = ("skip", "error")
IDENTICAL_POLICIES = ("skip", "error", "keep")
#: ``bad_rows``: one policy for every reason, or reason -> policy (reasons not named: "error").
RowPolicy = Union[str, Mapping[str, str]]


class DataError(ValueError):
    """Bad training data: the message names the source, the row and the field."""


def check_policy(bad_rows: RowPolicy) -> None:
    """ValueError for a policy that is not "skip" / "error" (per reason, or for all)."""
    if isinstance(bad_rows, str):
        if bad_rows not in BAD_ROW_POLICIES:
            raise ValueError(f"bad_rows must be one of {BAD_ROW_POLICIES}, got {bad_rows!r}")
        return
    for reason, policy in bad_rows.items():
        allowed = IDENTICAL_POLICIES if reason == "identical" else BAD_ROW_POLICIES
        if reason not in REASONS or policy not in allowed:
            raise ValueError(f"bad_rows[{reason!r}] = {policy!r}: the reasons are "
                             f"{list(REASONS)}, the policies {allowed}")


def policy_for(bad_rows: RowPolicy, reason: str) -> str:
    """The policy of ``reason`` under ``bad_rows``."""
    return bad_rows if isinstance(bad_rows, str) else bad_rows.get(reason, "error")


def is_messages(v: Any) -> bool:
    """Whether ``v`` is a conversation: a list (or tuple) of mappings with ``role`` and
    ``content``."""
    return isinstance(v, (list, tuple)) and all(
        isinstance(m, Mapping) and "role" in m and "content" in m for m in v)


def _undecodable(v: Any) -> bool:
    texts = [v] if isinstance(v, str) else [m.get("content") for m in v] if is_messages(v) \
        else []
    for t in texts:
        if isinstance(t, str):
            try:
                t.encode("utf-8")
            except UnicodeEncodeError:
                return True
    return False


def _empty(v: Any) -> bool:
    if isinstance(v, str):
        return not v.strip()
    return len(v) == 0 or all(not str(m.get("content") or "").strip() for m in v)


def extract_prompt(chosen, rejected) -> Tuple[Any, Any, Any]:
    """TRL's implicit prompt: the longest shared prefix of ``chosen`` and ``rejected``
    (characters of strings, messages of conversations) becomes the prompt; a string prompt
    gives its trailing space to the responses."""
    n = min(len(chosen), len(rejected))
    idx = n
    for i in range(n):
        if chosen[i] != rejected[i]:
            idx = i
            if isinstance(chosen, str) and i > 0 and chosen[i - 1] == " ":
                idx -= 1
            break
    return chosen[:idx], chosen[idx:], rejected[idx:]


def check_rows(rows: Sequence[Any], names: Sequence[str], columns: Tuple[str, str, str],
               implicit: bool) -> Tuple[List[Tuple[int, Dict[str, Any]]], Dict[str, List[int]],
                                        Dict[int, str]]:
    """Checks each row; returns ``(good, bad, why)``: good = [(row index, {"prompt", "chosen",
    "rejected"})], bad = reason -> row indices, why = row index -> a message naming the field."""
    pcol, ccol, rcol = columns
    good: List[Tuple[int, Dict[str, Any]]] = []
    bad: Dict[str, List[int]] = {}
    why: Dict[int, str] = {}

    def reject(i: int, reason: str, msg: str) -> None:
        bad.setdefault(reason, []).append(i)
        why[i] = f"{names[i]}: {msg}"

    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            reject(i, "not_a_mapping", f"expected a mapping with columns "
                   f"{[ccol, rcol] if implicit else list(columns)}, got {type(row).__name__}")
            continue
        cols = (ccol, rcol) if implicit else columns
        missing = [c for c in cols if c not in row or row[c] is None]
        if missing:
            reject(i, "missing_field", f"field {missing[0]!r} is missing (the row has "
                   f"{sorted(k for k, v in row.items() if v is not None)})")
            continue
        vals = {c: row[c] for c in cols}
        wrong = [c for c, v in vals.items() if not (isinstance(v, str) or is_messages(v))]
        if wrong:
            reject(i, "bad_type", f"field {wrong[0]!r} must be a string or a list of "
                   f"{{'role', 'content'}} messages, got {type(vals[wrong[0]]).__name__}")
            continue
        kinds = {c: isinstance(v, str) for c, v in vals.items()}
        if len(set(kinds.values())) != 1:
            reject(i, "bad_type", "fields mix strings and message lists: "
                   + ", ".join(f"{c} is {'a string' if s else 'messages'}"
                               for c, s in kinds.items()))
            continue
        undec = [c for c, v in vals.items() if _undecodable(v)]
        if undec:
            reject(i, "undecodable", f"field {undec[0]!r} holds text that cannot be encoded as "
                   "UTF-8 (a lone surrogate: the source was decoded wrongly)")
            continue
        if implicit:
            p, c, r = extract_prompt(vals[ccol], vals[rcol])
            if len(p) == 0:
                reject(i, "no_prompt", f"no {pcol!r} field and {ccol!r} / {rcol!r} share no "
                       "prefix to use as the prompt")
                continue
        else:
            p, c, r = vals[pcol], vals[ccol], vals[rcol]
        empty = [n for n, v in ((pcol, p), (ccol, c), (rcol, r)) if _empty(v)]
        if empty:
            reject(i, "empty", f"field {empty[0]!r} is empty")
            continue
        good.append((i, {"prompt": p, "chosen": c, "rejected": r}))
    return good, bad, why


# ------------------------------------------------------------------------------ texts


def _listing(names: Sequence[str], count: int, limit: int) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({count - limit} more)" if count > limit else "")


def describe_dropped(rows_by_reason: Mapping[str, Sequence[str]],
                     counts: Mapping[str, int] = None, limit: int = 5,
                     verb: str = "dropped") -> str:
    """One line per reason (in :data:`REASONS` order): the count, ``verb`` ("dropped" by the
    tokenizer, "skipped" by a run's bad-row policy), why, and the first ``limit`` row names.
    ``counts`` (default: the number of names) may exceed the names given (a capped list)."""
    lines = []
    for reason, text in REASONS.items():
        names = list(rows_by_reason.get(reason, ()))
        n = counts.get(reason, 0) if counts is not None else len(names)
        if n:
            lines.append(f"{n} row(s) {verb}, {text}: {_listing(names, n, limit)}")
    return "\n".join(lines)


def refusal(reason: str, names: Sequence[str], hint: str = "") -> str:
    """The message that stops a run for rows failing ``reason`` at tokenization (``names``:
    those rows, in order): identical pairs are listed (they tend to come many at a time),
    other reasons name the first row."""
    if reason == "identical":
        return (f"{len(names)} row(s) have chosen == rejected after tokenization: "
                + ", ".join(names[:5]) + (", ..." if len(names) > 5 else "") + hint)
    return f"{names[0]}: {REASONS[reason]}{hint}"
