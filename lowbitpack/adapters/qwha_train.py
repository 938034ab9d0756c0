"""Train QWHA adapters on a packed base, saved in the reference's format (peft_type "QWHA").

Each targeted `LowBitLinear` (frozen packed weight Q(W)) is wrapped by `QwhaLinear`:

    y = base(x) + wht(x) · Sᵀ / n,   S[rows, cols] = spectrum · scaling / √out   (n = in_features)

which is the reference's forward wht(x)·(wht(Q(W)) + S)ᵀ / n with the base part left to the packed layer
(wht(x)·wht(W)ᵀ / n = x·Wᵀ because M·Mᵀ = n·I). Only `spectrum` trains.

Initialisation (the QWHA paper's idea, data-free variant): the spectrum that reproduces the quantisation error
E = W − Q(W) exactly is F = wht(E) row by row (ΔW = S·M / n = E ⇔ S = E·Mᵀ). M/√n is orthogonal, so
‖E − ΔW‖_F = ‖F − S‖_F / √n and the best k-sparse S keeps k entries of F unchanged; refining the values by
least squares (the paper's step) changes nothing without calibration data. Where the k entries go:
  selection="channel"  the paper's allocation: each output channel gets a share of the layer's budget in
                       proportion to ‖F[r]‖ (capped at in_features), then its largest |F[r, c]|
  selection="global"   the k largest |F| of the whole layer (optimal for ‖E − ΔW‖_F)
init="zeros" is the reference's `init_weights=True`: random locations from `random_loc_seed` (the same
`randperm` the reference draws), spectrum 0. The budget per layer is `n_frequency`, or r·(in+out) to match
a LoRA of rank r (the reference's `match_lora_params`).

The adapter directory holds adapter_config.json (QWHAConfig fields) and adapter_model.safetensors with per
module `qwha_spectrum`, `qwha_indices_default`, `qwha_scaling_default`, `qwha_n_frequency_default` (the real
per-module count) and `qwha_random_loc_seed_default`, plus lowbitpack_training.json / train_log.jsonl, and for
init="error" `lowbitpack_qwha_init.safetensors` (the initial spectra: merges onto a restored base subtract them,
because the error they cancel is the training base's; see `lowbitpack.adapters.qwha`).
"""
from __future__ import annotations

import json
import math
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..artifact import Artifact
from ..errors import BaseMismatchError, InputError, OptionError
from ..hadamard import hadamard_factors, wht
from ..io.atomic import atomic_dir, check_output
from ..io.checkpoint import SourceCheckpoint, resolve_model_path
from ..io.hashing import sha256_tensor
from ..kernels import dequantize
from ..lowbit_linear import LowBitLinear, load_packed_model, lowbit_modules
from ..version import __version__
from .base import PREFIX
from .qwha import INIT_FILE, INIT_SUFFIX, qwha_delta, sparse_spectrum_matrix

ADAPTER_NAME = "default"
DEFAULT_SCALING = 3000.0  # the reference's LLM fine-tuning scripts (train_gsm8k.py); its config default is 150
DEFAULT_SEED = 777        # QWHAConfig.random_loc_seed default
INITS = ("error", "zeros")
SELECTIONS = ("channel", "global")


