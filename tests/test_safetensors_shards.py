"""dpo_fast.safetensors_shards: the streaming sharded safetensors writer and the row reader.

Oracles: safetensors' own ``load_file`` / ``save_file`` / ``safe_open`` (every written file is
read back by them and compared with ``torch.equal``; shards are byte-compared with
``save_file`` of the same tensors) and transformers' ``from_pretrained`` for whole models.
The reader is checked on folders written by ``save_file`` and a hand-written index, so it is
not only tested against this module's own writer.
"""

from __future__ import annotations

import json
import os
import weakref
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dpo_fast.safetensors_shards import (
    SafetensorsSource,
    TensorSpec,
    dtype_code,
    parse_size,
    plan_shards,
    shard_file_names,
    write_sharded,
)
from tiny import tiny_model

INDEX = "model.safetensors.index.json"


def random_tensors(seed=0):
    """Tensors of every supported dtype, a 0-d one, empty ones and non-contiguous ones."""
    g = torch.Generator().manual_seed(seed)
    t = {
        "f32": torch.randn(6, 5, generator=g),
        "bf16": torch.randn(7, 3, generator=g).to(torch.bfloat16),
        "f16": torch.randn(9, generator=g).to(torch.float16),
        "f64": torch.randn(2, 3, 2, generator=g, dtype=torch.float64),
        "i64": torch.randint(-2**40, 2**40, (5,), generator=g, dtype=torch.int64),
        "i32": torch.randint(-2**30, 2**30, (3, 3), generator=g, dtype=torch.int32),
        "i16": torch.randint(-2**15, 2**15, (11,), generator=g, dtype=torch.int16),
        "i8": torch.randint(-128, 128, (13,), generator=g, dtype=torch.int8),
        "u8": torch.randint(0, 256, (4, 3), generator=g, dtype=torch.uint8),
        "bool": torch.randint(0, 2, (10,), generator=g).bool(),
        "scalar": torch.randn((), generator=g),
        "scalar_bf16": torch.randn((), generator=g).to(torch.bfloat16),
        "empty": torch.zeros(0, 4),
        "empty_i32": torch.zeros(3, 0, dtype=torch.int32),
        "transposed": torch.randn(5, 8, generator=g).t(),
        "strided_bf16": torch.randn(6, 10, generator=g).to(torch.bfloat16)[:, ::3],
        "layer.0.weight": torch.randn(4, 4, generator=g),
    }
    assert not t["transposed"].is_contiguous() and not t["strided_bf16"].is_contiguous()
    return t


def specs_of(tensors):
    return [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]


def nbytes(t):
    return t.numel() * t.element_size()


