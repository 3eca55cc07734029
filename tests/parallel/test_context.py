"""ParallelContext: rank layout (DeepSpeed's), groups on gloo, RNG tracker, test harness."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron_ext.parallel import ParallelContext, coord_of, global_rank_of, group_ranks
from megatron_ext.parallel.tensor_parallel import RNGStatesTracker
from tests.distributed_utils import run_distributed_test

LAYOUTS = [(1, 1, 1), (2, 1, 1), (1, 2, 1), (2, 2, 2), (4, 2, 1), (2, 3, 2), (1, 4, 2)]


@pytest.mark.parametrize("tp,pp,dp", LAYOUTS)
def test_rank_layout_matches_deepspeed_topology(tp, pp, dp):
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    topo = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)
    ours = group_ranks(tp, pp, dp)
    assert sorted(ours["tp"]) == sorted(topo.get_axis_comm_lists("model"))
    assert sorted(ours["pp"]) == sorted(topo.get_axis_comm_lists("pipe"))
    assert sorted(ours["dp"]) == sorted(topo.get_axis_comm_lists("data"))
    for rank in range(tp * pp * dp):
        c = topo.get_coord(rank)
        mine = coord_of(rank, tp, pp, dp)
        assert (mine.pp_rank, mine.dp_rank, mine.tp_rank) == (c.pipe, c.data, c.model)
        assert global_rank_of(mine, tp, dp) == rank


def test_single_context():
    ctx = ParallelContext.single()
    assert (ctx.tp_size, ctx.pp_size, ctx.dp_size, ctx.rank) == (1, 1, 1, 0)
    assert ctx.tp_group is None and ctx.is_first_stage and ctx.is_last_stage
    assert ParallelContext.from_sizes(1, 1, 1).tp_size == 1  # no torch.distributed needed
    with pytest.raises(RuntimeError, match="init_process_group"):
        ParallelContext.from_sizes(2)


def test_rng_tracker_fork_restores_default_state():
    tracker = RNGStatesTracker("cpu")
    torch.manual_seed(1)
    tracker.add("a", 123)
    expected = torch.rand(3)
    torch.manual_seed(1)
    with tracker.fork("a"):
        inside = torch.rand(3)
    assert torch.equal(torch.rand(3), expected)  # default stream unaffected by the fork
    with tracker.fork("a"):
        second = torch.rand(3)
    assert not torch.equal(inside, second)  # the named stream advances
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), inside)
    states = tracker.get_states()
    with tracker.fork("a"):
        x = torch.rand(2)
    tracker.set_states(states)
    with tracker.fork("a"):
        assert torch.equal(torch.rand(2), x)  # states restore for recomputation
    with pytest.raises(KeyError, match="seed"):
        with tracker.fork("missing"):
            pass


def _groups_worker(rank, world_size):
    out = {}
    for tp, pp in [(2, 2), (4, 1), (1, 2)]:
        ctx = ParallelContext.from_sizes(tp, pp)
        sums = {}
        for kind in ("tp", "pp", "dp"):
            t = torch.tensor([float(rank)])
            dist.all_reduce(t, group=getattr(ctx, f"{kind}_group"))
            sums[kind] = (t.item(), float(sum(getattr(ctx, f"{kind}_ranks"))))
        out[(tp, pp)] = (ctx.tp_rank, ctx.pp_rank, ctx.dp_rank, sums)
    # RNG: the tracker differs across TP ranks, the default generator agrees.
    ctx = ParallelContext.from_sizes(2, 1)
    ctx.seed(1234)
    with ctx.rng.fork():
        split_mask = torch.rand(8)
    shared_mask = torch.rand(8)
    gathered = [torch.empty(16) for _ in range(world_size)]
    dist.all_gather(gathered, torch.cat([split_mask, shared_mask]))
    out["rng"] = [g.tolist() for g in gathered]
    return out


@pytest.mark.distributed
def test_groups_and_rng_on_gloo():
    results = run_distributed_test(_groups_worker, 4)
    for rank, res in enumerate(results):
        for (tp, pp), (tp_rank, pp_rank, dp_rank, sums) in (
            (k, v) for k, v in res.items() if k != "rng"
        ):
            c = coord_of(rank, tp, pp, 4 // (tp * pp))
            assert (tp_rank, pp_rank, dp_rank) == (c.tp_rank, c.pp_rank, c.dp_rank)
            for kind, (reduced, expected) in sums.items():
                assert reduced == expected, (rank, tp, pp, kind)
    rng = torch.tensor(results[0]["rng"])  # [rank, 16]: tracker draws, then default draws
    assert not torch.equal(rng[0, :8], rng[1, :8])  # TP ranks 0, 1: different dropout masks
    assert torch.equal(rng[0, 8:], rng[1, 8:])  # same default stream within a TP group
    assert torch.equal(rng[0, :8], rng[2, :8])  # another DP replica, same TP rank: same


def _failing_worker(rank, world_size):
    if rank == 1:
        raise ValueError("rank one is broken")
    dist.barrier()  # rank 0 would wait here forever without the harness stopping it


@pytest.mark.distributed
def test_harness_reports_the_failing_rank():
    with pytest.raises(AssertionError) as info:
        run_distributed_test(_failing_worker, 2, timeout_s=60)
    assert "rank 1 failed" in str(info.value) and "rank one is broken" in str(info.value)
