"""Progress bars (with tqdm when it is installed; none otherwise)."""
from __future__ import annotations


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
