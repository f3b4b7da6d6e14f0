r"""Importance draws from a guide, scored by the model: the raw material of every diagnostic.

For :math:`s = 1..S` draws :math:`z_s \sim q(z \mid x)` the model is replayed against the guide
and every sample site's log-probability is kept, so that

.. math:: \log w_s = \log p(x, z_s) - \log q(z_s \mid x)

is available for the whole model and, when every latent and observed site sits inside one plate
over data items (sequences, images, rows), per item:

.. math:: \log w_{s,i} = \log p(x_i, z_{s,i}) - \log q(z_{s,i} \mid x_i),

the sum of each site's log-probability over every dim except the particle dim and the item
plate's dim. Draws are vectorised with an outer particle plate (as
:func:`pyro.infer.importance.vectorized_importance_weights` does, so a seeded call draws the same
``z`` as :func:`pyro.infer.importance.psis_diagnostic`), or taken one at a time for models that
cannot broadcast over an extra leading dim.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import pyro
import pyro.poutine as poutine
import torch
from pyro.poutine.util import prune_subsample_sites
from pyro.poutine.trace_struct import Trace
from pyro.util import get_rng_state, set_rng_state

from ..validation import check_non_negative_int, check_positive_int

__all__ = ["ImportanceDraws", "SiteDims", "draw_importance_samples", "guess_max_plate_nesting"]

# Name of the outer plate that vectorises the draws. Only its dim matters to the model; the
# name just has to be one no model uses.
PARTICLE_PLATE = "_diagnostics_particles"


@dataclass(frozen=True)
class SiteDims:
    """What each dim of a site's stored array is.

    :param plates: for each kept batch dim (after the draw dim), the name of the plate that
        declares it, or ``None`` for a batch dim no plate declares.
    :param event_dims: how many trailing dims are the distribution's event dims.
    """

    plates: tuple[str | None, ...]
    event_dims: int


@dataclass
class ImportanceDraws:
    """``S`` draws from the guide with their log-weights under the model.

    Tensors are on the CPU, detached. ``latents[name]`` has shape ``(S, *plate dims, *event
    shape)`` (batch dims that no plate declares and that have size 1 are dropped);
    ``log_likelihood[name]`` is the pointwise log-likelihood of observed site ``name``, shape
    ``(S, *plate dims)``; ``observed[name]`` is the data itself.

    :param log_p: ``(S,)`` :math:`\\log p(x, z_s)`.
    :param log_q: ``(S,)`` :math:`\\log q(z_s \\mid x)`.
    :param log_weights_per_item: ``(S, N)`` per-item log-weights, or ``None`` when the model has
        no plate that holds every site (e.g. a global latent).
    :param item_plate: the plate the items run over, or ``None``.
    """

    latents: dict[str, torch.Tensor]
    log_p: torch.Tensor
    log_q: torch.Tensor
    log_weights_per_item: torch.Tensor | None
    item_plate: str | None
    log_likelihood: dict[str, torch.Tensor]
    observed: dict[str, torch.Tensor]
    posterior_predictive: dict[str, torch.Tensor] = field(default_factory=dict)
    site_dims: dict[str, SiteDims] = field(default_factory=dict)

    @property
    def log_weights(self) -> torch.Tensor:
        """``(S,)`` joint log importance weights :math:`\\log p(x, z_s) - \\log q(z_s|x)`."""
        return self.log_p - self.log_q

    @property
    def num_samples(self) -> int:
        return int(self.log_p.shape[0])


def _traced_sites(trace: Trace) -> list[dict[str, Any]]:
    return [site for site in trace.nodes.values() if site["type"] == "sample"]


def _plate_frames(site: dict[str, Any]) -> list[Any]:
    """The vectorised plates a site sits in, our particle plate left out."""
    return [
        frame
        for frame in site["cond_indep_stack"]
        if frame.vectorized and frame.dim is not None and frame.name != PARTICLE_PLATE
    ]


def guess_max_plate_nesting(model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> int:
    """How many batch dims the model and guide use: the deepest plate, or the longest batch
    shape, of any site. Runs both once; the RNG state is restored afterwards so that the draws
    that follow are the ones an equally seeded Pyro diagnostic would take."""
    state = get_rng_state()
    try:
        with torch.no_grad(), poutine.block():
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
                *args, **kwargs
            )
    finally:
        set_rng_state(state)
    depth = 0
    for trace in (prune_subsample_sites(guide_trace), prune_subsample_sites(model_trace)):
        for site in _traced_sites(trace):
            depth = max(depth, len(site["fn"].batch_shape))
            depth = max(depth, *(-frame.dim for frame in _plate_frames(site)), 0)
    return depth


def _find_item_plate(model_trace: Trace, guide_trace: Trace, item_plate: str | None) -> str | None:
    """The plate every scored site sits in (the outermost such plate if several), checked when
    the user names it. ``None`` when no plate holds them all."""
    sites = [s for s in _traced_sites(model_trace)] + [
        s for s in _traced_sites(guide_trace) if not s["is_observed"]
    ]
    if not sites:
        return None
    common = None
    for site in sites:
        names = {frame.name for frame in _plate_frames(site)}
        common = names if common is None else common & names
    if item_plate is not None:
        if item_plate not in common:
            outside = sorted(
                {s["name"] for s in sites}
                - {s["name"] for s in sites if item_plate in {f.name for f in _plate_frames(s)}}
            )
            raise ValueError(
                f"item_plate {item_plate!r} does not hold every sample site; sites outside it: "
                f"{', '.join(outside)}; plates that hold them all: {sorted(common) or 'none'}"
            )
        return item_plate
    if not common:
        return None
    dims = {frame.name: frame.dim for site in sites for frame in _plate_frames(site)}
    return min(common, key=lambda name: dims[name])


def _pad_batch(tensor: torch.Tensor, batch_rank: int, depth: int) -> torch.Tensor:
    """Left-pad the batch part of ``tensor`` (its first ``batch_rank`` dims) to ``depth``."""
    missing = depth - batch_rank
    if missing < 0:
        raise ValueError(
            f"a site has {batch_rank} batch dims, more than max_plate_nesting={depth}"
        )
    return tensor.reshape((1,) * missing + tuple(tensor.shape))


def _kept_dims(site: dict[str, Any], full_batch: torch.Size, depth: int) -> list[tuple[int, str | None]]:
    """The batch positions (0..depth-1, counted after the draw dim) worth keeping for a site:
    those a plate declares and any other of size > 1."""
    plate_at = {depth + frame.dim: frame.name for frame in _plate_frames(site)}
    return [
        (pos, plate_at.get(pos))
        for pos in range(depth)
        if pos in plate_at or full_batch[pos] != 1
    ]


@dataclass
class _Pass:
    latents: dict[str, torch.Tensor]
    log_p: torch.Tensor
    log_q: torch.Tensor
    per_item: torch.Tensor | None
    log_likelihood: dict[str, torch.Tensor]
    observed: dict[str, torch.Tensor]
    predictive: dict[str, torch.Tensor]
    site_dims: dict[str, SiteDims]


class _Scorer:
    """Turns one guide/model trace pair (holding ``num`` draws, vectorised or not) into
    ``_Pass`` arrays whose first dim is the draw."""

    def __init__(self, depth: int, item_plate: str | None, num: int, vectorized: bool) -> None:
        self.depth = depth
        self.item_plate = item_plate
        self.num = num
        self.vectorized = vectorized

    def _full_log_prob(self, site: dict[str, Any]) -> torch.Tensor:
        """``(num, *depth batch dims)`` log-prob of a site."""
        log_prob = site["log_prob"]
        if not torch.is_tensor(log_prob):
            log_prob = torch.as_tensor(log_prob)
        if log_prob.dim() > self.depth + (1 if self.vectorized else 0):
            raise ValueError(
                f"site {site['name']!r} has log_prob shape {tuple(log_prob.shape)}, more batch "
                f"dims than max_plate_nesting={self.depth}"
                + (" plus the draw dim: the model does not broadcast over a leading draw dim "
                   "(pass vectorize=False)" if self.vectorized else "")
            )
        if self.vectorized:
            # The particle plate sits at dim -(depth + 1): everything right of it is batch.
            log_prob = log_prob.reshape((1,) * (self.depth + 1 - log_prob.dim()) + log_prob.shape)
            return log_prob.expand((self.num,) + log_prob.shape[1:])
        return _pad_batch(log_prob, log_prob.dim(), self.depth).unsqueeze(0)

    def _full_value(self, value: torch.Tensor, site: dict[str, Any], batch: torch.Size) -> torch.Tensor:
        event_shape = site["fn"].event_shape
        event_dims = len(event_shape)
        lead = value.dim() - event_dims
        value = value.reshape((1,) * max(0, len(batch) - lead) + tuple(value.shape))
        return value.expand(tuple(batch) + tuple(value.shape[value.dim() - event_dims :]))

    def _keep(self, array: torch.Tensor, kept: list[tuple[int, str | None]]) -> torch.Tensor:
        """Drop the batch dims not in ``kept`` (all of size 1) from ``(num, *batch, ...)``."""
        drop = [1 + pos for pos in range(self.depth) if pos not in {p for p, _ in kept}]
        for dim in reversed(drop):
            array = array.squeeze(dim)
        return array

    def _per_item(self, log_prob: torch.Tensor, site: dict[str, Any]) -> torch.Tensor:
        frame = next(f for f in _plate_frames(site) if f.name == self.item_plate)
        moved = log_prob.movedim(1 + self.depth + frame.dim, 1)
        return moved.reshape(moved.shape[0], moved.shape[1], -1).sum(-1)

    def score(self, model_trace: Trace, guide_trace: Trace, predictive_trace: Trace | None) -> _Pass:
        # Sums start from a Python 0 so they keep the model's dtype (a float32 model's weights
        # stay float32, as in Pyro's own psis_diagnostic).
        log_p: torch.Tensor | float = 0.0
        log_q: torch.Tensor | float = 0.0
        per_item: torch.Tensor | float | None = 0.0 if self.item_plate else None
        latents: dict[str, torch.Tensor] = {}
        log_likelihood: dict[str, torch.Tensor] = {}
        observed: dict[str, torch.Tensor] = {}
        predictive: dict[str, torch.Tensor] = {}
        site_dims: dict[str, SiteDims] = {}

        for site in _traced_sites(guide_trace):
            if site["is_observed"]:
                continue
            log_prob = self._full_log_prob(site).detach().cpu()
            log_q = log_q + log_prob.reshape(self.num, -1).sum(-1)
            if per_item is not None:
                per_item = per_item - self._per_item(log_prob, site)

        for site in _traced_sites(model_trace):
            log_prob = self._full_log_prob(site).detach().cpu()
            log_p = log_p + log_prob.reshape(self.num, -1).sum(-1)
            if per_item is not None:
                per_item = per_item + self._per_item(log_prob, site)
            batch = log_prob.shape
            kept = _kept_dims(site, batch[1:], self.depth)
            name = site["name"]
            site_dims[name] = SiteDims(tuple(p for _, p in kept), len(site["fn"].event_shape))
            if site["is_observed"]:
                log_likelihood[name] = self._keep(log_prob, kept)
                observed[name] = site["value"].detach().cpu()
                if predictive_trace is not None:
                    drawn = predictive_trace.nodes[name]["value"].detach().cpu()
                    predictive[name] = self._keep(self._value(drawn, site, batch), kept)
            else:
                value = site["value"].detach().cpu()
                latents[name] = self._keep(self._value(value, site, batch), kept)

        log_p, log_q = (torch.as_tensor(v).expand(self.num) for v in (log_p, log_q))
        return _Pass(latents, log_p, log_q, per_item, log_likelihood, observed, predictive, site_dims)

    def _value(self, value: torch.Tensor, site: dict[str, Any], batch: torch.Size) -> torch.Tensor:
        if not self.vectorized:
            event_dims = len(site["fn"].event_shape)
            value = _pad_batch(value, value.dim() - event_dims, self.depth).unsqueeze(0)
        return self._full_value(value, site, batch)


def _in_particle_plate(fn: Callable, num: int, dim: int) -> Callable:
    def vectorized(*args: Any, **kwargs: Any) -> Any:
        with pyro.plate(PARTICLE_PLATE, num, dim=dim):
            return fn(*args, **kwargs)

    return vectorized


def _run_pass(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    num: int,
    depth: int,
    vectorize: bool,
    predictive: bool,
    resolve_item_plate: Callable[[Trace, Trace], str | None],
) -> tuple[_Pass, str | None]:
    if vectorize:
        model_fn = _in_particle_plate(model, num, -(depth + 1))
        guide_fn = _in_particle_plate(guide, num, -(depth + 1))
    else:
        model_fn, guide_fn = model, guide
    guide_trace = poutine.trace(guide_fn).get_trace(*args, **kwargs)
    model_trace = poutine.trace(poutine.replay(model_fn, trace=guide_trace)).get_trace(*args, **kwargs)
    guide_trace = prune_subsample_sites(guide_trace)
    model_trace = prune_subsample_sites(model_trace)
    item_plate = resolve_item_plate(model_trace, guide_trace)
    scaled = sorted(
        {
            site["name"]
            for trace in (model_trace, guide_trace)
            for site in _traced_sites(trace)
            if not (isinstance(site["scale"], (int, float)) and site["scale"] == 1.0)
        }
    )
    if scaled:
        warnings.warn(
            f"sites {', '.join(scaled)} are scaled (poutine.scale, KL annealing or a subsampled "
            "plate): their log-densities enter the log-weights scaled, so these are not the "
            "importance weights of the model; evaluate with scale 1 and full plates",
            stacklevel=3,
        )
    guide_trace.compute_log_prob()
    model_trace.compute_log_prob()
    predictive_trace = None
    if predictive:
        predictive_trace = poutine.trace(
            poutine.replay(poutine.uncondition(model_fn), trace=guide_trace)
        ).get_trace(*args, **kwargs)
    scorer = _Scorer(depth, item_plate, num, vectorize)
    return scorer.score(model_trace, guide_trace, predictive_trace), item_plate


@torch.no_grad()
def draw_importance_samples(
    model: Callable,
    guide: Callable,
    *args: Any,
    num_samples: int = 1000,
    item_plate: str | None = None,
    find_item_plate: bool = True,
    max_plate_nesting: int | None = None,
    particle_batch_size: int | None = None,
    vectorize: bool = True,
    predictive: bool = False,
    **kwargs: Any,
) -> ImportanceDraws:
    """Draw ``num_samples`` latents from ``guide`` and score them under ``model``.

    :param model: a Pyro model with observed sites (``obs=``); called as ``model(*args,
        **kwargs)``, and likewise ``guide``.
    :param num_samples: ``S``, the number of draws.
    :param item_plate: the plate whose entries are the data items for per-item log-weights;
        found automatically (the outermost plate holding every site) when ``None`` and
        ``find_item_plate`` is true.
    :param find_item_plate: set ``False`` to compute joint log-weights only.
    :param max_plate_nesting: the model's plate depth; guessed by running it once (RNG
        restored) when ``None``.
    :param particle_batch_size: draws taken per vectorised pass (memory bound); ``S`` must be a
        multiple of it. Default: all at once.
    :param vectorize: draw inside an outer particle plate; ``False`` runs model and guide once
        per draw, for models that cannot broadcast over an extra leading dim.
    :param predictive: also replay the model with its observed sites sampled (posterior
        predictive draws of each observed site, one per latent draw).

    Example::

        draws = draw_importance_samples(model, guide, data, num_samples=1000)
        draws.log_weights_per_item.shape  # (1000, len(data)) if model has a plate over data

    Draws use Pyro's RNG: after ``pyro.set_rng_seed(s)`` the ``z`` are those that
    ``psis_diagnostic(model, guide, *args, num_particles=S)`` would see after the same seed.
    """
    check_positive_int("num_samples", num_samples)
    batch = num_samples if particle_batch_size is None else particle_batch_size
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1 or num_samples % batch:
        raise ValueError(
            f"particle_batch_size must be a positive int dividing num_samples={num_samples}, "
            f"got {particle_batch_size!r}"
        )
    if max_plate_nesting is None:
        max_plate_nesting = guess_max_plate_nesting(model, guide, *args, **kwargs)
    check_non_negative_int("max_plate_nesting", max_plate_nesting)

    def resolve_item_plate(model_trace: Trace, guide_trace: Trace) -> str | None:
        if not find_item_plate:
            return None
        return _find_item_plate(model_trace, guide_trace, item_plate)

    if vectorize:
        sizes = [batch] * (num_samples // batch)
    else:
        sizes = [1] * num_samples
    passes: list[_Pass] = []
    found: str | None = None
    for size in sizes:
        result, found = _run_pass(
            model, guide, args, kwargs, size, max_plate_nesting, vectorize, predictive,
            resolve_item_plate,
        )
        passes.append(result)

    def cat(get: Callable[[_Pass], torch.Tensor]) -> torch.Tensor:
        return torch.cat([get(p) for p in passes])

    first = passes[0]
    return ImportanceDraws(
        latents={name: cat(lambda p, n=name: p.latents[n]) for name in first.latents},
        log_p=cat(lambda p: p.log_p),
        log_q=cat(lambda p: p.log_q),
        log_weights_per_item=cat(lambda p: p.per_item) if found is not None else None,
        item_plate=found,
        log_likelihood={n: cat(lambda p, n=n: p.log_likelihood[n]) for n in first.log_likelihood},
        observed=first.observed,
        posterior_predictive={n: cat(lambda p, n=n: p.predictive[n]) for n in first.predictive},
        site_dims=first.site_dims,
    )
