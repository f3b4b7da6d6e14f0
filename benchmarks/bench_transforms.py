"""Transform throughput: our flows against Pyro's same math, and inverse cost against forward.

Batch 4096, D = 2, 16, 64, K = 8 layers: forward + log-det (no grad), and forward + backward of
sum(y) + sum(log-det). Each contender is a stack built the same way (a reversal between layers
where the flow needs one), so the ratio compares the layers themselves. The spline, matrix
exponential, NAF, BNAF and polynomial families are compared with Pyro's layer of the same family on our parameters
(:mod:`benchmarks.family_twins`), plain and conditional, at D = 8.
"""

from __future__ import annotations

from typing import Any, Callable

import pyro.distributions.transforms as pyro_transforms
import torch
from pyro.distributions.conditional import ConditionalTransform

import transforms
from transforms.autoregressive import InverseAutoregressive
from transforms.coupling import AffineCoupling

from .external_twins import EXTERNAL_TWINS, TWIN_NOTES, TwinStack
from .family_twins import FAMILY_TWINS, pyro_twin, same_math_variant
from .harness import Timing, paired_interval, paired_ratio, time_interleaved

__all__ = ["run"]

BATCH = 4096
DIMS = (2, 16, 64)
# The target for ours against Pyro's same math: ratio <= 1.05.
THROUGHPUT_TARGET = 1.05
# Below this many rounds a bootstrap interval is the spread of a handful of values: no verdict.
MIN_REPEATS_FOR_VERDICT = 5
LENGTH = 8
# Pyro's own implementation of the same map, where one exists (pyro-ppl 1.9.2 names).
PYRO_TWINS: dict[str, Callable[[int], Any]] = {
    "planar": pyro_transforms.planar,
    "radial": pyro_transforms.radial,
    # ours defaults to D reflections per layer (any orthogonal map); Pyro's to 1: compare like
    # with like
    "householder": lambda dim: pyro_transforms.householder(dim, count_transforms=dim),
    "iaf": pyro_transforms.affine_autoregressive,
    "realnvp": pyro_transforms.affine_coupling,
}
# MAF's forward (sampling) direction is D sequential network passes per layer: at D = 64 one
# stack call takes seconds and the three-way comparison minutes, so it stops at 16.
EXTERNAL_MAX_DIM = {"maf": 16}
# Ours bounds the log-scale smoothly (s = 3 tanh(raw / 3), the gradient of the map computed);
# Pyro clamps it to [-5, 3] with a straight-through gradient. For these flows the Pyro stack is
# built on our stack's own networks, and our layer with log_scale_bound=None on the same networks
# is timed in the same run: where Pyro's clamp does not bind, it is Pyro's map (same values and
# gradients), so it measures our implementation of the same math, and our default against it
# measures what the smooth bound costs.
UNBOUNDED_VARIANT = {"iaf": {"log_scale_bound": None}, "realnvp": {"log_scale_bound": None}}
# Every row also times a second Pyro stack, built the same way, against the first: the same code,
# so its ratio (the A/A control) is how far that row's ratio moves by noise alone in that run.
# (flow, D): the first four at D = 2 as before; the newer families at D = 8.
INVERSE_FLOWS = (("planar", 2), ("radial", 2), ("sylvester", 2), ("conv_planar", 2),
                 ("spline", 8), ("spline_coupling", 8), ("spline_autoregressive", 8),
                 ("matrix_exponential", 8), ("naf", 8), ("bnaf", 8), ("polynomial", 8))
# Targets for inverse / forward: closed forms 5x, numerical root-finds 20x; a sequential
# autoregressive inverse (D network passes) is stated, not judged.
INVERSE_TARGETS = {"closed": 5.0, "numerical": 20.0}
CONV_SEQ_LEN = 100  # T of the (B, T, Z) sequences fed to conv_planar
# The newer families' rows against Pyro's layers: one D, that of the inverse table (their coupling and
# autoregressive stacks already take 0.07-0.45 s a call there, four contenders a round), and, for
# the conditional forms, a context of this size per sample.
FAMILY_DIM = 8
FAMILY_CONTEXT_DIM = 8
# A stack of 8 polynomial layers (degree 9 each) overflows float32 from N(0, 1) inputs, Pyro's and
# ours alike (|y| ~ 1e9 after 4 layers): 2 layers keep the timed values finite.
FAMILY_LENGTH = {"polynomial": 2}


