"""Which tensors of a checkpoint get quantized."""
from __future__ import annotations

import re

# Linear weights inside the decoder stack; embeddings, norms and lm_head stay as they are by default.
DEFAULT_MODULES = r"\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|qkv_proj|gate_up_proj|fc1|fc2|dense|query_key_value|dense_h_to_4h|dense_4h_to_h|c_attn|c_proj|c_fc|w1|w2|w3|wq|wk|wv|wo)\.weight$"


def compile_modules(pattern: str | None) -> re.Pattern:
    try:
        return re.compile(pattern or DEFAULT_MODULES)
    except re.error as e:
        from ..errors import OptionError
        raise OptionError(f"--modules is not a valid regular expression ({e})", None, "fix the pattern") from None


def is_selected(name: str, shape, dtype_name: str, modules: re.Pattern) -> bool:
    """2-D floating tensors whose name matches `modules`."""
    return (len(shape) == 2 and dtype_name in ("F32", "F16", "BF16", "float32", "float16", "bfloat16")
            and modules.search(name) is not None)
