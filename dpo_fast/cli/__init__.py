"""Command line: ``dpo-fast <command>`` (console entry point) or ``python -m dpo_fast``.

Commands (one module each, with its own parser):
    train        train a model with DPO from a config (:mod:`.train`; no arguments: the
                 demo run), then print the end-of-run report
    eval         held-out DPO loss, reward accuracy and margin of a model (:mod:`.evaluate`)
    info         versions, available backends (and why not), the machine (:mod:`.info`)
    precompute   compute the reference log-probs of a preference data set into a cache
                 directory (:class:`dpo_fast.RefLogProbCache`); re-running resumes an
                 interrupted run and adds only rows the cache lacks (:mod:`.precompute`)

Example::

    dpo-fast precompute --model ./SmolLM2-135M-Instruct --data pairs.jsonl --out ref_cache \\
        --max-length 512 --batch-tokens 16384

``--model`` is a Hugging Face model folder (``config.json`` + weights + tokenizer), a
``.gguf`` file (or a folder holding exactly one), or a hub id already in the local Hugging Face
cache (or downloadable, when the hub is reachable) (:func:`dpo_fast.models.locate_model`).
``--data`` is anything the trainer reads (:func:`dpo_fast.data.read_source`: JSONL, JSON, CSV,
Parquet, a saved ``datasets`` folder, a ``datasets`` name) with ``prompt`` / ``chosen`` /
``rejected`` columns (strings or conversational message lists; without ``prompt``, the shared
prefix of chosen and rejected), tokenized as TRL 1.16 does (:mod:`dpo_fast.data`). Progress
goes to stderr: a bar refreshed at most 10 times a second on a terminal (a line every 10 s
otherwise), then one summary line.

Failures print one message naming the argument, file or row and exit non-zero (1: the run
failed; 2: bad command line; 130: interrupted), with no traceback unless ``--debug``
(:mod:`.errors`). Checks that need no model (paths, data, the cache directory, its lock) run
before the model loads.
"""

from ..progress import ProgressBar
from .errors import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_USAGE, CliError, error_message
from .main import COMMANDS, main

__all__ = ["main", "COMMANDS", "CliError", "error_message", "EXIT_ERROR", "EXIT_USAGE",
           "EXIT_INTERRUPTED", "ProgressBar"]
