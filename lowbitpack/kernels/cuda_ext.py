"""The CUDA extension (sources in `cuda/`): JIT-built on first use, cached, and optional.

`load()` builds `cuda/*.cu` + `cuda/bindings.cpp` with `torch.utils.cpp_extension.load` into
`~/.cache/lowbitpack/torch_extensions/<key>` (key = sources hash, torch/CUDA version, GPU arch), once per
machine; later processes only load the built module. Whenever it cannot be had -- no GPU, a CPU-only
torch, no nvcc, sources not shipped, a build error -- it returns None and `status()["reason"]` says why;
callers then use the pure-torch references (the ground truth the kernels are tested against bit for bit).

Set `LOWBITPACK_DISABLE_CUDA=1` to never build or use it.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import threading
import weakref
from pathlib import Path
from typing import Any, Callable

import torch

from ..qtensor import QuantizedTensor

# Fused GEMV handles at most this many rows of x (the n = 8 side of one m16n8k16 mma).
MAX_GEMV_ROWS = 8
GEMV_INTG_BITS = (2, 3, 4, 8)

_lock = threading.Lock()
_ext: Any = None
_tried = False
_reason: str | None = None
_build_dir: Path | None = None

_DTYPE_OK = (torch.bfloat16, torch.float16, torch.float32)


def sources_dir() -> Path | None:
    """Directory holding the .cu sources: $LOWBITPACK_CUDA_SRC, else `cuda/` beside the package (a checkout)."""
    env = os.environ.get("LOWBITPACK_CUDA_SRC")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[2] / "cuda")
    for c in candidates:
        if (c / "bindings.cpp").is_file():
            return c
    return None


def cache_root() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "lowbitpack" / "torch_extensions"


def _sources(src: Path) -> list[Path]:
    return sorted(src.glob("*.cu")) + [src / "bindings.cpp"]


def _source_hash(src: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(list(src.glob("*.cu")) + list(src.glob("*.cuh")) + list(src.glob("*.h")) + [src / "bindings.cpp"]):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:12]


def _why_not() -> str | None:
    """Reason the extension cannot be built here, or None."""
    if os.environ.get("LOWBITPACK_DISABLE_CUDA") == "1":
        return "disabled by LOWBITPACK_DISABLE_CUDA=1"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is built without CUDA"
    if not torch.cuda.is_available():
        return "no CUDA device visible to torch"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return f"GPU sm_{major}{minor} is older than sm_80 (the kernels use bf16 tensor-core mma)"
    from torch.utils.cpp_extension import CUDA_HOME
    if CUDA_HOME is None and shutil.which("nvcc") is None:
        return "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    if sources_dir() is None:
        return "CUDA sources (cuda/*.cu) not found; set LOWBITPACK_CUDA_SRC to the checkout's cuda/ directory"
    return None


def load(verbose: bool = False) -> Any:
    """The built extension module, or None (see `status()` for the reason). Builds at most once per process."""
    global _ext, _tried, _reason, _build_dir
    with _lock:
        if _tried:
            return _ext
        _tried = True
        _reason = _why_not()
        if _reason is not None:
            return None
        src = sources_dir()
        assert src is not None
        major, minor = torch.cuda.get_device_capability()
        key = f"{_source_hash(src)}-torch{torch.__version__.split('+')[0]}-cu{torch.version.cuda}-sm{major}{minor}"
        _build_dir = cache_root() / key
        _build_dir.mkdir(parents=True, exist_ok=True)
        # Build only for this GPU: one arch compiles several times faster than torch's default list.
        old_arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
        os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
        try:
            from torch.utils.cpp_extension import load as load_ext
            _ext = load_ext(
                name=f"lowbitpack_cuda_{key.split('-')[0]}",
                sources=[str(p) for p in _sources(src)],
                extra_include_paths=[str(src)],
                extra_cflags=["-O3"],  # torch picks the C++ standard its headers need
                # No --use_fast_math: the weight arithmetic must round exactly like the torch reference.
                extra_cuda_cflags=["-O3", "-lineinfo"],
                build_directory=str(_build_dir),
                verbose=verbose,
            )
        except Exception as e:  # a broken toolchain must never break the reference path
            _ext = None
            msg = str(e).strip().splitlines()
            _reason = f"build failed in {_build_dir}: {msg[-1] if msg else type(e).__name__}"
        finally:
            if old_arch is None:
                os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
            else:
                os.environ["TORCH_CUDA_ARCH_LIST"] = old_arch
        return _ext


def status() -> dict[str, Any]:
    """Whether the extension is loaded, and if not, why; where it was built."""
    return {"tried": _tried, "available": _ext is not None, "reason": _reason,
            "build_dir": str(_build_dir) if _build_dir else None}


def available() -> bool:
    return load() is not None


# ------------------------------------------------------------------ intg-v1

def _intg_args(qt: QuantizedTensor) -> tuple | None:
    """Positional kernel arguments shared by intg dequant and GEMV, or None when the kernel cannot take qt."""
    t = qt.tensors
    bits = int(qt.bits)
    if len(qt.shape) != 2 or not 1 <= bits <= 8 or float(qt.bits) != bits:
        return None
    rows, cols = int(qt.shape[0]), int(qt.shape[1])
    g_idx = t.get("g_idx")
    if g_idx is None and not qt.group_size:
        return None
    zero, offset = t.get("zero"), t.get("offset")
    if (zero is None) == (offset is None):
        return None
    scale = t["scale"]
    if scale.dtype not in _DTYPE_OK or (offset is not None and offset.dtype not in _DTYPE_OK):
        return None
    dev = t["qweight"].device
    if any(v.device != dev for v in t.values()):
        return None
    gi = None if g_idx is None else g_idx.to(torch.int32).contiguous()
    return (t["qweight"].contiguous(), scale.contiguous(),
            None if zero is None else zero.contiguous(), None if offset is None else offset.contiguous(),
            gi, rows, cols, bits, int(qt.group_size or 1))


def dequantize_intg(qt: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor | None:
    ext = load()
    if ext is None or dtype not in _DTYPE_OK:
        return None
    args = _intg_args(qt)
    if args is None:
        return None
    return ext.intg_dequant(*args, dtype)


def gemv_intg(x2d: torch.Tensor, qt: QuantizedTensor) -> torch.Tensor | None:
    ext = load()
    if ext is None or int(qt.bits) not in GEMV_INTG_BITS:
        return None
    args = _intg_args(qt)
    if args is None:
        return None
    return ext.intg_gemv(x2d, *args)


# ------------------------------------------------------------------ nf4-bnb-v1

def _nf4_args(qt: QuantizedTensor) -> tuple | None:
    """Kernel arguments (after the output dtype / x) for an nf4-bnb-v1 tensor, or None."""
    t, prm = qt.tensors, qt.params
    n = 1
    for s in qt.shape:
        n *= int(s)
    rows, cols = (int(qt.shape[0]), int(qt.shape[1])) if len(qt.shape) == 2 else (1, n)
    blocksize = int(prm.get("blocksize", qt.group_size or 0))
    if blocksize <= 0 or blocksize % 16:  # bitsandbytes' block sizes are 32..4096
        return None
    packed = t["qweight"].reshape(-1)
    if packed.dtype != torch.uint8:
        packed = packed.contiguous().view(torch.uint8)
    if packed.data_ptr() % 16:  # a view into a larger buffer: the kernels load 8/16 bytes at a time
        packed = packed.clone()
    absmax = t["absmax"].reshape(-1)
    dev = packed.device
    if any(v.device != dev for v in t.values()):
        return None
    qmap = t["quant_map"].float().reshape(-1).contiguous()
    if bool(prm.get("double_quant", absmax.dtype == torch.uint8)):
        if absmax.dtype != torch.uint8:
            return None
        return (packed.contiguous(), qmap, None, absmax.contiguous(),
                t["nested_quant_map"].float().reshape(-1).contiguous(),
                t["nested_absmax"].float().reshape(-1).contiguous(), float(prm["offset"]),
                blocksize, int(prm.get("nested_blocksize", 256)), rows, cols)
    return (packed.contiguous(), qmap, absmax.float().contiguous(), None, None, None, 0.0, blocksize, 256, rows, cols)


def dequantize_nf4(qt: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor | None:
    ext = load()
    if ext is None or dtype not in _DTYPE_OK:
        return None
    args = _nf4_args(qt)
    if args is None:
        return None
    return ext.nf4_dequant(*args, dtype).reshape(tuple(qt.shape))


def gemv_nf4(x2d: torch.Tensor, qt: QuantizedTensor) -> torch.Tensor | None:
    ext = load()
    if ext is None or len(qt.shape) != 2:
        return None
    args = _nf4_args(qt)
    if args is None:
        return None
    return ext.nf4_gemv(x2d, *args)


# ------------------------------------------------------------------ lowra-v1

# Original row index of every row of each width class, cached per row_bits tensor: computing it is a
# device sort, which a 1-token decode step should not pay every call. Keyed by id() with a weak reference
# to check identity (tensors compare elementwise, so they cannot be dict keys by value).
_ROW_MAPS: dict[int, tuple[Any, tuple[torch.Tensor, ...]]] = {}
_LOWRA_WIDTHS = (1, 2, 4)


def _lowra_row_maps(row_bits: torch.Tensor, counts: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    hit = _ROW_MAPS.get(id(row_bits))
    if hit is not None and hit[0]() is row_bits:
        return hit[1]
    # Stable sort by width: rows of width 1, then 2, then 4, each class in ascending row order -- the
    # order the layout stores them in (counts come from the class tensors' shapes: no device sync).
    order = torch.argsort(row_bits.to(torch.int32), stable=True).to(torch.int32)
    maps, start = [], 0
    for n in counts:
        maps.append(order[start:start + n].contiguous())
        start += n
    result = tuple(maps)
    key = id(row_bits)
    _ROW_MAPS[key] = (weakref.ref(row_bits, lambda _r, key=key: _ROW_MAPS.pop(key, None)), result)
    return result


def _lowra_args(qt: QuantizedTensor) -> tuple | None:
    t = qt.tensors
    if len(qt.shape) != 2 or "row_bits" not in t:
        return None
    rows, cols = int(qt.shape[0]), int(qt.shape[1])
    dev = t["row_bits"].device
    if any(v.device != dev for v in t.values()):
        return None
    codes = [t[f"codes{b}"].contiguous() for b in _LOWRA_WIDTHS]
    books = [t[f"codebook{b}"].to(torch.float16).contiguous() for b in _LOWRA_WIDTHS]
    maps = _lowra_row_maps(t["row_bits"], tuple(int(c.shape[0]) for c in codes))
    return codes, books, list(maps), rows, cols


def dequantize_lowra(qt: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor | None:
    ext = load()
    if ext is None or dtype not in _DTYPE_OK:
        return None
    args = _lowra_args(qt)
    if args is None:
        return None
    return ext.lowra_dequant(*args, dtype)


def gemv_lowra(x2d: torch.Tensor, qt: QuantizedTensor) -> torch.Tensor | None:
    ext = load()
    if ext is None:
        return None
    args = _lowra_args(qt)
    if args is None:
        return None
    return ext.lowra_gemv(x2d, *args)


# ------------------------------------------------------------------ registry

_DEQUANT: dict[str, Callable[[QuantizedTensor, torch.dtype], torch.Tensor | None]] = {
    "intg-v1": dequantize_intg,
    "nf4-bnb-v1": dequantize_nf4,
    "lowra-v1": dequantize_lowra,
}
_GEMV: dict[str, Callable[[torch.Tensor, QuantizedTensor], torch.Tensor | None]] = {
    "intg-v1": gemv_intg,
    "nf4-bnb-v1": gemv_nf4,
    "lowra-v1": gemv_lowra,
}


def gemv_for(layout: str) -> Callable[[torch.Tensor, QuantizedTensor], torch.Tensor | None] | None:
    """Fused GEMV of `layout` (returns None for a tensor it cannot take), or None when there is no kernel."""
    return _GEMV.get(layout) if available() else None


def register() -> bool:
    """Register the CUDA dequantizers with `lowbitpack.kernels.dispatch` (a no-op returning False without CUDA)."""
    if not available():
        return False
    from .dispatch import register_cuda
    for layout, fn in _DEQUANT.items():
        register_cuda(layout, fn)
    return True
