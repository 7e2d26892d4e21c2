"""``training.models.layers.Conv2d``: the single-position fast path is the same convolution."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from training.models.layers import Conv2d

# (in, out, kernel, stride, padding, input size): the first three give a 1x1 output (the fast
# path: Figure 9's last layer, a kernel wider than the input, stride larger than the overhang),
# the last two do not (the ordinary convolution).
CASES = [
    (16, 8, 4, 2, 1, 3),
    (3, 5, 5, 1, 2, 1),
    (4, 6, 3, 3, 0, 4),
    (4, 6, 4, 2, 1, 7),
    (4, 6, 3, 1, 1, 5),
]


@pytest.mark.parametrize(("cin", "cout", "k", "stride", "pad", "size"), CASES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_same_outputs_and_gradients_as_nn_conv2d(
    cin: int, cout: int, k: int, stride: int, pad: int, size: int, bias: bool, channels_last: bool
) -> None:
    torch.manual_seed(0)
    fast = Conv2d(cin, cout, k, stride=stride, padding=pad, bias=bias).double()
    ref = nn.Conv2d(cin, cout, k, stride=stride, padding=pad, bias=bias).double()
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(3, cin, size, size, dtype=torch.float64)
    if channels_last:
        fast, ref = (m.to(memory_format=torch.channels_last) for m in (fast, ref))
        x = x.contiguous(memory_format=torch.channels_last)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out, expected = fast(xa), ref(xb)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected)
    g = torch.randn_like(expected)
    out.backward(g)
    expected.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad)
    assert fast.weight.grad is not None and ref.weight.grad is not None
    torch.testing.assert_close(fast.weight.grad, ref.weight.grad)
    if bias:
        torch.testing.assert_close(fast.bias.grad, ref.bias.grad)


def test_fast_path_is_taken_only_for_a_single_output_position() -> None:
    conv = Conv2d(8, 4, 4, stride=2, padding=1)
    assert conv._single_position(torch.zeros(1, 8, 3, 3))
    assert not conv._single_position(torch.zeros(1, 8, 7, 7))
    assert not Conv2d(8, 4, 4, stride=2, padding=1, groups=2)._single_position(torch.zeros(1, 8, 3, 3))
    assert not Conv2d(8, 4, 4, stride=2, padding=1, dilation=2)._single_position(torch.zeros(1, 8, 3, 3))
    assert not Conv2d(8, 4, 3, padding="same")._single_position(torch.zeros(1, 8, 1, 1))


def test_paper_mnist_encoder_uses_it_and_keeps_its_state_dict_keys() -> None:
    from training.models import create_model

    model = create_model("er_mnist", width=0.125)
    convs = [m for m in model.encoder if isinstance(m, nn.Conv2d)]
    assert convs and all(isinstance(m, Conv2d) for m in convs)
    assert "encoder.8.weight" in model.state_dict()  # same keys: stored weights load unchanged
