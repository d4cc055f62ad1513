"""Streaming safetensors export and row-sliced loading, for models no process holds whole.

Under FSDP2 the trainer exports a ``from_pretrained``-loadable folder by gathering one tensor
at a time (a collective every process calls, in the same order) and letting the writing
process stream each into a size-capped shard right away (``write_sharded``); a model is loaded
by reading only the rows (dim 0) each process keeps (``SafetensorsSource.rows``).

The ``safetensors`` library writes a file only from a dict of whole tensors, so the writer
implements the format itself: an 8-byte little-endian unsigned header length N, N bytes of
UTF-8 JSON (``{"__metadata__": {"format": "pt"}, name: {"dtype", "shape",
"data_offsets": [begin, end]}, ...}``, padded with spaces so N is a multiple of 8), then the
tensors' raw little-endian row-major bytes, contiguous and without holes. Inside a shard the
tensors are laid out as ``safetensors.torch.save_file`` lays them out (larger element types
first, then by name), so every tensor starts at a multiple of its element size and a shard is
byte-identical to ``save_file(shard_dict, metadata={"format": "pt"})``; the tensors still
arrive in the caller's order and each is written at its offset.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import struct
import sys
from contextlib import ExitStack
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import BinaryIO, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from safetensors import safe_open

from .fileio import TMP_MARK, atomic_write, fsync_dir, json_bytes

#: The dtypes the writer and reader handle, with their header codes, in the order
#: safetensors lays a file out (its dtype enum, descending): larger elements first.
_LAYOUT_ORDER: Tuple[Tuple[torch.dtype, str], ...] = (
    (torch.int64, "I64"), (torch.float64, "F64"), (torch.float32, "F32"),
    (torch.int32, "I32"), (torch.bfloat16, "BF16"), (torch.float16, "F16"),
    (torch.int16, "I16"), (torch.int8, "I8"), (torch.uint8, "U8"), (torch.bool, "BOOL"),
)
_CODE = {dt: code for dt, code in _LAYOUT_ORDER}
_DTYPE = {code: dt for dt, code in _LAYOUT_ORDER}
_RANK = {dt: i for i, (dt, _) in enumerate(_LAYOUT_ORDER)}

#: The key safetensors reserves in the header for string metadata.
_METADATA_KEY = "__metadata__"
#: The metadata every shard carries (transformers refuses files without a known format).
_METADATA = {"format": "pt"}

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*")


def dtype_code(dtype: torch.dtype) -> str:
    """The safetensors header code of a torch dtype (``torch.bfloat16`` -> ``"BF16"``).

    Raises ValueError for a dtype other than float32 / bfloat16 / float16 / float64 / int64 /
    int32 / int16 / int8 / uint8 / bool."""
    try:
        return _CODE[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} is not supported; supported: "
                         f"{', '.join(str(dt) for dt, _ in _LAYOUT_ORDER)}") from None


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one tensor of a checkpoint (no data).

    ``shape`` is normalized to a tuple of ints (a ``torch.Size`` is accepted). Raises
    ValueError for an empty name or the reserved ``"__metadata__"``, a negative or non-integer
    dimension, or a dtype ``dtype_code`` does not handle."""

    name: str
    shape: Tuple[int, ...]
    dtype: torch.dtype

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name or self.name == _METADATA_KEY:
            raise ValueError(f"tensor name must be a non-empty string other than "
                             f"{_METADATA_KEY!r}; got {self.name!r}")
        try:
            shape = tuple(self.shape)
        except TypeError:
            shape = (None,)
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise ValueError(f"tensor {self.name!r}: shape must be non-negative ints; "
                             f"got {self.shape!r}")
        object.__setattr__(self, "shape", shape)
        try:
            dtype_code(self.dtype)
        except ValueError as e:
            raise ValueError(f"tensor {self.name!r}: {e}") from None

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor's data: prod(shape) * element size (0 for an empty tensor)."""
        return math.prod(self.shape) * self.dtype.itemsize


