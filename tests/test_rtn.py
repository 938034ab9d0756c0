import pytest
import torch

from lowbitpack.kernels import dequantize
from lowbitpack.layouts.intg import unpack_intg
from lowbitpack.schemes import make_scheme


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape,group", [((7, 33), 16), ((5, 128), 128), ((3, 130), 128), ((4, 10), 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rtn_error_bound_and_exact_codes(bits, shape, group, dtype):
    torch.manual_seed(bits)
    w = torch.randn(shape).to(dtype)
    qt = make_scheme(f"int{bits}", group_size=group).quantize(w)
    deq = dequantize(qt, torch.float32)
    assert deq.shape == w.shape and deq.dtype == torch.float32
    # error of round-to-nearest is at most half a step (+ rounding of the output dtype)
    g = qt.group_size
    step = qt.tensors["scale"].float().repeat_interleave(g, dim=1)[:, : shape[1]]
    err = (deq - w.float()).abs()
    assert (err <= step / 2 + 1e-6 + w.float().abs() * 1e-2 * (dtype != torch.float32)).all()
    # codes re-derived from the dequantized weights are the stored codes (exact decode)
    codes = unpack_intg(qt.tensors["qweight"], bits, shape[1]).float()
    zero = qt.tensors["zero"].float().repeat_interleave(g, dim=1)[:, : shape[1]]
    assert torch.equal(torch.round(deq / step + zero), codes)


def test_rtn_constant_and_zero_rows():
    w = torch.zeros(3, 40)
    w[1] = 0.5
    qt = make_scheme("int4", group_size=16).quantize(w)
    assert torch.allclose(dequantize(qt, torch.float32), w, atol=1e-3)


def test_rtn_more_bits_less_error():
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    errs = [(dequantize(make_scheme(f"int{b}").quantize(w), torch.float32) - w).pow(2).mean().item()
            for b in (2, 3, 4, 8)]
    assert errs == sorted(errs, reverse=True)
    assert errs[-1] < 1e-4


def test_rtn_storage_cost():
    qt = make_scheme("int4", group_size=128).quantize(torch.randn(256, 1024))
    # 4 bits codes + (16-bit scale + 8-bit zero) per 128 weights
    assert abs(qt.bits_per_weight() - (4 + 24 / 128)) < 1e-9
