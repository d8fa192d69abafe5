"""The demo's time left (console.TimeLeft) under a fake clock: within 25% of the truth under steady load
from epoch 3 on, and after a change of load once the new speed has been seen for two epochs, the truth
inside the range it shows. Never timed: the clock is a list of simulated epoch durations."""
from __future__ import annotations

import re

import pytest

from fastp2phd.console import TimeLeft


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def estimates(durations: list[float]):
    """(epochs done, estimator, true seconds left) after each simulated epoch."""
    clock = FakeClock()
    left = TimeLeft(len(durations), clock=clock)
    for done, seconds in enumerate(durations, 1):
        clock.now += seconds
        left.step()
        yield done, left, sum(durations[done:])


def assert_close(left: TimeLeft, truth: float, done: int) -> None:
    low, high = left.range()
    assert low <= truth <= high, (done, low, truth, high)
    assert abs((low + high) / 2 - truth) <= 0.25 * truth, (done, low, truth, high)


@pytest.mark.parametrize("durations", [
    [10.0] * 20,
    [9.0, 11.0] * 10,  # jitter
    [15.0] + [10.0] * 19,  # a slower first epoch (warm-up)
])
def test_steady_load_is_estimated_from_epoch_3_on(durations):
    for done, left, truth in estimates(durations):
        if 3 <= done < len(durations):
            assert_close(left, truth, done)


@pytest.mark.parametrize("before, after", [(10.0, 20.0), (20.0, 10.0), (10.0, 30.0)])
def test_a_change_of_load_is_followed_within_two_epochs(before, after):
    durations = [before] * 7 + [after] * 13  # the load changes in epoch 8 of 20
    for done, left, truth in estimates(durations):
        if 9 <= done < 20:  # from epoch 9 on, the new speed has been seen for two epochs
            assert_close(left, truth, done)
    mean_of_all = sum(durations[:9]) / 9 * 11  # what the demo said before: far off
    assert abs(mean_of_all - sum(durations[9:])) > 0.25 * sum(durations[9:])


def test_the_text_is_one_number_when_steady_and_a_range_that_holds_the_truth_when_not():
    texts = {done: str(left) for done, left, _ in estimates([10.0] * 20)}
    assert texts[5] == "about 2:30 to go" and texts[19] == "about 0:10 to go"
    for durations, unit, scale in (([10.0] * 7 + [20.0] * 13, "min", 60), ([2.0] * 7 + [4.0] * 13, "s", 1)):
        for done, left, truth in estimates(durations):
            if done in (8, 9, 10):  # the load changed in epoch 8: a range
                low, high = (int(v) * scale for v in re.fullmatch(rf"(\d+)-(\d+) {unit} to go", str(left)).groups())
                assert low <= truth <= high