def parse_size(size: Union[int, str], what: str) -> int:
    """A byte count from an int >= 1 or a text such as ``'5GB'`` (5 * 10**9), ``'500MB'``,
    ``'100KB'``, ``'2GiB'`` (2 * 2**30), ``'1.5GB'``, ``'4096'`` (units B, KB, MB, GB, TB,
    KiB, MiB, GiB, TiB, any letter case; always bytes, never bits).

    Raises ValueError naming ``what`` (e.g. ``"TrainConfig.max_shard_size"``) for anything
    else: a bool, another type, an unknown unit, or a result that is not a whole number >= 1.
    """
    problem = (f"{what} must be a byte count >= 1 or a size such as '5GB', '500MB', '2GiB'; "
               f"got {size!r}")
    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise ValueError(problem)
    if isinstance(size, int):
        if size < 1:
            raise ValueError(problem)
        return size
    m = _SIZE_RE.fullmatch(size)
    if m is None or m.group(2).lower() not in _UNITS:
        raise ValueError(problem)
    value = Decimal(m.group(1)) * _UNITS[m.group(2).lower()]
    if value != value.to_integral_value() or value < 1:
        raise ValueError(problem)
    return int(value)


def plan_shards(specs: Sequence[TensorSpec], max_shard_bytes: int) -> List[List[TensorSpec]]:
    """The tensors cut into shards of consecutive runs, greedily in the given order: a new
    shard starts when adding a tensor would take the current one past ``max_shard_bytes``
    (tensor data only; the header is not counted); a tensor larger than the cap gets a shard
    of its own (as transformers does). No specs: no shards.

    Raises ValueError if ``max_shard_bytes`` is not an int >= 1."""
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) \
            or max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be an int >= 1; got {max_shard_bytes!r}")
    shards: List[List[TensorSpec]] = []
    current: List[TensorSpec] = []
    current_bytes = 0
    for spec in specs:
        if current and current_bytes + spec.nbytes > max_shard_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(spec)
        current_bytes += spec.nbytes
    if current:
        shards.append(current)
    return shards