def assert_same(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def load_folder(folder):
    """Every tensor of a written folder through safetensors.torch.load_file, with the file
    that holds it."""
    out, where = {}, {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        for k, v in load_file(path).items():
            assert k not in out
            out[k], where[k] = v, path.name
    return out, where


def test_round_trip_several_shards(tmp_path):
    tensors = random_tensors()
    specs = specs_of(tensors)
    cap = 64
    calls = []

    def produce(spec):
        calls.append(spec.name)
        return tensors[spec.name]

    names = write_sharded(tmp_path, specs, produce, max_shard_bytes=cap, write=True)
    assert calls == list(tensors)
    n = len(names)
    assert n > 3
    assert names == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert sorted(os.listdir(tmp_path)) == sorted(names + [INDEX])

    loaded, where = load_folder(tmp_path)
    assert set(loaded) == set(tensors)
    for k, v in tensors.items():
        assert_same(loaded[k], v)
    index = json.loads((tmp_path / INDEX).read_text())
    assert index["weight_map"] == where
    assert index["metadata"]["total_size"] == sum(nbytes(v) for v in tensors.values())

    # shards are runs of the input order, each within the cap unless it holds one tensor
    order = [k for name in names for k in tensors if where[k] == name]
    assert order == list(tensors)
    for name in names:
        held = [k for k in tensors if where[k] == name]
        assert held
        assert sum(nbytes(tensors[k]) for k in held) <= cap or len(held) == 1
        with safe_open(tmp_path / name, framework="pt") as f:
            assert f.metadata() == {"format": "pt"}


def test_shards_byte_identical_to_save_file(tmp_path):
    """Each shard is the file safetensors itself writes for the same tensors."""
    tensors = random_tensors(seed=1)
    out = tmp_path / "out"
    names = write_sharded(out, specs_of(tensors), lambda s: tensors[s.name],
                          max_shard_bytes=100, write=True)
    assert len(names) > 1
    weight_map = json.loads((out / INDEX).read_text())["weight_map"]
    for name in names:
        ref = tmp_path / f"ref-{name}"
        save_file({k: v.contiguous() for k, v in tensors.items() if weight_map[k] == name},
                  ref, metadata={"format": "pt"})
        assert (out / name).read_bytes() == ref.read_bytes(), name

    single = tmp_path / "single"
    assert write_sharded(single, specs_of(tensors), lambda s: tensors[s.name],
                         max_shard_bytes=10**12, write=True) == ["model.safetensors"]
    assert os.listdir(single) == ["model.safetensors"]
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "ref.safetensors",
              metadata={"format": "pt"})
    assert (single / "model.safetensors").read_bytes() == \
        (tmp_path / "ref.safetensors").read_bytes()
    for k, v in load_file(single / "model.safetensors").items():
        assert_same(v, tensors[k])


def test_one_file_with_a_huge_cap(tmp_path):
    tensors = random_tensors(seed=2)
    param = torch.nn.Parameter(torch.randn(3, 2))  # requires grad: written all the same
    tensors["param"] = param
    names = write_sharded(tmp_path, specs_of(tensors), lambda s: tensors[s.name],
                          max_shard_bytes=parse_size("5GB", "cap"), write=True)
    assert names == ["model.safetensors"] and os.listdir(tmp_path) == names
    loaded = load_file(tmp_path / "model.safetensors")
    assert set(loaded) == set(tensors)
    for k, v in tensors.items():
        assert_same(loaded[k], v.detach())


@pytest.mark.parametrize("cap", [1, 64, 10**9])
def test_write_false_calls_produce_once_in_order_and_writes_nothing(tmp_path, cap):
    tensors = random_tensors()
    calls = []

    def produce(spec):
        calls.append(spec)
        return None

    out = tmp_path / "never"
    names = write_sharded(out, specs_of(tensors), produce, max_shard_bytes=cap, write=False)
    assert calls == specs_of(tensors)
    assert not out.exists()
    written = write_sharded(tmp_path / "w", specs_of(tensors), lambda s: tensors[s.name],
                            max_shard_bytes=cap, write=True)
    assert names == written


@pytest.mark.parametrize("write", [True, False])
def test_one_produced_tensor_alive_at_a_time(tmp_path, write):
    """Each result of produce is dropped before the next call (a weak reference to it dies)."""
    specs = [TensorSpec(f"w{i}", (64, 16), torch.float32) for i in range(8)]
    last = []

    def produce(spec):
        if last:
            assert last[-1]() is None, "the previous tensor is still alive"
        t = torch.randn(64, 16)
        last.append(weakref.ref(t))
        return t

    write_sharded(tmp_path, specs, produce, max_shard_bytes=10000, write=write)
    assert len(last) == len(specs) and last[-1]() is None


@pytest.mark.parametrize("bad", ["shape", "dtype", "none", "transposed"])
def test_wrong_tensor_raises_naming_it_and_leaves_no_file(tmp_path, bad):
    tensors = random_tensors()
    victim = list(tensors)[6]
    calls = []

    def produce(spec):
        calls.append(spec.name)
        t = tensors[spec.name]
        if spec.name != victim:
            return t
        return {"shape": t[:-1], "dtype": t.to(torch.float32), "none": None,
                "transposed": t.reshape(-1, 1)}[bad]

    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=victim):
        write_sharded(tmp_path, specs_of(tensors), produce, max_shard_bytes=64, write=True)
    # produce was still called for every spec (the other processes' collectives match)
    assert calls == list(tensors)
    assert os.listdir(tmp_path) == ["config.json"]


def test_exception_from_produce_propagates_and_leaves_no_file(tmp_path):
    tensors = random_tensors()
    calls = []

    def produce(spec):
        calls.append(spec.name)
        if len(calls) == 9:
            raise RuntimeError("collective failed")
        return tensors[spec.name]

    with pytest.raises(RuntimeError, match="collective failed"):
        write_sharded(tmp_path, specs_of(tensors), produce, max_shard_bytes=64, write=True)
    assert len(calls) == 9
    assert os.listdir(tmp_path) == []


def test_bad_arguments_raise_before_produce(tmp_path):
    def produce(spec):
        raise AssertionError("produce must not be called")

    a = TensorSpec("a", (2,), torch.float32)
    with pytest.raises(ValueError, match="'a'"):
        write_sharded(tmp_path, [a, TensorSpec("b", (1,), torch.int8), a], produce,
                      max_shard_bytes=10, write=True)
    with pytest.raises(ValueError, match="no tensors"):
        write_sharded(tmp_path, [], produce, max_shard_bytes=10, write=True)
    with pytest.raises(ValueError, match="max_shard_bytes"):
        write_sharded(tmp_path, [a], produce, max_shard_bytes=0, write=True)
    assert os.listdir(tmp_path) == []


