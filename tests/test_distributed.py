"""torch.distributed scale-out (lowbitpack.dist, docs/SCALING.md): 2 gloo CPU ranks against one process.

One launch of 2 ranks (torchrun's elastic launch API, the code path of `--nproc`) runs every distributed flow
of this module, because starting ranks costs seconds on a shared 2-core machine; the references run in-process.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lowbitpack
from lowbitpack import dist
from lowbitpack.artifact import Artifact

from .conftest import make_tiny_llama
from .test_gptq import _CALIB_TEXT, _byte_tokenizer

SHARD = 40_000  # small output shards: several shard boundaries to get right

# (label, source key, scheme, extra quantize options, LOWBITPACK_GPTQ_SPLIT)
RUNS = [
    ("int4-one-shard", "one", "int4", {"group_size": 32}, None),      # fewer source shards than ranks: tensors split
    ("nf4-three-shards", "three", "nf4", {}, None),                    # shards split
    ("int8-three-shards", "three", "int8", {"group_size": 48}, None),  # odd group
    ("gptq4-rows", "gptq", "gptq4", {"group_size": 32}, "rows"),
    ("gptq3-linears-act", "gptq", "gptq3", {"group_size": 32, "act_order": True}, "linears"),
]
GPTQ_OPTS = {"calib_samples": 16, "calib_seqlen": 32, "device": "cpu"}


def _worker(sources: dict[str, str], outdir: str) -> dict:
    """Runs in each of the 2 ranks: every distributed flow of RUNS, in one process group."""
    seconds = {}
    for label, key, scheme, opts, split in RUNS:
        if split:
            os.environ[dist.SPLIT_ENV] = split
        extra = {**GPTQ_OPTS, "calib": sources["calib"]} if scheme.startswith("gptq") else {}
        m = lowbitpack.quantize(sources[key], Path(outdir) / label, scheme, progress=False, max_shard_size=SHARD,
                                **opts, **extra)
        seconds[label] = m["timing"]["seconds"]
        os.environ.pop(dist.SPLIT_ENV, None)
    return seconds


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    sources = {"one": str(make_tiny_llama(root / "one", hidden=64, inter=160)),
               "three": str(make_tiny_llama(root / "three", hidden=64, inter=160, shards=3, seed=1))}
    g = make_tiny_llama(root / "gptq", hidden=64, inter=96, layers=2, vocab=256)
    _byte_tokenizer(g)
    (root / "calib.txt").write_text(_CALIB_TEXT)
    sources.update(gptq=str(g), calib=str(root / "calib.txt"))
    for label, key, scheme, opts, _ in RUNS:
        extra = {**GPTQ_OPTS, "calib": sources["calib"]} if scheme.startswith("gptq") else {}
        lowbitpack.quantize(sources[key], root / "single" / label, scheme, progress=False, max_shard_size=SHARD,
                            **opts, **extra)
    seconds = dist.launch(2, "tests.test_distributed:_worker", sources, str(root / "two"))
    return root, seconds


def _normalized_manifest(path: Path) -> str:
    text = (path / "lowbitpack.json").read_text()
    text = re.sub(r'"created_utc": "[^"]*"', '"created_utc": ""', text)
    text = re.sub(r'"seconds": [0-9.e+-]+', '"seconds": 0', text)
    return re.sub(r'"layer_seconds": \[[^\]]*\]', '"layer_seconds": []', text)


@pytest.mark.parametrize("label", ["int4-one-shard", "nf4-three-shards", "int8-three-shards"])
def test_rtn_nf4_byte_identical(runs, label):
    root, _ = runs
    a, b = root / "single" / label, root / "two" / label
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())  # no part files or temp files left
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) >= 3  # several output shard boundaries
    for f in files:
        if f != "lowbitpack.json":
            assert (a / f).read_bytes() == (b / f).read_bytes(), f
    ma, mb = _normalized_manifest(a), _normalized_manifest(b)
    assert ma == mb  # same bytes apart from created_utc / timing, which differ between any two runs
    assert json.loads((b / "lowbitpack.json").read_text())["created_utc"]
    Artifact.open(b, verify=True)
    assert not list(root.glob("two/.*"))


def _codes_and_weights(path: Path) -> tuple[dict, dict]:
    art = Artifact.open(path, verify=True)
    codes, dense = {}, {}
    for name, rec in art.tensors.items():
        if rec["scheme"] != "none":
            qt = art.quantized_tensor(name)
            from lowbitpack.layouts.intg import unpack_intg
            codes[name] = unpack_intg(qt.tensors["qweight"], qt.bits, qt.shape[1])
            dense[name] = art.dense(name, torch.float32)
    return codes, dense


@pytest.mark.parametrize("label", ["gptq4-rows", "gptq3-linears-act"])
def test_gptq_two_ranks_within_bound(runs, label):
    """Same calibration batches and activations; only the fp32 summation order of Σ xxᵀ differs (the
    all-reduce adds the two ranks' partial sums). Bound (docs/SCALING.md): ≤ 1% of codes change, each by at most
    one level, and the layer-0 q/k/v codes (the first Hessian) by ≤ 0.5%."""
    root, _ = runs
    a, b = root / "single" / label, root / "two" / label
    ca, wa = _codes_and_weights(a)
    cb, wb = _codes_and_weights(b)
    assert set(ca) == set(cb) and len(ca) == 14
    changed = sum(int((ca[n].int() != cb[n].int()).sum()) for n in ca)
    total = sum(ca[n].numel() for n in ca)
    assert changed / total <= 0.01, (changed, total)
    for n in ca:
        assert int((ca[n].int() - cb[n].int()).abs().max()) <= 1, n
    first = [n for n in ca if ".layers.0.self_attn." in n and n.split(".")[-2] in ("q_proj", "k_proj", "v_proj")]
    f_changed = sum(int((ca[n] != cb[n]).sum()) for n in first)
    assert f_changed / sum(ca[n].numel() for n in first) <= 0.005
    ma = json.loads((a / "lowbitpack.json").read_text())["quantization"]
    mb = json.loads((b / "lowbitpack.json").read_text())["quantization"]
    assert ma["calibration"]["samples"] == mb["calibration"]["samples"] == 16
    for n, la in ma["calibration_loss"].items():  # same problem solved: per-linear GPTQ loss within 5%
        assert abs(mb["calibration_loss"][n] - la) <= 0.05 * la + 1e-6, n


def test_row_blocks_equal_whole_weight():
    """GPTQ rows are independent: row blocks solved apart and joined give the whole weight's bytes."""
    from lowbitpack.schemes import make_scheme
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 72, generator=g) @ torch.randn(72, 72, generator=g)
    h = 2 * x.T @ x / 512
    w = torch.randn(37, 72, generator=g)
    for act_order in (False, True):
        sch = make_scheme("gptq3", group_size=32, act_order=act_order)
        whole, st = sch.quantize_with_stats(w, hessian=h)
        blocks = [sch.quantize_with_stats(w[s:e], hessian=h) for s, e in (dist._row_block(37, r, 3) for r in range(3))]
        joined, jst = dist.cat_row_blocks(blocks, (37, 72))
        assert set(joined.tensors) == set(whole.tensors)
        for k in whole.tensors:
            assert torch.equal(joined.tensors[k], whole.tensors[k]), k
        assert joined.shape == whole.shape and joined.group_size == whole.group_size
        assert jst["loss"] == pytest.approx(st["loss"], rel=1e-5)