# ---------------------------------------------------------------------------------------------- the layer
class QwhaLinear(nn.Module):
    """A frozen linear layer (`LowBitLinear` or `nn.Linear`) plus a trainable sparse Walsh–Hadamard spectrum."""

    def __init__(self, base_layer: nn.Module, indices: torch.Tensor, spectrum: torch.Tensor, scaling: float,
                 random_loc_seed: int = DEFAULT_SEED):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = int(base_layer.in_features), int(base_layer.out_features)
        hadamard_factors(self.in_features)  # ValueError for sizes without a Hadamard matrix
        if indices.shape != (2, spectrum.numel()):
            raise ValueError(f"indices {tuple(indices.shape)} do not match spectrum [{spectrum.numel()}]")
        self.scaling = float(scaling)
        self.random_loc_seed = int(random_loc_seed)
        self.register_buffer("qwha_indices", indices.long().clone())
        self.qwha_spectrum = nn.Parameter(spectrum.detach().float().clone())

    @property
    def n_frequency(self) -> int:
        return self.qwha_spectrum.numel()

    def spectrum_matrix(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return sparse_spectrum_matrix(self.qwha_spectrum, self.qwha_indices, self.scaling,
                                      (self.out_features, self.in_features), dtype)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """ΔW = S·M / n of the current spectrum (float32): what this layer adds to its base. (Merges onto a restored
        base add the learned part only, see `lowbitpack.adapters.qwha`.)"""
        return qwha_delta(self.qwha_spectrum, self.qwha_indices, self.scaling, (self.out_features, self.in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        # The spectrum is float32; so are the transform and the product (WHT values grow with √n).
        xt = wht(x.float())
        delta = xt @ self.spectrum_matrix(torch.float32).t() / self.in_features
        return result + delta.to(result.dtype)

    def extra_repr(self) -> str:
        return f"n_frequency={self.n_frequency}, scaling={self.scaling}"


# ---------------------------------------------------------------------------------------------- init
def random_locations(out_features: int, in_features: int, n_frequency: int, seed: int) -> torch.Tensor:
    """[2, n] (row, col): the reference's `update_layer` draw, so zero-initialised adapters match it exactly."""
    flat = torch.randperm(out_features * in_features, generator=torch.Generator().manual_seed(seed))[:n_frequency]
    return torch.stack([flat // in_features, flat % in_features], dim=0)


def allocate_per_channel(weights: torch.Tensor, budget: int, cap: int) -> torch.Tensor:
    """Integer counts per channel summing to `budget`, proportional to `weights`, none above `cap`.

    Floors of the proportional shares first, then one more to the channels furthest below their share that
    still have room, until the budget is spent (the reference's version can exceed the cap)."""
    n = weights.numel()
    if budget > n * cap:
        raise ValueError(f"budget {budget} exceeds {n} channels x {cap}")
    w = weights.double().clamp_min(0)
    share = w / w.sum() * budget if float(w.sum()) > 0 else torch.full((n,), budget / n, dtype=torch.float64)
    counts = share.floor().clamp(max=cap).long()
    remaining = budget - int(counts.sum())
    while remaining > 0:
        room = counts < cap
        deficit = torch.where(room, share - counts, torch.full_like(share, -math.inf))
        take = min(remaining, int(room.sum()))
        idx = torch.topk(deficit, take).indices
        counts[idx] += 1
        remaining -= take
    return counts


def select_spectrum(error: torch.Tensor, n_frequency: int, selection: str = "channel"
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices [2, n], S values [n]) of the n_frequency-sparse S that best cancels `error` [out, in]."""
    out_f, in_f = error.shape
    if not 1 <= n_frequency <= out_f * in_f:
        raise ValueError(f"n_frequency must be in [1, {out_f * in_f}], got {n_frequency}")
    full = wht(error.double())  # S that reproduces E exactly (row r: wht(E[r]))
    if selection == "global":
        flat = torch.topk(full.abs().reshape(-1), n_frequency).indices
        rows, cols = flat // in_f, flat % in_f
    elif selection == "channel":
        counts = allocate_per_channel(full.norm(dim=1), n_frequency, in_f)
        order = torch.topk(full.abs(), int(counts.max()), dim=1).indices  # sorted, largest first
        keep = torch.arange(order.shape[1]).unsqueeze(0) < counts.unsqueeze(1)  # first counts[r] of each row
        rows = torch.arange(out_f).unsqueeze(1).expand_as(order)[keep]
        cols = order[keep]
    else:
        raise ValueError(f"unknown selection {selection!r}; choose {', '.join(SELECTIONS)}")
    return torch.stack([rows, cols]).long(), full[rows, cols].float()


def init_from_error(error: torch.Tensor, n_frequency: int, scaling: float, selection: str = "channel"
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, spectrum) such that ΔW cancels the largest part of `error` (spectrum in the stored scale)."""
    out_f = error.shape[0]
    indices, values = select_spectrum(error, n_frequency, selection)
    return indices, values / (scaling / math.sqrt(out_f))


# ---------------------------------------------------------------------------------------------- attach / save
def matches_target(name: str, targets: Sequence[str]) -> bool:
    """PEFT's rule for a list of target names: the module name equals one or ends with '.' + one."""
    return any(name == t or name.endswith("." + t) for t in targets)


def layer_budget(in_features: int, out_features: int, n_frequency: int | None, r: int | None) -> int:
    n = n_frequency if n_frequency is not None else int(r or 0) * (in_features + out_features)
    return max(1, min(n, in_features * out_features))


def attach_qwha(model: nn.Module, target_modules: Sequence[str], *, n_frequency: int | None = None,
                r: int | None = 16, scaling: float = DEFAULT_SCALING, random_loc_seed: int = DEFAULT_SEED,
                init: str = "zeros", originals: dict[str, torch.Tensor] | None = None,
                selection: str = "channel") -> dict[str, QwhaLinear]:
    """Wrap every targeted linear layer of `model` in place; returns {module name: QwhaLinear}.

    init="error" needs `originals` {module name: original W [out, in]}; the packed W is dequantized here."""
    if init not in INITS:
        raise OptionError(f"unknown QWHA init {init!r}", None, f"choose one of {', '.join(INITS)}")
    if selection not in SELECTIONS:
        raise OptionError(f"unknown QWHA selection {selection!r}", None, f"choose one of {', '.join(SELECTIONS)}")
    found = [(n, m) for n, m in model.named_modules()
             if isinstance(m, (LowBitLinear, nn.Linear)) and matches_target(n, target_modules)]
    if not found:
        raise OptionError(f"no linear layer matches --target-modules {','.join(target_modules)}", None,
                          "name modules of the model, e.g. q_proj,k_proj,v_proj,o_proj")
    wrapped: dict[str, QwhaLinear] = {}
    for name, layer in found:
        out_f, in_f = int(layer.out_features), int(layer.in_features)
        try:
            hadamard_factors(in_f)
        except ValueError as e:
            raise OptionError(f"{name}: {e}", None, "leave this layer out of --target-modules") from None
        budget = layer_budget(in_f, out_f, n_frequency, r)
        if init == "zeros":
            indices = random_locations(out_f, in_f, budget, random_loc_seed)
            spectrum = torch.zeros(budget)
        else:
            if originals is None or name not in originals:
                raise OptionError(f"{name}: init 'error' needs the original weight", None,
                                  "pass the original model (--original) or use --qwha-init zeros")
            with torch.no_grad():
                w = originals[name].float()
                q = packed_weight(layer)
                indices, spectrum = init_from_error(w - q, budget, scaling, selection)
        device = next((t.device for t in list(layer.parameters()) + list(layer.buffers())), torch.device("cpu"))
        q_layer = QwhaLinear(layer, indices, spectrum, scaling, random_loc_seed).to(device)
        _set_submodule(model, name, q_layer)
        wrapped[name] = q_layer
    return wrapped


@torch.no_grad()
def packed_weight(layer: nn.Module) -> torch.Tensor:
    """Q(W) in float32 (decoded afresh: a layer's dense cache holds its compute dtype only)."""
    if isinstance(layer, LowBitLinear):
        return dequantize(layer.qt, torch.float32)
    return layer.weight.detach().float()


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def qwha_state_dict(layers: dict[str, QwhaLinear]) -> dict[str, torch.Tensor]:
    """The tensors the reference's save_pretrained writes (adapter name "default")."""
    out: dict[str, torch.Tensor] = {}
    for name, layer in sorted(layers.items()):
        key = PREFIX + name
        out[f"{key}.qwha_spectrum"] = layer.qwha_spectrum.detach().float().cpu().contiguous()
        out[f"{key}.qwha_indices_{ADAPTER_NAME}"] = layer.qwha_indices.detach().long().cpu().contiguous()
        out[f"{key}.qwha_scaling_{ADAPTER_NAME}"] = torch.tensor(layer.scaling, dtype=torch.float32)
        out[f"{key}.qwha_n_frequency_{ADAPTER_NAME}"] = torch.tensor(layer.n_frequency, dtype=torch.long)
        out[f"{key}.qwha_random_loc_seed_{ADAPTER_NAME}"] = torch.tensor(layer.random_loc_seed, dtype=torch.long)
    return out


def qwha_adapter_config(layers: dict[str, QwhaLinear], target_modules: Sequence[str],
                        base_model: str | None) -> dict[str, Any]:
    """adapter_config.json with the reference's QWHAConfig fields (scaling and seed: the layers', which agree).

    Layers whose frequency count differs from `n_frequency` get an `n_frequency_pattern` entry the reference's
    regex (rf".*\\.{key}$") resolves: the target name when all its layers agree, else the module's path."""
    scalings = {layer.scaling for layer in layers.values()}
    seeds = {layer.random_loc_seed for layer in layers.values()}
    if len(scalings) != 1 or len(seeds) != 1:
        # the config has one `scaling` and one `random_loc_seed`; per-layer values have no place in it
        raise ValueError(f"layers disagree on scaling {sorted(scalings)} or seed {sorted(seeds)}")
    scaling, random_loc_seed = scalings.pop(), seeds.pop()
    counts = {n: layer.n_frequency for n, layer in layers.items()}
    common = Counter(counts.values()).most_common(1)[0][0]
    pattern: dict[str, int] = {}
    for target in target_modules:
        mine = {n: c for n, c in counts.items() if matches_target(n, [target])}
        values = set(mine.values())
        if len(values) == 1 and values != {common}:
            pattern[target] = values.pop()
        elif len(values) > 1:
            for n, c in mine.items():
                if c != common:
                    pattern[n.split(".", 1)[1] if "." in n else n] = c
    return {
        "peft_type": "QWHA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "revision": None,
        "inference_mode": True, "auto_mapping": None,
        "n_frequency": common, "scaling": float(scaling), "random_loc_seed": int(random_loc_seed),
        "fan_in_fan_out": False, "target_modules": sorted(target_modules), "exclude_modules": None,
        "bias": "none", "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "n_frequency_pattern": pattern, "init_weights": True,
    }


def save_qwha_adapter(directory: str | Path, layers: dict[str, QwhaLinear], target_modules: Sequence[str],
                      base_model: str | None, init_spectra: dict[str, torch.Tensor] | None = None) -> None:
    """adapter_config.json + adapter_model.safetensors (reference format); with `init_spectra` {module: initial
    spectrum} also lowbitpack_qwha_init.safetensors, so that restores drop the training base's error correction."""
    from .peft_io import ADAPTER_CONFIG, ADAPTER_WEIGHTS
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = qwha_adapter_config(layers, target_modules, base_model)
    (directory / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    save_file(qwha_state_dict(layers), str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    if init_spectra:
        init = {f"{PREFIX}{name}{INIT_SUFFIX}": init_spectra[name].detach().float().cpu().contiguous()
                for name in sorted(layers)}
        save_file(init, str(directory / INIT_FILE), metadata={"format": "pt"})


# ---------------------------------------------------------------------------------------------- originals
def original_weights(art: Artifact, module_names: Sequence[str], original: str | Path | None
                     ) -> tuple[dict[str, torch.Tensor], Path]:
    """{module: original W} for the targeted modules, checked against the sha256 the artifact recorded."""
    src = original if original is not None else art.manifest["source"].get("path")
    if not src:
        raise InputError("the artifact records no source path for the original weights", art.path,
                         "pass the original model with --original, or use --qwha-init zeros")
    path = resolve_model_path(src)
    ckpt = SourceCheckpoint.open(path)
    wanted = {m + ".weight": m for m in module_names}
    missing = [t for t in wanted if t not in ckpt.weight_map]
    if missing:
        raise InputError(f"the original lacks {missing[0]}", ckpt.path, "pass the model the artifact was made from")
    out: dict[str, torch.Tensor] = {}
    by_shard: dict[str, list[str]] = {}
    for t in wanted:
        by_shard.setdefault(ckpt.weight_map[t], []).append(t)
    for shard, names in by_shard.items():
        with safe_open(str(ckpt.path / shard), framework="pt") as f:
            for t in names:
                w = f.get_tensor(t)
                expected = art.tensors.get(t, {}).get("sha256")
                if expected is not None and sha256_tensor(w) != expected:
                    raise BaseMismatchError(f"{t} differs from the tensor the artifact was quantized from (sha256)",
                                            ckpt.path, "pass the exact original with --original")
                out[wanted[t]] = w
    return out, ckpt.path


# ---------------------------------------------------------------------------------------------- training
def train_qwha_adapter(
    packed: str | Path,
    out: str | Path,
    *,
    data: str | Path | None = None,
    n_frequency: int | None = None,
    r: int | None = 16,
    scaling: float = DEFAULT_SCALING,
    random_loc_seed: int = DEFAULT_SEED,
    init: str = "error",
    selection: str = "channel",
    original: str | Path | None = None,
    target_modules: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj"),
    lr: float = 2e-4,
    epochs: int = 1,
    max_steps: int | None = None,
    batch_size: int = 4,
    seq_len: int = 128,
    seed: int = 42,
    weight_decay: float = 0.0,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    cache_dense: bool | None = None,
    force: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train a QWHA adapter on the packed artifact `packed`; write it to `out` in the reference's format.

    Returns the training record (also OUT/lowbitpack_training.json; per-step losses in OUT/train_log.jsonl).
    Budget per layer: `n_frequency`, else r·(in+out). `init="error"` reads the original weights (the
    artifact's recorded source, or `original`) and checks their sha256 against the artifact's manifest.
    """
    from transformers import AutoTokenizer

    from ..train import (MAX_GRAD_NORM, TRAIN_LOG, TRAINING_FORMAT, TRAINING_MANIFEST, _base_record,
                         _compute_dtype, _versions, load_texts, run_steps, token_windows)

    _check_options(n_frequency, r, scaling, init, selection, lr, epochs, max_steps, batch_size, seq_len,
                   target_modules)
    check_output(out, force)
    art = Artifact.open(packed)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    compute_dtype = _compute_dtype(dtype, device)
    texts, data_info = load_texts(data)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(art.path))
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a missing tokenizer
        raise InputError(f"cannot load a tokenizer from the artifact ({e.__class__.__name__})", art.path,
                         "re-create the artifact from a source that has tokenizer files") from None
    windows = token_windows(tokenizer, texts, seq_len)
    if len(windows) < 1:
        raise InputError(f"the text gives fewer than {seq_len} tokens", data_info["file"],
                         "pass more text or a smaller --seq-len")
    steps_per_epoch = math.ceil(len(windows) / batch_size)
    total_steps = steps_per_epoch * epochs if max_steps is None else min(max_steps, steps_per_epoch * epochs)

    random.seed(seed)
    torch.manual_seed(seed)
    model = load_packed_model(art, compute_dtype, device)
    if cache_dense is None:
        cache_dense = not str(device).startswith("cuda")
    for m in lowbit_modules(model).values():
        m.cache_dense(cache_dense)
    targets = list(target_modules)
    names = [n for n, m in model.named_modules()
             if isinstance(m, (LowBitLinear, nn.Linear)) and matches_target(n, targets)]
    originals, original_path = (original_weights(art, names, original) if init == "error" else (None, None))
    t_init = time.perf_counter()
    layers = attach_qwha(model, targets, n_frequency=n_frequency, r=r, scaling=scaling,
                         random_loc_seed=random_loc_seed, init=init, originals=originals, selection=selection)
    init_report = _init_report(layers, originals) if originals is not None else None
    init_spectra = ({n: layer.qwha_spectrum.detach().clone() for n, layer in layers.items()}
                    if init == "error" else None)
    init_seconds = time.perf_counter() - t_init
    del originals
    model.requires_grad_(False)
    trainable = [layer.qwha_spectrum for layer in layers.values()]
    for p in trainable:
        p.requires_grad_(True)
    n_trainable = sum(p.numel() for p in trainable)
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)

    t0 = time.perf_counter()
    with atomic_dir(out, force) as tmp:
        model.train()
        losses = run_steps(model, windows, opt, trainable, total_steps=total_steps, batch_size=batch_size, lr=lr,
                           device=device, gen=gen, log_path=tmp / TRAIN_LOG, label="train QWHA",
                           progress=progress, data_file=data_info["file"], t0=t0,
                           nan_fix="lower --lr or --scaling, or check the data")
        step = len(losses)
        save_qwha_adapter(tmp, layers, targets, art.manifest["source"].get("model_id"), init_spectra)
        seconds = time.perf_counter() - t0
        tail = losses[-min(10, len(losses)):]
        record = {
            "format": TRAINING_FORMAT, "format_version": 1,
            "producer": {"name": "lowbitpack", "version": __version__},
            "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "base": _base_record(art),
            "data": {**data_info, "texts": len(texts), "windows": len(windows), "seq_len": seq_len},
            "hparams": {"adapter_type": "qwha", "n_frequency": n_frequency, "r_equivalent": r if n_frequency is None
                        else None, "scaling": scaling, "random_loc_seed": random_loc_seed, "init": init,
                        "selection": selection if init == "error" else None, "target_modules": targets, "lr": lr,
                        "epochs": epochs, "max_steps": max_steps, "batch_size": batch_size, "seq_len": seq_len,
                        "seed": seed, "weight_decay": weight_decay, "optimizer": "adamw", "schedule": "constant",
                        "max_grad_norm": MAX_GRAD_NORM, "compute_dtype": str(compute_dtype).removeprefix("torch."),
                        "device": str(device), "cache_dense": cache_dense},
            "init": None if init_report is None else {**init_report, "original": str(original_path),
                                                      "seconds": round(init_seconds, 3)},
            "result": {"steps": step, "epochs_completed": round(step / steps_per_epoch, 4),
                       "tokens_seen": step * batch_size * seq_len, "first_loss": losses[0],
                       "last_loss": losses[-1], "final_loss": sum(tail) / len(tail),
                       "final_loss_window": len(tail), "seconds": round(seconds, 3),
                       "trainable_params": n_trainable, "qwha_layers": len(layers),
                       "packed_linears": len(lowbit_modules(model))},
            "versions": _versions(),
            "log": TRAIN_LOG,
        }
        (tmp / TRAINING_MANIFEST).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return record


@torch.no_grad()
def _init_report(layers: dict[str, QwhaLinear], originals: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Relative quantisation error ‖W − Q(W)‖/‖W‖ per layer before and after the initial ΔW."""
    per = {}
    for name, layer in layers.items():
        w = originals[name].float()
        e = w - packed_weight(layer.base_layer)
        wn = float(w.norm().clamp_min(1e-30))
        per[name] = {"before": float(e.norm()) / wn, "after": float((e - layer.delta_weight()).norm()) / wn,
                     "n_frequency": layer.n_frequency}
    before = [v["before"] for v in per.values()]
    after = [v["after"] for v in per.values()]
    return {"what": "relative weight error ||W - Q(W) - dW|| / ||W||", "mean_before": sum(before) / len(before),
            "mean_after": sum(after) / len(after), "layers": per}


def _check_options(n_frequency, r, scaling, init, selection, lr, epochs, max_steps, batch_size, seq_len,
                   target_modules) -> None:
    checks = [(n_frequency is None or n_frequency >= 1, f"--n-frequency must be >= 1, got {n_frequency}"),
              (n_frequency is not None or (r is not None and r >= 1), f"--r must be >= 1, got {r}"),
              (math.isfinite(scaling) and scaling > 0, f"--scaling must be > 0, got {scaling}"),
              (init in INITS, f"--qwha-init must be one of {', '.join(INITS)}, got {init!r}"),
              (selection in SELECTIONS, f"--qwha-selection must be one of {', '.join(SELECTIONS)}, got {selection!r}"),
              (lr > 0, f"--lr must be > 0, got {lr}"), (epochs >= 1, f"--epochs must be >= 1, got {epochs}"),
              (max_steps is None or max_steps >= 1, f"--max-steps must be >= 1, got {max_steps}"),
              (batch_size >= 1, f"--batch-size must be >= 1, got {batch_size}"),
              (seq_len >= 2, f"--seq-len must be >= 2, got {seq_len}"),
              (len(list(target_modules)) > 0, "--target-modules is empty")]
    for ok, msg in checks:
        if not ok:
            raise OptionError(msg, None, "see `lowbitpack train --help`")


__all__ = ["QwhaLinear", "allocate_per_channel", "attach_qwha", "init_from_error", "original_weights",
           "qwha_adapter_config", "qwha_state_dict", "random_locations", "save_qwha_adapter", "select_spectrum",
           "train_qwha_adapter"]