def shard_file_names(n: int, prefix: str = "model") -> List[str]:
    """The names of ``n`` shard files: ``['model.safetensors']`` for one, else
    ``model-00001-of-0000n.safetensors`` ... (5 digits, as transformers names them).

    Raises ValueError if ``n < 1``."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of shards must be an int >= 1; got {n!r}")
    if n == 1:
        return [f"{prefix}.safetensors"]
    return [f"{prefix}-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def _index_name(prefix: str) -> str:
    return f"{prefix}.safetensors.index.json"


def _tmp_path(final: Path) -> Path:
    return final.with_name(f".{final.name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")


def _header(layout: Sequence[Tuple[TensorSpec, int, int]]) -> bytes:
    """The length-prefixed, space-padded JSON header of a shard whose tensors have the given
    (begin, end) data offsets, listed in offset order."""
    entries: Dict[str, object] = {_METADATA_KEY: _METADATA}
    for spec, begin, end in layout:
        entries[spec.name] = {"dtype": dtype_code(spec.dtype), "shape": list(spec.shape),
                              "data_offsets": [begin, end]}
    text = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def _raw_bytes(tensor: torch.Tensor):
    """The tensor's data as a flat uint8 CPU array, row-major, little-endian.

    Raises RuntimeError on a big-endian host (the bytes would need swapping)."""
    if sys.byteorder != "little":
        raise RuntimeError("writing safetensors on a big-endian host is not supported")
    flat = tensor.detach().to("cpu").reshape(-1)
    return flat.view(torch.uint8).numpy()


class _ShardFile:
    """One shard being written under a temporary name: header first, then each tensor at its
    offset as it arrives."""

    def __init__(self, final: Path, specs: Sequence[TensorSpec]):
        layout, offset = [], 0
        for spec in sorted(specs, key=lambda s: (_RANK[s.dtype], s.name)):
            layout.append((spec, offset, offset + spec.nbytes))
            offset += spec.nbytes
        header = _header(layout)
        self.final = final
        self.tmp = _tmp_path(final)
        self._start = {spec.name: len(header) + begin for spec, begin, _ in layout}
        self._file: Optional[BinaryIO] = open(self.tmp, "wb")
        try:
            self._file.write(header)
        except BaseException:
            self.discard()
            raise

    def put(self, spec: TensorSpec, tensor: Optional[torch.Tensor]) -> None:
        """Writes ``tensor`` (shape and dtype of ``spec``) at its offset; ValueError naming
        the tensor otherwise."""
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"tensor {spec.name!r}: produce returned {type(tensor).__name__}, "
                             f"not a tensor")
        if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise ValueError(f"tensor {spec.name!r}: expected shape {list(spec.shape)} dtype "
                             f"{spec.dtype}, got shape {list(tensor.shape)} dtype "
                             f"{tensor.dtype}")
        self._file.seek(self._start[spec.name])
        self._file.write(_raw_bytes(tensor))

    def finish(self) -> None:
        """Flushes and fsyncs the complete file (still under its temporary name)."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None

    def discard(self) -> None:
        """Closes and removes the temporary file."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self.tmp.unlink(missing_ok=True)


def _remove_stale(out_dir: Path, names: Sequence[str], prefix: str) -> None:
    """Removes the weight files of an earlier export with this prefix that the new one does
    not overwrite (an old index, a single file or shards of another count), so the folder
    never mixes two exports."""
    shard_re = re.compile(re.escape(prefix) + r"-\d{5}-of-\d{5}\.safetensors")
    keep = set(names)
    single = f"{prefix}.safetensors"
    for path in out_dir.iterdir():
        stale = path.name == _index_name(prefix) or (
            path.name not in keep and (path.name == single or shard_re.fullmatch(path.name)))
        if stale and path.is_file():
            path.unlink()
    fsync_dir(out_dir)


class _Writer:
    """The writing side of ``write_sharded``. ``put`` never raises: the first failure is kept
    (and later tensors are dropped unwritten) so the caller keeps calling ``produce``;
    ``commit`` raises it, or moves the complete shards to their final names."""

    def __init__(self, out_dir: Path, plan: List[List[TensorSpec]], names: List[str],
                 prefix: str):
        self.out_dir, self.plan, self.names, self.prefix = out_dir, plan, names, prefix
        self.error: Optional[Exception] = None
        self.shards: List[_ShardFile] = []
        self._place = {spec.name: (i, j) for i, shard in enumerate(plan)
                       for j, spec in enumerate(shard)}

    def put(self, spec: TensorSpec, tensor: Optional[torch.Tensor]) -> None:
        if self.error is not None:
            return
        i, j = self._place[spec.name]
        try:
            if j == 0:
                self.out_dir.mkdir(parents=True, exist_ok=True)
                self.shards.append(_ShardFile(self.out_dir / self.names[i], self.plan[i]))
            self.shards[i].put(spec, tensor)
            if j == len(self.plan[i]) - 1:
                self.shards[i].finish()
        except Exception as e:
            self.error = e

    def commit(self) -> None:
        if self.error is not None:
            raise self.error
        _remove_stale(self.out_dir, self.names, self.prefix)
        moved = []
        try:
            for shard in self.shards:
                os.replace(shard.tmp, shard.final)
                moved.append(shard.final)
            fsync_dir(self.out_dir)
            if len(self.names) > 1:
                weight_map = {spec.name: name for shard, name in zip(self.plan, self.names)
                              for spec in shard}
                total = sum(spec.nbytes for shard in self.plan for spec in shard)
                index = {"metadata": {"total_size": total}, "weight_map": weight_map}
                atomic_write(self.out_dir / _index_name(self.prefix), json_bytes(index))
        except BaseException:
            for path in moved:
                path.unlink(missing_ok=True)
            raise

    def abort(self) -> None:
        """Removes every temporary file."""
        for shard in self.shards:
            shard.discard()


def write_sharded(out_dir: Path, specs: Sequence[TensorSpec],
                  produce: Callable[[TensorSpec], Optional[torch.Tensor]], *,
                  max_shard_bytes: int, write: bool, prefix: str = "model") -> List[str]:
    """Streams the tensors described by ``specs`` into size-capped safetensors shards.

    Calls ``produce(spec)`` once for every spec, in order, on every process (it may run a
    collective), and drops each result before the next call, so at most one produced tensor
    is alive at a time. Where ``write`` is True each returned tensor (shape and dtype equal to
    the spec's; any device; non-contiguous allowed) is written into its shard right away.
    Shards follow ``plan_shards(specs, max_shard_bytes)`` and ``shard_file_names``; each is
    written under a temporary name in ``out_dir`` (created if missing) and fsynced; once all
    are complete, weight files of an earlier export with this prefix that would mix with the
    new ones are removed, the shards renamed to their final names, and with more than one
    shard ``<prefix>.safetensors.index.json`` (``{"metadata": {"total_size": <bytes of all
    tensors>}, "weight_map": {name: file}}``) is written atomically, last. Where ``write`` is
    False nothing is written and the results of ``produce`` are ignored.

    Returns the shard file names (the same on every process).

    Raises ValueError (before any ``produce`` call, on every process alike) for no specs,
    duplicate names or a bad ``max_shard_bytes``. A returned tensor of the wrong shape or
    dtype (ValueError naming it) or a failed write (OSError) stops the writing, but
    ``produce`` is still called for the remaining specs, so the other processes' collectives
    are matched; then that error is raised. An exception from ``produce`` itself propagates at
    once. On any exception no new file is left under a final name (temporary files are
    removed).
    """
    if not specs:
        raise ValueError("write_sharded: no tensors to write")
    seen = set()
    for spec in specs:
        if spec.name in seen:
            raise ValueError(f"write_sharded: tensor name {spec.name!r} appears twice")
        seen.add(spec.name)
    plan = plan_shards(specs, max_shard_bytes)
    names = shard_file_names(len(plan), prefix)
    writer = _Writer(Path(out_dir), plan, names, prefix) if write else None
    try:
        for spec in specs:
            tensor = produce(spec)
            if writer is not None:
                writer.put(spec, tensor)
            del tensor
        if writer is not None:
            writer.commit()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return names


def _data_offsets(path: Path) -> Dict[str, int]:
    """Tensor name -> byte offset of its data in the safetensors file ``path``."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {name: 8 + n + int(v["data_offsets"][0]) for name, v in header.items()
            if name != "__metadata__"}


