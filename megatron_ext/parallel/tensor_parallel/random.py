"""Named RNG states, so dropout differs across TP ranks where it must and agrees where it must.

Dropout on tensors replicated over the TP group (the residual stream without sequence
parallelism) must draw the same mask on every TP rank: it uses the default generator, seeded
identically on all TP ranks. Dropout on TP-split tensors (attention probabilities of this
rank's heads, sequence-parallel shards) must draw independent masks: it runs inside
`tracker.fork()`, whose state is seeded with the TP rank. Works for any device type
(CPU, CUDA, ROCm, others through `torch.get_device_module`); nothing calls torch.cuda unless the
tracker's device is a CUDA device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def _device_module(device: torch.device):
    return torch.get_device_module(device.type)


def get_rng_state(device: torch.device) -> torch.Tensor:
    """The default generator's state for `device` (a CPU ByteTensor)."""
    if device.type in ("cpu", "meta"):
        return torch.get_rng_state()
    return _device_module(device).get_rng_state(device)


def set_rng_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type in ("cpu", "meta"):
        torch.set_rng_state(state)
    else:
        _device_module(device).set_rng_state(state, device)


class RNGStatesTracker:
    """Named generator states for one device; `fork(name)` swaps one in for a block of code.

    The states are plain tensors (`get_states`/`set_states`), so activation recomputation and
    checkpoints can save and restore them.
    """

    MODEL_PARALLEL = "model-parallel-rng"

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self._states: dict[str, torch.Tensor] = {}

    def reset(self) -> None:
        self._states = {}

    def get_states(self) -> dict[str, torch.Tensor]:
        return {name: state.clone() for name, state in self._states.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._states = {name: state.clone() for name, state in states.items()}

    def add(self, name: str, seed: int) -> None:
        """Register state `name` seeded with `seed`; the current default state is untouched."""
        if name in self._states:
            raise ValueError(f"RNG state {name!r} already exists; call reset() first")
        saved = get_rng_state(self.device)
        if self.device.type in ("cpu", "meta"):
            torch.default_generator.manual_seed(seed)  # CPU only; torch.manual_seed seeds GPUs too
        else:
            with _device_module(self.device).device(self.device):  # seeds the *current* device
                _device_module(self.device).manual_seed(seed)
        self._states[name] = get_rng_state(self.device)
        set_rng_state(self.device, saved)

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL) -> Iterator[None]:
        """Run the block with state `name`; the default state is restored afterwards."""
        if name not in self._states:
            raise KeyError(
                f"RNG state {name!r} was never added; call ParallelContext.seed(seed) before "
                "training with dropout"
            )
        saved = get_rng_state(self.device)
        set_rng_state(self.device, self._states[name])
        try:
            yield
        finally:
            self._states[name] = get_rng_state(self.device)
            set_rng_state(self.device, saved)

    def has(self, name: str = MODEL_PARALLEL) -> bool:
        return name in self._states


def recompute_with_tracker(tracker: RNGStatesTracker):
    """Activation checkpointing (DeepSpeed's activation_checkpoint_func for whole blocks, the
    attention core for selective recompute): non-reentrant torch checkpointing (trap: the
    reentrant one fails on the pipeline's embedding layer) whose recomputation in backward
    replays the TP tracker's dropout masks of the forward.

    torch's checkpoint restores the default generator for the recomputation, not our tracker's
    states: without this the recomputed TP-split dropout (attention probabilities, SP shards)
    would draw new masks and the gradients would not belong to the forward's loss."""

    def checkpoint_replaying_tracker(function, *args):
        start, calls = tracker.get_states(), [0]

        def run(*inputs):
            calls[0] += 1
            if calls[0] == 1:
                return function(*inputs)
            now = tracker.get_states()  # later micro-batches moved the tracker on since
            tracker.set_states(start)
            try:
                return function(*inputs)
            finally:
                tracker.set_states(now)

        return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)

    return checkpoint_replaying_tracker
