"""When a run should save and stop: Slurm's warning signal, scancel, a time budget, a kill switch.

Signals only set a flag; the training loop checks `should_stop()` between steps, and all ranks
agree (an all-reduce of the flag) so every rank finishes the same step, saves, and exits 0.
"""

from __future__ import annotations

import os
import signal
import time


def process_start_monotonic() -> float:
    """This process's start on the time.monotonic() clock: --exit-duration-in-mins counts
    the time spent building the engine and loading (or converting) a checkpoint too, which
    on a 176B run is minutes of the Slurm allocation."""
    import psutil

    age = max(0.0, time.time() - psutil.Process().create_time())
    return time.monotonic() - age


class StopConditions:
    def __init__(
        self, exit_duration_mins: float | None = None, kill_switch_file: str | None = None
    ):
        self.start = process_start_monotonic()  # the budget includes start-up, as in Megatron
        self.exit_duration_s = None if exit_duration_mins is None else exit_duration_mins * 60.0
        self.kill_switch_file = kill_switch_file
        self.signal_received: int | None = None
        self._previous = {}

    def install(self) -> None:
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        self.signal_received = signum

    def local_reason(self) -> str | None:
        """Why this rank wants to stop, or None."""
        if self.signal_received is not None:
            return f"signal {signal.Signals(self.signal_received).name}"
        if (
            self.exit_duration_s is not None
            and time.monotonic() - self.start >= self.exit_duration_s
        ):
            return f"exit duration of {self.exit_duration_s / 60:g} min reached"
        if self.kill_switch_file and os.path.exists(self.kill_switch_file):
            return f"kill-switch file {self.kill_switch_file} exists"
        return None
