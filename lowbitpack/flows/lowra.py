"""LowRA over a whole model: activation statistics → per-row fits → one exact bit allocation → packing.

The allocation is global (all selected linears, all rows compete for one budget), so unlike GPTQ's
layer-by-layer flow this needs every layer's statistics before any weight is quantized:

1. **Statistics**: the full-precision model (float32) runs the calibration windows once; a forward
   pre-hook on every selected nn.Linear accumulates Σ x_j² per input feature (float64). Inputs are those
   of the *unquantized* model (LowRA's per-channel error model needs only E[x²], not error propagation).
   Memory: the float32 model (4 bytes/parameter: ~0.55 GB for SmolLM2-135M, ~2 GB for a 0.5B model)
   plus one batch of activations; the statistics themselves are one vector per linear.
2. **Fits**: for each selected weight (read from the checkpoint, one at a time) codebooks and exact
   weighted errors for 1, 2 and 4 bits per row (schemes.lowra.LowRA.fit); only the small codebooks and
   the [rows, 3] error/cost tables are kept.
   With the default objective "fisher" the same pass also runs a backward pass of the LM loss and
   accumulates E[g_c²] per output feature (g = ∂loss/∂y): the row weights of the allocation.
3. **Allocation**: lowbitpack.solvers.solve_mckp over all rows of all selected weights with budget
   floor(budget · Σ numel) stored bits (codes + codebooks + row_bits, see layouts/lowra.py), minimising
   Σ_rows E[g_c²] · Σ_j E[x_j²] (w_cj − q_cj)² (a diagonal, Kronecker-factored Fisher estimate of the
   loss increase; docs/LOWRA.md shows why the unweighted sum fails across layers).
4. **Packing**: every weight is read again and packed with its rows' widths.
"""
from __future__ import annotations

import math
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import InputError, OptionError
from ..io.checkpoint import SourceCheckpoint
from ..layouts.lowra import WIDTHS
from ..qtensor import QuantizedTensor
from ..schemes.lowra import OBJECTIVES, LowRA, LowRAFit, row_cost_bits
from ..solvers import InfeasibleBudget, solve_mckp
from .progress import progress_bar
from .select import compile_modules, is_selected


def selected_weights(ckpt: SourceCheckpoint, modules: str | None) -> list[str]:
    """Names of the tensors that get quantized (same rule as the streaming flow)."""
    pattern = compile_modules(modules)
    names = [n for n, i in ckpt.tensor_infos().items() if is_selected(n, i["shape"], i["dtype"], pattern)]
    if not names:
        raise InputError(f"no tensor matches the module pattern {pattern.pattern!r}", ckpt.path,
                         "check --modules against `lowbitpack inspect` of the source")
    return names


def calibration_windows(tokenizer, calib: str | Path | None, samples: int, seqlen: int, seed: int) -> torch.Tensor:
    """`samples` random windows of `seqlen` tokens [samples, seqlen] from the calibration text."""
    from ..data import kjv_split, read_text_file
    from ..eval import tokenize_stream

    if samples < 1 or seqlen < 2:
        raise OptionError(f"calibration needs samples >= 1 and seqlen >= 2, got {samples} and {seqlen}", None,
                          "e.g. --calib-samples 128 --calib-seqlen 512")
    texts = read_text_file(calib) if calib is not None else kjv_split()["calib"]
    where = calib if calib is not None else "KJV calibration split (Psalms)"
    ids = tokenize_stream(tokenizer, texts, max_tokens=max(4 * samples * seqlen, 1 << 20))
    if len(ids) < seqlen:
        raise InputError(f"calibration text has {len(ids)} tokens, fewer than one window of {seqlen}", where,
                         "pass a longer --calib file or a smaller --calib-seqlen")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seqlen + 1, (samples,), generator=gen)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])


