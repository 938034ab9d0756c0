"""QA-LoRA adapters (PEFT `peft_type: LORA` with `use_qalora: true`): pooled LoRA, ΔW constant per group.

PEFT's convention (peft 0.21, `tuners/lora/variants.py::QALoraLinearVariant`), with G = `qalora_group_size`,
n = in_features / G pooled features and s = α/r (α/√r with rsLoRA):

    x_pooled = mean over each group of G consecutive inputs   [.., n]
    y        = base(x) + (x_pooled · n) @ Aᵀ @ Bᵀ · s          A: lora_A.weight [r, n], B: lora_B.weight [out, r]

Column j of group g = ⌊j / G⌋ therefore gets the same ΔW entry as every column of its group:

    ΔW[o, j] = c[o, g],   c = (B @ A) · s · n / G        (mean = sum / G, times n)

so with a group-wise quantized base w = scale·q + m whose quantization groups lie inside the pooling groups,
the merge is exact in the offsets: m' = m + c (codes and scales unchanged; `fold_into_offsets`). PEFT requires
in_features % G == 0 and refuses otherwise; so do we. A base whose quantization group Gq divides G (Gq == G is
the usual case, e.g. G = 64 over Gq = 32 also folds exactly) is accepted; any other base group is refused.

PEFT applies `use_qalora` only to GPTQ layers (a plain nn.Linear silently trains ordinary LoRA). lowbitpack's
`LowBitQALoraLinear` implements it on `LowBitLinear` (and nn.Linear), by running PEFT's own
`QALoraLinearVariant`, so adapters trained here are PEFT adapters with use_qalora=True and those trained with
PEFT on GPTQModel layers load here unchanged.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..errors import InputError, OptionError
from ..layouts.intg import LAYOUT as INTG_LAYOUT
from ..layouts.intg import default_g_idx
from ..qtensor import QuantizedTensor
from .lora import LoraKind, lora_scaling


# ---------------------------------------------------------------------------------------------- ΔW math
def pool_group_size(config: dict[str, Any]) -> int:
    return int(config.get("qalora_group_size") or 0)


def group_constants(a: torch.Tensor, b: torch.Tensor, scaling: float, group_size: int) -> torch.Tensor:
    """c [out, n_groups] in float32: the value ΔW takes on every column of each pooling group.

    From PEFT's forward: (mean_G(x) · n) @ Aᵀ @ Bᵀ · s with n = A's columns = in / G.
    """
    n_groups = a.shape[1]
    return (b.float() @ a.float()) * (float(scaling) * n_groups / group_size)


def expand_groups(c: torch.Tensor, group_size: int) -> torch.Tensor:
    """ΔW [out, n_groups · G] from the per-group constants."""
    return c.repeat_interleave(group_size, dim=1)


def qalora_delta(a: torch.Tensor, b: torch.Tensor, scaling: float, group_size: int) -> torch.Tensor:
    """The dense ΔW [out, in] that PEFT's pooled forward adds (for --restore 16 and error reports)."""
    return expand_groups(group_constants(a, b, scaling, group_size), group_size)


def pooled_forward(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float, group_size: int) -> torch.Tensor:
    """PEFT's QALoraLinearVariant.forward adapter term, literally (reference for tests)."""
    n = x.shape[-1] // group_size
    pooled = x.reshape(*x.shape[:-1], n, group_size).mean(dim=-1) * n
    return pooled @ a.t() @ b.t() * scaling


# ---------------------------------------------------------------------------------------------- base checks
def fold_incompatibility(layout: str | None, quant_group: int | None, in_features: int, pool_group: int,
                         has_act_order: bool = False) -> str | None:
    """None when ΔW of a QA-LoRA adapter pooling groups of `pool_group` folds exactly into a base quantized
    with `layout` and group `quant_group`; else why not (one phrase)."""
    if pool_group < 1:
        return f"qalora_group_size {pool_group} is not a positive integer"
    if in_features % pool_group:
        return (f"in_features {in_features} is not divisible by qalora_group_size {pool_group} "
                "(PEFT's QA-LoRA needs whole groups)")
    if layout != INTG_LAYOUT:
        return f"the base layout {layout} has no per-group offsets (QA-LoRA needs group-wise integer codes, intg-v1)"
    if has_act_order:
        return "the base uses act-order (g_idx): its groups are not contiguous columns"
    gq = min(int(quant_group or in_features), in_features)
    if pool_group % gq:
        return (f"the base's quantization group {gq} does not divide the adapter's pooling group {pool_group} "
                "(re-quantize with --group-size equal to qalora_group_size)")
    return None


def _trivial_g_idx(g_idx: torch.Tensor | None, in_features: int, group_size: int) -> bool:
    return g_idx is None or torch.equal(g_idx.to(torch.int32).cpu(), default_g_idx(in_features, group_size))


