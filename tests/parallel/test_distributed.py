"""Process-group set-up on GPU machines (device map, device binding) and the one classifier of
communication failures, checked on CPU: the GPU calls are stood in for, the group runs for real."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from megatron_ext.errors import UserError
from megatron_ext.parallel import distributed
from megatron_ext.parallel.distributed import is_communication_failure
from tests.distributed_utils import CUDA_ONLY_BACKEND, run_distributed_test


@pytest.fixture
def gpu_machine(monkeypatch):
    """torch.cuda answers as on a node with 8 GPUs; dist/DeepSpeed init calls are recorded."""
    import deepspeed

    calls: dict = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.setdefault("set_device", i))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(
        dist, "init_process_group", lambda backend, **kw: calls.update(backend=backend, **kw)
    )
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kw: calls.update(ds=kw))
    # init_distributed turns TF32 on for GPUs: let monkeypatch restore the process's setting
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    for name in ("RANK", "WORLD_SIZE", "TORCH_GLOO_LAZY_INIT"):
        monkeypatch.delenv(name, raising=False)
    return calls


def test_init_distributed_on_a_gpu_node_binds_local_rank_and_uses_a_device_map(
    gpu_machine, monkeypatch
):
    from megatron_ext.training.engine import init_distributed

    monkeypatch.setenv("LOCAL_RANK", "3")
    device = init_distributed(30.0)
    assert gpu_machine["backend"] == "cpu:gloo,cuda:nccl"  # was plain "nccl": CPU tensors fail
    assert gpu_machine["set_device"] == 3  # was never called: every rank on cuda:0
    assert "device_id" not in gpu_machine  # eager NCCL splits per group; see the module
    assert device == torch.device("cuda", 3)
    assert gpu_machine["ds"]["dist_backend"] == "nccl"
    assert torch.backends.cuda.matmul.allow_tf32


def test_local_rank_beyond_the_node_gpus_is_refused(gpu_machine, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "8")
    with pytest.raises(UserError, match="LOCAL_RANK=8 but this node shows 8 GPU"):
        distributed.init_process_group(30.0)


def test_cpu_only_machine_uses_the_same_device_map_path():
    assert distributed.backend_spec(None) == "cpu:gloo"
    assert distributed.backend_spec("nccl") == "cpu:gloo,cuda:nccl"


def _agreements(rank, world_size):
    from megatron_ext.training import checkpointing
    from megatron_ext.training.stopping import StopConditions
    from megatron_ext.training.trainer import _stop_reason

    no_stop = _stop_reason(StopConditions(None, None))
    agreed = checkpointing.all_agree(rank == 0)  # rank 1 disagrees: False everywhere
    gathered: list = [None] * world_size
    dist.all_gather_object(gathered, {"rank": rank})
    accelerator_only = dist.new_group(list(range(world_size)), backend=CUDA_ONLY_BACKEND)
    try:
        dist.all_reduce(torch.ones(1), group=accelerator_only)
        plain_error = None
    except RuntimeError as exc:
        plain_error = str(exc)
    return no_stop, agreed, gathered, plain_error, dist.get_backend()


@pytest.mark.distributed
def test_cpu_agreements_run_on_the_device_map_and_fail_on_an_accelerator_only_group():
    results = run_distributed_test(_agreements, 2)
    for no_stop, agreed, gathered, plain_error, backend in results:
        assert no_stop is None and agreed is False
        assert gathered == [{"rank": 0}, {"rank": 1}]
        assert backend == f"cpu:gloo,cuda:{CUDA_ONLY_BACKEND}"
        # the stand-in is faithful: a group without a CPU backend refuses the CPU tensor
        assert "No backend type associated with device type cpu" in plain_error


def test_classifier_separates_communication_failures_from_bugs():
    assert is_communication_failure(dist.DistBackendError("NCCL communicator was aborted"))
    assert is_communication_failure(dist.DistNetworkError("socket"))
    gloo_closed = "[pair.cc:553] Connection closed by peer [127.0.0.1]:38581"
    assert is_communication_failure(RuntimeError(gloo_closed))
    assert is_communication_failure(RuntimeError("Timed out waiting 10000ms for recv operation"))
    shape_bug = "mat1 and mat2 shapes cannot be multiplied (64x32 and 48x96)"
    assert not is_communication_failure(RuntimeError(shape_bug))
    oom = "CUDA out of memory. Tried to allocate 2.00 GiB (NCCL buffers hold 1.2 GiB)"
    assert not is_communication_failure(torch.OutOfMemoryError(oom))
    assert not is_communication_failure(ValueError("timed out"))
    # the old marks "gloo"/"nccl" alone turned any error text naming a backend into "a peer died"
    assert not is_communication_failure(RuntimeError("expected a gloo-compatible dtype"))


def _step_errors(rank, world_size):
    from megatron_ext.parallel.context import ParallelContext
    from megatron_ext.training.stopping import StopConditions
    from megatron_ext.training.trainer import CollectiveError, _run_step

    def engine_raising(exc):
        def train_batch(batches):
            raise exc

        return SimpleNamespace(ds=SimpleNamespace(train_batch=train_batch), ctx=ParallelContext())

    stop = StopConditions(None, None)
    out = {}
    cases = {
        "shape": RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"),
        "oom": torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
        "peer": dist.DistBackendError("NCCL error: remote process exited or there was a network"),
    }
    for name, exc in cases.items():
        try:
            _run_step(engine_raising(exc), iter([]), stop, 7, [], None)
        except CollectiveError as caught:
            out[name] = ("collective", str(caught), caught.__cause__ is exc)
        except Exception as caught:  # noqa: BLE001 - the kind is the result
            out[name] = (type(caught).__name__, str(caught), caught is exc)
    return out


@pytest.mark.distributed
def test_only_communication_failures_in_a_step_become_peer_errors():
    out = run_distributed_test(_step_errors, 1)[0]
    assert out["shape"][0] == "RuntimeError" and out["shape"][2]  # the bug's own traceback
    assert out["oom"][0] == "OutOfMemoryError" and out["oom"][2]
    kind, text, chained = out["peer"]
    assert kind == "collective" and chained
    assert "step 7: rank 0 (pipeline stage 0/1" in text and "A peer rank died" in text


def _gpu_agreements(rank, world_size):
    """On a GPU the default group is cpu:gloo,cuda:nccl: the CPU agreements and a CUDA TP
    all-reduce both run, each on its own backend, on the GPU bound to LOCAL_RANK."""
    device = torch.device("cuda", torch.cuda.current_device())
    assert device == torch.device("cuda", rank)  # bound to LOCAL_RANK before the group
    out = _agreements_without_stand_in(rank, world_size)
    t = torch.ones(4, device=device)
    dist.all_reduce(t)
    return out, t.cpu(), dist.get_backend()


def _agreements_without_stand_in(rank, world_size):
    from megatron_ext.training import checkpointing
    from megatron_ext.training.stopping import StopConditions
    from megatron_ext.training.trainer import _stop_reason

    return _stop_reason(StopConditions(None, None)), checkpointing.all_agree(True)


@pytest.mark.gpu
def test_agreements_and_tp_collectives_on_nccl():
    world = min(torch.cuda.device_count(), 2)
    results = run_distributed_test(_gpu_agreements, world, accelerator="auto")
    for (no_stop, agreed), t, backend in results:
        assert no_stop is None and agreed is True
        assert torch.equal(t, torch.full((4,), float(world)))
        assert backend == "cpu:gloo,cuda:nccl"
