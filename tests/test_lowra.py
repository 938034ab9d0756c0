"""LowRA: layout lowra-v1 round trips, weighted Lloyd–Max fits, the exact bit allocator, the whole-model flow."""
from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from lowbitpack.errors import OptionError, OutputExistsError
from lowbitpack.kernels import dequantize
from lowbitpack.layouts.bitpack import packed_row_bytes
from lowbitpack.layouts.lowra import WIDTHS, check_lowra, class_rows, dequantize_lowra, pack_lowra, unpack_lowra_codes
from lowbitpack.qtensor import QuantizedTensor
from lowbitpack.schemes import make_scheme
from lowbitpack.schemes.lowra import (LowRA, act_weights, assign_codes, lloyd_max, row_cost_bits,
                                      weighted_error)
from lowbitpack.solvers import InfeasibleBudget, brute_force_mckp, lagrangian_bound, solve_mckp


# ---------------------------------------------------------------------------------------------- layout

def _random_layout(out_f: int, in_f: int, mode: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    if mode == "mixed":
        row_bits = torch.tensor(WIDTHS)[torch.randint(0, 3, (out_f,), generator=g)]
    else:
        row_bits = torch.full((out_f,), int(mode), dtype=torch.int64)
    codes = torch.zeros(out_f, in_f, dtype=torch.int64)
    books = {}
    for b in WIDTHS:
        rows = class_rows(row_bits, b)
        codes[rows] = torch.randint(0, 1 << b, (len(rows), in_f), generator=g)
        books[b] = (torch.randn(len(rows), 1 << b, generator=g) * 0.1).to(torch.float16)
    return row_bits, codes, books


@pytest.mark.parametrize("shape", [(7, 33), (1, 1), (5, 8), (13, 130), (3, 17), (9, 1)])
@pytest.mark.parametrize("mode", ["mixed", "1", "2", "4"])
def test_layout_round_trip_exact(shape, mode, tmp_path):
    out_f, in_f = shape
    row_bits, codes, books = _random_layout(out_f, in_f, mode, seed=out_f * 1000 + in_f)
    tensors = pack_lowra(row_bits, codes, books)
    check_lowra(tensors, shape)
    # exact decode: every weight is its row's fp16 codebook value at its code
    expect = torch.empty(out_f, in_f)
    for b in WIDTHS:
        rows = class_rows(row_bits, b)
        for i, r in enumerate(rows.tolist()):
            expect[r] = books[b][i].float()[codes[r]]
    assert torch.equal(dequantize_lowra(tensors, shape, torch.float32), expect)
    assert torch.equal(unpack_lowra_codes(tensors, in_f), codes.to(torch.uint8))
    # storage is exactly the per-row cost model the allocator uses
    stored_bits = 8 * sum(t.numel() * t.element_size() for t in tensors.values())
    assert stored_bits == sum(row_cost_bits(in_f, int(b)) for b in row_bits)
    # through safetensors (empty width classes included) and the dispatcher
    save_file(tensors, str(tmp_path / "t.safetensors"))
    back = load_file(str(tmp_path / "t.safetensors"))
    qt = QuantizedTensor("lowra", "lowra-v1", 2.0, None, shape, torch.bfloat16, back)
    assert torch.equal(dequantize(qt, torch.float32), expect)
    assert dequantize(qt).dtype == torch.bfloat16


def test_layout_rejects_bad_input():
    codes = torch.zeros(2, 5, dtype=torch.int64)
    with pytest.raises(ValueError, match="1, 2 or 4"):
        pack_lowra(torch.tensor([1, 3]), codes, {})
    with pytest.raises(ValueError, match="code >= 2"):
        pack_lowra(torch.tensor([1, 1]), codes + 2, {1: torch.zeros(2, 2, dtype=torch.float16)})
    with pytest.raises(ValueError, match="codebook1"):
        pack_lowra(torch.tensor([1, 1]), codes, {1: torch.zeros(1, 2, dtype=torch.float16)})
    good = pack_lowra(torch.tensor([1, 4]), codes, {1: torch.zeros(1, 2, dtype=torch.float16),
                                                    4: torch.zeros(1, 16, dtype=torch.float16)})
    bad = dict(good, codes4=torch.zeros(1, packed_row_bytes(5, 4) + 1, dtype=torch.uint8))
    with pytest.raises(ValueError, match="codes4"):
        dequantize_lowra(bad, (2, 5))
    with pytest.raises(ValueError, match="row_bits"):
        dequantize_lowra(dict(good, row_bits=torch.tensor([1, 4, 4], dtype=torch.uint8)), (2, 5))


# ---------------------------------------------------------------------------------------------- fitting

def _kmeans_opt(w: np.ndarray, h: np.ndarray, k: int) -> float:
    """Exact weighted 1-D k-means optimum by dynamic programming over the sorted values (oracle)."""
    o = np.argsort(w)
    ws, hs = w[o].astype(np.float64), h[o].astype(np.float64)
    n = len(ws)
    p0 = np.concatenate([[0.0], np.cumsum(hs)])
    p1 = np.concatenate([[0.0], np.cumsum(hs * ws)])
    p2 = np.concatenate([[0.0], np.cumsum(hs * ws * ws)])
    j, i = np.arange(n + 1)[:, None], np.arange(n + 1)[None, :]
    with np.errstate(all="ignore"):
        s0, s1, s2 = p0[i] - p0[j], p1[i] - p1[j], p2[i] - p2[j]
        c = np.where(s0 > 0, s2 - s1 * s1 / np.where(s0 > 0, s0, 1), 0.0)
    c = np.where(j <= i, np.maximum(c, 0), np.inf)
    d = c[0].copy()
    for _ in range(k - 1):
        d = np.min(d[:, None] + c, axis=0)
    return float(d[n])


def _heavy_rows(r: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # Student-t-like heavy tails without global RNG: normal / sqrt(chi2/3)
    z = torch.randn(r, n, generator=g)
    chi = torch.randn(r, n, 3, generator=g).pow(2).sum(-1) / 3
    w = (z / chi.sqrt()) * 0.02
    h = torch.rand(n, generator=g, dtype=torch.float64) * 4 + 0.05
    return w, h


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("init", ["dp", "quantile"])
def test_lloyd_max_error_never_increases(bits, init):
    w, h = _heavy_rows(12, 300, seed=bits)
    hist: list[torch.Tensor] = []
    c = lloyd_max(w, h, bits, max_iter=200, history=hist, init=init)
    errs = torch.stack(hist)                                   # [iterations, rows]
    assert errs.shape[0] >= 2
    steps = errs[1:] - errs[:-1]
    assert (steps <= 1e-12 * errs[:-1]).all(), "a Lloyd–Max step increased the weighted error"
    # the tracked error is the true error of the nearest-value quantizer with the final codebook
    final = weighted_error(w, h, c, assign_codes(w, c))
    torch.testing.assert_close(final, errs[-1], rtol=1e-9, atol=1e-15)
    if init == "quantile":
        assert (errs[-1] < errs[0]).any()


@pytest.mark.parametrize("n", [1, 2, 3, 17, 40])
@pytest.mark.parametrize("bits", [1, 2, 4])
def test_fit_is_exact_optimum_when_rows_fit_the_dp(n, bits):
    """1 bit is always exact; with in ≤ dp_bins the DP start is the global optimum and Lloyd keeps it."""
    w, h = _heavy_rows(5, n, seed=n + 10 * bits)
    c = lloyd_max(w, h, bits, dp_bins=64)
    got = weighted_error(w, h, c, assign_codes(w, c)).numpy()
    opt = np.array([_kmeans_opt(w[r].numpy(), h.numpy(), 1 << bits) for r in range(5)])
    np.testing.assert_allclose(got, opt, rtol=1e-7, atol=1e-14)


def test_one_bit_exact_on_long_rows_and_dp_close_at_four_bits():
    w, h = _heavy_rows(4, 400, seed=3)
    for bits, tol in ((1, 1e-9), (2, 0.02), (4, 0.08)):
        c = lloyd_max(w, h, bits, dp_bins=64)
        got = weighted_error(w, h, c, assign_codes(w, c)).numpy()
        opt = np.array([_kmeans_opt(w[r].numpy(), h.numpy(), 1 << bits) for r in range(4)])
        assert (got >= opt * (1 - 1e-9)).all()
        assert (got <= opt * (1 + tol)).all(), (bits, got / opt)


def test_weighting_lowers_weighted_error():
    w, h = _heavy_rows(6, 48, seed=5)   # in ≤ dp_bins: every fit is the exact optimum for its weights
    hw = act_weights(h, 48, damp=0.0)
    for bits in (1, 2, 4):
        cw = lloyd_max(w, hw, bits)
        cu = lloyd_max(w, torch.ones(48, dtype=torch.float64), bits)
        ew = weighted_error(w, hw, cw, assign_codes(w, cw))
        eu = weighted_error(w, hw, cu, assign_codes(w, cu))
        assert (ew <= eu * (1 + 1e-12)).all()
        assert (ew < eu).any()


def test_fit_errors_are_those_of_the_stored_fp16_codebook():
    w, h = _heavy_rows(40, 77, seed=7)
    s = LowRA(1.8)
    fit = s.fit(w, h)
    assert (np.diff(fit.errors, axis=1) <= 1e-12).all(), "more bits must not fit worse"
    rb = torch.tensor(WIDTHS)[torch.arange(40) % 3]
    qt = s.pack(w, fit, rb)
    deq = dequantize(qt, torch.float32)
    hw = act_weights(h, 77, s.damp)
    per_row = ((w.double() - deq.double()) ** 2 * hw).sum(1).numpy()
    np.testing.assert_allclose(per_row, fit.errors[np.arange(40), (rb.numpy() > 1).astype(int) + (rb.numpy() > 2)], rtol=1e-9)
    # every weight sits on its row's nearest stored (fp16) codebook value
    for r in range(40):
        b = int(rb[r])
        i = int((class_rows(rb, b) == r).nonzero())
        cb = qt.tensors[f"codebook{b}"][i].float()
        nearest = (w[r, :, None] - cb[None, :]).abs().min(1).values
        assert torch.equal((w[r] - deq[r]).abs(), nearest)
    assert qt.params["bit_histogram"] == {str(b): int((rb == b).sum()) for b in WIDTHS}
    assert qt.params["avg_bits"] == pytest.approx(sum(row_cost_bits(77, int(b)) for b in rb) / w.numel())


def test_constant_zero_and_tiny_rows():
    w = torch.zeros(4, 9)
    w[1] = 0.25
    w[2, :3] = torch.tensor([1.0, -1.0, 0.5])
    qt = LowRA(16.0).quantize(w)   # 9 inputs: codebooks dominate, 16 bits/weight allows 2-bit rows
    # constant rows are exact at 1 bit, so only the row with 4 distinct values takes (and needs) 2 bits
    assert qt.tensors["row_bits"].tolist() == [1, 1, 2, 1]
    torch.testing.assert_close(dequantize(qt, torch.float32), w, atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="at least 6.22"):
        LowRA(3.0).quantize(w)
    s = LowRA(2.0)
    one = torch.tensor([[0.3]])
    qt1 = s.pack(one, s.fit(one), torch.tensor([1]))
    assert dequantize(qt1, torch.float32).item() == pytest.approx(0.3, abs=1e-4)


def test_scheme_budget_per_tensor_and_hessian_input():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(256, 96, generator=g) * torch.linspace(0.2, 3, 256)[:, None]
    x = torch.randn(400, 96, generator=g) * torch.linspace(0.1, 2, 96)
    s = make_scheme("lowra", bits=1.6)
    assert s.needs_calibration and s.name == "lowra"
    qt = s.quantize(w, act_stats=x.pow(2).mean(0))
    assert 1.6 - 0.01 <= qt.params["avg_bits"] <= 1.6
    assert qt.bits_per_weight() == qt.params["avg_bits"]
    # a GPTQ Hessian (∝ E[x xᵀ]) gives the same result through its diagonal (scale does not matter)
    qt_h = s.quantize(w, hessian=2 * x.T @ x / 400)
    assert torch.equal(qt_h.tensors["row_bits"], qt.tensors["row_bits"])
    # rows with larger weights get more bits
    rb = qt.tensors["row_bits"].float()
    assert rb[:64].mean() < rb[-64:].mean()
    with pytest.raises(ValueError, match="above 1 bit"):
        LowRA(1.0)


# ---------------------------------------------------------------------------------------------- solver

def _instance(n: int, m: int, seed: int, structured: bool):
    rng = np.random.default_rng(seed)
    if structured:  # LowRA-like: costs from row_cost_bits, errors falling with bits
        ins = rng.choice([3, 8, 13], size=n)
        costs = np.array([[row_cost_bits(int(i), b) for b in WIDTHS] for i in ins])
        e1 = rng.lognormal(0, 1, n)
        errors = np.stack([e1, e1 * rng.uniform(0.2, 0.5, n), e1 * rng.uniform(0.01, 0.1, n)], 1)
    else:  # anything: ties, dominated options, zero costs
        costs = rng.integers(0, 6, size=(n, m))
        errors = rng.integers(0, 5, size=(n, m)).astype(float) + rng.random((n, m)) * (seed % 2)
    return errors, costs


@pytest.mark.parametrize("seed", range(40))
def test_solver_matches_brute_force(seed):
    n = 1 + seed % 7
    structured = seed % 3 != 0
    errors, costs = _instance(n, 3, seed, structured)
    lo, hi = int(costs.min(1).sum()), int(costs.max(1).sum())
    for budget in np.unique(np.linspace(lo, hi + 2, 7).astype(int)):
        best, _ = brute_force_mckp(errors, costs, int(budget))
        sol = solve_mckp(errors, costs, int(budget))
        assert sol.optimal
        assert sol.cost <= budget
        assert sol.objective == pytest.approx(best, rel=1e-12, abs=1e-12)
        assert sol.lower_bound <= sol.objective + 1e-12


def test_solver_matches_highs_on_a_larger_instance():
    from scipy.optimize import Bounds, LinearConstraint, milp

    errors, costs = _instance(60, 3, seed=123, structured=True)
    budget = int(costs.min(1).sum() + 0.4 * (costs.max(1).sum() - costs.min(1).sum()))
    sol = solve_mckp(errors, costs, budget, core_rows=4)  # a tiny first core forces the second round
    n, m = errors.shape
    a_eq = np.kron(np.eye(n), np.ones(m))
    res = milp(errors.ravel(), integrality=np.ones(n * m), bounds=Bounds(0, 1),
               constraints=[LinearConstraint(a_eq, 1, 1), LinearConstraint(costs.ravel()[None], -np.inf, budget)],
               options={"mip_rel_gap": 0})
    assert res.status == 0
    assert sol.optimal and sol.cost <= budget
    assert sol.objective == pytest.approx(res.fun, rel=1e-9)
    lam, lb, x = lagrangian_bound(errors, costs, budget)
    assert lb <= sol.objective + 1e-9 and lam > 0


def test_solver_edge_cases():
    errors = np.array([[3.0, 1.0, 0.0], [2.0, 1.0, 0.5]])
    costs = np.array([[1, 2, 4], [1, 2, 4]])
    with pytest.raises(InfeasibleBudget):
        solve_mckp(errors, costs, 1)
    assert solve_mckp(errors, costs, 100).choice.tolist() == [2, 2]       # unconstrained
    assert solve_mckp(errors, costs, 2).choice.tolist() == [0, 0]         # tight
    with pytest.raises(ValueError, match="integers"):
        solve_mckp(errors, costs + 0.5, 4)


# ---------------------------------------------------------------------------------------------- flow

@pytest.fixture
def tiny_with_tokenizer(tmp_path, smollm2) -> Path:
    from tests.conftest import make_tiny_llama
    src = make_tiny_llama(tmp_path / "tiny", vocab=49152)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2 / f, src / f)
    return src


def test_api_quantize_lowra_tiny_model(tiny_with_tokenizer, tmp_path):
    from lowbitpack import api
    from lowbitpack.artifact import Artifact

    out = tmp_path / "lowra"
    m = api.quantize(tiny_with_tokenizer, out, "lowra", bits=1.8, calib_samples=2, calib_seqlen=32, progress=False)
    q = m["quantization"]
    assert q["scheme"] == "lowra" and q["budget"] == 1.8 and q["objective"] == "fisher"
    assert q["objective_formula"].startswith("sum over rows c of E[g_c^2]")
    assert 1.79 <= q["avg_bits"] <= 1.8
    assert q["solver"]["optimal"] and q["solver"]["stored_bits"] <= q["solver"]["budget_bits"]
    info = api.inspect(out)
    # the achieved average in the manifest is what the shards hold
    assert info["totals"]["avg_bits_quantized"] == pytest.approx(q["avg_bits"], abs=1e-12)
    art = Artifact.open(out, verify=True)
    rows = [r for r in info["tensors"] if r["scheme"] == "lowra"]
    assert len(rows) == 14 and all("bit_histogram" in r for r in rows)
    assert sum(sum(r["bit_histogram"].values()) for r in rows) == q["solver"]["rows"]
    assert {k: sum(r["bit_histogram"][k] for r in rows) for k in ("1", "2", "4")} == q["bit_histogram"]
    name = "model.layers.1.mlp.down_proj.weight"
    w = art.dense(name, torch.float32)
    assert w.shape == (64, 160) and torch.isfinite(w).all()
    # every row holds at most 2^b distinct values
    rb = art.quantized_tensor(name).tensors["row_bits"]
    assert all(len(torch.unique(w[r])) <= (1 << int(rb[r])) for r in range(64))
    json.dumps(m)  # manifest is JSON-serialisable
    # errors: too small a budget names the minimum; existing output fails before calibration
    with pytest.raises(OptionError, match="smallest LowRA size"):
        api.quantize(tiny_with_tokenizer, tmp_path / "x", "lowra", bits=1.2, progress=False)
    with pytest.raises(OutputExistsError):
        api.quantize(tiny_with_tokenizer, out, "lowra", bits=1.8, progress=False)
    with pytest.raises(OptionError, match="group-size"):
        api.quantize(tiny_with_tokenizer, tmp_path / "y", "lowra", bits=1.8, group_size=64, progress=False)


@pytest.mark.slow
def test_budget_met_on_smollm2(smollm2, tmp_path):
    from lowbitpack import api

    m = api.quantize(smollm2, tmp_path / "a", "lowra", bits=1.5, calib_samples=4, calib_seqlen=128, progress=False)
    q = m["quantization"]
    assert 1.49 <= q["avg_bits"] <= 1.5
    assert q["solver"]["optimal"]
    assert api.inspect(tmp_path / "a")["totals"]["avg_bits_quantized"] == pytest.approx(q["avg_bits"], abs=1e-12)


def test_fisher_row_weights_steer_the_allocation():
    from lowbitpack.flows.lowra import allocate_bits

    w, h = _heavy_rows(64, 40, seed=11)
    s = LowRA(2.0)
    fits = {"a": s.fit(w[:32], h), "b": s.fit(w[32:], h)}
    numels = {"a": 32 * 40, "b": 32 * 40}
    budget = (32 * row_cost_bits(40, 1) + 32 * row_cost_bits(40, 2)) / (64 * 40)
    # tensor "a" does not matter to the loss (zero output gradients): its rows drop to 1 bit
    rb, info = allocate_bits(fits, numels, budget, row_weights={"a": torch.zeros(32), "b": torch.ones(32)})
    assert info["optimal"]
    assert (rb["a"] == 1).all() and (rb["b"] >= 2).all()
    rb2, _ = allocate_bits(fits, numels, budget, row_weights={"a": torch.ones(32), "b": torch.zeros(32)})
    assert (rb2["b"] == 1).all() and (rb2["a"] >= 2).all()
    with pytest.raises(ValueError, match="objective"):
        LowRA(2.0, objective="mse")


def test_collect_stats_output_gradients(tiny_with_tokenizer):
    from transformers import AutoTokenizer

    from lowbitpack.flows import lowra as flow
    from lowbitpack.io.checkpoint import SourceCheckpoint

    ckpt = SourceCheckpoint.open(tiny_with_tokenizer)
    names = flow.selected_weights(ckpt, None)
    win = flow.calibration_windows(AutoTokenizer.from_pretrained(ckpt.path), None, 2, 16, 0)
    assert win.shape == (2, 16)
    act, grads = flow.collect_stats(ckpt.path, names, win, "cpu", False, output_grads=True)
    act_only = flow.collect_act_stats(ckpt.path, names, win, "cpu", False)
    for n in names:
        shape = ckpt.tensor_infos()[n]["shape"]
        assert act[n].shape == (shape[1],) and grads[n].shape == (shape[0],)
        assert (grads[n] >= 0).all() and grads[n].sum() > 0
        torch.testing.assert_close(act[n], act_only[n])


def test_golden_lowra_v1_still_decodes():
    """formats/golden/lowra_golden.safetensors (frozen) decodes as the spec says, through the dispatcher."""
    golden = load_file(str(Path(__file__).resolve().parents[1] / "formats" / "golden" / "lowra_golden.safetensors"))
    cases = sorted({k.split(".")[0] for k in golden})
    assert cases == ["all4_3x5", "mixed_7x33", "no2_4x9", "one_1x1"]
    for case in cases:
        stored = {k.split(".", 1)[1]: v for k, v in golden.items() if k.startswith(case + ".") and not k.endswith("dequant")}
        expect = golden[f"{case}.dequant"]
        shape = tuple(expect.shape)
        check_lowra(stored, shape)
        qt = QuantizedTensor("lowra", "lowra-v1", 2.0, None, shape, torch.float32, stored)
        assert torch.equal(dequantize(qt, torch.float32), expect), case
        # independent decode straight from formats/artifact-v1.md
        rb = stored["row_bits"].tolist()
        for b in WIDTHS:
            rows = [r for r in range(shape[0]) if rb[r] == b]
            codes = stored[f"codes{b}"].tolist()
            for i, r in enumerate(rows):
                for j in range(shape[1]):
                    q = (codes[i][j * b // 8] >> (j * b % 8)) & ((1 << b) - 1)
                    assert expect[r, j] == stored[f"codebook{b}"][i, q].float()
