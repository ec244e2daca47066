"""Stopping training between two steps: the first Ctrl-C (SIGINT) or SIGTERM (what ``kill``, a
scheduler's time limit and a system shutdown send) is a request the training loop honours after the
current step, by writing a checkpoint; a second one raises :class:`~pyrossl.errors.Interrupted` at once
(the last checkpoint stays intact, every write being atomic)."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading

from pyrossl.errors import Interrupted, TrainingInterrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """Whether a signal asked training to stop (``signum``, 0 for none), while :meth:`catching`."""

    def __init__(self):
        self.signum = 0

    def __bool__(self) -> bool:
        return bool(self.signum)

    def _handler(self, signum, frame):
        if self.signum:
            raise Interrupted(signum)
        self.signum = signum
        again = "Ctrl-C" if signum == signal.SIGINT else "the signal"
        print(
            f"\npyrossl: {signal.Signals(signum).name}: stopping after this step to write a checkpoint "
            f"({again} again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    @contextlib.contextmanager
    def catching(self, enabled: bool = True):
        """Take SIGINT and SIGTERM as requests meanwhile. Only the main thread can take signals, and a
        process of a multi-process job leaves them to its launcher (which stops every process; the last
        checkpoint stays): elsewhere, or with ``enabled`` false, both keep their behaviour."""
        if not enabled or threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self._handler) for s in SIGNALS}
        try:
            yield self
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def error(self, where: str, checkpoint, out) -> TrainingInterrupted:
        """The one line training ends with when it honoured the request: where it stopped, the
        checkpoint written, the resume command."""
        return TrainingInterrupted.by(
            self.signum or signal.SIGINT,
            f" {where}; checkpoint written to {checkpoint}; resume with: pyrossl train --resume {out}",
        )
