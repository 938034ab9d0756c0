"""Frozen low-bit linear layers, and transformers models built on a packed artifact without dense weights.

`LowBitLinear` keeps one `QuantizedTensor`'s stored tensors as buffers and computes `x @ W^T (+ bias)` with
W dequantized on the fly (`lowbitpack.kernels.dequantize`: the layout's torch reference, or a CUDA kernel
when one is registered; on a GPU the fused `lowbitpack.kernels.gemv.lowbit_matmul` is used when that module
exists). The backward pass dequantizes again instead of keeping W alive (as bitsandbytes' 4-bit matmul
does), so training memory stays that of the packed base plus activations.

PEFT LoRA wraps it through its documented custom-module route: `LoraConfig._register_custom_module(
{LowBitLinear: LowBitLoraLinear})` (`lora_config_for_packed` does it). The mapping is not serialised, so
adapters trained here are ordinary PEFT adapters that load onto the original Hugging Face model.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .artifact import Artifact
from .errors import InputError
from .kernels import dequantize
from .qtensor import QuantizedTensor

_BUFFER_PREFIX = "packed_"
_gemv: Callable[..., torch.Tensor] | None | bool = False  # False: not looked up yet


def _fused_matmul() -> Callable[..., torch.Tensor] | None:
    """`lowbitpack.kernels.gemv.lowbit_matmul` when that module exists (written separately), else None."""
    global _gemv
    if _gemv is False:
        _gemv = None
        if importlib.util.find_spec("lowbitpack.kernels.gemv") is not None:
            _gemv = getattr(importlib.import_module("lowbitpack.kernels.gemv"), "lowbit_matmul", None)
    return _gemv  # type: ignore[return-value]


class _DequantLinear(torch.autograd.Function):
    """y = x W^T with W recomputed in backward: nothing of W is saved between passes."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: "LowBitLinear") -> torch.Tensor:  # type: ignore[override]
        ctx.module = module
        return module._matmul(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        w = ctx.module.dequantized_weight(grad.dtype)
        return grad @ w, None


class LowBitLinear(nn.Module):
    """A frozen linear layer whose weight is a packed `QuantizedTensor` (buffers `packed_<key>`)."""

    def __init__(self, qt: QuantizedTensor, bias: torch.Tensor | None = None,
                 compute_dtype: torch.dtype | None = None):
        super().__init__()
        if len(qt.shape) != 2:
            raise ValueError(f"LowBitLinear needs a 2-D weight, got shape {qt.shape}")
        self.out_features, self.in_features = int(qt.shape[0]), int(qt.shape[1])
        self.scheme, self.layout, self.bits, self.group_size = qt.scheme, qt.layout, qt.bits, qt.group_size
        self.weight_dtype = qt.dtype
        self.quant_params = dict(qt.params)
        self._keys = list(qt.tensors)
        for key, t in qt.tensors.items():
            self.register_buffer(_BUFFER_PREFIX + key, t)
        if bias is not None:
            self.bias = nn.Parameter(bias.detach(), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        # An empty float buffer whose dtype follows model.to(dtype)/.half(): the dtype `.weight` is reported in
        # (PEFT gives new LoRA weights that dtype), while the packed tensors themselves keep theirs (`_apply`).
        compute_dtype = compute_dtype or (bias.dtype if bias is not None else qt.dtype)
        self.register_buffer("dtype_probe", torch.empty(0, dtype=compute_dtype), persistent=False)
        # Optional cache of the dense weight (see `cache_dense`); not a buffer, never saved.
        self._dense_cache: dict[tuple[torch.dtype, torch.device], torch.Tensor] | None = None

    def cache_dense(self, enabled: bool = True) -> None:
        """Keep the dequantized weight after first use instead of decoding it on every pass.

        Trades the packed base's memory saving for speed: worth it on CPUs, where decoding costs as much as the
        matmul and memory is rarely what limits training. The weight is frozen, so the cache never goes stale.
        """
        self._dense_cache = {} if enabled else None

    def _apply(self, fn, recurse: bool = True):
        """Moves follow .to()/.cuda(); dtype casts (model.half(), .to(bf16)) never touch the packed tensors, whose
        exact dtypes (fp16 scales, fp32 absmax, ...) the layout defines, only the compute dtype."""
        if self._dense_cache:
            self._dense_cache.clear()  # a cached dense copy would be on the old device / in the old dtype
        packed = {k: getattr(self, _BUFFER_PREFIX + k) for k in self._keys}
        out = super()._apply(fn, recurse)
        for k, old in packed.items():
            new = self._buffers[_BUFFER_PREFIX + k]
            if new.dtype != old.dtype:
                self._buffers[_BUFFER_PREFIX + k] = old.to(new.device)
        return out

    @property
    def qt(self) -> QuantizedTensor:
        """The quantized weight, its tensors on this module's current device."""
        return QuantizedTensor(scheme=self.scheme, layout=self.layout, bits=self.bits, group_size=self.group_size,
                               shape=(self.out_features, self.in_features), dtype=self.weight_dtype,
                               tensors={k: getattr(self, _BUFFER_PREFIX + k) for k in self._keys},
                               params=self.quant_params)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dense W [out, in] in `dtype` (default: the dtype the weight was quantized from)."""
        dtype = dtype or self.weight_dtype
        if self._dense_cache is None:
            return dequantize(self.qt, dtype)
        key = (dtype, getattr(self, _BUFFER_PREFIX + self._keys[0]).device)
        if key not in self._dense_cache:
            self._dense_cache[key] = dequantize(self.qt, dtype)
        return self._dense_cache[key]

    @property
    def weight(self) -> torch.Tensor:
        """Dense W, computed on demand (for code that inspects `.weight`; forward never materialises it)."""
        return self.dequantized_weight(self.compute_dtype)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the surrounding model computes in (set by load_packed_model, follows model.to(dtype))."""
        return self.dtype_probe.dtype

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        fused = _fused_matmul()
        first = getattr(self, _BUFFER_PREFIX + self._keys[0])
        if fused is not None and first.is_cuda:
            return fused(x, self.qt).to(x.dtype)
        return x @ self.dequantized_weight(x.dtype).t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            y = _DequantLinear.apply(x, self)
        else:
            y = self._matmul(x)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}, "
                f"layout={self.layout}, bits={self.bits}, group_size={self.group_size}, bias={self.bias is not None}")