def test_assignment_deterministic_and_balanced():
    order = [(f"s{i // 4}", f"t{i}") for i in range(12)]
    nbytes = {n: (i + 1) * 100 for i, (_, n) in enumerate(order)}
    by_shard = dist._assign(order, nbytes, ["s0", "s1", "s2"], 2)
    assert {by_shard[f"t{i}"] for i in range(4)} == {by_shard["t0"]}  # whole shards
    assert by_shard["t8"] != by_shard["t0"]  # the largest shard (s2) first, then the smallest next to it
    by_tensor = dist._assign(order, nbytes, ["s0"], 2)
    loads = [sum(nbytes[n] for n, r in by_tensor.items() if r == k) for k in (0, 1)]
    assert abs(loads[0] - loads[1]) <= 100 and by_tensor == dist._assign(order, nbytes, ["s0"], 2)
    assert dist._row_block(10, 0, 3) == (0, 4) and dist._row_block(10, 2, 3) == (7, 10)


def test_failed_rank_leaves_nothing(tmp_path):
    """A NaN in a tensor only rank 1 reads: the CLI exits nonzero with that rank's one-line error, nothing at
    the target, no temp directory left."""
    src = make_tiny_llama(tmp_path / "src", hidden=64, inter=160, shards=3)
    from lowbitpack.io.checkpoint import SourceCheckpoint
    ckpt = SourceCheckpoint.open(src)
    order = dist._tensor_order(ckpt)
    infos = ckpt.tensor_infos()
    from lowbitpack.flows.quantize import _nbytes
    owner = dist._assign(order, {n: _nbytes(infos[n]) for _, n in order}, ckpt.shards, 2)
    shard, name = next((s, n) for s, n in order if owner[n] == 1 and n.endswith("mlp.up_proj.weight"))
    tensors = load_file(src / shard)
    tensors[name][3, 5] = float("nan")
    save_file(tensors, str(src / shard), metadata={"format": "pt"})
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "lowbitpack.cli", "quantize", str(src), "-o", str(out),
                        "--scheme", "int4", "--nproc", "2", "--no-progress"], capture_output=True, text=True,
                       timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("error: ") and "holds NaN or Inf" in lines[-1] and name in lines[-1], r.stderr[-2000:]
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no .out.*.partial left behind


def test_nproc_option_errors(tmp_path, tiny_llama):
    from lowbitpack.errors import OptionError
    with pytest.raises(OptionError, match="positive integer"):
        lowbitpack.quantize(tiny_llama, tmp_path / "o", "int4", nproc=0, progress=False)
    assert not (tmp_path / "o").exists()
