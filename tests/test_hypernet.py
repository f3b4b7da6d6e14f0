"""The shared context network of the conditional builders: defaults, shapes, and errors that name
the bad value (every conditional family goes through it)."""

import pytest
import torch

import transforms
from transforms.hypernet import context_hypernet

# the families whose conditional builder takes (input_dim, context_dim, hidden_dims) through
# context_hypernet
FAMILIES = ["planar", "radial", "householder", "sylvester", "prelu", "conv_planar"]


def test_default_widths_and_parameter_shapes():
    net = context_hypernet(3, 5, [1, 3, 3])
    assert net.hidden_dims == [30, 30]
    bias, u, w = net(torch.randn(7, 5))
    assert bias.shape == (7, 1) and u.shape == (7, 3) and w.shape == (7, 3)


def test_given_widths_are_used():
    net = context_hypernet(2, 4, [2], hidden_dims=(8, 6, 4))
    assert net.hidden_dims == [8, 6, 4]
    assert [layer.out_features for layer in net.layers] == [8, 6, 4, 2]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"input_dim": 0}, "input_dim must be a positive int, got 0"),
        ({"input_dim": 2.0}, "input_dim must be a positive int, got 2.0"),
        ({"context_dim": True}, "context_dim must be a positive int, got True"),
        ({"context_dim": -3}, "context_dim must be a positive int, got -3"),
        ({"hidden_dims": []}, "hidden_dims must list at least one layer width"),
        ({"hidden_dims": [16, 0]}, r"hidden_dims\[1\] must be a positive int, got 0"),
        ({"hidden_dims": [16.5]}, r"hidden_dims\[0\] must be a positive int, got 16.5"),
    ],
)
def test_bad_dimensions_are_named(kwargs, message):
    arguments = {"input_dim": 2, "context_dim": 3, "param_dims": [2], **kwargs}
    with pytest.raises(ValueError, match=message):
        context_hypernet(**arguments)


@pytest.mark.parametrize("name", FAMILIES)
def test_every_conditional_builder_names_a_bad_width(name):
    with pytest.raises(ValueError, match=r"hidden_dims\[0\] must be a positive int, got 0"):
        transforms.build(name, 2, context_dim=3, hidden_dims=[0])
