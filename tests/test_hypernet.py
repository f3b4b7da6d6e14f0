"""The shared context network of the conditional builders: defaults, shapes, and errors that name
the bad value (every conditional family goes through it)."""

from dataclasses import dataclass

import pytest
import torch
from pyro.nn import DenseNN

import transforms
from flow_helpers import move_parameters
from test_transforms_contract import Case, _check_logdet, _warm_up
from transforms.hypernet import LinearHypernet, context_hypernet

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


def test_no_hidden_layer_is_one_linear_map_split_as_densenn_splits():
    net = context_hypernet(3, 5, [1, 3, 3], hidden_dims=[])
    assert isinstance(net, LinearHypernet) and net.hidden_dims == []
    assert [(layer.in_features, layer.out_features) for layer in net.layers] == [(5, 7)]
    context = torch.randn(4, 2, 5)
    bias, u, w = net(context)
    flat = net.layers[0](context)
    torch.testing.assert_close(torch.cat([bias, u, w], dim=-1), flat, rtol=0, atol=0)
    assert context_hypernet(3, 5, [3], hidden_dims=[])(context).shape == (4, 2, 3)


# the conditional families whose context network is context_hypernet's
LINEAR_FAMILIES = FAMILIES + ["spline", "matrix_exponential"]


@dataclass(frozen=True)
class LinearCase(Case):
    """A contract-test case whose context network is linear (``hidden_dims=[]``)."""

    def build(self, dtype: torch.dtype = torch.float64):
        layer = transforms.build(self.name, self.dim, context_dim=3, hidden_dims=[],
                                 **self.entry.test_kwargs)
        return layer.to(dtype)


LINEAR_CASES = [LinearCase(name, dim, True) for name in LINEAR_FAMILIES for dim in (2, 3)
                if dim >= transforms.info(name).min_input_dim]


@pytest.mark.parametrize("case", LINEAR_CASES, ids=str)
def test_a_linear_context_network_keeps_every_contract(case):
    """Log-det against the float64 autograd Jacobian at initialisation and after the parameters
    move far, a round trip at a fresh point, and a conditioned transform that follows the
    parameters."""
    torch.manual_seed(30)
    layer = case.build()
    nets = [m for m in layer.modules() if isinstance(m, DenseNN)]
    assert nets and all(isinstance(m, LinearHypernet) for m in nets), f"{case}: {nets}"
    _warm_up(case, layer)
    _check_logdet(case, layer, seed=31)
    context = case.context((4,), torch.float64)
    transform = layer.condition(context)
    x = torch.randn(4, *case.event_shape(), dtype=torch.float64)
    before = transform(x.clone())
    move_parameters(layer, seed=32)
    _check_logdet(case, layer, seed=33)
    after = transform(x.clone())
    assert not torch.allclose(before, after), f"{case}: the conditioned map ignored the new parameters"
    torch.testing.assert_close(after, layer.condition(context)(x.clone()))
    if case.entry.exact_inverse:
        y = torch.randn(4, *case.event_shape(), dtype=torch.float64)
        torch.testing.assert_close(transform(transform.inv(y.clone()).clone()), y, atol=1e-8, rtol=1e-8)
