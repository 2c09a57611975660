"""The GPU paths (skipped without CUDA): editors, REVIVE and a whole drift run on CUDA agree with the CPU,
and the embedded model edits in bfloat16 and float16 with finite results in its own dtype.

CI has no GPU, so these run where one is lent (``pytest tests/test_cuda_paths.py`` there); the figures
that go with them (time, efficacy per dtype) are ``benchmarks/bench_precision.py``'s.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_cli_experiments import invoke
from test_editing_editors import EDITORS, build
from test_editing_support import requests, tiny_model
from test_editing_support import single_thread  # noqa: F401 - autouse fixture, applied to this module
from test_spectral_revive import naive_algorithm_1, relative_error

from spectra.editing import IdentityFilter
from spectra.results import load_run
from spectra.spectral import ReviveProjector, matrix_with_singular_values, svd

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

#: The drift metrics compared between a CPU and a CUDA run, with the largest difference accepted.
DRIFT_TOLERANCE = {"LS": 1e-3, "SS_diag_mean": 1e-3, "delta_spectral_rel": 1e-3, "text_nll": 1e-4, "efficacy": 0.0}


@pytest.mark.parametrize("name", EDITORS)
def test_every_editor_writes_the_cpu_update_on_cuda(name: str, tmp_path) -> None:
    """Same model, same requests: the update written on CUDA equals the CPU one to 1e-3 (float32 throughout;
    the editors' Adam steps and solves run in another order on the GPU, so not bit for bit)."""
    deltas = {}
    for device in ("cpu", "cuda"):
        model = tiny_model("llama")
        reqs = requests(model, 3)  # chosen on the CPU: the same targets for both devices
        model.model.to(device)
        editor = build(name, model, tmp_path / device)
        editor.prepare(model, reqs)
        written = editor.apply_round(model, reqs, IdentityFilter())
        assert all(delta.to_dense().device.type == device for delta in written.values())
        deltas[device] = {site: delta.to_dense().cpu() for site, delta in written.items()}
    assert deltas["cpu"].keys() == deltas["cuda"].keys()
    for site, expected in deltas["cpu"].items():
        assert relative_error(deltas["cuda"][site], expected) <= 1e-3, site


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_projector_on_cuda_equals_algorithm_1(dtype: torch.dtype) -> None:
    """REVIVE's projector built from a CUDA SVD equals Algorithm 1 in float64 on the CPU: exactly (1e-10)
    from a float64 spectrum, to the float32 basis error from a float32 one."""
    g = torch.Generator().manual_seed(0)
    W, dW = torch.randn(120, 60, generator=g), torch.randn(120, 60, generator=g)
    expected = naive_algorithm_1(W, dW, 0.2)
    projector = ReviveProjector(svd(W.cuda(), dtype=dtype), 0.2)
    filtered = projector(dW.cuda().to(dtype))
    assert filtered.device.type == "cuda"
    assert relative_error(filtered.cpu(), expected) <= (1e-10 if dtype == torch.float64 else 1e-5)


def test_top_k_triplets_survive_a_filtered_update_on_cuda() -> None:
    """W + dW_safe keeps the top-k singular triplets of W when everything lives on the GPU."""
    g = torch.Generator().manual_seed(5)
    W = matrix_with_singular_values(80, 120, torch.linspace(10.0, 0.1, 80), g, dtype=torch.float64).cuda()
    s = svd(W, dtype=torch.float64)
    projector = ReviveProjector(s, 0.3)
    k = projector.k
    dW = torch.randn(80, 120, generator=g, dtype=torch.float64).cuda()
    dW = dW * (0.05 * float(s.S[k - 1]) / float(torch.linalg.matrix_norm(dW)))
    W_new = W + projector(dW)
    U, S, V = s.U[:, :k], s.S[:k], s.V[:, :k]
    assert float((W_new @ V - U * S).abs().max()) <= 1e-10 * float(s.S[0])
    assert torch.allclose(torch.linalg.svdvals(W_new)[:k], S, rtol=1e-10, atol=1e-10 * float(s.S[0]))


@pytest.mark.slow
def test_a_drift_run_on_cuda_matches_the_cpu_run(tmp_path) -> None:
    """Two MEMIT rounds on the embedded model, both arms: LS, SS, the update's size, held-out NLL and
    efficacy per arm and round agree between --device cpu and --device cuda."""
    common = ["drift", "--rounds", "2", "--eval-records", "12", "--represent-prompts", "0", "--items-per-task", "20"]
    values = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        invoke(*common, "--device", device, "--out", str(out))
        rows = load_run(out).rows
        rows = rows[rows["metric"].isin(list(DRIFT_TOLERANCE))]
        rows = rows.assign(site=rows["site"].fillna(""), side=rows["side"].fillna(""))
        values[device] = rows.set_index(["arm", "round", "metric", "site", "side"])["value"].sort_index()
    assert values["cpu"].index.equals(values["cuda"].index)
    assert values["cpu"].index.is_unique
    for (arm, round_, metric, site, side), expected in values["cpu"].items():
        got = values["cuda"][(arm, round_, metric, site, side)]
        assert math.isclose(got, expected, rel_tol=DRIFT_TOLERANCE[metric], abs_tol=DRIFT_TOLERANCE[metric]), (
            arm, round_, metric, site, side, got, expected)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_the_embedded_model_edits_in_half_precision_on_cuda(dtype: str, tmp_path) -> None:
    """A MEMIT round on the embedded model loaded in half precision finishes with every measured number finite
    (keys, solves and SVDs run in float32 underneath; a half-precision solve would overflow)."""
    out = tmp_path / dtype
    invoke("drift", "--rounds", "1", "--eval-records", "6", "--represent-prompts", "0", "--items-per-task", "20",
           "--device", "cuda", "--dtype", dtype, "--out", str(out))
    run = load_run(out)
    assert run.config["dtype"] == dtype
    numbers = run.rows["value"].dropna()
    assert len(numbers) > 0 and numbers.map(math.isfinite).all()
    assert set(run.rows["arm"].dropna()) == {"off", "revive"}
