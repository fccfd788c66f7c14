"""PCL (mmcl.methods.pcl): ProtoNCE and the concentration φ against the paper's formulas, the
prototypes from k-means, the loss = InfoNCE + mean ProtoNCE, the re-clustering schedule, validation."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from mmcl.cluster import kmeans
from mmcl.methods import build_objective
from mmcl.methods.pcl import PCLConfig, Prototypes, concentration, proto_nce
from mmcl.train.builders import build_model
from mmcl.train.config import load_config
from mmcl.train.loop import fit
from train_helpers import tiny_overrides


def _proto_nce_reference(q, c, phi, targets):
    """−1/B Σ_i log( exp(q_i·c_s/φ_s) / Σ_j exp(q_i·c_j/φ_j) ), loops written out."""
    total = 0.0
    for i in range(q.shape[0]):
        terms = [torch.exp(q[i] @ c[j] / phi[j]) for j in range(c.shape[0])]
        total = total - torch.log(terms[int(targets[i])] / sum(terms))
    return total / q.shape[0]


@pytest.mark.parametrize("b,k,d", [(1, 2, 3), (7, 5, 32), (13, 11, 48)])
def test_proto_nce_matches_the_formula_with_gradients(b, k, d):
    q = F.normalize(torch.randn(b, d, dtype=torch.float64), dim=1).requires_grad_(True)
    c = F.normalize(torch.randn(k, d, dtype=torch.float64), dim=1)
    phi = 0.05 + torch.rand(k, dtype=torch.float64)
    targets = torch.randint(k, (b,))
    ours = proto_nce(q.double(), c, phi, targets)
    ref = _proto_nce_reference(q, c, phi, targets)
    assert torch.allclose(ours.double(), ref, rtol=1e-6), (ours.item(), ref.item())
    g, g_ref = torch.autograd.grad(ours, q)[0], torch.autograd.grad(ref, q)[0]
    assert torch.allclose(g.double(), g_ref, atol=1e-6), (g.double() - g_ref).abs().max()


def _phi_reference(dist, assign, k, alpha, temperature):
    """The paper's φ = Σ‖v−c‖ / (Z log(Z+α)); one-row clusters take the largest; clamp to the
    10th/90th percentiles; scaled to mean `temperature` (numpy, float64)."""
    dist, assign = dist.numpy().astype(np.float64), assign.numpy()
    phi = np.zeros(k)
    for j in range(k):
        d = dist[assign == j]
        if len(d) > 1:
            phi[j] = d.mean() / np.log(len(d) + alpha)
    dmax = phi.max()
    for j in range(k):
        if (assign == j).sum() <= 1:
            phi[j] = dmax
    phi = phi.clip(np.percentile(phi, 10), np.percentile(phi, 90))
    return temperature * phi / phi.mean()


def test_concentration_matches_the_paper():
    x = torch.randn(120, 6, dtype=torch.float64)
    x[:1] += 30  # a cluster of one row
    res = kmeans(x, 9, seed=1, backend="torch")
    dist = res.distances.sqrt()
    ours = concentration(dist, res.assignments, 9, 10.0, 0.2)
    ref = _phi_reference(dist, res.assignments, 9, 10.0, 0.2)
    assert np.allclose(ours.numpy(), ref, rtol=1e-10), (ours, ref)
    assert abs(float(ours.mean()) - 0.2) < 1e-12


def test_prototypes_fit_stores_normalised_centroids_and_assignments():
    feats = F.normalize(torch.randn(50, 8), dim=1)
    bank = Prototypes([3, 7], 50, 8)
    assert int(bank.ready) == 0
    bank.fit(feats, iters=20, seed=5, alpha=10.0, temperature=0.2, backend="torch")
    assert int(bank.ready) == 1
    for i, k in enumerate([3, 7]):
        centroids, phi, assign = bank.level(i)
        res = kmeans(feats, k, iters=20, seed=5 + i, backend="torch")
        assert torch.equal(assign, res.assignments)
        assert torch.allclose(centroids, F.normalize(res.centroids, dim=1))
        assert phi.shape == (k,) and bool((phi > 0).all())


def test_pcl_loss_is_infonce_plus_mean_proto_nce(tmp_path):
    cfg = load_config(None, tiny_overrides("pcl", tmp_path / "r", None) + ["loss.impl=naive"])
    objective = build_objective(cfg, build_model(cfg))
    q = F.normalize(torch.randn(6, 16), dim=1).requires_grad_(True)
    k = F.normalize(torch.randn(6, 16), dim=1)
    index = torch.tensor([0, 5, 9, 33, 63, 2])
    keys = {"k": k, "index": index}
    before, logs = objective.loss({"q": q}, keys, None)
    assert "proto_nce" not in logs  # before the first clustering: InfoNCE alone
    objective.prototypes.fit(F.normalize(torch.randn(64, 16), dim=1), iters=10, seed=0, alpha=10.0,
                             temperature=0.2, backend="torch")
    loss, logs = objective.loss({"q": q}, keys, None)
    terms = [proto_nce(q, c, phi, a[index]) for c, phi, a in (objective.prototypes.level(i) for i in range(2))]
    assert torch.allclose(loss, before + (terms[0] + terms[1]) / 2, rtol=1e-6)
    assert logs["proto_nce"] == pytest.approx(float((terms[0] + terms[1]).detach() / 2), rel=1e-6)


def test_pcl_validation(tmp_path):
    with pytest.raises(ValueError, match=r"pcl.num_clusters \[100\] exceed the 64 training samples"):
        load_config(None, tiny_overrides("pcl", tmp_path / "r", None) + ["pcl.num_clusters=[4,100]"])
    for field, value, match in (("num_clusters", [], "pcl.num_clusters"), ("num_clusters", [1], "pcl.num_clusters"),
                                ("every_steps", 0, "pcl.every_steps"), ("warmup_steps", -1, "pcl.warmup_steps"),
                                ("kmeans_iters", 0, "pcl.kmeans_iters"), ("backend", "sk", "pcl.backend"),
                                ("concentration_alpha", 0.0, "pcl.concentration_alpha")):
        with pytest.raises(ValueError, match=match):
            PCLConfig(**{field: value}).validate()


@pytest.mark.slow
def test_pcl_fit_clusters_on_schedule_and_checkpoints_the_prototypes(tmp_path):
    # 64 samples, batch 8: an epoch is 8 steps; warm-up 2, then every 3 steps -> clusterings after 2 and 5.
    overrides = tiny_overrides("pcl", tmp_path / "r", None, steps=6) + [
        "train.trackers=[jsonl]", "pcl.warmup_steps=2", "pcl.every_steps=3", "checkpoint.every=6"]
    result = fit(load_config(None, overrides))
    assert math.isfinite(result["loss"])
    logs = [json.loads(line) for line in (tmp_path / "r" / "logs" / "metrics.jsonl").read_text().splitlines()]
    steps = {rec["step"]: rec for rec in logs if "loss" in rec}
    assert "proto_nce" not in steps[1] and "proto_nce" not in steps[2]
    assert all("proto_nce" in steps[s] for s in (3, 4, 5, 6))
    extra = load_file(str(tmp_path / "r" / "checkpoints" / "step_00000006" / "extra.safetensors"))
    assert int(extra["prototypes.ready"]) == 1 and extra["prototypes.assignments_1"].shape == (64,)
    assert extra["prototypes.centroids_0"].shape == (4, 16)


@pytest.mark.slow
def test_pcl_prototypes_agree_across_two_processes(tmp_path):
    from helpers.launch import SCRIPTS, accelerate_launch

    # 64 digits, 8 per rank and step: an epoch is 4 steps; warm-up 2 steps, then one clustering. A
    # BatchNorm tower: each rank's key encoder keeps running statistics of its own batches.
    resnet = ("{model_type: resnet, num_channels: 3, embedding_size: 8, hidden_sizes: [8, 16], depths: [1, 1], "
              "layer_type: basic, downsample_in_first_stage: false}")
    extra = ["train.max_steps=3", "pcl.warmup_steps=2", "pcl.kmeans_iters=10", f"model.image_tower_config={resnet}"]
    accelerate_launch(SCRIPTS / "dist_pcl.py", str(tmp_path), *extra)
    cfg = load_config(None, tiny_overrides("pcl", tmp_path / "r", None) + extra)
    assert not (tmp_path / "rank0_call1.safetensors").exists()  # one clustering in 3 steps
    ranks = [load_file(str(tmp_path / f"rank{r}_call0.safetensors")) for r in (0, 1)]
    features = ranks[0]["features"]
    assert features.shape == (64, 16)
    # The ranks embedded the training set with different BatchNorm statistics ...
    assert not torch.allclose(features, ranks[1]["features"])
    # ... and hold one clustering all the same:
    for name in ranks[0]:
        if name != "features":
            assert torch.equal(ranks[0][name], ranks[1][name]), name
    assert int(ranks[0]["ready"]) == 1
    # The ranks' state is rank 0's clustering: a 1-process k-means of the features it clustered.
    p = cfg.pcl
    bank = Prototypes(p.num_clusters, 64, 16)
    bank.fit(features, iters=p.kmeans_iters, seed=cfg.seed, alpha=p.concentration_alpha,
             temperature=cfg.loss.temperature, backend=p.backend)
    for i, k in enumerate(p.num_clusters):
        centroids, phi, assign = bank.level(i)
        assert torch.equal(ranks[1][f"assignments_{i}"], assign), i
        assert len(torch.unique(assign)) > 1
        torch.testing.assert_close(ranks[1][f"centroids_{i}"], centroids, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ranks[1][f"concentration_{i}"], phi, rtol=1e-6, atol=1e-6)
    # The batches' `index` (the key into the assignments) names global training rows: the two
    # ranks' rows of one epoch are disjoint.
    seen = [load_file(str(tmp_path / f"rank{r}_index.safetensors"))["index"] for r in (0, 1)]
    assert all(s.numel() == 24 and int(s.min()) >= 0 and int(s.max()) < 64 for s in seen)
    assert not set(seen[0].tolist()) & set(seen[1].tolist())