def test_tensor_spec_checks_and_nbytes():
    assert TensorSpec("x", torch.Size([3, 4]), torch.bfloat16).shape == (3, 4)
    for shape, dtype in [((3, 4), torch.bfloat16), ((), torch.float64), ((0, 7), torch.int32),
                         ((5,), torch.bool)]:
        assert TensorSpec("x", shape, dtype).nbytes == nbytes(torch.empty(shape, dtype=dtype))
    for name, shape, dtype in [("", (1,), torch.float32), ("__metadata__", (1,), torch.float32),
                               ("x", (-1,), torch.float32), ("x", (1.5,), torch.float32),
                               ("x", (1,), torch.complex64), ("x", 3, torch.float32)]:
        with pytest.raises(ValueError):
            TensorSpec(name, shape, dtype)
    assert [dtype_code(t.dtype) for t in random_tensors().values()][:10] == \
        ["F32", "BF16", "F16", "F64", "I64", "I32", "I16", "I8", "U8", "BOOL"]
    with pytest.raises(ValueError, match="uint16"):
        dtype_code(torch.uint16)


def test_rewrite_in_the_same_folder_leaves_one_export(tmp_path):
    """An export over an earlier one removes the earlier weight files that would mix in."""
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "other.safetensors").write_bytes(b"kept")
    kept = {"config.json", "other.safetensors"}
    for seed, cap in [(0, 64), (1, 10**9), (2, 40), (3, 64), (4, 10**9)]:
        tensors = random_tensors(seed)
        names = write_sharded(tmp_path, specs_of(tensors), lambda s: tensors[s.name],
                              max_shard_bytes=cap, write=True)
        expected = set(names) | kept | ({INDEX} if len(names) > 1 else set())
        assert set(os.listdir(tmp_path)) == expected
        with SafetensorsSource(tmp_path) as src:
            assert src.names() == sorted(tensors)
            for k, v in tensors.items():
                assert_same(src.rows(k, 0, 10**6), v)


def test_plan_shards_greedy_in_order():
    g = torch.Generator().manual_seed(0)
    sizes = torch.randint(0, 40, (200,), generator=g).tolist()
    specs = [TensorSpec(f"t{i}", (s,), torch.float32) for i, s in enumerate(sizes)]
    for cap in [1, 4, 50, 100, 333, 10**6]:
        shards = plan_shards(specs, cap)
        assert [s for shard in shards for s in shard] == specs
        for i, shard in enumerate(shards):
            total = sum(s.nbytes for s in shard)
            assert shard and (total <= cap or len(shard) == 1)
            if i + 1 < len(shards):  # greedy: the next shard's first tensor did not fit
                assert total + shards[i + 1][0].nbytes > cap
    big = [TensorSpec("a", (2,), torch.float32), TensorSpec("big", (100,), torch.float32),
           TensorSpec("b", (2,), torch.float32), TensorSpec("c", (2,), torch.float32)]
    assert [[s.name for s in shard] for shard in plan_shards(big, 16)] == \
        [["a"], ["big"], ["b", "c"]]
    assert plan_shards([], 10) == []
    for cap in [0, -5, True, 2.0, "5GB"]:
        with pytest.raises(ValueError, match="max_shard_bytes"):
            plan_shards(big, cap)


def test_parse_size():
    cases = {"5GB": 5 * 10**9, "500MB": 500 * 10**6, "2GiB": 2 * 2**30, "100KB": 100 * 10**3,
             "3mib": 3 * 2**20, " 7 kib ": 7 * 2**10, "1.5GB": 15 * 10**8, "1TB": 10**12,
             "4096": 4096, "12B": 12, 1: 1, 10**10: 10**10}
    for text, value in cases.items():
        assert parse_size(text, "X.size") == value
    for bad in [0, -3, True, 2.5, None, "", "GB", "5XB", "1.5B", "0.4B", "0GB", "-1GB",
                "5 G B", "1e9"]:
        with pytest.raises(ValueError, match=r"TrainConfig\.max_shard_size"):
            parse_size(bad, "TrainConfig.max_shard_size")


def test_shard_file_names():
    assert shard_file_names(1) == ["model.safetensors"]
    assert shard_file_names(3) == ["model-00001-of-00003.safetensors",
                                   "model-00002-of-00003.safetensors",
                                   "model-00003-of-00003.safetensors"]
    assert shard_file_names(2, prefix="adapter")[1] == "adapter-00002-of-00002.safetensors"
    with pytest.raises(ValueError):
        shard_file_names(0)


