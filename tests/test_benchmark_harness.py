"""The timing harness: interleaving, fresh inputs per call, and the calls-per-repeat option."""

import pytest

from benchmarks import harness
from benchmarks.harness import Timing, paired_interval, paired_ratio, time_interleaved


def _recording_contenders(log):
    return {name: (lambda value, name=name: log.append((name, value))) for name in ("a", "b")}


def test_every_call_gets_its_own_input_and_rounds_alternate():
    counter = iter(range(10_000))
    log = []
    timings = time_interleaved(
        _recording_contenders(log), lambda: next(counter), repeats=3, warmup=1, calls_per_repeat=4
    )
    inputs = [value for _, value in log]
    assert len(inputs) == len(set(inputs)) == 2 * 4 * 4  # (warmup + repeats) rounds, 2 contenders
    names = [name for name, _ in log]
    assert names[:8] == ["a"] * 4 + ["b"] * 4 and names[8:16] == ["b"] * 4 + ["a"] * 4
    for timing in timings.values():
        assert len(timing.seconds) == 3 and timing.calls_per_repeat == 4
        assert timing.summary()["calls_per_repeat"] == 4


def test_auto_calls_are_bounded_and_positive(monkeypatch):
    log = []
    timings = time_interleaved(_recording_contenders(log), object, repeats=1, warmup=0, calls_per_repeat="auto")
    # a no-op contender is far faster than the target: the cap applies
    assert timings["a"].calls_per_repeat == harness.AUTO_MAX_CALLS
    monkeypatch.setattr(harness, "AUTO_REPEAT_SECONDS", 0.0)
    timings = time_interleaved(_recording_contenders(log), object, repeats=1, warmup=0, calls_per_repeat="auto")
    assert timings["a"].calls_per_repeat == 1


@pytest.mark.parametrize("bad", [0, -1, 1.5, "many", True])
def test_bad_calls_per_repeat_is_refused_by_name(bad):
    with pytest.raises(ValueError, match="calls_per_repeat"):
        time_interleaved({"a": lambda v: None}, object, repeats=1, warmup=0, calls_per_repeat=bad)


def test_paired_ratio_is_the_median_of_per_round_ratios():
    ours = Timing("ours", [1.0, 5.0, 6.0])
    theirs = Timing("theirs", [4.0, 1.0, 2.0])
    assert paired_ratio(ours, theirs) == 3.0  # of 0.25, 5, 3; the ratio of medians is 5 / 2
    # a slow spell that hits both contenders of a round alike divides out
    assert paired_ratio(Timing("a", [1.0, 10.0, 1.0]), Timing("b", [2.0, 20.0, 2.0])) == 0.5
    with pytest.raises(ValueError, match="same rounds"):
        paired_ratio(ours, Timing("short", [1.0]))


def test_paired_interval_brackets_the_paired_ratio_and_narrows_with_agreement():
    import random

    rng = random.Random(0)
    theirs = Timing("theirs", [rng.uniform(1.0, 2.0) for _ in range(21)])
    noisy = Timing("noisy", [t * rng.lognormvariate(0.1, 0.2) for t in theirs.seconds])
    steady = Timing("steady", [t * 1.1 for t in theirs.seconds])
    low, high = paired_interval(noisy, theirs)
    assert low < paired_ratio(noisy, theirs) < high
    # every resampled median is one of the rounds' own ratios
    ratios = sorted(a / b for a, b in zip(noisy.seconds, theirs.seconds))
    assert low in ratios and high in ratios and ratios[0] < low and high < ratios[-1]
    # the same seed, the same interval: a run's table is reproducible from its timings
    assert paired_interval(noisy, theirs) == (low, high)
    # a contender that is 1.1x in every round: no spread, the interval is the point
    assert paired_interval(steady, theirs) == pytest.approx((1.1, 1.1))
    # a wider level gives an interval at least as wide
    wide = paired_interval(noisy, theirs, level=0.99)
    assert wide[0] <= low and high <= wide[1]


@pytest.mark.parametrize("kwargs, match", [
    ({"level": 1.0}, "level"), ({"level": 0}, "level"), ({"resamples": 0}, "resamples"),
    ({"resamples": 2.5}, "resamples"),
])
def test_paired_interval_refuses_bad_settings_by_name(kwargs, match):
    a, b = Timing("a", [1.0, 2.0, 3.0]), Timing("b", [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match=match):
        paired_interval(a, b, **kwargs)
    with pytest.raises(ValueError, match="same rounds"):
        paired_interval(a, Timing("short", [1.0]))