def _pyro_stack(name: str, dim: int, length: int) -> list[Any]:
    parts: list[Any] = []
    for k in range(length):
        if k > 0 and transforms.info(name).permute_between:
            parts.append(transforms.Reverse())
        parts.append(PYRO_TWINS[name](dim))
    return parts


def _pyro_layer_on(layer: Any) -> Any:
    """Pyro's layer of the same math on our layer's own network (IAF, RealNVP); permutations are
    kept as they are."""
    if isinstance(layer, InverseAutoregressive):
        return pyro_transforms.AffineAutoregressive(layer.arn)
    if isinstance(layer, AffineCoupling):
        return pyro_transforms.AffineCoupling(layer.split_dim, layer.nn)
    return layer


def _our_layer_on(layer: Any, **kwargs: Any) -> Any:
    """Our layer on the same network with other settings (``log_scale_bound=None``)."""
    if isinstance(layer, InverseAutoregressive):
        return InverseAutoregressive(layer.arn, **kwargs)
    if isinstance(layer, AffineCoupling):
        return AffineCoupling(layer.split_dim, layer.nn, **kwargs)
    return layer


def _clamp_binding_share(parts: list[Any], x: torch.Tensor) -> float:
    """The share of the log-scales that Pyro's clamp changes along its stack ``parts`` at ``x``:
    where it is 0, our unbounded layers compute the very same map."""
    changed = total = 0
    with torch.no_grad():
        for part in parts:
            if isinstance(part, pyro_transforms.AffineAutoregressive):
                raw = part.arn(x)[1]
            elif isinstance(part, pyro_transforms.AffineCoupling):
                raw = part.nn(x[..., : part.split_dim])[1]
            else:
                x = part(x)
                continue
            outside = (raw < part.log_scale_min_clip) | (raw > part.log_scale_max_clip)
            changed += int(outside.sum())
            total += outside.numel()
            x = part(x)
    return changed / total if total else 0.0


