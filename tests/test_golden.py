"""Golden v1 artifacts (formats/golden/) must keep reading, and decode as the spec says."""
import json
import math
from pathlib import Path

import jsonschema
import pytest
import torch
from safetensors import safe_open

import lowbitpack
from lowbitpack.artifact import Artifact

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "formats" / "golden"
SCHEMA = json.loads((ROOT / "formats" / "artifact-v1.schema.json").read_text())
INTG = sorted(GOLDEN.glob("artifact-v1-int*"))


def spec_decode_intg(stored: dict, shape, bits, group) -> torch.Tensor:
    """Straight from formats/artifact-v1.md, bit by bit: independent of lowbitpack.layouts."""
    out_f, in_f = shape
    qw = stored["qweight"].tolist()
    scale, zero = stored["scale"].float(), stored["zero"].float()
    w = torch.empty(out_f, in_f)
    for r in range(out_f):
        for j in range(in_f):
            q = 0
            for k in range(bits):
                bit = j * bits + k
                q |= ((qw[r][bit // 8] >> (bit % 8)) & 1) << k
            g = j // group
            w[r, j] = (q - zero[r, g]) * scale[r, g]
    return w


def test_goldens_present():
    assert len(INTG) == 4


@pytest.mark.parametrize("path", INTG, ids=lambda p: p.name)
def test_golden_reads_verifies_and_matches_schema(path):
    art = Artifact.open(path, verify=True)
    jsonschema.validate(art.manifest, SCHEMA)
    for name, rec in art.tensors.items():
        if rec["scheme"] == "none":
            continue
        qt = art.quantized_tensor(name)
        expected = spec_decode_intg(qt.tensors, rec["shape"], rec["bits"], rec["group_size"])
        assert torch.equal(art.dense(name, torch.float32), expected)
        assert qt.tensors["scale"].shape[1] == math.ceil(rec["shape"][1] / rec["group_size"])


@pytest.mark.parametrize("path", INTG, ids=lambda p: p.name)
def test_requantizing_golden_source_reproduces_bytes(path, tmp_path):
    """Quantization is deterministic and v1 encoding has not drifted."""
    q = json.loads((path / "lowbitpack.json").read_text())["quantization"]
    out = tmp_path / "q"
    lowbitpack.quantize(GOLDEN / "source", out, q["scheme"], group_size=q["group_size"], progress=False)
    for f in ("packed.safetensors",):
        with safe_open(str(path / f), "pt") as a, safe_open(str(out / f), "pt") as b:
            assert sorted(a.keys()) == sorted(b.keys())
            for k in a.keys():
                assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k


def test_fresh_manifest_matches_schema(tmp_path, tiny_llama):
    m = lowbitpack.quantize(tiny_llama, tmp_path / "q", "int3", group_size=24, progress=False)
    jsonschema.validate(m, SCHEMA)
