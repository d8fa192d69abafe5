"""What long commands show while they run: progress bars (with tqdm when it is installed; none otherwise)
and the time left."""
from __future__ import annotations

import math
import statistics
import time
from collections import deque
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
    """The time the rest of ``total`` steps (epochs) takes, from the last three.

    The mean of all steps lags a change of machine load (it said 7:44 to go with 12:44 left). The median
    of the last three follows a change once two steps have seen it and ignores one odd step; while they
    differ by more than 25%, the fastest and the slowest of them bound a range around it.
    ``clock`` (seconds) is injectable so that tests simulate load without waiting.
    """

    def __init__(self, total: int, clock: Callable[[], float] = time.monotonic, recent: int = 3):
        self.total, self.clock, self.done = total, clock, 0
        self.last = clock()
        self.times: deque[float] = deque(maxlen=recent)

    def step(self) -> None:
        """One more step done."""
        now = self.clock()
        self.times.append(now - self.last)
        self.last, self.done = now, self.done + 1

    def estimate(self) -> tuple[float, float, float]:
        """The seconds left: at least, likely, at most (after at least one step)."""
        left = self.total - self.done
        return left * min(self.times), left * statistics.median(self.times), left * max(self.times)

    def __str__(self) -> str:
        low, likely, high = self.estimate()
        text = f"about {_minutes(likely)} to go"
        if high <= 1.25 * low:  # steady (within about ±10%): one number
            return text
        if high < 120:
            return f"{text} ({math.floor(low)}-{math.ceil(high)} s)"
        return f"{text} ({math.floor(low / 60)}-{math.ceil(high / 60)} min)"


def _minutes(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 60}:{seconds % 60:02d}"
