"""ShardWriter spools tensors to disk and must still write exactly what safetensors' save_file writes."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from lowbitpack.io.writer import ShardWriter

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.uint8, torch.int8, torch.int16,
          torch.int32, torch.int64, torch.bool]


def _tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    return torch.randint(-100 if dtype != torch.uint8 else 0, 100, shape, generator=g).to(dtype)


tensor_sets = st.dictionaries(
    st.text(alphabet="abcxyz._0123", min_size=1, max_size=12),
    st.tuples(st.sampled_from(DTYPES), st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple),
              st.integers(0, 1000)),
    min_size=1, max_size=8)


@settings(max_examples=40, deadline=None)
@given(tensor_sets)
def test_one_shard_is_byte_identical_to_save_file(tmp_path_factory, spec):
    d = tmp_path_factory.mktemp("w")
    tensors = {n: _tensor(dt, shape, seed) for n, (dt, shape, seed) in spec.items()}
    w = ShardWriter(d, "model", max_shard_bytes=1 << 30)
    for n, t in tensors.items():
        w.add(n, t)
    w.finish()
    save_file(tensors, str(d / "ref.safetensors"), metadata={"format": "pt"})
    assert (d / "model.safetensors").read_bytes() == (d / "ref.safetensors").read_bytes()
    assert not list(d.glob("*.spool")) and not list(d.glob(".*.spool"))


def test_shards_split_like_before_and_each_matches_save_file(tmp_path):
    tensors = {f"layer.{i}.w": _tensor(DTYPES[i % len(DTYPES)], (7, 9 + i), i) for i in range(12)}
    w = ShardWriter(tmp_path, "packed", max_shard_bytes=600)
    for n, t in tensors.items():
        w.add(n, t)
    shards = w.finish()
    assert len(shards) > 2
    seen = {}
    for name in shards:
        got = load_file(str(tmp_path / name))
        ref = tmp_path / f"ref-{name}"
        save_file({k: tensors[k] for k in got}, str(ref), metadata={"format": "pt"})
        assert (tmp_path / name).read_bytes() == ref.read_bytes()
        seen.update(got)
    assert set(seen) == set(tensors) and all(torch.equal(seen[k], tensors[k]) for k in tensors)


def test_duplicate_name_is_refused(tmp_path):
    w = ShardWriter(tmp_path)
    w.add("a", torch.zeros(2))
    with pytest.raises(ValueError, match="duplicate"):
        w.add("a", torch.ones(2))


def test_memory_holds_no_tensor_data(tmp_path):
    """What the writer keeps between adds is metadata only: the bytes live in the spool file."""
    w = ShardWriter(tmp_path)
    w.add("big", torch.ones(256, 1024))
    assert not any(isinstance(v, torch.Tensor) for entry in w._buf.values() for v in entry)
    assert Path(w._spool.name).stat().st_size >= 0
    w.finish()
    assert load_file(str(tmp_path / "model.safetensors"))["big"].sum() == 256 * 1024
