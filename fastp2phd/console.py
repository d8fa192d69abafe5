"""What long commands show while they run: progress bars (with tqdm when it is installed; none otherwise)
and the time left."""
from __future__ import annotations

import math
import time
from typing import Callable


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str, enabled: bool = True, unit: str = "img"):
    """A tqdm bar, or an object with the same methods that shows nothing."""
    if enabled:
        try:
            from tqdm import tqdm

            return tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)
        except ImportError:
            pass
    return _NoBar()


class TimeLeft:
    """The time the rest of ``total`` steps (epochs) takes, from how long the recent ones took.

    The mean of all steps lags a change of machine load (it said 7:44 to go with 12:44 left), so the
    rate is an exponentially weighted mean that follows a change within two steps, and the weighted
    mean deviation of the durations from it makes the estimate a range while they vary.
    ``clock`` (seconds) is injectable so that tests can simulate load without waiting.
    """

    def __init__(self, total: int, clock: Callable[[], float] = time.monotonic, weight: float = 0.6):
        self.total, self.clock, self.weight = total, clock, weight
        self.last = clock()
        self.done, self.rate, self.spread = 0, 0.0, 0.0

    def step(self) -> None:
        """One more step done."""
        now = self.clock()
        seconds, self.last = now - self.last, now
        self.done += 1
        if self.done == 1:
            self.rate = seconds
            return
        self.spread += self.weight * (abs(seconds - self.rate) - self.spread)  # against the rate before this step
        self.rate += self.weight * (seconds - self.rate)

    def range(self) -> tuple[float, float]:
        """The seconds left, at least and at most."""
        left, margin = self.total - self.done, 1.5 * self.spread  # one epoch can stray further than the mean deviation
        return left * max(0.0, self.rate - margin), left * (self.rate + margin)

    def __str__(self) -> str:
        low, high = self.range()
        if self.spread <= 0.1 * self.rate:  # steady: one number
            return f"about {_minutes((low + high) / 2)} to go"
        if high < 120:
            return f"{math.floor(low)}-{math.ceil(high)} s to go"
        return f"{math.floor(low / 60)}-{math.ceil(high / 60)} min to go"


def _minutes(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 60}:{seconds % 60:02d}"
