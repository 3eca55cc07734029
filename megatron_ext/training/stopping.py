"""When a run should save and stop: Slurm's warning signal, scancel, a time budget, a kill switch.

Signals only set a flag; the training loop checks `should_stop()` between steps, and all ranks
agree (an all-reduce of the flag) so every rank finishes the same step, saves, and exits 0.

A rank process records SIGUSR1/SIGTERM from its start (`install_early_handlers`, before torch,
DeepSpeed, the engine build and checkpoint loading), so a signal that arrives during start-up is
not the default action (death, no message, no requeue): the run stops at its first step boundary
with nothing new to save, exits 0, and the Slurm script requeues it.
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


# SIGINT (Ctrl-C) stops like SIGTERM: at the step boundary, with a save. A second Ctrl-C more
# than INTERRUPT_AGAIN_S later stops at once (in a terminal the first one reaches a rank twice,
# from the terminal and from the launcher, within milliseconds).
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
INTERRUPT_AGAIN_S = 2.0
_early_signal: int | None = None
_early_interrupt: float | None = None


def _record_early(signum, frame) -> None:
    global _early_signal, _early_interrupt
    if signum == signal.SIGINT:
        now = time.monotonic()
        if _early_interrupt is not None and now - _early_interrupt > INTERRUPT_AGAIN_S:
            raise KeyboardInterrupt
        _early_interrupt = _early_interrupt or now
    _early_signal = signum


def install_early_handlers() -> None:
    """Record a stop signal from now on, until StopConditions.install takes it over."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _record_early)


class StopConditions:
    def __init__(
        self, exit_duration_mins: float | None = None, kill_switch_file: str | None = None
    ):
        self.start = process_start_monotonic()  # the budget includes start-up, as in Megatron
        self.exit_duration_s = None if exit_duration_mins is None else exit_duration_mins * 60.0
        self.kill_switch_file = kill_switch_file
        self.signal_received: int | None = None
        self._first_interrupt: float | None = None
        self._previous = {}

    def install(self) -> None:
        """Handle the stop signals; one recorded since `install_early_handlers` counts."""
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        if _early_signal is not None and self.signal_received is None:
            self.signal_received = _early_signal

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            now = time.monotonic()
            if self._first_interrupt is not None:
                if now - self._first_interrupt > INTERRUPT_AGAIN_S:
                    raise KeyboardInterrupt  # the second Ctrl-C: stop at once, no save
                return
            self._first_interrupt = now
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
