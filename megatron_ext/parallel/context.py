"""ParallelContext: the one object that owns the tensor/pipeline/data parallel process groups.

Model code never reads a global: every layer is handed the context (or just the group it
needs) when it is built. Ranks are laid out exactly as DeepSpeed's
`PipeModelDataParallelTopology(num_pp, num_mp, num_dp)`: axes (pipe, data, model), model
fastest, so

    global_rank = (pp_rank * dp_size + dp_rank) * tp_size + tp_rank

and the TP ranks of one model replica are neighbours (same node, fastest links).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megatron_ext.parallel.distributed import current_device
from megatron_ext.parallel.tensor_parallel.random import RNGStatesTracker


@dataclass(frozen=True)
class RankCoord:
    """Coordinates of one rank in the (pipe, data, model) grid."""

    pp_rank: int
    dp_rank: int
    tp_rank: int


def global_rank_of(coord: RankCoord, tp_size: int, dp_size: int) -> int:
    """Global rank at `coord`, DeepSpeed's PipeModelDataParallelTopology layout."""
    return (coord.pp_rank * dp_size + coord.dp_rank) * tp_size + coord.tp_rank


def coord_of(rank: int, tp_size: int, pp_size: int, dp_size: int) -> RankCoord:
    """Inverse of `global_rank_of`."""
    if not 0 <= rank < tp_size * pp_size * dp_size:
        raise ValueError(f"rank {rank} outside a grid of tp={tp_size} pp={pp_size} dp={dp_size}")
    tp_rank = rank % tp_size
    dp_rank = (rank // tp_size) % dp_size
    return RankCoord(rank // (tp_size * dp_size), dp_rank, tp_rank)


def group_ranks(tp_size: int, pp_size: int, dp_size: int) -> dict[str, list[list[int]]]:
    """Global ranks of every tp, pp and dp group, in the order they are created."""
    grid = [
        [[global_rank_of(RankCoord(p, d, t), tp_size, dp_size) for t in range(tp_size)]
         for d in range(dp_size)]
        for p in range(pp_size)
    ]  # fmt: skip
    tp = [grid[p][d] for p in range(pp_size) for d in range(dp_size)]
    dp = [[grid[p][d][t] for d in range(dp_size)] for p in range(pp_size) for t in range(tp_size)]
    pp = [[grid[p][d][t] for p in range(pp_size)] for d in range(dp_size) for t in range(tp_size)]
    return {"tp": tp, "pp": pp, "dp": dp}


@dataclass
class ParallelContext:
    """The tp/pp/dp process groups of this rank, its coordinates and the TP RNG tracker.

    Build with `ParallelContext.single()` (one process, no torch.distributed needed) or
    `ParallelContext.from_sizes(tp_size, pp_size, dp_size)` (all ranks call it together after
    `dist.init_process_group`). Groups are None only in the single-process context; all
    collectives in `megatron_ext.parallel` skip a group of size 1 or None.
    `sequence_parallel` splits norm/dropout regions along the sequence over the TP group.
    """

    tp_size: int = 1
    pp_size: int = 1
    dp_size: int = 1
    tp_rank: int = 0
    pp_rank: int = 0
    dp_rank: int = 0
    rank: int = 0
    world_size: int = 1
    tp_group: dist.ProcessGroup | None = None
    pp_group: dist.ProcessGroup | None = None
    dp_group: dist.ProcessGroup | None = None
    tp_ranks: tuple[int, ...] = (0,)
    pp_ranks: tuple[int, ...] = (0,)
    dp_ranks: tuple[int, ...] = (0,)
    sequence_parallel: bool = False
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    rng: RNGStatesTracker = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.sequence_parallel and self.tp_size == 1:
            self.sequence_parallel = False  # nothing to split; keeps the code paths identical
        if self.rng is None:
            self.rng = RNGStatesTracker(self.device)

    @classmethod
    def single(cls, device: str | torch.device = "cpu") -> ParallelContext:
        """tp = pp = dp = 1 in one process; torch.distributed need not be initialised."""
        return cls(device=torch.device(device))

    @classmethod
    def from_sizes(
        cls,
        tp_size: int = 1,
        pp_size: int = 1,
        dp_size: int | None = None,
        *,
        sequence_parallel: bool = False,
        device: str | torch.device | None = None,
        existing: dict[str, dist.ProcessGroup] | None = None,
    ) -> ParallelContext:
        """Create the groups over the default process group (collective: all ranks call it).

        dp_size defaults to world_size / (tp_size * pp_size). Every rank creates every group
        in the same order, as `dist.new_group` requires. `existing`: this rank's "tp", "pp" and
        "dp" groups, already made by someone else over the same ranks (DeepSpeed's pipeline
        grid, training/engine.py): used instead of creating a second set."""
        if not dist.is_initialized():
            if tp_size * pp_size * (dp_size or 1) == 1:
                return cls.single(device or "cpu")
            raise RuntimeError(
                "ParallelContext.from_sizes: torch.distributed is not initialised; call "
                "dist.init_process_group first (or use ParallelContext.single() for one process)"
            )
        world, rank = dist.get_world_size(), dist.get_rank()
        if dp_size is None:
            dp_size = world // (tp_size * pp_size) if world % (tp_size * pp_size) == 0 else -1
        if tp_size < 1 or pp_size < 1 or dp_size < 1 or tp_size * pp_size * dp_size != world:
            raise ValueError(
                f"ParallelContext: tp={tp_size} x pp={pp_size} x dp={dp_size} does not match the "
                f"world size {world}; choose sizes whose product is the number of processes"
            )
        coord = coord_of(rank, tp_size, pp_size, dp_size)
        mine: dict[str, tuple[dist.ProcessGroup, tuple[int, ...]]] = {}
        for kind, all_ranks in group_ranks(tp_size, pp_size, dp_size).items():
            for ranks in all_ranks:
                if existing is not None:
                    if rank in ranks:
                        have = dist.get_process_group_ranks(existing[kind])
                        if sorted(have) != sorted(ranks):
                            raise RuntimeError(
                                f"the given {kind} group has ranks {have}, not {ranks}"
                            )
                        mine[kind] = (existing[kind], tuple(ranks))
                    continue
                group = dist.new_group(ranks)  # every rank creates every group
                if rank in ranks:
                    mine[kind] = (group, tuple(ranks))
        dev = torch.device(device) if device is not None else current_device()
        return cls(
            tp_size=tp_size,
            pp_size=pp_size,
            dp_size=dp_size,
            tp_rank=coord.tp_rank,
            pp_rank=coord.pp_rank,
            dp_rank=coord.dp_rank,
            rank=rank,
            world_size=world,
            tp_group=mine["tp"][0],
            pp_group=mine["pp"][0],
            dp_group=mine["dp"][0],
            tp_ranks=mine["tp"][1],
            pp_ranks=mine["pp"][1],
            dp_ranks=mine["dp"][1],
            sequence_parallel=sequence_parallel,
            device=dev,
        )

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def tp_src_rank(self) -> int:
        """Global rank of TP rank 0 in this rank's TP group (source for broadcasts)."""
        return self.tp_ranks[0]

    def seed(self, seed: int) -> None:
        """Seed the default generator (same on all TP ranks) and the TP tracker (differs).

        Megatron's scheme: default = seed + 100 * pp_rank, used for dropout in regions
        replicated over TP; tracker `MODEL_PARALLEL_RNG` = default + 2718 + tp_rank, used for
        dropout on TP-split tensors (attention heads, sequence-parallel shards).
        """
        base = seed + 100 * self.pp_rank
        torch.manual_seed(base)
        self.rng.reset()
        self.rng.add(RNGStatesTracker.MODEL_PARALLEL, base + 2718 + self.tp_rank)

    def describe(self) -> dict:
        """Sizes, ranks and group members, for logs."""
        return {
            "rank": self.rank,
            "world_size": self.world_size,
            "tp": [self.tp_rank, self.tp_size],
            "pp": [self.pp_rank, self.pp_size],
            "dp": [self.dp_rank, self.dp_size],
            "tp_ranks": list(self.tp_ranks),
            "pp_ranks": list(self.pp_ranks),
            "dp_ranks": list(self.dp_ranks),
            "sequence_parallel": self.sequence_parallel,
            "device": str(self.device),
        }
