"""The progress callback every long operation (download, load, convert, train, export) takes:
`progress(fraction in [0, 1] or None when unknown, message)`."""
from __future__ import annotations

from typing import Callable

Progress = Callable[[float | None, str], None]


def no_progress(fraction: float | None, message: str) -> None:
    pass
