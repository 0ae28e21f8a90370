"""delt_ext.image_channel_sums (the float64 per-image channel sums of `delt stats`) against plain
torch float64, and its documented summation order bit for bit (csrc/channel_sums.cpp)."""

import pytest
import torch
from conftest import DEVICES, DTYPES

import delt_ext
from delt_ext import reference

pytestmark = pytest.mark.skipif(not delt_ext.HAS_OPS, reason="compiled delt_ext library not built")
ops = torch.ops.delt_ext

# Planes shorter than the 32 partials, with a partial last round, exact multiples of 32; one
# value per channel; channel counts that are not multiples of the vector widths.
SHAPES = [(3, 5, 7, 9), (2, 3, 28, 28), (4, 37, 1, 1), (2, 130, 8, 4), (1, 2, 3, 1), (5, 4, 14, 14)]
LAYOUTS = ["nchw", "channels_last", "strided"]


def make_input(shape, dtype, layout, device="cpu", seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=generator) * 3 + 1.5).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":  # neither NCHW- nor channels_last-contiguous: a copy is read
        x = torch.cat([x, x], dim=3)[..., ::2]
    return x.to(device)


def documented_order(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The op's order in plain torch: pixel i to partial i % 32, each partial added in pixel
    order (a sequential cumsum), then partial l += partial l + k for k = 16, 8, 4, 2, 1."""
    n, c = x.shape[:2]
    flat = x.detach().cpu().to(torch.float64).reshape(n, c, -1)
    rounds = -(-flat.shape[-1] // 32)
    results = []
    for values in (flat, flat * flat):
        lanes = torch.zeros(n, c, rounds * 32, dtype=torch.float64)
        lanes[..., : flat.shape[-1]] = values
        partial = lanes.reshape(n, c, rounds, 32).cumsum(2)[:, :, -1]  # adds 0 after the end
        k = 16
        while k:
            partial = partial[..., :k] + partial[..., k : 2 * k]
            k //= 2
        results.append(partial[..., 0])
    return results[0], results[1]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_torch_float64(shape, dtype, layout, device):
    x = make_input(shape, dtype, layout, device)
    total, squares = delt_ext.image_channel_sums(x)
    assert total.dtype == squares.dtype == torch.float64
    assert total.shape == squares.shape == shape[:2] and total.device == x.device
    expected_total, expected_squares = reference.image_channel_sums(x)
    torch.testing.assert_close(total, expected_total, rtol=1e-13, atol=1e-12)
    torch.testing.assert_close(squares, expected_squares, rtol=1e-13, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_documented_order_bitwise(shape, dtype, layout, device):
    """Squares of values of at most 24 bits are exact in float64: every backend and layout gives
    the documented order's bits."""
    x = make_input(shape, dtype, layout, device, seed=1)
    total, squares = delt_ext.image_channel_sums(x)
    expected_total, expected_squares = documented_order(x)
    assert torch.equal(total.cpu(), expected_total)
    assert torch.equal(squares.cpu(), expected_squares)


@pytest.mark.parametrize("dtype", DTYPES)
def test_same_bits_at_any_thread_count_and_layout(dtype):
    x = make_input((16, 24, 28, 28), dtype, "nchw", seed=2)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = delt_ext.image_channel_sums(x)
        torch.set_num_threads(max(2, threads))
        many = delt_ext.image_channel_sums(x)
        last = delt_ext.image_channel_sums(x.contiguous(memory_format=torch.channels_last))
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(one, many, last, strict=True):
        assert torch.equal(a, b)
        if dtype != torch.float64:  # float64 squares round (and may round apart per layout)
            assert torch.equal(a, c)
        else:
            torch.testing.assert_close(a, c, rtol=1e-14, atol=0)


def test_16_bit_values_are_widened_exactly():
    x = make_input((3, 4, 9, 9), torch.float16, "nchw", seed=3)
    for a, b in zip(
        delt_ext.image_channel_sums(x), delt_ext.image_channel_sums(x.float()), strict=True
    ):
        assert torch.equal(a, b)


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 0, 4, 4), (2, 3, 0, 4)])
def test_empty(shape):
    total, squares = delt_ext.image_channel_sums(torch.randn(shape))
    assert total.shape == squares.shape == shape[:2]
    assert not total.any() and not squares.any()


def test_non_finite_values_propagate():
    x = torch.randn(2, 3, 5, 5)
    x[0, 1, 2, 2] = float("nan")
    x[1, 2, 0, 0] = float("inf")
    total, squares = delt_ext.image_channel_sums(x)
    assert total[0, 1].isnan() and squares[0, 1].isnan()
    assert total[1, 2] == float("inf") and squares[1, 2] == float("inf")
    finite = torch.ones(2, 3, dtype=torch.bool)
    finite[0, 1] = finite[1, 2] = False
    expected = reference.image_channel_sums(x)
    torch.testing.assert_close(total[finite], expected[0][finite], rtol=1e-13, atol=1e-12)


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="4-D"):
        delt_ext.image_channel_sums(torch.randn(3, 4, 5))
    with pytest.raises(TypeError, match="float32"):
        delt_ext.image_channel_sums(torch.ones(2, 3, 4, 4, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="4-D"):
        ops.image_channel_sums(torch.randn(3, 4, 5))


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_opcheck(layout):
    torch.library.opcheck(
        ops.image_channel_sums.default, (make_input((5, 6, 4, 3), torch.float32, layout),)
    )


def test_torch_compile_fullgraph():
    def step(x):
        total, squares = delt_ext.image_channel_sums(x)
        return squares / 16 - (total / 16) ** 2

    compiled = torch.compile(step, fullgraph=True)
    x = make_input((4, 5, 4, 4), torch.float32, "nchw")
    assert torch.equal(compiled(x), step(x))