def collect_stats(model_dir: Path, names: list[str], windows: torch.Tensor, device: str,
                  show_progress: bool = True, batch_size: int = 4,
                  output_grads: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """Per selected linear: E[x_j²] per input feature (float64 [in]) of the full-precision model, and with
    `output_grads` also E[g_c²] per output feature, g = ∂(LM loss)/∂y (one backward pass per batch)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    model.requires_grad_(False)
    modules = dict(model.named_modules())
    sums: dict[str, torch.Tensor] = {}
    gsums: dict[str, torch.Tensor] = {}
    counts: Counter = Counter()
    handles = []

    def pre_hook(name: str):
        def fn(module, args):
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1])
            sums[name] += x.double().pow(2).sum(0).cpu()
            counts[name] += x.shape[0]
        return fn

    def out_hook(name: str):
        def acc(g):
            gsums[name] += g.detach().reshape(-1, g.shape[-1]).double().pow(2).sum(0).cpu()

        def fn(module, args, y):
            if y.requires_grad:
                y.register_hook(acc)
        return fn

    try:
        for name in names:
            mod = modules.get(name.removesuffix(".weight")) if name.endswith(".weight") else None
            if not isinstance(mod, torch.nn.Linear) or tuple(mod.weight.shape) != tuple(_shape(model, name)):
                raise InputError(f"no nn.Linear named {name.removesuffix('.weight')} in the loaded model: "
                                 "LowRA needs the input statistics of every quantized tensor", model_dir,
                                 "restrict --modules to linear layers")
            sums[name] = torch.zeros(mod.in_features, dtype=torch.float64)
            handles.append(mod.register_forward_pre_hook(pre_hook(name)))
            if output_grads:
                gsums[name] = torch.zeros(mod.out_features, dtype=torch.float64)
                handles.append(mod.register_forward_hook(out_hook(name)))
        embed = model.get_input_embeddings()
        with progress_bar(show_progress) as bar:
            task = bar.add_task("LowRA statistics (tokens)", total=windows.numel())
            for i in range(0, len(windows), batch_size):
                x = windows[i:i + batch_size].to(device)
                if output_grads:
                    # Leaf input that requires grad: the graph (and the output hooks) exist although
                    # no parameter is trained. The loss sums over tokens, so E[g²] is per token.
                    with torch.enable_grad():
                        emb = embed(x).detach().requires_grad_(True)
                        logits = model(inputs_embeds=emb, use_cache=False).logits[:, :-1].float()
                        loss = torch.nn.functional.cross_entropy(
                            logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
                        loss.backward()
                else:
                    with torch.no_grad():
                        model(input_ids=x, use_cache=False)
                bar.advance(task, x.numel())
    finally:
        for h in handles:
            h.remove()
        del model
    act = {n: sums[n] / max(counts[n], 1) for n in names}
    grads = {n: gsums[n] / max(counts[n], 1) for n in names} if output_grads else None
    return act, grads


def collect_act_stats(model_dir: Path, names: list[str], windows: torch.Tensor, device: str,
                      show_progress: bool = True, batch_size: int = 4) -> dict[str, torch.Tensor]:
    """E[x_j²] per input feature of each selected linear (float64 [in]), from the full-precision model."""
    return collect_stats(model_dir, names, windows, device, show_progress, batch_size)[0]


def _shape(model, name: str) -> tuple[int, ...]:
    try:
        return tuple(model.get_parameter(name).shape)
    except AttributeError:
        return ()


def _iter_selected(ckpt: SourceCheckpoint, names: list[str]):
    wanted = set(names)
    for shard in ckpt.shards:
        for name, tensor in ckpt.iter_shard(shard):
            if name in wanted:
                if not torch.isfinite(tensor).all():
                    raise InputError(f"tensor {name} holds NaN or Inf values", ckpt.path / shard,
                                     "fix the checkpoint, or exclude the tensor with --modules")
                yield name, tensor


def check_budget(budget: float, shapes: dict[str, tuple[int, ...]], where: Path | str | None = None) -> None:
    """Fail fast (before calibration) when even every row at 1 bit exceeds the budget."""
    total = sum(s[0] * s[1] for s in shapes.values())
    least = sum(s[0] * row_cost_bits(s[1], WIDTHS[0]) for s in shapes.values()) / max(total, 1)
    if budget < least:
        raise OptionError(f"--bits {budget} is below the smallest LowRA size for these tensors "
                          f"({least:.4f} bits/weight: every row at 1 bit with its codebook)", where,
                          f"use --bits {math.ceil(least * 1000) / 1000} or more")


def allocate_bits(fits: dict[str, LowRAFit], numels: dict[str, int], budget: float,
                  where: Path | str | None = None,
                  row_weights: dict[str, torch.Tensor] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """One exact allocation over all rows of all fitted weights; returns row widths per tensor + solver info.

    Row r of tensor t costs `row_weights[t][r] · errors` (objective "fisher": E[g_r²] of its output);
    without row weights the plain sum of weighted errors is minimised (objective "hessian-diag").
    """
    order = list(fits)
    if row_weights is None:
        errors = np.concatenate([fits[n].errors for n in order])
    else:
        errors = np.concatenate([fits[n].errors * row_weights[n].double().numpy()[:, None] for n in order])
    costs = np.concatenate([fits[n].costs for n in order])
    total = sum(numels[n] for n in order)
    budget_bits = int(math.floor(budget * total))
    try:
        sol = solve_mckp(errors, costs, budget_bits)
    except InfeasibleBudget as e:
        least = e.min_cost / total
        raise OptionError(f"--bits {budget} is below the smallest LowRA size for these tensors "
                          f"({least:.4f} bits/weight: every row at 1 bit with its codebook)", where,
                          f"use --bits {math.ceil(least * 1000) / 1000} or more") from None
    widths = np.asarray(WIDTHS)[sol.choice]
    out: dict[str, torch.Tensor] = {}
    start = 0
    for n in order:
        rows = fits[n].errors.shape[0]
        out[n] = torch.from_numpy(widths[start:start + rows].astype(np.int64))
        start += rows
    info = {
        "method": sol.info.get("method"), "optimal": bool(sol.optimal), "seconds": round(sol.info["seconds"], 3),
        "objective": sol.objective, "lower_bound": sol.lower_bound, "rows": int(errors.shape[0]),
        "budget_bits": budget_bits, "stored_bits": int(sol.cost), "lagrange_multiplier": sol.info.get("lambda"),
        "core_rows": [r["core_rows"] for r in sol.info.get("rounds", [])],
        "avg_bits_all_1bit": float(costs[:, 0].sum() / total), "avg_bits_all_4bit": float(costs[:, -1].sum() / total),
    }
    return out, info


_LAYER = re.compile(r"\.(\d+)\.")


def bit_map_summary(row_bits: dict[str, torch.Tensor], numels: dict[str, int]) -> dict[str, Any]:
    """Where the bits went: histogram and average code bits per module kind and per layer index."""
    def hist(ts):
        cat = torch.cat(ts) if ts else torch.zeros(0, dtype=torch.int64)
        return {str(b): int((cat == b).sum()) for b in WIDTHS}, (float(cat.double().mean()) if len(cat) else 0.0)

    kinds: dict[str, list] = {}
    layers: dict[int, list] = {}
    for n, rb in row_bits.items():
        kind = n.removesuffix(".weight").rsplit(".", 1)[-1]
        kinds.setdefault(kind, []).append(rb)
        m = _LAYER.search(n)
        if m:
            layers.setdefault(int(m.group(1)), []).append(rb)
    by_kind = {}
    for k, ts in kinds.items():
        h, avg = hist(ts)
        by_kind[k] = {"bit_histogram": h, "avg_code_bits": round(avg, 4)}
    by_layer = {str(i): round(hist(layers[i])[1], 4) for i in sorted(layers)}
    return {"by_module": by_kind, "avg_code_bits_by_layer": by_layer}


def lowra_quantize(src: str | Path, scheme: LowRA, *, modules: str | None = None, calib: str | Path | None = None,
                   samples: int = 128, seqlen: int = 512, seed: int = 0, device: str | None = None,
                   show_progress: bool = True) -> tuple[dict[str, QuantizedTensor], dict[str, Any]]:
    """Quantize every selected weight of `src` with one global LowRA allocation.

    Returns (name -> QuantizedTensor, extra manifest `quantization` fields).
    """
    from transformers import AutoTokenizer

    ckpt = SourceCheckpoint.open(src)
    names = selected_weights(ckpt, modules)
    infos = ckpt.tensor_infos()
    numels = {n: int(np.prod(infos[n]["shape"])) for n in names}
    check_budget(scheme.budget, {n: tuple(infos[n]["shape"]) for n in names}, ckpt.path)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(ckpt.path)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a missing/broken tokenizer
        raise InputError(f"cannot load the tokenizer ({e.__class__.__name__})", ckpt.path,
                         "LowRA calibration needs the tokenizer files next to config.json") from None
    windows = calibration_windows(tokenizer, calib, samples, seqlen, seed)
    # objective "fisher" needs E[g²] of every linear's outputs: one backward pass per calibration batch
    stats, grads = collect_stats(ckpt.path, names, windows, device, show_progress,
                                 output_grads=scheme.objective == "fisher")
    t_stats = time.perf_counter() - t0

    t0 = time.perf_counter()
    fits: dict[str, LowRAFit] = {}
    with progress_bar(show_progress) as bar:
        task = bar.add_task("LowRA fit 1/2/4-bit codebooks", total=sum(numels.values()))
        for name, w in _iter_selected(ckpt, names):
            fits[name] = scheme.fit(w, stats[name])
            bar.advance(task, numels[name])
    t_fit = time.perf_counter() - t0

    row_bits, solver = allocate_bits(fits, numels, scheme.budget, ckpt.path, row_weights=grads)

    t0 = time.perf_counter()
    out: dict[str, QuantizedTensor] = {}
    with progress_bar(show_progress) as bar:
        task = bar.add_task("LowRA pack", total=sum(numels.values()))
        for name, w in _iter_selected(ckpt, names):
            out[name] = scheme.pack(w, fits[name], row_bits[name])
            bar.advance(task, numels[name])
    t_pack = time.perf_counter() - t0

    total = sum(numels.values())
    stored_bits = sum(8 * qt.stored_bytes() for qt in out.values())
    if stored_bits != solver["stored_bits"]:  # the cost model must be the bytes on disk, exactly
        raise RuntimeError(f"LowRA cost model mismatch: solver counted {solver['stored_bits']} bits, "
                           f"packed tensors hold {stored_bits}")
    summary = bit_map_summary(row_bits, numels)
    all_rows = torch.cat(list(row_bits.values()))
    extra = {
        "budget": scheme.budget,
        "avg_bits": stored_bits / total,
        "avg_code_bits": float(all_rows.double().mean()),
        "budget_accounting": ("all stored bits of the quantized tensors (packed codes, fp16 codebooks, the "
                              "row_bits byte) / their weights; a row of width b and in inputs stores "
                              "8*ceil(in*b/8) + 16*2^b + 8 bits"),
        "bit_histogram": {str(b): int((all_rows == b).sum()) for b in WIDTHS},
        "objective_formula": OBJECTIVES[scheme.objective],
        "solver": solver,
        "calibration": {"source": str(calib) if calib is not None else "kjv:calib (Psalms)",
                        "samples": int(windows.shape[0]), "seqlen": int(windows.shape[1]), "seed": seed,
                        "tokens": int(windows.numel()), "device": device,
                        "statistics": "E[x^2] per input feature" + (
                            ", E[g^2] per output feature (g = dLoss/dy, one backward pass per batch)"
                            if grads is not None else "") + ", of the full-precision model"},
        "bit_map": summary,
        "lowra_timing": {"statistics_s": round(t_stats, 2), "fit_s": round(t_fit, 2),
                         "solve_s": solver["seconds"], "pack_s": round(t_pack, 2)},
    }
    if scheme.budget - extra["avg_bits"] > 0.01:
        extra["note"] = (f"budget not binding: every row at 4 bits takes {extra['avg_bits']:.4f} bits/weight")
    return out, extra
