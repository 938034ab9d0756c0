"""QWHA adapters: reading the reference's format, ΔW = S·M/n (and why the reference's merge is wrong),
bundling and merging, and training on packed bases with the quantisation-error initialisation."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode

from lowbitpack.adapters import detect_type, get_kind
from lowbitpack.adapters.peft_io import read_peft_adapter
from lowbitpack.adapters.qwha import (INIT_FILE, qwha_delta, qwha_forward, reference_merge_delta,
                                      sparse_spectrum_matrix)
from lowbitpack.adapters.qwha_train import (QwhaLinear, allocate_per_channel, attach_qwha, init_from_error,
                                            qwha_adapter_config, random_locations, save_qwha_adapter,
                                            select_spectrum)
from lowbitpack.errors import InputError, OptionError
from lowbitpack.hadamard import dense_hadamard, wht

from .conftest import make_tiny_llama

PREFIX = "base_model.model."


# ---------------------------------------------------------------------------------------------- helpers
def _random_adapter(shapes: dict[str, tuple[int, int]], n: int | dict[str, int], seed: int = 0, scaling: float = 150.0,
                    index_dtype=torch.int64) -> tuple[dict, dict[str, torch.Tensor]]:
    """A QWHA adapter laid out exactly as the reference's save_pretrained writes it (adapter "default")."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (out_f, in_f) in shapes.items():
        k = n[module] if isinstance(n, dict) else n
        flat = torch.randperm(out_f * in_f, generator=g)[:k]
        key = PREFIX + module
        tensors[f"{key}.qwha_spectrum"] = torch.randn(k, generator=g) * 1e-3
        tensors[f"{key}.qwha_indices_default"] = torch.stack([flat // in_f, flat % in_f]).to(index_dtype)
        tensors[f"{key}.qwha_scaling_default"] = torch.tensor(scaling, dtype=torch.float32)
        tensors[f"{key}.qwha_n_frequency_default"] = torch.tensor(1000, dtype=torch.long)  # stale, as the reference's
        tensors[f"{key}.qwha_random_loc_seed_default"] = torch.tensor(777, dtype=torch.long)
    config = {"peft_type": "QWHA", "task_type": "CAUSAL_LM", "n_frequency": 1000, "scaling": scaling,
              "random_loc_seed": 777, "fan_in_fan_out": False, "bias": "none", "modules_to_save": None,
              "target_modules": sorted({m.rsplit(".", 1)[-1] for m in shapes}), "n_frequency_pattern": {},
              "init_weights": True, "base_model_name_or_path": None, "inference_mode": True}
    return config, tensors


def _write_adapter(path: Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    return path


def _parts(tensors: dict[str, torch.Tensor], module: str) -> tuple[torch.Tensor, torch.Tensor]:
    return tensors[f"{PREFIX}{module}.qwha_spectrum"], tensors[f"{PREFIX}{module}.qwha_indices_default"]


class MaxNumel(TorchDispatchMode):
    """Largest floating tensor any op produces inside the block (memory sanity by shapes, not timing). Byte views
    (hashing reads a tensor as uint8) are not matrices and are left out."""

    def __init__(self):
        super().__init__()
        self.max = 0
        self.shapes: set[tuple[int, ...]] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                self.max = max(self.max, t.numel())
                self.shapes.add(tuple(t.shape))
        return out


LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _llama_shapes(ckpt: Path, targets=LLAMA_TARGETS) -> dict[str, tuple[int, int]]:
    from safetensors import safe_open
    shapes = {}
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        for k in f.keys():
            if k.endswith(".weight") and k.rsplit(".", 2)[-2] in targets:
                shapes[k[: -len(".weight")]] = tuple(f.get_slice(k).get_shape())
    return shapes


def _byte_tokenizer(dst: Path) -> None:
    """A byte-level tokenizer with exactly 256 ids (no merges), matching the tiny models' vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(dst / "tokenizer.json"))
    (dst / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))


def _tiny_with_tokenizer(path: Path, hidden: int, inter: int) -> Path:
    src = make_tiny_llama(path, hidden=hidden, inter=inter, dtype=torch.float32, seed=3)
    _byte_tokenizer(src)
    return src


TEXT = "\n\n".join(["In the beginning God created the heaven and the earth.",
                    "And the earth was without form, and void; and darkness was upon the face of the deep.",
                    "And God said, Let there be light: and there was light."] * 8)


# ---------------------------------------------------------------------------------------------- ΔW math
@pytest.mark.parametrize("out_f,in_f", [(8, 64), (5, 48), (7, 96), (3, 36), (6, 20), (4, 80), (9, 12)])
def test_merged_weight_equals_unmerged_forward(out_f, in_f):
    """x·(W + ΔW)ᵀ equals the reference's forward wht(x)·(wht(W) + S)ᵀ/n, for 2^k and m·2^k widths."""
    g = torch.Generator().manual_seed(out_f * in_f)
    w = torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
    k = max(1, out_f * in_f // 5)
    flat = torch.randperm(out_f * in_f, generator=g)[:k]
    idx = torch.stack([flat // in_f, flat % in_f])
    spec = torch.randn(k, generator=g, dtype=torch.float64)
    x = torch.randn(11, in_f, generator=g, dtype=torch.float64)
    unmerged = qwha_forward(x, w, spec, idx, 150.0)
    delta = qwha_delta(spec, idx, 150.0, (out_f, in_f), torch.float64)
    torch.testing.assert_close(x @ (w + delta).t(), unmerged, rtol=1e-10, atol=1e-9)
    # ΔW = S·M/n with the dense matrix, as a second opinion on the fast path
    s = sparse_spectrum_matrix(spec, idx, 150.0, (out_f, in_f), torch.float64)
    torch.testing.assert_close(delta, s @ dense_hadamard(in_f, torch.float64) / in_f, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("out_f,in_f", [(8, 64), (7, 96), (6, 36)])
def test_reference_style_merge_is_not_the_forward(out_f, in_f):
    """The reference's merge() adds S itself to W; that changes the layer's outputs by far more than rounding."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
    k = out_f * 4
    flat = torch.randperm(out_f * in_f, generator=g)[:k]
    idx = torch.stack([flat // in_f, flat % in_f])
    spec = torch.randn(k, generator=g, dtype=torch.float64) * 1e-2
    x = torch.randn(16, in_f, generator=g, dtype=torch.float64)
    unmerged = qwha_forward(x, w, spec, idx, 150.0)
    ours = x @ (w + qwha_delta(spec, idx, 150.0, (out_f, in_f), torch.float64)).t()
    theirs = x @ (w + reference_merge_delta(spec, idx, 150.0, (out_f, in_f), torch.float64)).t()
    base = x @ w.t()
    adapter_effect = (unmerged - base).norm()
    assert (ours - unmerged).norm() < 1e-9 * adapter_effect
    # the reference's merge is off by more than the adapter's whole effect: it puts the spectral coefficients into
    # the weight domain untransformed and without the 1/n
    assert (theirs - unmerged).norm() > adapter_effect
    # and its ΔW is a different matrix: the sparse S, not S·M/n
    s = reference_merge_delta(spec, idx, 150.0, (out_f, in_f), torch.float64)
    assert int((s != 0).sum()) == k
    assert int((qwha_delta(spec, idx, 150.0, (out_f, in_f), torch.float64) != 0).sum()) > k


def test_duplicate_indices_add_up():
    idx = torch.tensor([[1, 1], [3, 3]])
    spec = torch.tensor([0.5, 0.25], dtype=torch.float64)
    one = qwha_delta(torch.tensor([0.75], dtype=torch.float64), torch.tensor([[1], [3]]), 2.0, (4, 12), torch.float64)
    torch.testing.assert_close(qwha_delta(spec, idx, 2.0, (4, 12), torch.float64), one)


@pytest.mark.parametrize("out_f,in_f", [(576, 576), (192, 576), (1536, 576), (576, 1536)])
def test_delta_on_smollm2_shapes_builds_no_square_matrix(out_f, in_f):
    """SmolLM2-135M's shapes (576 = 36·16, 1536 = 12·128): nothing larger than ΔW itself is created."""
    g = torch.Generator().manual_seed(0)
    k = 16 * (out_f + in_f)  # the LoRA-r16-equivalent budget
    flat = torch.randperm(out_f * in_f, generator=g)[:k]
    idx = torch.stack([flat // in_f, flat % in_f])
    spec = torch.randn(k, generator=g)
    kind = get_kind("qwha")
    parts = {"spectrum": spec, "indices": idx}
    mode = MaxNumel()
    with mode:
        delta = kind.delta_weight("m", parts, (out_f, in_f), {"scaling": 150.0})
    assert delta.shape == (out_f, in_f)
    assert mode.max <= out_f * in_f
    assert (in_f, in_f) not in mode.shapes or in_f == out_f
    # exactness against the dense reference on a few rows
    rows = torch.unique(idx[0])[:3]
    s = sparse_spectrum_matrix(spec.double(), idx, 150.0, (out_f, in_f), torch.float64)[rows]
    torch.testing.assert_close(delta[rows].double(), s @ dense_hadamard(in_f, torch.float64) / in_f,
                               rtol=1e-5, atol=1e-6)


def test_sparse_rows_transform_only_their_rows():
    """Rows of S without a nonzero are never transformed: 3 nonzero rows -> a [3, in] transform."""
    out_f, in_f = 1536, 576
    idx = torch.tensor([[5, 5, 700, 1500], [0, 10, 3, 575]])
    spec = torch.ones(4)
    mode = MaxNumel()
    with mode:
        delta = qwha_delta(spec, idx, 1.0, (out_f, in_f))
    assert (3, in_f) in mode.shapes
    assert set(torch.nonzero(delta.abs().sum(1)).flatten().tolist()) == {5, 700, 1500}


# ---------------------------------------------------------------------------------------------- reading
def test_reads_reference_layout(tmp_path):
    shapes = {"model.layers.0.self_attn.q_proj": (64, 64), "model.layers.0.mlp.down_proj": (64, 96)}
    config, tensors = _random_adapter(shapes, {"model.layers.0.self_attn.q_proj": 50,
                                               "model.layers.0.mlp.down_proj": 70}, index_dtype=torch.int32)
    d = _write_adapter(tmp_path / "a", config, tensors)
    assert detect_type(config) == "qwha"
    ad = read_peft_adapter(d)
    assert ad.type == "qwha" and sorted(ad.modules) == sorted(shapes)
    ad.check_against({m + ".weight": s for m, s in shapes.items()}, d)
    for module, shape in shapes.items():
        spec, idx = _parts(tensors, module)
        torch.testing.assert_close(ad.delta_weight(module, shape), qwha_delta(spec, idx.long(), 150.0, shape))
    assert ad.kind.describe_config(config)["peft_type"] == "QWHA"


def _expect_input_error(tmp_path, config, tensors, match, shapes=None):
    d = _write_adapter(tmp_path / "bad", config, tensors)
    with pytest.raises(InputError, match=match):
        ad = read_peft_adapter(d)
        if shapes is not None:
            ad.check_against(shapes, d)


def test_refuses_malformed_adapters(tmp_path):
    shapes = {"model.layers.0.self_attn.q_proj": (8, 12)}
    key = PREFIX + "model.layers.0.self_attn.q_proj"
    config, tensors = _random_adapter(shapes, 10)

    bad = dict(tensors)
    bad[f"{key}.qwha_indices_default"] = bad[f"{key}.qwha_indices_default"].float()
    _expect_input_error(tmp_path / "1", config, bad, "floating point|integer")

    bad = {k: v for k, v in tensors.items() if "indices" not in k}
    _expect_input_error(tmp_path / "2", config, bad, "lacks qwha_indices")

    bad = dict(tensors)
    bad[f"{key}.qwha_other_default"] = torch.zeros(1)
    _expect_input_error(tmp_path / "3", config, bad, "unexpected tensor key")

    bad = dict(tensors)
    bad[f"{key}.qwha_spectrum"] = torch.zeros(9)
    _expect_input_error(tmp_path / "4", config, bad, r"\[2, 9\]")

    _expect_input_error(tmp_path / "5", {**config, "fan_in_fan_out": True}, tensors, "fan_in_fan_out")
    _expect_input_error(tmp_path / "6", {**config, "scaling": 300.0}, tensors, "differs from the config")
    _expect_input_error(tmp_path / "7", {**config, "bias": "all"}, tensors, "bias")

    # indices beyond the base weight, and an in_features without a Hadamard matrix
    _expect_input_error(tmp_path / "8", config, tensors, "indices reach", {key[len(PREFIX):] + ".weight": (4, 12)})
    _expect_input_error(tmp_path / "9", config, tensors, "no Hadamard matrix", {key[len(PREFIX):] + ".weight": (8, 13)})


def test_refuses_pickle_only(tmp_path):
    shapes = {"model.layers.0.self_attn.q_proj": (8, 12)}
    config, _ = _random_adapter(shapes, 10)
    d = tmp_path / "p"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps(config))
    (d / "adapter_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(InputError, match="never unpickles"):
        read_peft_adapter(d)


# ---------------------------------------------------------------------------------------------- init + layer
def test_init_cancels_quantisation_error_and_global_is_optimal():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 48, generator=g)
    q = torch.round(w * 2) / 2  # a coarse quantiser
    e = w - q
    errs = {}
    for sel in ("channel", "global"):
        idx, spec = init_from_error(e, 300, scaling=150.0, selection=sel)
        assert idx.shape == (2, 300) and len({(int(r), int(c)) for r, c in idx.t()}) == 300  # no duplicates
        delta = qwha_delta(spec, idx, 150.0, e.shape)
        errs[sel] = float((e - delta).norm() / e.norm())
    assert errs["global"] <= errs["channel"] + 1e-6 < 1.0
    # with the full budget the error vanishes (exact spectrum F = wht(E))
    idx, spec = init_from_error(e, e.numel(), scaling=150.0, selection="channel")
    torch.testing.assert_close(qwha_delta(spec, idx, 150.0, e.shape), e, rtol=1e-4, atol=1e-5)


def test_global_selection_keeps_largest_coefficients():
    e = torch.randn(6, 12, dtype=torch.float64)
    idx, vals = select_spectrum(e, 10, "global")
    full = wht(e)
    threshold = full.abs().flatten().topk(10).values.min()
    assert (vals.abs() >= threshold.float() - 1e-6).all()
    torch.testing.assert_close(vals.double(), full[idx[0], idx[1]], rtol=1e-6, atol=1e-6)


def test_channel_allocation_respects_budget_and_cap():
    counts = allocate_per_channel(torch.tensor([100.0, 1.0, 1.0, 0.0, 5.0]), 30, cap=8)
    assert int(counts.sum()) == 30 and int(counts.max()) <= 8 and int(counts[0]) == 8
    assert int(allocate_per_channel(torch.zeros(4), 6, cap=2).sum()) == 6
    with pytest.raises(ValueError):
        allocate_per_channel(torch.ones(2), 5, cap=2)


def test_zero_init_matches_reference_random_locations():
    idx = random_locations(8, 12, 20, 777)
    flat = torch.randperm(96, generator=torch.Generator().manual_seed(777))[:20]
    assert torch.equal(idx, torch.stack([flat // 12, flat % 12]))


@pytest.mark.parametrize("in_f", [64, 48])
def test_layer_forward_is_the_reference_forward(in_f):
    base = torch.nn.Linear(in_f, 10, bias=False)
    g = torch.Generator().manual_seed(2)
    idx, _ = init_from_error(torch.randn(10, in_f, generator=g), 40, 150.0, "global")
    spec = torch.randn(40, generator=g)
    layer = QwhaLinear(base, idx, spec, 150.0)
    x = torch.randn(2, 5, in_f, generator=g)
    expected = qwha_forward(x.double(), base.weight.double(), spec.double(), idx, 150.0)
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x @ (base.weight + layer.delta_weight()).t(), layer(x), rtol=1e-4, atol=1e-5)
    layer(x).sum().backward()
    assert layer.qwha_spectrum.grad is not None and layer.qwha_spectrum.grad.abs().sum() > 0


def test_saved_format_and_config_pattern(tmp_path):
    model = torch.nn.Module()
    model.a = torch.nn.Module()
    model.a.q_proj = torch.nn.Linear(12, 8, bias=False)
    model.a.down_proj = torch.nn.Linear(24, 12, bias=False)
    layers = attach_qwha(model, ["q_proj", "down_proj"], r=1, init="zeros", scaling=150.0)
    assert {n: l.n_frequency for n, l in layers.items()} == {"a.q_proj": 20, "a.down_proj": 36}
    save_qwha_adapter(tmp_path, layers, ["q_proj", "down_proj"], "org/model")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "QWHA" and cfg["scaling"] == 150.0 and cfg["random_loc_seed"] == 777
    # one target has the common count, the other is listed in n_frequency_pattern for the reference's loader
    assert cfg["n_frequency"] in (20, 36)
    other = "down_proj" if cfg["n_frequency"] == 20 else "q_proj"
    assert cfg["n_frequency_pattern"] == {other: 36 if other == "down_proj" else 20}
    t = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert set(t) == {f"{PREFIX}a.{m}.qwha_{r}" for m in ("q_proj", "down_proj")
                      for r in ("spectrum", "indices_default", "scaling_default", "n_frequency_default",
                                "random_loc_seed_default")}
    assert t[f"{PREFIX}a.q_proj.qwha_indices_default"].dtype == torch.int64
    assert t[f"{PREFIX}a.q_proj.qwha_indices_default"].shape == (2, 20)
    assert int(t[f"{PREFIX}a.down_proj.qwha_n_frequency_default"]) == 36
    ad = read_peft_adapter(tmp_path)
    assert ad.type == "qwha"
    assert qwha_adapter_config(layers, ["q_proj"], None)["target_modules"] == ["q_proj"]
    layers["a.q_proj"].scaling = 2.0
    with pytest.raises(ValueError, match="disagree"):
        qwha_adapter_config(layers, ["q_proj"], None)


def test_attach_refuses_unknown_targets_and_sizes():
    model = torch.nn.Module()
    model.q_proj = torch.nn.Linear(13, 8)
    with pytest.raises(OptionError, match="Hadamard"):
        attach_qwha(model, ["q_proj"], r=1, init="zeros")
    with pytest.raises(OptionError, match="no linear layer"):
        attach_qwha(model, ["nothing"], r=1, init="zeros")
    model.q_proj = torch.nn.Linear(12, 8)
    with pytest.raises(OptionError, match="original"):
        attach_qwha(model, ["q_proj"], r=1, init="error")


# ---------------------------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("hidden,inter", [(64, 128), (48, 96)])
def test_train_bundle_merge_end_to_end(tmp_path, hidden, inter):
    """2-layer Llama (hidden 64 = 2^6, and 48 = 12·4 with intermediate 96 = 12·8): quantize int4, train QWHA with the
    quantisation-error init, bundle, merge --restore 16; the merged model equals the unmerged QWHA model on the
    original weights, and restore 8 (adapter beside) / --fold work."""
    from lowbitpack import api
    from transformers import AutoModelForCausalLM

    src = _tiny_with_tokenizer(tmp_path / "src", hidden, inter)
    packed = tmp_path / "packed"
    api.quantize(src, packed, "int4", group_size=32, progress=False)
    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj")
    rec = api.train(packed, tmp_path / "adapter", adapter="qwha", data=data, r=2, scaling=150.0,
                    target_modules=targets, max_steps=3, batch_size=2, seq_len=32, lr=1e-3, progress=False,
                    dtype="fp32")
    assert rec["hparams"]["adapter_type"] == "qwha" and rec["result"]["steps"] == 3
    assert all(math.isfinite(x) for x in (rec["result"]["first_loss"], rec["result"]["last_loss"]))
    init = rec["init"]
    assert init["mean_after"] < init["mean_before"]  # the initial ΔW cancels part of W - Q(W)
    layers = init["layers"]
    assert len(layers) == 2 * len(targets)
    assert layers["model.layers.0.self_attn.q_proj"]["n_frequency"] == 2 * (hidden + hidden)

    bundle = tmp_path / "bundle"
    m = api.bundle(tmp_path / "adapter", packed, bundle)
    assert m["adapter"]["type"] == "qwha" and m["training"]["hparams"]["adapter_type"] == "qwha"
    assert m["base"]["bits"] == 4 and len(m["base"]["tensors"]) == 2 * len(targets)
    card = (bundle / "README.md").read_text()
    assert "QWHA, n_frequency=" in card and "r=None" not in card and "standard PEFT adapter" not in card

    # the initial (error-cancelling) spectra travel with the bundle; restores apply the learned part only
    assert (bundle / INIT_FILE).is_file() and INIT_FILE in m["files"]
    t = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    t0 = load_file(str(tmp_path / "adapter" / INIT_FILE))
    learned = {mod: t[f"{PREFIX}{mod}.qwha_spectrum"] - t0[f"{PREFIX}{mod}.qwha_spectrum_init"] for mod in layers}
    assert all(v.abs().max() > 0 for v in learned.values())  # 3 steps moved every layer

    merged = tmp_path / "merged16"
    api.merge(bundle, merged, restore=16, original=src, progress=False)
    orig = load_file(str(src / "model.safetensors"))
    got = load_file(str(merged / "model.safetensors"))
    adapter = read_peft_adapter(tmp_path / "adapter")
    for module in adapter.modules:
        name = module + ".weight"
        delta = adapter.delta_weight(module, tuple(orig[name].shape))
        idx = t[f"{PREFIX}{module}.qwha_indices_default"]
        torch.testing.assert_close(delta, qwha_delta(learned[module], idx, 150.0, tuple(orig[name].shape)))
        torch.testing.assert_close(got[name], orig[name] + delta)

    # the merged checkpoint's logits = QWHA layers (reference forward, learned spectrum) on the original weights
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    merged_model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    ref_model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    qlayers = {}
    for module in adapter.modules:
        base = ref_model.get_submodule(module)
        qlayers[module] = QwhaLinear(base, t[f"{PREFIX}{module}.qwha_indices_default"], learned[module], 150.0)
    for module, layer in qlayers.items():
        parent, _, child = module.rpartition(".")
        setattr(ref_model.get_submodule(parent), child, layer)
    with torch.no_grad():
        a = merged_model(ids).logits
        b = ref_model(ids).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)

    # PLR-8 with the adapter beside, and folded
    beside = api.merge(bundle, tmp_path / "plr8", restore=8, original=src, progress=False)
    assert not beside["restore"]["merged"]
    assert read_peft_adapter(tmp_path / "plr8").type == "qwha"
    tb = load_file(str(tmp_path / "plr8" / "adapter_model.safetensors"))
    for mod in layers:  # the adapter beside the restored base carries the learned part
        torch.testing.assert_close(tb[f"{PREFIX}{mod}.qwha_spectrum"], learned[mod])
    folded = api.merge(bundle, tmp_path / "plr4f", restore=4, fold=True, original=src, progress=False)
    assert folded["restore"]["merged"] and folded["errors"]["what"] == "fold_error"


def test_merge_restore16_smollm2_shapes(tmp_path):
    """A 1-layer model with SmolLM2-135M's widths (hidden 576 = 36·16, intermediate 1536 = 12·128): bundle a QWHA
    adapter on all seven projections against the original checkpoint and merge --restore 16. Memory sanity by
    shapes: no tensor larger than the largest weight is created (a dense 1536×1536 Hadamard would be)."""
    from lowbitpack import api
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=1, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=256, max_position_embeddings=128, tie_word_embeddings=True)
    src = tmp_path / "smol"
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(src)
    shapes = _llama_shapes(src)
    assert {s for s in shapes.values()} == {(576, 576), (192, 576), (1536, 576), (576, 1536)}
    budget = {m: 16 * sum(s) for m, s in shapes.items()}  # LoRA-r16-equivalent
    config, tensors = _random_adapter(shapes, budget, scaling=150.0)
    adapter = _write_adapter(tmp_path / "adapter", config, tensors)
    bundle = tmp_path / "bundle"
    api.bundle(adapter, src, bundle)
    mode = MaxNumel()
    with mode:
        api.merge(bundle, tmp_path / "merged", restore=16, original=src, progress=False)
    assert mode.max <= 1536 * 576
    assert (1536, 1536) not in mode.shapes
    got = load_file(str(tmp_path / "merged" / "model.safetensors"))
    orig = load_file(str(src / "model.safetensors"))
    for module in ("model.layers.0.mlp.down_proj", "model.layers.0.self_attn.k_proj"):
        spec, idx = _parts(tensors, module)
        s = sparse_spectrum_matrix(spec.double(), idx, 150.0, shapes[module], torch.float64)
        in_f = shapes[module][1]
        expected = orig[module + ".weight"].double() + s @ dense_hadamard(in_f, torch.float64) / in_f
        torch.testing.assert_close(got[module + ".weight"].double(), expected.to(torch.bfloat16).double())


def test_cli_train_qwha_and_option_errors(tmp_path):
    """`lowbitpack train --adapter qwha` (zeros init: the reference's random locations); options that do not apply."""
    from click.testing import CliRunner

    from lowbitpack import api
    from lowbitpack.cli import main

    src = _tiny_with_tokenizer(tmp_path / "src", 48, 96)
    packed = tmp_path / "packed"
    api.quantize(src, packed, "int4", group_size=16, progress=False)
    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    out = tmp_path / "adapter"
    res = CliRunner().invoke(main, ["train", str(packed), "-o", str(out), "--adapter", "qwha", "--qwha-init", "zeros",
                                    "--n-frequency", "64", "--target-modules", "q_proj,down_proj", "--max-steps", "2",
                                    "--batch-size", "1", "--seq-len", "16", "--data", str(data), "--dtype", "fp32",
                                    "--json", "--no-progress"])
    assert res.exit_code == 0, res.output
    rec = json.loads(res.stdout)
    assert rec["hparams"]["init"] == "zeros" and rec["init"] is None and rec["result"]["qwha_layers"] == 4
    t = load_file(str(out / "adapter_model.safetensors"))
    idx = t[PREFIX + "model.layers.0.self_attn.q_proj.qwha_indices_default"]
    assert torch.equal(idx, random_locations(48, 48, 64, 777))  # where the reference would put them
    assert t[PREFIX + "model.layers.0.self_attn.q_proj.qwha_spectrum"].abs().sum() > 0  # trained away from 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["n_frequency"] == 64 and cfg["n_frequency_pattern"] == {}

    with pytest.raises(OptionError, match="do not apply"):
        api.train(packed, tmp_path / "x", adapter="qwha", dropout=0.1, progress=False)
    with pytest.raises(OptionError, match="qwha only"):
        api.train(packed, tmp_path / "y", n_frequency=10, progress=False)


def test_error_init_is_dropped_on_restore(tmp_path):
    """An untrained error-init adapter restored to 16 bits gives back W exactly (its ΔW_init only cancels the
    training base's error); without the init file the same adapter would add ΔW_init ≈ W − Q(W) to W."""
    from lowbitpack import api

    src = make_tiny_llama(tmp_path / "src", hidden=48, inter=96, dtype=torch.float32, seed=4)
    orig = load_file(str(src / "model.safetensors"))
    model = torch.nn.Module()
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    for name in names:
        w = orig[name + ".weight"]
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        lin.weight.data = torch.round(w * 8) / 8  # the "packed" base Q(W)
        parent = model
        for part in name.split(".")[:-1]:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        parent.add_module(name.rsplit(".", 1)[1], lin)
    originals = {n: orig[n + ".weight"] for n in names}
    layers = attach_qwha(model, ["q_proj", "down_proj"], r=4, scaling=150.0, init="error", originals=originals)
    init = {n: layer.qwha_spectrum.detach().clone() for n, layer in layers.items()}
    save_qwha_adapter(tmp_path / "with_init", layers, ["q_proj", "down_proj"], None, init)
    save_qwha_adapter(tmp_path / "without_init", layers, ["q_proj", "down_proj"], None)
    for variant in ("with_init", "without_init"):
        api.bundle(tmp_path / variant, src, tmp_path / f"b_{variant}")
        api.merge(tmp_path / f"b_{variant}", tmp_path / f"m_{variant}", restore=16, original=src, progress=False)
    with_init = load_file(str(tmp_path / "m_with_init" / "model.safetensors"))
    without = load_file(str(tmp_path / "m_without_init" / "model.safetensors"))
    for n in names:
        w = orig[n + ".weight"]
        assert torch.equal(with_init[n + ".weight"], w)
        e = w - torch.round(w * 8) / 8
        d = without[n + ".weight"] - w  # = ΔW_init, which correlates with the k-bit error, not with W
        assert float((d * e).sum()) > 0.1 * float(d.norm() * e.norm())

    # a sidecar that does not match the adapter is refused by name
    bad = tmp_path / "with_init" / INIT_FILE
    save_file({f"{PREFIX}model.layers.0.self_attn.q_proj.qwha_spectrum_init": torch.zeros(3)}, str(bad))
    with pytest.raises(InputError, match="initial spectra do not match"):
        read_peft_adapter(tmp_path / "with_init")


def test_restore_at_training_base_keeps_init(tmp_path):
    """Regression (bench/qwha_quality.py on SmolLM2: PLR-4 of an int4-trained error-init adapter differed from the
    trained model by 12.8 in max |logit| in a 1-step run): an unmerged restore whose packed tensors are bit-identical to the training
    base (int4 RTN, same group size) keeps the saved spectrum, so restored base + adapter = the trained model; a
    restore to another base (int8) still gets the learned part only."""
    from lowbitpack import api
    from lowbitpack.lowbit_linear import load_packed_model

    src = make_tiny_llama(tmp_path / "src", hidden=48, inter=96, dtype=torch.float32, seed=5)
    packed = tmp_path / "packed"
    api.quantize(src, packed, "int4", group_size=16, progress=False)
    orig = load_file(str(src / "model.safetensors"))
    targets = ["q_proj", "down_proj"]
    model = load_packed_model(packed, torch.float32)
    originals = {n[: -len(".weight")]: t for n, t in orig.items() if n.rsplit(".", 2)[-2] in targets}
    layers = attach_qwha(model, targets, r=2, scaling=150.0, init="error", originals=originals)
    init = {n: layer.qwha_spectrum.detach().clone() for n, layer in layers.items()}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # "training" moved the spectrum away from its initial value
        for layer in layers.values():
            layer.qwha_spectrum += torch.randn(layer.n_frequency, generator=g) * 1e-3
    save_qwha_adapter(tmp_path / "adapter", layers, targets, None, init)
    api.bundle(tmp_path / "adapter", packed, tmp_path / "bundle")
    ids = torch.randint(0, 256, (2, 12), generator=g)
    with torch.no_grad():
        trained = model(ids).logits

    def beside(out: Path):
        t = load_file(str(out / "adapter_model.safetensors"))
        return {n: t[f"{PREFIX}{n}.qwha_spectrum"] for n in layers}

    # --restore 4 --group-size 16: the same int4 tensors as the training base -> saved spectrum, trained model back
    api.merge(tmp_path / "bundle", tmp_path / "r4", restore=4, group_size=16, original=src, progress=False)
    for n, layer in layers.items():
        torch.testing.assert_close(beside(tmp_path / "r4")[n], layer.qwha_spectrum.detach(), rtol=0, atol=0)
    restored = load_packed_model(tmp_path / "r4", torch.float32)
    adapter = read_peft_adapter(tmp_path / "r4")
    for n, parts in adapter.modules.items():
        parent, _, child = n.rpartition(".")
        setattr(restored.get_submodule(parent), child,
                QwhaLinear(restored.get_submodule(n), parts["indices"], parts["spectrum"], 150.0))
    with torch.no_grad():
        torch.testing.assert_close(restored(ids).logits, trained, rtol=0, atol=1e-5)

    # another group size (different int4 tensors) and int8: the learned part only
    for out, kw in (("r4g32", {"restore": 4, "group_size": 32}), ("r8", {"restore": 8})):
        api.merge(tmp_path / "bundle", tmp_path / out, original=src, progress=False, **kw)
        for n, layer in layers.items():
            torch.testing.assert_close(beside(tmp_path / out)[n], layer.qwha_spectrum.detach() - init[n])