# ---------------------------------------------------------------------------------------------- PEFT LoRA
def _lora_layer_class():
    from peft.tuners.lora.layer import LoraLayer

    class LowBitLoraLinear(nn.Module, LoraLayer):
        """PEFT LoRA around a `LowBitLinear`: y = base(x) + B(A(dropout(x))) * scaling. Merging into the packed
        base is not offered here (that is `lowbitpack merge`, which merges into the restored original)."""

        def __init__(self, base_layer: nn.Module, adapter_name: str, config, r: int = 0, lora_alpha: int = 1,
                     **kwargs: Any):
            super().__init__()
            LoraLayer.__init__(self, base_layer)
            if config.use_dora:
                raise ValueError("DoRA is not supported on packed bases (LowBitLinear); set use_dora=False")
            if getattr(config, "use_qalora", False):
                raise ValueError("QA-LoRA is not supported by LowBitLoraLinear; train QA-LoRA adapters with the "
                                 "qalora adapter type")
            self._active_adapter = adapter_name
            self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

        def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
            # PEFT's generic probe warns about unknown layer types and imports gptqmodel to test for it.
            return module.in_features, module.out_features

        def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            result = self.base_layer(x)
            if self.disable_adapters:
                return result
            for name in self.active_adapters:
                if name not in self.lora_A:
                    continue
                a, b = self.lora_A[name], self.lora_B[name]
                xa = self._cast_input_dtype(x, a.weight.dtype)
                result = result + (b(a(self.lora_dropout[name](xa))) * self.scaling[name]).to(result.dtype)
            return result

        def merge(self, *args: Any, **kwargs: Any) -> None:
            raise NotImplementedError("merging into a packed base is done by `lowbitpack merge --restore`")

        def __repr__(self) -> str:
            return "lora." + super().__repr__()

    return LowBitLoraLinear


_LORA_CLS = None


def lora_layer_class():
    """The PEFT LoRA layer class for `LowBitLinear` (built lazily so that importing this module needs no peft)."""
    global _LORA_CLS
    if _LORA_CLS is None:
        _LORA_CLS = _lora_layer_class()
    return _LORA_CLS


def register_lowbit_lora(config) -> Any:
    """Register `LowBitLinear -> LowBitLoraLinear` on a peft `LoraConfig` (in place; returns it)."""
    if getattr(config, "use_qalora", False):  # QA-LoRA: pooled input layer (lowbitpack.adapters.qalora)
        from .adapters.qalora import register_lowbit_qalora
        return register_lowbit_qalora(config)
    config._register_custom_module({LowBitLinear: lora_layer_class()})
    return config


def attach_adapter(model: nn.Module, adapter_dir: str | Path, adapter_name: str = "default",
                   is_trainable: bool = False):
    """`PeftModel.from_pretrained` for a model built by `load_packed_model` (registers the custom layer)."""
    from peft import LoraConfig, PeftModel

    config = LoraConfig.from_pretrained(str(adapter_dir))
    register_lowbit_lora(config)
    return PeftModel.from_pretrained(model, str(adapter_dir), adapter_name=adapter_name, config=config,
                                     is_trainable=is_trainable)


