"""Checks shared by the tests that run tests/scripts/dist_losses.py in 2 processes."""
from __future__ import annotations

import json
from pathlib import Path


def check_gathered_losses(out: Path, impls: list[str], dtypes: list[str], tolerances: dict[str, float]) -> None:
    """Every case of tests/scripts/dist_losses.py, on both ranks, within its dtype's tolerance."""
    per_rank = json.loads(out.read_text())
    assert [r["rank"] for r in per_rank] == [0, 1] and all(r["world_size"] == 2 for r in per_rank)
    for result in per_rank:
        seen = {(c["loss"], c["shards"], c["impl"], c["dtype"]) for c in result["cases"]}
        assert len(seen) == len(result["cases"]) == 6 * 2 * len(impls) * len(dtypes), sorted(seen)
        for case in result["cases"]:
            label = (f"rank {result['rank']} ({case['rows']} rows, {case['shards']} shards): {case['loss']}, "
                     f"impl={case['impl']}, {case['dtype']}")
            tol = tolerances[case["dtype"]]
            assert case["loss_err"] < tol, f"{label}: loss differs by {case['loss_err']:.3e}"
            assert case["grad_err"] < tol, f"{label}: DDP-averaged gradients differ by {case['grad_err']:.3e}"
        red = result["reductions"]  # all_reduce_logsumexp, gather_with_grad, all_reduce_sum_with_grad
        assert red["lse_inf_agrees"] and red["lse_grad_finite"], red
        assert max(red["lse_err"], red["lse_grad_err"], red["gather_err"], red["gather_grad_err"]) < 1e-12, red
