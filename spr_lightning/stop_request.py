"""SIGTERM for runs made of many stages (the quickstart, ``experiments.shapes``): finish or checkpoint the stage
that is running, then stop with a message, so that running the same command again goes on from there.

Why it is needed: every stage runs in-process through Lightning, and Lightning's own SIGTERM handler only records the
signal. A ``fit`` or ``validate`` stage then stops at its next step (``SIGTERMException``, which exits with status 0
and no message), but a ``predict`` stage (generation, scoring) does not look at it, finishes, and Lightning restores
the handlers it replaced, so the next stage starts as if nothing had been asked: ``kill`` did not stop a quickstart.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any


class StopRequest:
    """Context manager that turns SIGTERM into "stop at the next stage boundary" for ``program``.

    Inside it, the first SIGTERM is recorded (Lightning's handler, installed by each stage's Trainer, calls this one
    too); :meth:`stage` turns Lightning's silent stop into a message and :meth:`check` stops after a finished stage. A
    second SIGTERM stops at once. Outside the main thread (where Python cannot install handlers) it does nothing.
    """

    def __init__(self, program: str) -> None:
        self.program = program
        self.requested = False
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
            self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)
            self._installed = False

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise SystemExit(f"[{self.program}] second SIGTERM: stopping now")
        self.requested = True
        print(f"[{self.program}] SIGTERM: stopping after the current stage (a training or evaluation stage stops "
              f"at its next step; send SIGTERM again to stop at once). Run the same command again to go on.",
              file=sys.stderr, flush=True)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Run stage ``name``; when Lightning stopped it on SIGTERM, exit with a message instead of status 0."""
        try:
            yield
        except SystemExit as stopped:
            if self.requested and not isinstance(stopped.code, str):
                raise SystemExit(f"[{self.program}] stopped on SIGTERM during {name} (not marked done; a training "
                                 f"stage resumes from its last checkpoint): run the same command again to go on"
                                 ) from stopped
            raise

    def check(self, finished: str) -> None:
        """Exit with a message if SIGTERM came while stage ``finished`` (already marked done) was running."""
        if self.requested:
            raise SystemExit(f"[{self.program}] stopped on SIGTERM after {finished}: run the same command again "
                             f"to go on from the next stage")
