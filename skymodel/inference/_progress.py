"""Progress bars for the samplers (tqdm; silent when disabled)."""

from __future__ import annotations

import math


class _NullBar:
    def update(self, n: int = 1) -> None: ...

    def set_postfix_str(self, s: str) -> None: ...

    def close(self) -> None: ...

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def progress_bar(total: int, *, initial: int = 0, desc: str = "", enabled: bool = True):
    """A tqdm bar over `total` steps starting at `initial`, or a no-op bar."""
    if not enabled:
        return _NullBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=True)


def format_loss(x: float) -> str:
    """Short loss text for a progress bar."""
    if not math.isfinite(x):
        return f"loss={x}"
    return f"loss={x:.6g}"


__all__ = ["format_loss", "progress_bar"]
