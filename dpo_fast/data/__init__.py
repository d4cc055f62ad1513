"""Preference data: from a source (file, ``datasets`` object, list of rows) to tokenized
examples, for the trainer and ``dpo-fast precompute`` alike.

Modules (data flows down this list):

- :mod:`.read` -- the one reader (:func:`read_source`): files, ``datasets`` objects and names,
  bundled data; UTF-8 handling; row names such as ``"train.jsonl line 7"``;
- :mod:`.checks` -- row checks, implicit prompt, the one table of reasons a row is left out
  (:data:`REASONS`), the bad-row policy;
- :mod:`.tokenization` -- TRL-style tokenization (:func:`tokenize_preference`,
  :func:`tokenize_dataset`, :class:`DroppedRows`);
- :mod:`.pipeline` -- :func:`prepare`: rows -> checked, tokenized :class:`PreparedData`
  (tokenization cached on disk), the held-out split;
- :mod:`.examples` -- :class:`PreferenceExample` and its content key, :func:`pack_pair_batch`.
"""

from .checks import REASONS, DataError, check_rows, extract_prompt, is_messages
from .examples import KEY_BYTES, KEY_VERSION, PairBatch, PreferenceExample, pack_pair_batch
from .pipeline import PreparedData, count_reasons, prepare, split_eval, tokenize_rows
from .read import BUNDLED_DATA, DATA_SUFFIXES, read_rows, read_source
from .tokenization import DroppedRows, PromptTooLongError, tokenize_dataset, tokenize_preference

__all__ = [
    "KEY_BYTES",
    "KEY_VERSION",
    "PreferenceExample",
    "PairBatch",
    "pack_pair_batch",
    "PromptTooLongError",
    "DroppedRows",
    "tokenize_preference",
    "tokenize_dataset",
    "REASONS",
    "DataError",
    "is_messages",
    "extract_prompt",
    "check_rows",
    "BUNDLED_DATA",
    "DATA_SUFFIXES",
    "read_source",
    "read_rows",
    "PreparedData",
    "prepare",
    "tokenize_rows",
    "split_eval",
    "count_reasons",
]