def save_file_folder(folder, tensors, groups):
    """A sharded folder written by safetensors.save_file plus a hand-written index."""
    folder.mkdir()
    weight_map = {}
    for i, group in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: tensors[k].contiguous() for k in group}, folder / name,
                  metadata={"format": "pt"})
        weight_map.update({k: name for k in group})
    (folder / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def check_rows(src, tensors):
    assert src.names() == sorted(tensors)
    for k, v in tensors.items():
        spec = src.spec(k)
        assert spec == TensorSpec(k, tuple(v.shape), v.dtype)
        if v.dim() == 0:
            assert_same(src.rows(k, 0, 0), v)
            assert_same(src.rows(k, 3, 7), v)
            continue
        n = v.shape[0]
        for a, b in [(0, n), (0, 0), (n, n), (0, 1), (1, 3), (n - 1, n), (n // 2, n),
                     (2, n + 5), (n + 1, n + 3)]:
            a, b = max(a, 0), max(b, 0)
            got = src.rows(k, a, b)
            assert_same(got, v[a:b])
            # an owned copy of just those rows, not a view of the whole mapped tensor
            assert got.untyped_storage().nbytes() == nbytes(got)


def test_source_over_single_file_and_shards(tmp_path):
    tensors = random_tensors(seed=3)
    single = tmp_path / "single"
    single.mkdir()
    save_file({k: v.contiguous() for k, v in tensors.items()}, single / "model.safetensors")
    keys = list(tensors)
    sharded = save_file_folder(tmp_path / "sharded", tensors,
                               [keys[:5], keys[5:6], keys[6:]])
    ours = tmp_path / "ours"
    write_sharded(ours, specs_of(tensors), lambda s: tensors[s.name], max_shard_bytes=50,
                  write=True)
    for folder in [single, sharded, ours]:
        assert SafetensorsSource.available(folder)
        with SafetensorsSource(folder) as src:
            check_rows(src, tensors)


def test_source_errors(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        SafetensorsSource(missing)
    assert not SafetensorsSource.available(missing)
    empty = tmp_path / "empty_model"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    assert not SafetensorsSource.available(empty)
    with pytest.raises(FileNotFoundError, match="empty_model"):
        SafetensorsSource(empty)

    tensors = {"a": torch.randn(3, 2), "b": torch.arange(4)}
    folder = save_file_folder(tmp_path / "gappy", tensors, [["a"], ["b"]])
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        SafetensorsSource(folder)

    wrong = save_file_folder(tmp_path / "wrong_map", tensors, [["a"], ["b"]])
    index = json.loads((wrong / INDEX).read_text())
    index["weight_map"]["a"] = "model-00002-of-00002.safetensors"
    (wrong / INDEX).write_text(json.dumps(index))
    with pytest.raises(ValueError, match="'a'"):
        SafetensorsSource(wrong)
    for bad_index in ["not json", json.dumps({"metadata": {}}), json.dumps({"weight_map": {}}),
                      json.dumps({"weight_map": {"a": "../model.safetensors"}})]:
        (wrong / INDEX).write_text(bad_index)
        with pytest.raises(ValueError, match="index.json"):
            SafetensorsSource(wrong)

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"\x10" + b"\x00" * 7 + b"{not a header}")
    with pytest.raises(ValueError, match="model.safetensors"):
        SafetensorsSource(broken)

    good = save_file_folder(tmp_path / "good", tensors, [["a"], ["b"]])
    src = SafetensorsSource(good)
    with pytest.raises(KeyError, match=r"'c'.*good"):
        src.spec("c")
    with pytest.raises(KeyError, match=r"'c'.*good"):
        src.rows("c", 0, 1)
    for a, b in [(-1, 2), (2, 1), (0, -1), (0.0, 1)]:
        with pytest.raises(ValueError, match="'a'"):
            src.rows("a", a, b)
    src.close()
    with pytest.raises(ValueError, match="closed"):
        src.rows("a", 0, 1)
    src.close()


def write_model(model, out, *, leave_out=(), cap=4096):
    state = {k: v for k, v in model.state_dict().items() if k not in leave_out}
    names = write_sharded(out, specs_of(state), lambda s: state[s.name], max_shard_bytes=cap,
                          write=True)
    model.config.save_pretrained(out)
    return names


def test_transformers_loads_untied_model(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model(seed=0, tie_word_embeddings=False)
    names = write_model(model, tmp_path)
    assert len(names) > 2
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ref = dict(model.named_parameters())
    got = dict(loaded.named_parameters())
    assert set(got) == set(ref)
    for k, v in ref.items():
        assert_same(got[k].detach(), v.detach())


def test_transformers_loads_tied_model_without_lm_head(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model(seed=0, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    names = write_model(model, tmp_path, leave_out={"lm_head.weight"})
    assert len(names) > 2
    with SafetensorsSource(tmp_path) as src:
        assert "lm_head.weight" not in src.names()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ref = dict(model.named_parameters())
    got = dict(loaded.named_parameters())
    assert set(got) == set(ref)
    for k, v in ref.items():
        assert_same(got[k].detach(), v.detach())