# ---------------------------------------------------------------------------------------------- model loading
@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Create parameters on the meta device while buffers (e.g. rotary `inv_freq`) are computed for real.

    The same trick as accelerate's `init_empty_weights(include_buffers=False)`, without the dependency.
    """
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            kwargs = {"requires_grad": param.requires_grad}
            module._parameters[name] = type(param)(param.to("meta"), **kwargs)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def load_packed_model(artifact: str | Path | Artifact, dtype: torch.dtype = torch.float32,
                      device: str | torch.device = "cpu"):
    """A transformers causal LM whose quantized linears are `LowBitLinear` (packed, frozen) and whose other
    tensors (embeddings, norms, lm_head, biases) are loaded dense in `dtype`.

    The model is built on the meta device: no dense copy of a quantized weight is ever made. Quantized
    tensors that are not the weight of an `nn.Linear` (unusual `--modules` choices) are dequantized.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    art = artifact if isinstance(artifact, Artifact) else Artifact.open(artifact)
    if not (art.path / "config.json").is_file():
        raise InputError("artifact has no config.json", art.path, "re-create it with `lowbitpack quantize`")
    try:
        config = AutoConfig.from_pretrained(art.path)
    except (ValueError, OSError, KeyError) as e:  # transformers' error for a config without model_type etc.
        raise InputError(f"config.json is not a usable model config ({e.__class__.__name__}: "
                         f"{str(e).splitlines()[0][:120] if str(e) else ''})", art.path / "config.json",
                         "restore the source model's config.json") from None
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    modules = dict(model.named_modules())
    state: dict[str, torch.Tensor] = {}
    swapped = set()
    for name, rec in art.tensors.items():
        mod_name = name[: -len(".weight")] if name.endswith(".weight") else None
        if rec["scheme"] != "none" and mod_name is not None and isinstance(modules.get(mod_name), nn.Linear):
            linear = modules[mod_name]
            if tuple(linear.weight.shape) != tuple(rec["shape"]):
                raise InputError(f"tensor {name} has shape {rec['shape']} but the model built from config.json "
                                 f"expects {list(linear.weight.shape)}", art.path, "re-create the artifact")
            bias = None
            if linear.bias is not None:
                bname = mod_name + ".bias"
                if bname not in art.tensors:
                    raise InputError(f"{bname} is missing", art.path, "re-create the artifact")
                bias = art.dense(bname, dtype)
                swapped.add(bname)
            qt = art.quantized_tensor(name)
            _set_submodule(model, mod_name, LowBitLinear(qt, bias, compute_dtype=dtype).to(device))
            swapped.add(name)
    for name in art.tensors:
        if name not in swapped:
            t = art.dense(name, dtype)
            state[name] = t.to(dtype) if t.is_floating_point() else t
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = _tied_names(model)
    packed = {f"{n}.{_BUFFER_PREFIX}{k}" for n, m in lowbit_modules(model).items() for k in m._keys}
    packed |= {f"{n}.dtype_probe" for n in lowbit_modules(model)}
    missing = [m for m in missing if m not in tied and m not in packed and m not in swapped]
    if unexpected:
        raise InputError(f"artifact tensors unknown to the model: {unexpected[:3]}", art.path,
                         "the artifact does not match its config.json; re-create it")
    if missing:
        raise InputError(f"tensors missing from the artifact: {missing[:3]}", art.path, "re-create the artifact")
    if tied:
        model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if still_meta:
        raise InputError(f"no weights for {still_meta[:3]}", art.path, "the artifact is incomplete; re-create it")
    model.requires_grad_(False)
    return model.to(device).eval()


def _tied_names(model: nn.Module) -> set[str]:
    """Parameter names that transformers ties to another one (e.g. lm_head.weight to the embeddings)."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return set()
    keys = getattr(model, "_tied_weights_keys", None) or {}
    names = set(keys) if isinstance(keys, (dict, list, tuple, set)) else set()
    return names or {"lm_head.weight"}


def lowbit_modules(model: nn.Module) -> dict[str, LowBitLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LowBitLinear)}


def dense_bytes_avoided(model: nn.Module) -> dict[str, int]:
    """Bytes the packed linears hold vs what dense weights in their dtype would take (for reports)."""
    packed = dense = 0
    for m in lowbit_modules(model).values():
        packed += sum(getattr(m, _BUFFER_PREFIX + k).numel() * getattr(m, _BUFFER_PREFIX + k).element_size()
                      for k in m._keys)
        dense += m.in_features * m.out_features * m.weight_dtype.itemsize
    return {"packed_bytes": packed, "dense_bytes": dense}


__all__ = ["LowBitLinear", "attach_adapter", "load_packed_model", "lora_layer_class", "lowbit_modules",
           "register_lowbit_lora", "dense_bytes_avoided"]
