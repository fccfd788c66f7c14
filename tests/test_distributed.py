"""The gathered losses through a real 2-process `accelerate launch` on CPU (gloo)."""
import pytest
from helpers.gathered import check_gathered_losses
from helpers.launch import SCRIPTS, accelerate_launch


@pytest.mark.slow
def test_gathered_losses_equal_one_process_on_the_whole_batch(tmp_path):
    """clip_loss (local_loss True/False), nt_xent and supcon_loss with gather=True on 2 ranks, even
    and uneven shards, naive and chunked: loss and DDP-averaged gradients as one float64 process
    on the whole batch (relative errors below 1e-12 in float64, 1e-6 in fp32)."""
    out = tmp_path / "result.json"
    accelerate_launch(SCRIPTS / "dist_losses.py", str(out), "--impls", "naive,chunked", "--dtypes", "float64,float32")
    check_gathered_losses(out, ["naive", "chunked"], ["float64", "float32"], {"float64": 1e-12, "float32": 1e-6})