def _forward_logdet(parts: list[Any], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    log_det = x.new_zeros(())
    for part in parts:
        y = part(x)
        part_log_det = part.log_abs_det_jacobian(x, y)
        if part_log_det.dim() == x.dim():  # an elementwise layer of event dim 0 (Pyro's Spline)
            part_log_det = part_log_det.sum(-1)
        log_det = log_det + part_log_det
        x = y
    return x, log_det


class ConditionalStack:
    """A stack of conditional parts (``condition(context)`` each, a permutation's returning
    itself), called on ``(x, context)``: conditioned afresh at each call, as a guide does."""

    def __init__(self, parts: list[ConditionalTransform]) -> None:
        self.parts = parts

    def forward_and_logdet(self, value: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x, context = value
        return _forward_logdet([part.condition(context) for part in self.parts], x)


def _forward_and_logdet(stack: list[Any] | TwinStack | ConditionalStack) -> Callable[[Any], tuple[torch.Tensor, torch.Tensor]]:
    """One call ``x -> (y, log_det)`` for a list of our/Pyro's parts or another library's twin
    (``(x, context) -> (y, log_det)`` for a conditional stack)."""
    if isinstance(stack, (TwinStack, ConditionalStack)):
        return stack.forward_and_logdet
    return lambda x: _forward_logdet(stack, x)


def _forward_contender(stack: list[Any] | TwinStack | ConditionalStack) -> Callable[[Any], None]:
    run = _forward_and_logdet(stack)

    def call(x: torch.Tensor) -> None:
        with torch.no_grad():
            run(x)

    return call


def _backward_contender(stack: list[Any] | TwinStack | ConditionalStack) -> Callable[[Any], None]:
    run = _forward_and_logdet(stack)

    def call(x: torch.Tensor) -> None:
        y, log_det = run(x)
        (y.sum() + log_det.sum()).backward()

    return call


def _inverse_contender(parts: list[Any]) -> Callable[[tuple[torch.Tensor, torch.Tensor]], None]:
    def call(pair: tuple[torch.Tensor, torch.Tensor]) -> None:
        y = pair[1]
        with torch.no_grad():
            for part in reversed(parts):
                y = part.inv(y)

    return call


def _verdict(throughput: list[dict[str, Any]], interval: Callable[[dict[str, Any]], tuple[float, float]],
             what: str) -> str:
    """Which rows meet the target (the paired interval at or below it), which miss it beyond
    the noise (the interval's lower end above it), and which are undecided (the interval
    straddles it); ``interval(row)`` picks the comparison that ``what`` names."""
    if min((row["ours"]["repeats"] for row in throughput), default=0) < MIN_REPEATS_FOR_VERDICT:
        return "Too few repeats here for an interval to judge the target by (a smoke run)."

    def name(row: dict[str, Any]) -> str:
        return f"{row['flow']} D = {row['dim']} {row['mode']}"

    above = [name(r) for r in throughput if interval(r)[0] > THROUGHPUT_TARGET]
    straddle = [name(r) for r in throughput if interval(r)[0] <= THROUGHPUT_TARGET < interval(r)[1]]
    met = [name(r) for r in throughput if interval(r)[1] <= THROUGHPUT_TARGET]
    return (
        f"{what}: above the target beyond the noise (paired interval entirely above "
        f"{THROUGHPUT_TARGET}): {', '.join(above) or 'none'}. Interval straddling it: "
        f"{', '.join(straddle) or 'none'}. Meeting it (interval at or below {THROUGHPUT_TARGET}): "
        f"{', '.join(met) or 'none'}."
    )


def _verdict_lines(rows: list[dict[str, Any]], same_math_verdict: Callable[[list[dict[str, Any]]], str]) -> list[str]:
    """The two verdicts under a table against Pyro: our defaults, then the same math."""
    return ["", _verdict(rows, _default_interval, "Our default layers against Pyro's"), "",
            same_math_verdict(rows), ""]


def _default_interval(row: dict[str, Any]) -> tuple[float, float]:
    return row["paired_interval"]


def _same_math_interval(row: dict[str, Any]) -> tuple[float, float]:
    return row["same_math"]["paired_interval"]


def _not_comparable(row: dict[str, Any]) -> bool:
    """Our unbounded stack overflowed (inf or NaN) on a draw of the row's inputs: where Pyro's
    clamp binds that far, the two stacks no longer do the same arithmetic."""
    return row["same_math"]["unbounded_finite"] is False


def _same_math_verdict(throughput: list[dict[str, Any]]) -> str:
    comparable = [row for row in throughput if not _not_comparable(row)]
    verdict = _verdict(comparable, _same_math_interval, "Same math against Pyro's")
    excluded = [f"{row['flow']} D = {row['dim']} {row['mode']}" for row in throughput if _not_comparable(row)]
    if excluded:
        verdict += (f" Not judged (our unbounded layers overflow there, where Pyro's clamp binds): "
                    f"{', '.join(excluded)}.")
    return verdict


def _throughput(dims: tuple[int, ...], batch: int, repeats: int, warmup: int, calls: int | str, device: torch.device):
    rows = []
    for name, twin in PYRO_TWINS.items():
        if name not in transforms.available():
            continue
        for dim in dims:
            if dim < transforms.info(name).min_input_dim:
                continue
            ours = list(transforms.flow(name, dim, LENGTH).to(device).parts)
            variant = UNBOUNDED_VARIANT.get(name)
            if variant is None:
                theirs, theirs_again = (
                    [p.to(device) if isinstance(p, torch.nn.Module) else p for p in _pyro_stack(name, dim, LENGTH)]
                    for _ in range(2)
                )
                unbounded, check = None, None
            else:  # Pyro's layers on our networks; the A/A stack on a second set of ours
                theirs = [_pyro_layer_on(p) for p in ours]
                theirs_again = [_pyro_layer_on(p) for p in transforms.flow(name, dim, LENGTH).to(device).parts]
                unbounded = [_our_layer_on(p, **variant) for p in ours]
                check = _same_map_check(theirs, unbounded, torch.randn(batch, dim, device=device))

            def make_input() -> torch.Tensor:
                return torch.randn(batch, dim, device=device)

            for mode, contender in (("forward+logdet", _forward_contender), ("forward+backward", _backward_contender)):
                contenders = {"ours": contender(ours), "pyro": contender(theirs), "pyro_again": contender(theirs_again)}
                if unbounded is not None:
                    contenders["ours_unbounded"] = contender(unbounded)
                timings = time_interleaved(
                    contenders,
                    make_input,
                    repeats=repeats,
                    warmup=warmup,
                    device=device,
                    calls_per_repeat=calls,
                )
                rows.append({"flow": name, "dim": dim, "mode": mode, **_against_pyro(timings),
                             **_same_math(timings, variant, check)})
    return rows


def _against_pyro(timings: dict[str, Timing]) -> dict[str, Any]:
    """Ours against Pyro's in one interleaved run: medians, their ratio, the paired ratio with its
    interval, and the A/A control (Pyro's second stack against its first)."""
    return {
        "ours": timings["ours"].summary(),
        "pyro": timings["pyro"].summary(),
        "ratio": timings["ours"].median / timings["pyro"].median,
        "paired_ratio": paired_ratio(timings["ours"], timings["pyro"]),
        "paired_interval": paired_interval(timings["ours"], timings["pyro"]),
        "control_ratio": timings["pyro_again"].median / timings["pyro"].median,
    }


def _same_map_check(pyros: list[Any], unbounded: list[Any], x: torch.Tensor) -> dict[str, Any]:
    """On one draw ``x``: the share of log-scales Pyro's clamp changes (where 0, our unbounded
    stack computes Pyro's very map) and whether our unbounded stack stays finite."""
    with torch.no_grad():
        y, log_det = _forward_logdet(unbounded, x.clone())
    return {"pyro_clamp_binding_share": _clamp_binding_share(pyros, x),
            "unbounded_finite": bool(torch.isfinite(y).all() and torch.isfinite(log_det).all())}


def _same_math(timings: dict[str, Timing], variant: dict[str, Any] | None, check: dict[str, Any] | None) -> dict[str, Any]:
    """Ours configured to Pyro's math against Pyro (the default layer itself where it already is),
    and, for a layer whose default differs, what the difference costs: ours / ours so configured,
    timed in the same rounds. ``check``: :func:`_same_map_check` on a draw of the row's inputs."""
    if variant is None:
        same = {"variant": None, "pyro_clamp_binding_share": None, "unbounded_finite": None,
                "paired_ratio": paired_ratio(timings["ours"], timings["pyro"]),
                "paired_interval": paired_interval(timings["ours"], timings["pyro"])}
        return {"same_math": same, "bound_cost": None}
    unbounded, ours, pyro = timings["ours_unbounded"], timings["ours"], timings["pyro"]
    same = {"variant": ", ".join(f"{key}={value}" for key, value in variant.items()), **check,
            "paired_ratio": paired_ratio(unbounded, pyro), "paired_interval": paired_interval(unbounded, pyro)}
    cost = {"paired_ratio": paired_ratio(ours, unbounded), "paired_interval": paired_interval(ours, unbounded)}
    return {"same_math": same, "bound_cost": cost}


def _external(dims: tuple[int, ...], batch: int, repeats: int, warmup: int, calls: int | str, device: torch.device):
    """Ours against normflows / zuko (whichever is installed: an optional extra)."""
    rows = []
    for name, builders in EXTERNAL_TWINS.items():
        if name not in transforms.available():
            continue
        for dim in dims:
            if dim < transforms.info(name).min_input_dim or dim > EXTERNAL_MAX_DIM.get(name, dim):
                continue
            ours = list(transforms.flow(name, dim, LENGTH).to(device).parts)
            twins = {}
            for library, build in builders.items():
                try:
                    twins[library] = build(dim, LENGTH).to(device)
                except ValueError:  # e.g. normflows' couplings need an even dim
                    continue
            if not twins:
                continue

            def make_input() -> torch.Tensor:
                return torch.randn(batch, dim, device=device)

            for mode, contender in (("forward+logdet", _forward_contender), ("forward+backward", _backward_contender)):
                contenders = {"ours": contender(ours)}
                contenders.update({library: contender(stack) for library, stack in twins.items()})
                timings = time_interleaved(
                    contenders, make_input, repeats=repeats, warmup=warmup, device=device, calls_per_repeat=calls
                )
                for library in twins:
                    rows.append(
                        {
                            "flow": name,
                            "library": library,
                            "dim": dim,
                            "mode": mode,
                            "ours": timings["ours"].summary(),
                            "theirs": timings[library].summary(),
                            "ratio": timings["ours"].median / timings[library].median,
                            "note": TWIN_NOTES.get((name, library), ""),
                        }
                    )
    return rows


def _family_label(name: str, conditional: bool) -> str:
    return f"{name} (conditional)" if conditional else name


def _family_stack(name: str, conditional: bool, dim: int, device: torch.device) -> list[Any]:
    """A fresh stack of ours: the parts of the plain flow, or every part of the conditional one
    (a permutation wrapped as a constant conditional transform)."""
    length = FAMILY_LENGTH.get(name, LENGTH)
    if not conditional:
        return list(transforms.flow(name, dim, length).to(device).parts)
    return list(transforms.flow(name, dim, length, context_dim=FAMILY_CONTEXT_DIM).to(device).transforms)


def _on_device(parts: list[Any], device: torch.device) -> list[Any]:
    return [part.to(device) if isinstance(part, torch.nn.Module) else part for part in parts]


def _agreement(first: Any, second: Any, value: Any) -> dict[str, Any]:
    """The largest differences of two stacks' outputs and log-dets on one draw ``value``, and
    whether both stayed finite (a difference of overflowed values says nothing)."""
    with torch.no_grad():
        (y_a, log_det_a), (y_b, log_det_b) = (_forward_and_logdet(stack)(value) for stack in (first, second))
    finite = all(bool(torch.isfinite(t).all()) for t in (y_a, y_b, log_det_a, log_det_b))
    return {"max_abs_dy": float((y_a - y_b).abs().max()), "max_abs_dlogdet": float((log_det_a - log_det_b).abs().max()),
            "finite": finite}


def _family_throughput(dim: int, batch: int, repeats: int, warmup: int, calls: int | str, device: torch.device):
    """Each newer family (and its conditional form where Pyro has one) against Pyro's layer on our
    parameters, with the A/A control and, where our default is not Pyro's map but a setting of
    ours is, that setting against Pyro (``same_math``)."""
    rows = []
    for (name, conditional), twin in FAMILY_TWINS.items():
        if name not in transforms.available() or dim < transforms.info(name).min_input_dim:
            continue
        wrap = ConditionalStack if conditional else list
        ours_parts = _family_stack(name, conditional, dim, device)
        stacks = {
            "ours": wrap(ours_parts),
            "pyro": wrap(_on_device([pyro_twin(p, name, conditional) for p in ours_parts], device)),
            "pyro_again": wrap(_on_device(
                [pyro_twin(p, name, conditional) for p in _family_stack(name, conditional, dim, device)], device)),
        }
        if twin.variant is not None:
            stacks["ours_same_math"] = wrap([same_math_variant(p, name, conditional) for p in ours_parts])

        def make_input() -> Any:
            x = torch.randn(batch, dim, device=device)
            return (x, torch.randn(batch, FAMILY_CONTEXT_DIM, device=device)) if conditional else x

        same_stack = stacks.get("ours_same_math", stacks["ours"])
        agreement = _agreement(same_stack, stacks["pyro"], make_input())
        for mode, contender in (("forward+logdet", _forward_contender), ("forward+backward", _backward_contender)):
            timings = time_interleaved(
                {key: contender(stack) for key, stack in stacks.items()},
                make_input, repeats=repeats, warmup=warmup, device=device, calls_per_repeat=calls,
            )
            same = timings.get("ours_same_math", timings["ours"])
            rows.append(
                {
                    "flow": _family_label(name, conditional),
                    "family": name,
                    "conditional": conditional,
                    "dim": dim,
                    "length": FAMILY_LENGTH.get(name, LENGTH),
                    "mode": mode,
                    **_against_pyro(timings),
                    "same_math": {
                        "judged": twin.same_math or twin.variant is not None,
                        "variant": twin.variant is not None,
                        "paired_ratio": paired_ratio(same, timings["pyro"]),
                        "paired_interval": paired_interval(same, timings["pyro"]),
                    },
                    "agreement": agreement,
                    "note": twin.note,
                }
            )
    return rows


def _family_same_math_verdict(rows: list[dict[str, Any]]) -> str:
    judged = [row for row in rows if row["same_math"]["judged"] and row["agreement"]["finite"]]
    verdict = _verdict(judged, _same_math_interval, "Same math against Pyro's")
    not_judged = [f"{row['flow']} D = {row['dim']} {row['mode']}" for row in rows if row not in judged]
    if not_judged:
        verdict += f" Not judged (not Pyro's map, see the notes): {', '.join(not_judged)}."
    return verdict


def _family_lines(rows: list[dict[str, Any]], dim: int, batch: int, repeats: int) -> list[str]:
    lines = [
        f"### The spline, matrix exponential, NAF, BNAF and polynomial families against Pyro's layers (batch {batch}, D = {dim}, {repeats} interleaved repeats)",
        "",
        f"Pyro 1.9's layer of each family, built on our stack's own parameters (copied, or its very "
        f"network; `benchmarks/family_twins.py`), a second set for the A/A stack; K = {LENGTH} layers "
        f"(polynomial: {FAMILY_LENGTH.get('polynomial', LENGTH)}), permutations shared. Conditional rows: a "
        f"context of {FAMILY_CONTEXT_DIM} per sample, each stack conditioned inside every timed call. "
        "Ratio, paired and A/A as above. Same math: ours against Pyro, paired, where the two compute "
        "one map: our default itself (\"the default\"), or ours set to Pyro's map where the default is "
        "not and such a setting exists; \"not Pyro's map\" rows are stated, not judged. Agreement: "
        "the largest |difference| of the outputs and of the log-dets of Pyro's stack and ours (the "
        "same-math one), on one draw, checked before timing.",
        "",
        "| flow | D | K | mode | ours median ms (min-max) | Pyro median ms (min-max) | ratio | paired (95% interval) | A/A | same math: paired (95% interval) | agreement: max abs dy, d log-det |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        same = row["same_math"]
        if not same["judged"]:
            same_cell = "not Pyro's map"
        elif same["variant"]:
            same_cell = "ours set to Pyro's map: " + _paired_cell(same)
        else:
            same_cell = "the default"
        agreement = row["agreement"]
        agreement_cell = f"{agreement['max_abs_dy']:.1e}, {agreement['max_abs_dlogdet']:.1e}"
        if not agreement["finite"]:
            agreement_cell += " (not finite)"
        lines.append(
            f"| {row['flow']} | {row['dim']} | {row['length']} | {row['mode']} | {_ms(row['ours'])} | {_ms(row['pyro'])} "
            f"| {row['ratio']:.2f} | {_paired_cell(row)} | {row['control_ratio']:.2f} | {same_cell} | {agreement_cell} |"
        )
    lines += _verdict_lines(rows, _family_same_math_verdict) + ["What each Pyro twin is, and what differs:", ""]
    for row in rows:
        if row["mode"] == "forward+logdet":
            lines.append(f"- {row['flow']}: {row['note']}.")
    return lines + [""]


def _inverse_target(how: str) -> float | None:
    if how.startswith("numerical"):
        return INVERSE_TARGETS["numerical"]
    if how.startswith("sequential"):
        return None
    return INVERSE_TARGETS["closed"]


def _inverse_cost(batch: int, repeats: int, warmup: int, calls: int | str, device: torch.device):
    rows = []
    for name, dim in INVERSE_FLOWS:
        if name not in transforms.available():
            continue
        entry = transforms.info(name)
        shape = (batch, dim) if entry.event_dim == 1 else (max(batch // CONV_SEQ_LEN, 1), CONV_SEQ_LEN, dim)
        # polynomial: the stack that stays finite in the forward direction, as in its throughput rows
        parts = list(transforms.flow(name, dim, FAMILY_LENGTH.get(name, LENGTH)).to(device).parts)

        # The inverse is timed at y = f(x) for x ~ N(0, I), the points a round trip asks for: at
        # initialisation an N(0, I) y sent back through 8 NAF layers leaves float32's range (tail
        # slopes near 0.007 compound), and every root-find then runs its step limit.
        def make_input() -> tuple[torch.Tensor, torch.Tensor]:
            x = torch.randn(*shape, device=device)
            with torch.no_grad():
                y = x
                for part in parts:
                    y = part(y)
            return x, y.detach().clone()  # a fresh tensor: no transform's cache returns x

        forward = _forward_contender(parts)
        timings: dict[str, Timing] = time_interleaved(
            {"forward": lambda pair: forward(pair[0]), "inverse": _inverse_contender(parts)},
            make_input,
            repeats=repeats,
            warmup=warmup,
            device=device,
            calls_per_repeat=calls,
        )
        rows.append(
            {
                "flow": name,
                "shape": list(shape),
                "how": entry.inverse,
                "target": _inverse_target(entry.inverse),
                "forward": timings["forward"].summary(),
                "inverse": timings["inverse"].summary(),
                "ratio": timings["inverse"].median / timings["forward"].median,
            }
        )
    return rows


def run(*, smoke: bool = False, device: torch.device | str = "cpu") -> tuple[dict[str, Any], str]:
    device = torch.device(device)
    batch = 64 if smoke else BATCH
    dims = (2,) if smoke else DIMS
    repeats, warmup, calls = (1, 0, 1) if smoke else (21, 3, "auto")
    throughput = _throughput(dims, batch, repeats, warmup, calls, device)
    family_dim = 3 if smoke else FAMILY_DIM
    families = _family_throughput(family_dim, batch, repeats, warmup, calls, device)
    inverse = _inverse_cost(batch, repeats, warmup, calls, device)
    external = _external(dims, batch, repeats, warmup, calls, device)
    lines = [
        f"### Transform throughput (batch {batch}, K = {LENGTH} layers, {repeats} interleaved repeats)",
        "",
        "Each repeat times up to 20 back-to-back calls on fresh inputs (about 20 ms of work) and "
        "records the time per call.",
        "",
        f"Ratio = median(ours) / median(Pyro's); target <= {THROUGHPUT_TARGET}. Paired: the median "
        "over rounds of ours / Pyro's timed back to back in that round (a slow spell of the machine "
        "divides out), with its 95% bootstrap interval over the rounds (what a rerun of the same "
        "spread could read). "
        "A/A: a second Pyro stack built the same way against the first, timed in the same "
        "interleaved run: the same code, so its distance from 1 is what noise alone does to that "
        "row. IAF and RealNVP: Pyro's stack is built on our stack's own networks (a second set "
        "for the A/A stack). Same math: ours set to compute what Pyro's layer computes, against "
        "Pyro, paired: the default layer itself, except for IAF and RealNVP, whose default bounds "
        "the log-scale smoothly (s = 3 tanh(raw / 3), so the gradient is the map's own; Pyro "
        "clamps to [-5, 3] with a straight-through gradient). For those it is our layer with "
        "`log_scale_bound=None` on the same networks. Where Pyro's clamp does not bind, that "
        "layer gives Pyro's values and gradients (tests/test_benchmarks_smoke.py checks "
        "this). Each row checks one draw of its inputs: the share of log-scales Pyro's clamp "
        "changes is given where it is not 0 (those coordinates differ, the arithmetic is the "
        "same), and the row is n/a, not judged, where our unbounded stack overflows. "
        "Bound's cost: our default against that unbounded layer, paired, in the same rounds.",
        "",
        "| flow | D | mode | ours median ms (min-max) | Pyro median ms (min-max) | ratio | paired (95% interval) | A/A | same math: paired (95% interval) | bound's cost: paired (95% interval) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in throughput:
        same, cost = row["same_math"], row["bound_cost"]
        if same["variant"] is None:
            same_cell = "the default"
        elif _not_comparable(row):
            same_cell = "n/a: ours unbounded overflows here"
        else:
            same_cell = _paired_cell(same)
            if same["pyro_clamp_binding_share"]:
                same_cell += f"; Pyro's clamp binds on {100 * same['pyro_clamp_binding_share']:.2g}%"
        # an overflowing unbounded stack is no measure of what the bound costs
        cost_cell = "-" if cost is None else "n/a" if _not_comparable(row) else _paired_cell(cost)
        lines.append(
            f"| {row['flow']} | {row['dim']} | {row['mode']} | {_ms(row['ours'])} | {_ms(row['pyro'])} | {row['ratio']:.2f} | {_paired_cell(row)} | {row['control_ratio']:.2f} | {same_cell} | {cost_cell} |"
        )
    lines += _verdict_lines(throughput, _same_math_verdict)
    lines += _family_lines(families, family_dim, batch, repeats)
    lines += [
        f"### Inverse cost against forward (K = {LENGTH}, polynomial {FAMILY_LENGTH['polynomial']}, no grad); "
        "target <= 5x closed form, <= 20x numerical",
        "",
        "How each inverts is the registry's `FlowInfo.inverse`. A sequential autoregressive inverse "
        "(D network passes per layer) is stated, not judged. Forward at x ~ N(0, I); inverse at "
        "y = f(x) of such an x, the stack's own outputs (an N(0, I) y sent back through 8 layers "
        "at initialisation can leave float32's range).",
        "",
        "| flow | input shape | how it inverts | forward median ms | inverse median ms | inverse / forward | target |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in inverse:
        target = row.get("target")
        verdict = "-" if target is None else (f"<= {target:g}x: " + ("met" if row["ratio"] <= target else "missed"))
        lines.append(
            f"| {row['flow']} | {tuple(row['shape'])} | {row.get('how', '')} | {_ms(row['forward'])} | {_ms(row['inverse'])} | {row['ratio']:.1f} | {verdict} |"
        )
    lines += ["", "### Against normflows and zuko (optional extra `.[bench]`)", ""]
    if not external:
        lines.append("Neither normflows nor zuko is installed here (`pip install -e \".[bench]\"`): not compared.")
    else:
        lines += [
            "Ratio = median(ours) / median(theirs), same layer count, hidden sizes and permutations; "
            "where the math differs the notes below say how (not a like-for-like target).",
            "",
            "| flow | library | D | mode | ours median ms (min-max) | theirs median ms (min-max) | ratio |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in external:
            lines.append(
                f"| {row['flow']} | {row['library']} | {row['dim']} | {row['mode']} | {_ms(row['ours'])} | {_ms(row['theirs'])} | {row['ratio']:.2f} |"
            )
        lines += ["", "What each twin computes:", ""]
        for flow, library in dict.fromkeys((row["flow"], row["library"]) for row in external):
            lines.append(f"- {flow} / {library}: {TWIN_NOTES.get((flow, library), '')}")
    return {"throughput": throughput, "families": families, "inverse": inverse, "external": external}, "\n".join(lines) + "\n"


def _paired_cell(comparison: dict[str, Any]) -> str:
    low, high = comparison["paired_interval"]
    return f"{comparison['paired_ratio']:.2f} ({low:.2f}-{high:.2f})"


def _ms(summary: dict[str, Any]) -> str:
    return f"{1e3 * summary['median_s']:.2f} ({1e3 * summary['min_s']:.2f}-{1e3 * summary['max_s']:.2f})"
