"""SIGTERM / SIGINT during training: finish the current step, save, exit 0 (preemptible machines).
A second signal more than a few seconds after the first falls back to the default behaviour
(immediate exit). Repeats within that window are ignored: a scheduler's SIGTERM to the process
group reaches a rank directly and again through the deepspeed launcher."""
from __future__ import annotations

import signal
import time

REPEAT_WINDOW_SECONDS = 5.0


class StopRequest:
    """`requested` turns true in the handler; the loop reads it at the end of each step, where the
    ranks share it (trainer/loop.py train_step), so all of them save at the same step boundary."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)):
        self.requested = False
        self.signal_name = ""
        self._first_at = 0.0
        self._previous = {number: signal.signal(number, self._handle) for number in signals}

    def _handle(self, number: int, frame) -> None:
        if self.requested and time.monotonic() - self._first_at < REPEAT_WINDOW_SECONDS:
            return
        if self.requested:
            signal.signal(number, self._previous.get(number, signal.SIG_DFL))
            signal.raise_signal(number)
            return
        self.requested = True
        self._first_at = time.monotonic()
        self.signal_name = signal.Signals(number).name

    def restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
