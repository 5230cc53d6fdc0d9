"""Wrong inputs to the model, plain or fast, are refused with an error that says what was expected."""

import numpy as np
import pytest
import torch

import swinv2
from swinv2.layers import to_2tuple


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "fast"])
def model(request):
    return swinv2.create_model("swinv2_debug", num_classes=3, fast=request.param).eval()


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32, torch.int64, torch.bool, torch.complex64])
def test_non_floating_images_are_refused(model, dtype):
    x = torch.zeros(2, 3, 64, 64, dtype=dtype)
    for call in (model, model.forward_features, lambda t: model.forward_intermediates(t, intermediates_only=True)):
        with pytest.raises(TypeError, match=f"expected a floating-point image tensor, got {str(dtype)[6:]}"):
            call(x)


def test_non_tensor_input_is_refused(model):
    with pytest.raises(TypeError, match="got ndarray"):
        model(np.zeros((2, 3, 64, 64), dtype=np.float32))


@pytest.mark.parametrize("value", ["64", b"64", 64.0, 64.5, True, [64, "64"], [64.0, 64], (1, 2, 3), [None, 2]])
def test_sizes_must_be_ints(value):
    with pytest.raises((TypeError, ValueError), match="must be an int or a pair of ints"):
        to_2tuple(value, "img_size")


def test_sizes_accept_every_integer_kind():
    assert to_2tuple(np.int64(64)) == (64, 64)
    assert to_2tuple(torch.tensor(64)) == (64, 64)
    assert to_2tuple((np.int32(32), 48)) == (32, 48)
    assert to_2tuple([32, 48]) == (32, 48)


def test_set_input_size_refuses_a_string(model):
    with pytest.raises(TypeError, match="img_size must be an int or a pair of ints, got '64'"):
        model.set_input_size(img_size="64")
    assert model.img_size == (64, 64)  # unchanged
    with pytest.raises(TypeError):
        swinv2.create_model("swinv2_debug", img_size="64")
