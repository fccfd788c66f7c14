"""MomentumEncoder and FeatureQueue against MoCo's formulas, in one process and across two."""
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from helpers.launch import accelerate_launch, load_script

from mmcl.models import FeatureQueue, MomentumEncoder

SCRIPTS = Path(__file__).parent / "scripts"


def encoder():
    return nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 3))


def test_momentum_update_is_moco_ema():
    query = encoder()
    key = MomentumEncoder(query, momentum=0.9)
    assert all(not p.requires_grad for p in key.parameters())
    expected = [p.detach().double().clone() for p in query.parameters()]
    opt = torch.optim.SGD(query.parameters(), lr=0.3)
    for _ in range(3):
        opt.zero_grad()
        query(torch.randn(6, 5)).pow(2).sum().backward()
        opt.step()
        assert key.update(query) == 0.9
        # p_k <- m p_k + (1 - m) p_q, in float64
        expected = [0.9 * k + 0.1 * q.detach().double() for k, q in zip(expected, query.parameters())]
    for k, e in zip(key.module.parameters(), expected):
        torch.testing.assert_close(k.double(), e, atol=1e-6, rtol=1e-6)
    out = key(torch.randn(4, 5))
    assert out.shape == (4, 3) and out.grad_fn is None
    # Buffers (batch-norm statistics) are the key encoder's own.
    assert not torch.equal(key.module[1].running_mean, query[1].running_mean)
    assert "module.0.weight" in key.state_dict()


def test_momentum_cosine_ramp_follows_byol_schedule():
    query = nn.Linear(4, 2)
    key = MomentumEncoder(query, momentum=0.99, final_momentum=1.0, total_steps=10)
    for step in (0, 1, 5, 9, 10, 25):
        k = min(step, 10)
        byol = 1 - (1 - 0.99) * (math.cos(math.pi * k / 10) + 1) / 2  # BYOL's tau schedule
        assert key.momentum_at(step) == pytest.approx(byol, abs=1e-12)
    before = key.module.weight.detach().clone()
    with torch.no_grad():
        query.weight.add_(1.0)
    key.update(query, step=10)  # m = 1: the key encoder stays where it was
    torch.testing.assert_close(key.module.weight, before, atol=0, rtol=0)
    key.update(query, step=0)  # m = 0.99
    torch.testing.assert_close(key.module.weight, 0.99 * before + 0.01 * query.weight.detach())
    with pytest.raises(ValueError, match="total_steps"):
        MomentumEncoder(query, final_momentum=1.0)
    with pytest.raises(ValueError, match="momentum"):
        MomentumEncoder(query, momentum=1.5)
    with pytest.raises(ValueError, match="parameters"):
        key.update(nn.Linear(3, 2))
    wrapped = MomentumEncoder(nn.DataParallel(query))  # the bare module is copied
    assert isinstance(wrapped.module, nn.Linear)


def ring_reference(batches, size, dim):
    """Key number k of the whole stream lands in row k mod size (later keys overwrite)."""
    rows, total = torch.zeros(size, dim, dtype=torch.float64), 0
    for batch in batches:
        for key in batch:
            rows[total % size] = key.double()
            total += 1
    return rows, total % size, min(total, size)


@pytest.mark.parametrize("size,batch_sizes", [(5, [3, 3, 3]), (7, [2, 9, 1]), (4, [1]), (6, [6, 6])])
def test_queue_is_a_fifo_ring(size, batch_sizes):
    dim = 3
    queue = FeatureQueue(dim, size)
    batches = [torch.randn(b, dim) for b in batch_sizes]
    for i, batch in enumerate(batches):
        queue.enqueue(batch)
        rows, ptr, filled = ring_reference(batches[: i + 1], size, dim)
        assert int(queue.ptr) == ptr and int(queue.filled) == filled
        torch.testing.assert_close(queue.valid_features().double(), rows[:filled], atol=0, rtol=0)
        assert queue.valid_features().shape == (filled, dim)


def test_queue_buffers_in_state_dict_and_bad_input():
    queue = FeatureQueue(4, 6)
    queue.enqueue(torch.randn(4, 4))
    state = queue.state_dict()
    assert set(state) == {"features", "ptr", "filled"}
    fresh = FeatureQueue(4, 6)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.features, queue.features) and int(fresh.ptr) == 4 and int(fresh.filled) == 4
    assert fresh.double().features.dtype == torch.float64  # buffers follow .to()
    assert all(not b.requires_grad for b in fresh.buffers()) and not list(fresh.parameters())
    with pytest.raises(ValueError, match=r"\(B, 4\)"):
        queue.enqueue(torch.randn(2, 5))
    with pytest.raises(TypeError, match="float"):
        queue.enqueue(torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="size"):
        FeatureQueue(4, 0)


@pytest.mark.slow
def test_queue_two_processes_gathers_in_rank_order(tmp_path):
    out = tmp_path / "queue.json"
    accelerate_launch(SCRIPTS / "dist_queue.py", str(out))
    states = [json.loads(Path(f"{out}.rank{r}").read_text()) for r in (0, 1)]
    assert states[0]["world_size"] == 2
    assert states[0] == states[1]  # every rank holds the same queue

    script = load_script("dist_queue")
    batches = [torch.cat([script.rank_keys(step, 0), script.rank_keys(step, 1)]) for step in range(4)]
    rows, ptr, filled = ring_reference(batches, script.SIZE, script.DIM)
    assert torch.equal(torch.tensor(states[0]["features"], dtype=torch.float64), rows)
    assert states[0]["ptr"] == ptr and states[0]["filled"] == filled
