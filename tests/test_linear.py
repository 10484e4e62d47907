"""moelab.nn.linear: one bf16 row on a CPU over a column-major weight goes through `embedding_bag`;
the result is F.linear's. On integer-valued data up to 30 in size every product and sum is exact
in float32 (sums up to 36,000, far past bf16's 256 exact integers), so the result must be the
exact sum rounded once to a nearest bf16 (a sum exactly halfway between two may go either way:
F.linear rounds such ties to even, the bag not always), as F.linear's is; on random data both lie
within bf16's rounding of a float64 reference.
Everything else (float32, row-major weights, two rows, a bias, gradients) is F.linear itself."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from moelab.nn import linear
from moelab.nn.linear import Linear, one_row_linear


def _column_major(w):
    return w.mT.contiguous().mT


@pytest.fixture
def bag_calls(monkeypatch):
    calls = []
    real = torch.embedding_bag
    monkeypatch.setattr(torch, "embedding_bag", lambda *args: calls.append(args[0].shape) or real(*args))
    return calls


@settings(max_examples=60, deadline=None)
@given(
    inputs=st.integers(1, 40),
    outputs=st.integers(1, 40),
    decode_shape=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_a_bag_rounds_the_exact_sum_once_to_a_nearest_bf16(inputs, outputs, decode_shape, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (1, 1, inputs) if decode_shape else (1, inputs)  # a decode step's [1, 1, D], or a row
    x = torch.randint(-30, 31, shape, generator=g).bfloat16()
    w = _column_major(torch.randint(-30, 31, (outputs, inputs), generator=g).bfloat16())
    with torch.inference_mode():
        assert linear._takes_bag(x, w)
        got = one_row_linear(x, w)
        want = F.linear(x, w.contiguous())
    assert got.shape == want.shape and got.dtype == torch.bfloat16
    exact = x.double() @ w.double().mT
    assert ((got.double() - exact).abs() <= (want.double() - exact).abs()).all(), "as near as F.linear's"
    assert ((got == want) | ((got.double() - exact).abs() == (want.double() - exact).abs())).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_bag_lies_within_bf16_rounding_of_a_float64_reference(seed, bag_calls):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 1, 256, generator=g).bfloat16()
    w = _column_major(torch.randn(384, 256, generator=g).bfloat16())
    with torch.no_grad():
        got = one_row_linear(x, w)
    assert bag_calls == [(256, 384)], "the weight's transpose"
    want = x.double() @ w.double().T
    # one rounding to bf16 of a float32 sum: half an ulp of the result, plus float32's own error
    assert ((got.double() - want).abs() <= want.abs() * 2**-8 + 1e-3).all()


def test_everything_else_is_f_linear(bag_calls):
    g = torch.Generator().manual_seed(0)
    w = _column_major(torch.randn(8, 6, generator=g).bfloat16())
    x = torch.randn(1, 6, generator=g).bfloat16()
    with torch.inference_mode():
        one_row_linear(x.float(), w.float())  # float32
        one_row_linear(x, w.contiguous())  # row-major
        one_row_linear(torch.randn(2, 6).bfloat16(), w)  # two rows
        one_row_linear(x.half(), w.half())  # another dtype
        one_row_linear(x, w, torch.ones(8).bfloat16())  # a bias: added after a bag, rounded twice
    grad_w = w.detach().clone().requires_grad_(True)
    y = one_row_linear(x, grad_w)  # gradients wanted
    y.sum().backward()
    assert grad_w.grad is not None
    assert bag_calls == []
    with torch.inference_mode():
        one_row_linear(x, w)
    assert len(bag_calls) == 1


def test_linear_module_keeps_nn_linear_state_and_results(bag_calls):
    torch.manual_seed(0)
    plain, ours = torch.nn.Linear(6, 8, bias=False), Linear(6, 8, bias=False)
    ours.load_state_dict(plain.state_dict())
    assert isinstance(ours, torch.nn.Linear) and ours.state_dict().keys() == plain.state_dict().keys()
    x = torch.randint(-3, 4, (3, 6)).float()
    assert torch.equal(ours(x), plain(x))
    ours.bfloat16()
    ours.weight.data = _column_major(ours.weight.data.round())
    with torch.inference_mode():
        row = x[:1].bfloat16()
        assert torch.equal(ours(row), F.linear(row, ours.weight.contiguous(), ours.bias))
    assert len(bag_calls) == 1
