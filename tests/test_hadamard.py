"""Fast Walsh–Hadamard transform: known blocks, factorisation rule, transform vs dense matrices."""
from __future__ import annotations

import ast
import hashlib
import importlib.util
from pathlib import Path

import pytest
import torch

from lowbitpack.hadamard import (KNOWN_SIZES, TABLE_SHA256, dense_hadamard, hadamard_factors, iwht, known_hadamard,
                                 supports, sylvester_hadamard, wht)

# every size the transform supports up to a few hundred: powers of two and m·2^k for each known block m
SMALL_SIZES = sorted({2 ** k for k in range(0, 10)} | {m * 2 ** k for m in KNOWN_SIZES for k in range(0, 5)
                                                        if m * 2 ** k <= 400})


@pytest.mark.parametrize("m", sorted(KNOWN_SIZES))
def test_known_block_is_hadamard_and_matches_recorded_table(m):
    h = known_hadamard(m, torch.float64)
    assert h.shape == (m, m)
    assert set(h.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(h @ h.t(), m * torch.eye(m, dtype=torch.float64))
    assert hashlib.sha256(known_hadamard(m, torch.int8).numpy().tobytes()).hexdigest() == TABLE_SHA256[m]


def test_known_blocks_equal_the_reference_tables_when_available():
    """The tables are QuaRot's (what the QWHA reference uses); gptqmodel ships the same file. Parsed, not imported
    (importing gptqmodel takes ~30 s)."""
    spec = importlib.util.find_spec("gptqmodel")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("gptqmodel (optional extra) is not installed")
    src = Path(list(spec.submodule_search_locations)[0]) / "quantization" / "rotation" / "hadamard_utils.py"
    if not src.is_file():
        pytest.skip("gptqmodel has no hadamard_utils.py")
    tree = ast.parse(src.read_text())
    seen = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name.startswith("get_had") and node.name[7:].isdigit():
            m = int(node.name[7:])
            table = torch.tensor(ast.literal_eval(node.body[-1].value.args[0]), dtype=torch.int8)
            assert torch.equal(table, known_hadamard(m, torch.int8)), m
            seen.add(m)
    assert seen == set(KNOWN_SIZES)


@pytest.mark.parametrize("n", SMALL_SIZES)
def test_dense_matrix_is_hadamard(n):
    h = dense_hadamard(n, torch.float64)
    assert torch.equal(h @ h.t(), n * torch.eye(n, dtype=torch.float64))


@pytest.mark.parametrize("n", SMALL_SIZES)
def test_wht_equals_dense_matrix(n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(3, 2, n, generator=g, dtype=torch.float64)
    h = dense_hadamard(n, torch.float64)
    torch.testing.assert_close(wht(x), x @ h.t(), rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(wht(x, transpose=True), x @ h, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(iwht(wht(x)), x, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(iwht(wht(x, transpose=True), transpose=True), x, rtol=1e-12, atol=1e-9)


def test_sylvester_natural_order():
    h = sylvester_hadamard(8, torch.int64)
    for j in range(8):
        for k in range(8):
            assert h[j, k] == (-1) ** bin(j & k).count("1")
    assert torch.equal(h, h.t())


def test_non_power_of_two_matrix_is_not_symmetric():
    """Why ΔW uses the transposed transform: for m·2^k sizes M ≠ Mᵀ (12 and 1536 = 12·128 included)."""
    for n in (12, 24, 20, 40, 52):
        h = dense_hadamard(n)
        assert not torch.equal(h, h.t()), n
    x = torch.randn(2, 24, dtype=torch.float64)
    assert not torch.allclose(wht(x), wht(x, transpose=True))


@pytest.mark.parametrize("n,expected", [(64, (1, 64)), (576, (36, 16)), (1536, (12, 128)), (12, (12, 1)),
                                        (80, (40, 2)), (20, (20, 1)), (120, (60, 2)), (11008, (172, 64)),
                                        (13824, (108, 128)), (2048, (1, 2048))])
def test_factorisation_follows_reference_order(n, expected):
    assert hadamard_factors(n) == expected


@pytest.mark.parametrize("n", [3, 6, 10, 100, 360, 0])
def test_unsupported_sizes_raise(n):
    assert not supports(n)
    with pytest.raises(ValueError, match="Hadamard"):
        hadamard_factors(n)
    if n > 0:
        with pytest.raises(ValueError):
            wht(torch.zeros(1, n))


def test_block_order_80_is_h40_kron_h2_not_h20_kron_h4():
    """80 = 40·2 uses the 40-block; the alternative factorisations give different matrices."""
    got = dense_hadamard(80)
    assert torch.equal(got, torch.kron(known_hadamard(40), sylvester_hadamard(2)))
    assert not torch.equal(got, torch.kron(known_hadamard(20), sylvester_hadamard(4)))


def test_wht_is_differentiable_and_keeps_dtype():
    x = torch.randn(4, 48, requires_grad=True)
    y = wht(x)
    assert y.dtype == torch.float32
    g = torch.randn_like(y)
    y.backward(g)
    # d(x Mᵀ)/dx applied to g = g M
    torch.testing.assert_close(x.grad, g @ dense_hadamard(48), rtol=1e-5, atol=1e-4)


def test_large_sizes_use_no_dense_matrix():
    """SmolLM2 / Llama widths: the transform's biggest intermediate is the input's size (no n×n)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class MaxNumel(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.max = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor):
                    self.max = max(self.max, t.numel())
            return out

    for n in (576, 1536, 11008):
        x = torch.randn(2, n)
        mode = MaxNumel()
        with mode:
            y = wht(x)
        assert mode.max <= max(2 * n, 172 * 172), (n, mode.max)
        # spot-check row 0 of the result against one row of the dense matrix built from its factors
        m, p = hadamard_factors(n)
        e0 = torch.zeros(n)
        e0[0] = 1.0
        col0 = wht(e0.unsqueeze(0))[0]  # M e0 = first column of M
        expected = torch.kron(known_hadamard(m)[:, 0], torch.ones(p)) if m > 1 else torch.ones(n)
        assert torch.equal(col0, expected)
        assert torch.isfinite(y).all()