@torch.no_grad()
def fold_into_offsets(qt: QuantizedTensor, c: torch.Tensor, pool_group: int) -> QuantizedTensor:
    """Merge per-group constants c [out, in / pool_group] into an intg-v1 weight: m' = m + c, exactly.

    Integer zero points become float offsets first (m = −s·z, exact in float32 for fp16 s and z < 256).
    The result keeps the codes and scales byte for byte and stores float32 offsets.
    """
    out_f, in_f = qt.shape
    gq = min(int(qt.group_size or in_f), in_f)
    t = qt.tensors
    reason = fold_incompatibility(qt.layout, gq, in_f, pool_group,
                                  has_act_order=not _trivial_g_idx(t.get("g_idx"), in_f, gq))
    if reason:
        raise ValueError(reason)
    if tuple(c.shape) != (out_f, in_f // pool_group):
        raise ValueError(f"group constants {tuple(c.shape)} do not fit [{out_f}, {in_f // pool_group}]")
    scale = t["scale"].float()
    m = t["offset"].float() if "offset" in t else -(scale * t["zero"].float())
    n_q = m.shape[1]
    pool_of_qgroup = (torch.arange(n_q, device=c.device) * gq) // pool_group
    offset = m + c.float().to(m.device)[:, pool_of_qgroup]
    tensors = {k: v for k, v in t.items() if k not in ("zero", "offset")}
    tensors["offset"] = offset.contiguous()
    return QuantizedTensor(scheme=qt.scheme, layout=qt.layout, bits=qt.bits, group_size=qt.group_size,
                           shape=tuple(qt.shape), dtype=qt.dtype, tensors=tensors,
                           params={**qt.params, "folded": "qalora"})


# ---------------------------------------------------------------------------------------------- adapter type
class QaloraKind(LoraKind):
    """QA-LoRA: LoRA keys and rules, A is [r, in / G], ΔW constant per group of G inputs."""

    name = "qalora"

    def check_config(self, config: dict[str, Any], where: Path) -> None:
        super().check_config(config, where)
        if not config.get("use_qalora"):
            raise InputError("use_qalora is not true: this is a plain LoRA adapter", where, "bundle it as LoRA")
        g = config.get("qalora_group_size")
        if isinstance(g, bool) or not isinstance(g, int) or g < 1:
            raise InputError(f"qalora_group_size={g!r} is not a positive integer", where, "re-save the adapter")
        if config.get("fan_in_fan_out"):
            raise InputError("fan_in_fan_out=True QA-LoRA adapters are not supported (PEFT pools nn.Linear "
                             "inputs)", where, "train on nn.Linear / GPTQ layers")

    def check_shapes(self, module: str, parts: dict[str, torch.Tensor], base_shape: tuple[int, ...],
                     config: dict[str, Any], where: Path) -> None:
        if len(base_shape) != 2:
            raise InputError(f"module {module}: QA-LoRA adapts 2-D weights, the base has {list(base_shape)}", where,
                             "the adapter was trained on a different model")
        out_f, in_f = base_shape
        g = pool_group_size(config)
        if in_f % g:
            raise InputError(f"module {module}: in_features {in_f} is not divisible by qalora_group_size {g}", where,
                             "PEFT's QA-LoRA needs whole groups; the adapter was trained on a different model")
        a, b = parts["A"], parts["B"]
        if b.shape[0] != out_f or a.shape[1] != in_f // g:
            raise InputError(f"module {module}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit a base "
                             f"weight {list(base_shape)} pooled in groups of {g} (expected lora_A [r, {in_f // g}], "
                             f"lora_B [{out_f}, r])", where, "the adapter was trained on a different model or group size")

    def check_base_record(self, module: str, record: dict[str, Any], config: dict[str, Any], where: Path) -> None:
        """Refuse a packed base the adapter's pooling groups do not fit (bundle time)."""
        shape = record.get("shape") or [0, 0]
        reason = fold_incompatibility(record.get("layout"), record.get("group_size"), int(shape[-1]),
                                      pool_group_size(config), has_act_order="g_idx" in (record.get("stored") or {}))
        if reason:
            raise InputError(f"module {module}: QA-LoRA adapter (qalora_group_size {pool_group_size(config)}) does "
                             f"not match its base: {reason}", where,
                             "bundle it with the artifact it was trained on, quantized with --scheme qalora "
                             f"--group-size {pool_group_size(config)}")

    def delta_weight(self, module: str, parts: dict[str, torch.Tensor], base_shape: tuple[int, ...],
                     config: dict[str, Any]) -> torch.Tensor:
        delta = qalora_delta(parts["A"], parts["B"], lora_scaling(config, module), pool_group_size(config))
        assert tuple(delta.shape) == tuple(base_shape), (module, delta.shape, base_shape)
        return delta

    def group_constants(self, module: str, parts: dict[str, torch.Tensor], config: dict[str, Any]) -> torch.Tensor:
        return group_constants(parts["A"], parts["B"], lora_scaling(config, module), pool_group_size(config))

    def describe_config(self, config: dict[str, Any]) -> dict[str, Any]:
        d = super().describe_config(config)
        d.update({k: config.get(k) for k in ("use_qalora", "qalora_group_size")})
        return d


KIND = QaloraKind()


# ---------------------------------------------------------------------------------------------- PEFT layer
def _qalora_layer_class():
    from peft.tuners.lora.layer import LoraLayer
    from peft.tuners.lora.variants import QALoraLinearVariant

    class LowBitQALoraLinear(nn.Module, LoraLayer):
        """PEFT QA-LoRA around a `LowBitLinear` (or nn.Linear): y = base(x) + PEFT's pooled LoRA term.

        lora_A is [r, in / G] (PEFT's QALoraLinearVariant.init replaces it); the forward is that variant's.
        """

        def __init__(self, base_layer: nn.Module, adapter_name: str, config, r: int = 0, lora_alpha: int = 1,
                     **kwargs: Any):
            super().__init__()
            LoraLayer.__init__(self, base_layer)
            if config.use_dora:
                raise ValueError("DoRA and QA-LoRA together are not supported; set use_dora=False")
            if not getattr(config, "use_qalora", False):
                raise ValueError("LowBitQALoraLinear needs use_qalora=True")
            # Any base runs the pooled forward (inference on a PLR-restored base, say); only whole groups are
            # needed. Whether the adapter can later be folded exactly is checked by training_options / bundling.
            g = int(config.qalora_group_size)
            if g < 1 or self.in_features % g:
                raise ValueError(f"QA-LoRA cannot adapt this layer ({self.in_features} -> {self.out_features}): "
                                 f"in_features {self.in_features} is not divisible by qalora_group_size {g}")
            self._active_adapter = adapter_name
            self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

        def resolve_lora_variant(self, *, config, **kwargs: Any):
            return QALoraLinearVariant()

        def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
            return module.in_features, module.out_features

        def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            result = self.base_layer(x, *args, **kwargs)
            if self.disable_adapters:
                return result
            result_dtype = result.dtype
            for name in self.active_adapters:
                if name not in self.lora_A:
                    continue
                xa = self._cast_input_dtype(x, self.lora_A[name].weight.dtype).contiguous()
                result = self.lora_variant[name].forward(self, active_adapter=name, x=xa, result=result)
                result = result.to(result_dtype)
            return result

        def merge(self, *args: Any, **kwargs: Any) -> None:
            raise NotImplementedError("QA-LoRA merges exactly into the group offsets with "
                                      "`lowbitpack merge BUNDLE --restore BITS --fold`")

        def __repr__(self) -> str:
            return "lora." + super().__repr__()

    return LowBitQALoraLinear


_QALORA_CLS = None


def qalora_layer_class():
    """The PEFT layer class implementing use_qalora on LowBitLinear / nn.Linear (built lazily: peft import)."""
    global _QALORA_CLS
    if _QALORA_CLS is None:
        _QALORA_CLS = _qalora_layer_class()
    return _QALORA_CLS


def register_lowbit_qalora(config) -> Any:
    """Register the QA-LoRA layer for LowBitLinear and nn.Linear on a peft LoraConfig with use_qalora=True."""
    from ..lowbit_linear import LowBitLinear
    cls = qalora_layer_class()
    config._register_custom_module({LowBitLinear: cls, nn.Linear: cls})
    return config


def training_options(artifact, group_size: int | None, target_modules: Sequence[str]) -> dict[str, Any]:
    """LoraConfig fields for QA-LoRA training on `artifact`: the pooling group defaults to the base's group.

    Every packed tensor the targets select (PEFT's rule: the module name equals a target or ends with
    ".<target>") must fold exactly; the first that does not is refused before the model is built.
    """
    q = artifact.manifest.get("quantization", {})
    g = group_size if group_size is not None else q.get("group_size")
    if not isinstance(g, int) or isinstance(g, bool) or g < 1:
        raise OptionError("cannot tell the QA-LoRA pooling group: the base records no group size", artifact.path,
                          "pass --qalora-group-size G, or quantize with --scheme qalora --group-size G")
    for name, rec in artifact.tensors.items():
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        if module is None or rec["scheme"] == "none" or len(rec["shape"]) != 2:
            continue
        if not any(module == t or module.endswith("." + t) for t in target_modules):
            continue
        reason = fold_incompatibility(rec["layout"], rec.get("group_size"), int(rec["shape"][1]), int(g),
                                      has_act_order="g_idx" in rec["stored"])
        if reason:
            raise OptionError(f"QA-LoRA cannot adapt {module}: {reason}", artifact.path,
                              "quantize with --scheme qalora --group-size G for a G dividing every adapted "
                              "layer's in_features, or leave the layer out of --target-modules")
    return {"use_qalora": True, "qalora_group_size": int(g)}


__all__ = ["KIND", "QaloraKind", "expand_groups", "fold_incompatibility", "fold_into_offsets",
           "group_constants", "pooled_forward", "qalora_delta", "qalora_layer_class", "register_lowbit_qalora",
           "training_options"]
