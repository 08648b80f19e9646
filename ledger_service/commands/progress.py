"""A progress bar on stderr for long commands, so stdout stays the report a script can read."""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm


class ProgressBar:
    """One bar per stage (users, tokens, logs), drawn with tqdm on stderr; about two redraws a second."""

    def __init__(self) -> None:
        self._bar: tqdm[Any] | None = None

    def start(self, label: str, total: int) -> None:
        self.finish()
        self._bar = tqdm(total=total, desc=f"{label:<7}", unit=" rows", file=sys.stderr, mininterval=0.5, leave=True)

    def advance(self, done: int) -> None:
        if self._bar is not None:
            self._bar.update(done)

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