class SafetensorsSource:
    """The tensors of a model folder: ``model.safetensors``, or else the files named by
    ``model.safetensors.index.json`` (the precedence transformers uses); a context manager
    keeping the files open (``safe_open``, framework ``"pt"``, CPU) until ``close``.

    Raises FileNotFoundError naming the folder if it does not exist, has no safetensors
    weights, or its index names a missing file; ValueError naming the file if the index is
    not a JSON object with a non-empty ``weight_map`` of plain file names, a file is not readable
    safetensors, a tensor appears in two files, an index entry is not in the file it names,
    or a tensor has a dtype ``dtype_code`` does not handle."""

    SINGLE = "model.safetensors"
    INDEX = _index_name("model")

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"model folder {self.folder} does not exist")
        weight_map = None
        if (self.folder / self.SINGLE).is_file():
            files = [self.SINGLE]
        elif (self.folder / self.INDEX).is_file():
            weight_map = self._read_index(self.folder / self.INDEX)
            files = sorted(set(weight_map.values()))
        else:
            raise FileNotFoundError(f"model folder {self.folder} has no safetensors weights "
                                    f"(neither {self.SINGLE} nor {self.INDEX})")
        self._stack: Optional[ExitStack] = ExitStack()
        try:
            self._handle = {}
            for file in files:
                path = self.folder / file
                if not path.is_file():
                    raise FileNotFoundError(f"{self.folder / self.INDEX} names {file}, which "
                                            f"is not in {self.folder}")
                try:
                    handle = self._stack.enter_context(
                        safe_open(str(path), framework="pt", device="cpu"))
                except Exception as e:
                    raise ValueError(f"{path} is not a readable safetensors file: {e}") from e
                for name in handle.keys():
                    if name in self._handle:
                        raise ValueError(f"tensor {name!r} is in two files of {self.folder}")
                    self._handle[name] = (handle, path)
            for name, file in (weight_map or {}).items():
                if name not in self._handle or self._handle[name][1].name != file:
                    raise ValueError(f"{self.folder / self.INDEX} puts tensor {name!r} in "
                                     f"{file}, which does not hold it")
            self._specs = {name: self._read_spec(name) for name in self._handle}
            self._offsets = {}
            for path in {path for _, path in self._handle.values()}:
                self._offsets.update({name: (path, begin)
                                      for name, begin in _data_offsets(path).items()})
        except BaseException:
            self.close()
            raise

    @classmethod
    def available(cls, folder: Path) -> bool:
        """True if ``folder`` has ``model.safetensors`` or ``model.safetensors.index.json``."""
        folder = Path(folder)
        return (folder / cls.SINGLE).is_file() or (folder / cls.INDEX).is_file()

    @staticmethod
    def _read_index(path: Path) -> Dict[str, str]:
        try:
            index = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} is not a UTF-8 JSON file: {e}") from e
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise ValueError(f"{path} has no weight_map of tensor names to file names")
        for file in weight_map.values():
            if Path(file).name != file or file in ("", ".", ".."):
                raise ValueError(f"{path} names {file!r}, which is not a plain file name")
        return weight_map

    def _read_spec(self, name: str) -> TensorSpec:
        handle, path = self._handle[name]
        piece = handle.get_slice(name)
        code = piece.get_dtype()
        if code not in _DTYPE:
            raise ValueError(f"{path}: tensor {name!r} has dtype {code}, which is not "
                             f"supported; supported: {', '.join(_DTYPE)}")
        return TensorSpec(name, tuple(piece.get_shape()), _DTYPE[code])

    def _open_handle(self, name: str):
        if self._stack is None:
            raise ValueError(f"the SafetensorsSource of {self.folder} is closed")
        if name not in self._handle:
            raise KeyError(f"tensor {name!r} is not in {self.folder}")
        return self._handle[name][0]

    def names(self) -> List[str]:
        """Every tensor name in the folder, sorted."""
        return sorted(self._specs)

    def spec(self, name: str) -> TensorSpec:
        """Name, shape and dtype of tensor ``name``; KeyError naming it and the folder if the
        folder does not hold it."""
        if name not in self._specs:
            raise KeyError(f"tensor {name!r} is not in {self.folder}")
        return self._specs[name]

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """``tensor[start:stop]`` along dim 0 (shape ``[max(0, min(stop, n) - start), *rest]``
        for a tensor of shape ``[n, *rest]``: a range past the end is clipped, as in slicing),
        read with plain file reads of only those bytes straight into a new tensor (no
        memory map: pages of a mapped file would count in the process's RSS while mapped).
        For a 0-d tensor ``start`` and ``stop`` are ignored and the whole tensor (shape
        ``[]``) is returned. A contiguous CPU tensor owning its memory.

        Raises KeyError naming the tensor and the folder if the folder does not hold it,
        ValueError if ``start`` / ``stop`` are not ints with ``0 <= start <= stop`` or the
        source is closed."""
        self._open_handle(name)
        spec = self._specs[name]
        shape = spec.shape
        if shape and (not all(isinstance(i, int) and not isinstance(i, bool)
                              for i in (start, stop)) or not 0 <= start <= stop):
            raise ValueError(f"tensor {name!r}: rows need ints 0 <= start <= stop; got "
                             f"start={start!r}, stop={stop!r}")
        if shape:
            start, stop = min(start, shape[0]), min(stop, shape[0])
            out = torch.empty((stop - start, *shape[1:]), dtype=spec.dtype)
        else:
            start, stop = 0, 1
            out = torch.empty((), dtype=spec.dtype)
        row = out.element_size() * math.prod(shape[1:])
        path, begin = self._offsets[name]
        if out.numel():
            buf = memoryview(out.reshape(-1).view(torch.uint8).numpy()).cast("B")
            with open(path, "rb", buffering=0) as f:
                f.seek(begin + start * row)
                got = 0
                while got < len(buf):
                    n = f.readinto(buf[got:])
                    if not n:
                        raise ValueError(f"{path}: tensor {name!r} ends early")
                    got += n
        return out

    def close(self) -> None:
        """Closes the files (again: no effect)."""
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    def __enter__(self) -> "SafetensorsSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
