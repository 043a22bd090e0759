"""SIGTERM / SIGINT during training: finish the current step, save, exit 0 (preemptible machines).
A second signal of the same kind falls back to the default behaviour (immediate exit)."""
from __future__ import annotations

import signal


class StopRequest:
    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)):
        self.requested = False
        self.signal_name = ""
        self._previous = {number: signal.signal(number, self._handle) for number in signals}

    def _handle(self, number: int, frame) -> None:
        if self.requested:
            signal.signal(number, self._previous.get(number, signal.SIG_DFL))
            signal.raise_signal(number)
            return
        self.requested = True
        self.signal_name = signal.Signals(number).name

    def restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
