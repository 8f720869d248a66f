"""Curvature on FSDP2 shards (DTensor) with real gloo processes."""

from pathlib import Path

import pytest
import torch

from tests.test_curvature_ddp import run_ddp_script as run_script

SCRIPTS = Path(__file__).parent / "scripts"


@pytest.mark.slow
def test_vector_operations_on_uneven_and_replicated_shards_equal_the_full_tensors(tmp_path):
    run_script(SCRIPTS / "curvature_dtensor_vectors.py", tmp_path, timeout=120)
    result = torch.load(tmp_path / "result.pt")
    for key in ("dot", "norm", "numel"):
        sharded, full = result[key]
        assert sharded == pytest.approx(full, rel=1e-12), key
    assert result["dots"][0] == pytest.approx(result["dots"][1], rel=1e-12)
    assert result["normal"] and result["rademacher"] and result["lanczos_vector"]
    assert result["lanczos"][0] == pytest.approx(result["lanczos"][1], rel=1e-12)


@pytest.mark.slow
def test_fsdp2_callbacks_log_the_one_process_values_and_leave_training_unchanged(tmp_path):
    """Every rank logs what one process measures on the same weights and subset: finite differences (the only
    products FSDP2 allows; hvp="auto" says so once) within 1e-8 of one process's finite differences and 1e-6 of
    exact products (float64); training is bitwise the same without the callbacks."""
    script = SCRIPTS / "curvature_fsdp_fit.py"
    run_script(script, "fsdp", tmp_path, timeout=400)
    run_script(script, "fsdp", tmp_path, "--plain", timeout=400)
    run_script(script, "reference", tmp_path, timeout=400)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    plain = [torch.load(tmp_path / f"plain{r}.pt", weights_only=False) for r in (0, 1)]
    reference = torch.load(tmp_path / "reference.pt", weights_only=False)
    assert ranks[0]["indices"] == ranks[1]["indices"] == reference["indices"]
    for watched, unwatched in zip(ranks, plain):
        assert all(torch.equal(a, b) for a, b in zip(watched["final"], unwatched["final"]))
        assert watched["hvp"] == ["finite_difference"] * 2
    keys = ("sharpness/lambda_max", "sharpness/lambda_2", "sharpness/trace", "sharpness/stability_ratio",
            "saddle/lambda_min")
    for rank in ranks:
        logged = [values for _, values in sorted(rank["logged"].items()) if "sharpness/lambda_max" in values]
        assert len(logged) == 2
        for values, fd, exact in zip(logged, *(dict(sorted(reference[h].items())).values()
                                               for h in ("finite_difference", "exact"))):
            for key in keys:
                assert values[key] == pytest.approx(fd[key], rel=1e-8), key
                assert values[key] == pytest.approx(exact[key], rel=1e-6), key
