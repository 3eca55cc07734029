"""Distributed sampler: DP-size invariance, resume, and spawned DataLoader workers."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_ext.data.blend import build_datasets
from megatron_ext.data.sampler import MicroBatchSampler, build_dataloader, collate_samples
from megatron_ext.errors import UserError
from tests.data.test_gpt_dataset import make_dataset


def global_stream(total: int, consumed: int, micro_batch_size: int, dp_size: int) -> list[int]:
    """Global sample order as the DP ranks consume it together, round by round."""
    per_rank = [
        list(MicroBatchSampler(total, consumed, micro_batch_size, rank, dp_size))
        for rank in range(dp_size)
    ]
    stream = []
    for rounds in zip(*per_rank, strict=True):
        for batch in rounds:
            stream += batch
    return stream


@pytest.mark.parametrize("dp_size,micro_batch_size", [(1, 1), (1, 4), (2, 3), (4, 2), (8, 1)])
def test_ranks_partition_the_global_stream(dp_size, micro_batch_size):
    total = 101
    stream = global_stream(total, 0, micro_batch_size, dp_size)
    usable = total - total % (micro_batch_size * dp_size)
    assert stream == list(range(usable))  # consecutive, each sample once, same for every DP size
    lengths = {
        len(MicroBatchSampler(total, 0, micro_batch_size, r, dp_size)) for r in range(dp_size)
    }
    assert lengths == {usable // (micro_batch_size * dp_size)}  # every rank takes the same steps


def test_resume_from_consumed_samples():
    full = global_stream(200, 0, 2, 4)
    for consumed in (0, 8, 40, 96):
        assert global_stream(200, consumed, 2, 4) == full[consumed:]
    # resuming with another DP size continues with exactly the next sample
    assert global_stream(200, 40, 4, 2)[:16] == list(range(40, 56))
    assert global_stream(200, 42, 3, 1)[:3] == [42, 43, 44]


@pytest.mark.parametrize(
    "args",
    [(10, 11, 1, 0, 1), (10, -1, 1, 0, 1), (10, 0, 0, 0, 1), (10, 0, 1, 2, 2), (10, 0, 1, 0, 0)],
)
def test_bad_sampler_arguments(args):
    with pytest.raises(UserError):
        MicroBatchSampler(*args)


@pytest.fixture
def blended(tmp_path):
    a, _ = make_dataset(tmp_path / "a", 80, seed=1)
    b, _ = make_dataset(tmp_path / "b", 40, seed=2)
    train, _, _ = build_datasets(
        ["0.6", a, "0.4", b], 16, (96, 0, 0), split="1", cache_dir=str(tmp_path / "cache")
    )
    return train


def test_sample_stream_does_not_depend_on_dp_size(blended):
    reference = np.stack([blended[i]["tokens"] for i in range(len(blended))])
    for dp_size, mbs in ((1, 8), (2, 4), (4, 2), (3, 1)):
        rows = []
        per_rank = [
            list(MicroBatchSampler(len(blended), 0, mbs, r, dp_size)) for r in range(dp_size)
        ]
        for rounds in zip(*per_rank, strict=True):
            for batch in rounds:
                rows.append(collate_samples([blended[i] for i in batch])["tokens"].numpy())
        got = np.concatenate(rows)
        np.testing.assert_array_equal(got, reference[: len(got)])


@pytest.mark.distributed
def test_dataloader_with_spawned_workers(blended):
    import torch

    kwargs = dict(consumed_samples=16, micro_batch_size=4, dp_rank=1, dp_size=2)
    plain = list(build_dataloader(blended, num_workers=0, **kwargs))
    loader = build_dataloader(blended, num_workers=2, **kwargs)
    assert loader.multiprocessing_context.get_start_method() == "spawn"
    spawned = list(loader)
    assert len(plain) == len(spawned) == (96 - 16) // 8
    for x, y in zip(plain, spawned, strict=True):
        assert x["tokens"].dtype == torch.int64 and x["tokens"].shape == (4, 16)
        assert torch.equal(x["tokens"], y["tokens"]) and torch.equal(x["labels"], y["labels"])
    first = plain[0]["tokens"].numpy()  # rank 1's first micro-batch after 16 consumed: 20..23
    np.testing.assert_array_equal(first, np.stack([blended[i]["tokens"] for i in range(20, 24)]))
