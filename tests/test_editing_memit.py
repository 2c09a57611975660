"""MEMIT, the shared machinery (statistics, templates, keys, z) and the hyperparameters and registry."""

from __future__ import annotations

import json

import pytest
import torch
from test_editing_support import FAMILIES, SMALL, corpus, requests, tiny_model, top_prediction
from test_editing_support import single_thread  # noqa: F401 - autouse fixture, applied to this module

from spectra.data.records import EditRequest
from spectra.editing import (
    IdentityFilter, KeyStatistics, MemitHParams, NseHParams, StatsCache, builtin_registry, make_editor, memit_solve,
)
from spectra.editing import stats as stats_module
from spectra.editing.core import key_rows, keys_and_hidden, logits_at, optimize_targets
from spectra.models.hooks import edit_hidden, record_block_output, replay_blocks
from spectra.editing.memit import MemitEditor
from spectra.editing.registry import EditorRegistry
from spectra.errors import SpectraError
from spectra.models.sites import Site


def small_hparams(**overrides: object) -> MemitHParams:
    return MemitHParams(**{**SMALL, **overrides})


def test_statistics_equal_hand_computed_mean_of_outer_products(tmp_path) -> None:
    """C is the mean of k k^T over every non-padding token, whatever the batching."""
    model = tiny_model("gpt2")
    docs = ["alice lives in paris", "bob works in the big city of rome and likes oslo", "i see"]
    stats = KeyStatistics(docs, max_length=32, batch_size=2, cache=StatsCache(tmp_path), progress=False)
    got = stats.second_moments(model, [1, 3])
    for layer in (1, 3):
        feats = []
        handle = model.adapter.key_module(layer).register_forward_pre_hook(lambda m, a: feats.append(a[0][0]))
        for doc in docs:
            with torch.no_grad():
                model.model(input_ids=torch.tensor([model.tokenizer(doc)["input_ids"]]))
        handle.remove()
        keys = torch.cat(feats).double()
        expected = keys.T @ keys / keys.shape[0]
        torch.testing.assert_close(got[layer].double(), expected, rtol=1e-5, atol=1e-7)


def test_statistics_are_cached_on_disk_with_a_manifest(tmp_path, monkeypatch) -> None:
    """A second object over the same corpus reads the cache instead of running the model."""
    model = tiny_model("llama")
    docs = corpus(6)
    first = KeyStatistics(docs, max_length=16, cache=StatsCache(tmp_path), progress=False).second_moments(model, [1])
    manifests = list((tmp_path / "stats").rglob("*.json"))
    assert len(manifests) == 1 and json.loads(manifests[0].read_text())["key"]["layer"] == 1

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("recomputed despite the cache")

    monkeypatch.setattr("spectra.editing.stats.accumulate_second_moments", boom)
    again = KeyStatistics(docs, max_length=16, cache=StatsCache(tmp_path), progress=False).second_moments(model, [1])
    torch.testing.assert_close(again[1], first[1])
    with pytest.raises(SpectraError, match="not in the cache"):
        KeyStatistics(docs[:3], max_length=16, cache=StatsCache(tmp_path)).second_moments(model, [1], compute=False)


def test_memit_closed_form_equals_generic_least_squares() -> None:
    """Delta = R K^T (lambda C + K K^T)^-1 minimises ||Delta K - R||^2 + lambda tr(Delta C Delta^T)."""
    gen = torch.Generator().manual_seed(0)
    d_v, d_k, n, lam = 5, 7, 3, 0.7
    K = torch.randn(d_k, n, generator=gen, dtype=torch.float64)
    R = torch.randn(d_v, n, generator=gen, dtype=torch.float64)
    X = torch.randn(d_k, 20, generator=gen, dtype=torch.float64)
    C = X @ X.T / 20
    delta = memit_solve(K, R, C, lam)
    assert delta.is_factored and delta.left.shape[1] == n
    # ||Delta [K, sqrt(lam) L]  - [R, 0]||^2 with C = L L^T: an ordinary least-squares problem.
    L = torch.linalg.cholesky(C)
    A = torch.cat([K, lam**0.5 * L], dim=1)
    B = torch.cat([R, torch.zeros(d_v, d_k, dtype=torch.float64)], dim=1)
    expected = torch.linalg.lstsq(A.T, B.T).solution.T
    torch.testing.assert_close(delta.to_dense().double(), expected, rtol=1e-5, atol=1e-6)


def test_memit_ridge_adds_a_scale_free_frobenius_penalty() -> None:
    """With ridge r, the solve minimises ||Delta K - R||^2 + lam tr(Delta C Delta^T) + r mean||k||^2 ||Delta||^2."""
    gen = torch.Generator().manual_seed(3)
    d_k, d_v, n, lam, r = 12, 5, 4, 2.0, 0.1
    basis = torch.randn(d_k, 3, generator=gen, dtype=torch.float64)
    C = basis @ basis.T / 3  # rank-deficient, as a small model's key statistics are
    K = torch.randn(d_k, n, generator=gen, dtype=torch.float64)
    R = torch.randn(d_v, n, generator=gen, dtype=torch.float64)
    rho = r * float((K**2).sum(0).mean())
    delta = memit_solve(K, R, C, lam, ridge=r)
    evals, evecs = torch.linalg.eigh(C)
    L = evecs * evals.clamp_min(0).sqrt()
    A = torch.cat([K, lam**0.5 * L, rho**0.5 * torch.eye(d_k, dtype=torch.float64)], dim=1)
    B = torch.cat([R, torch.zeros(d_v, 2 * d_k, dtype=torch.float64)], dim=1)
    expected = torch.linalg.lstsq(A.T, B.T).solution.T
    torch.testing.assert_close(delta.to_dense().double(), expected, rtol=1e-4, atol=1e-5)


def test_memit_in_solve_placement_is_the_optimum_over_updates_with_delta_v_zero() -> None:
    """With V protected, the solve equals least squares over Delta = Y B^T, B a basis of span(V)'s complement."""
    gen = torch.Generator().manual_seed(4)
    d_k, d_v, n, lam, r, k = 10, 4, 3, 1.5, 0.05, 3
    X = torch.randn(d_k, 30, generator=gen, dtype=torch.float64)
    C = X @ X.T / 30
    K = torch.randn(d_k, n, generator=gen, dtype=torch.float64)
    R = torch.randn(d_v, n, generator=gen, dtype=torch.float64)
    full, _ = torch.linalg.qr(torch.randn(d_k, d_k, generator=gen, dtype=torch.float64))
    V, B = full[:, :k], full[:, k:]
    delta = memit_solve(K, R, C, lam, ridge=r, protected_inputs=V.float()).to_dense().double()
    assert float((delta @ V).norm()) < 1e-5 * float(delta.norm())
    # Objective in Y: ||Y B^T K - R||^2 + lam tr(Y B^T C B Y^T) + rho ||Y||^2, an ordinary least squares.
    rho = r * float((K**2).sum(0).mean())
    L = torch.linalg.cholesky(B.T @ C @ B)
    A = torch.cat([B.T @ K, lam**0.5 * L, rho**0.5 * torch.eye(d_k - k, dtype=torch.float64)], dim=1)
    target = torch.cat([R, torch.zeros(d_v, 2 * (d_k - k), dtype=torch.float64)], dim=1)
    Y = torch.linalg.lstsq(A.T, target.T).solution.T
    torch.testing.assert_close(delta, Y @ B.T, rtol=1e-4, atol=1e-5)
    unconstrained = memit_solve(K, R, C, lam, ridge=r).to_dense().double()
    assert not torch.allclose(delta, unconstrained @ (torch.eye(d_k, dtype=torch.float64) - V @ V.T), atol=1e-3), (
        "post-hoc projection is not the constrained optimum, so the two placements must differ"
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_memit_changes_the_prediction_of_edited_facts(family: str, tmp_path) -> None:
    """A round of MEMIT makes each new target the model's top prediction (every architecture family)."""
    model = tiny_model(family)
    reqs = requests(model, 3)
    before = model.adapter.read(model.adapter.sites(("mlp.down",), [0])[0])
    editor = MemitEditor(small_hparams(), corpus(), stats_cache=StatsCache(tmp_path), progress=False)
    editor.prepare(model, reqs)
    written = editor.apply_round(model, reqs, IdentityFilter())
    assert set(written) == set(editor.edited_sites(model))
    for request in reqs:
        assert top_prediction(model, request.filled()) == request.target_new
    torch.testing.assert_close(model.adapter.read(model.adapter.sites(("mlp.down",), [0])[0]), before)


def test_subject_last_keys_write_z_into_the_subject_representation(tmp_path) -> None:
    """With MEMIT's default keys the hidden state at the subject's last token moves onto z."""
    model = tiny_model("llama")
    reqs = [
        EditRequest(0, "{} lives in", "alice", "rome"), EditRequest(1, "the house of {} is in", "bob", "oslo"),
    ]
    editor = MemitEditor(small_hparams(key_position="subject_last", layers=(0, 1, 2)), corpus(),
                         stats_cache=StatsCache(tmp_path), progress=False)
    editor.prepare(model, reqs)
    rows = key_rows(model, reqs, editor.templates, "subject_last")
    z = optimize_targets(model, reqs, editor.templates, editor.z_settings())
    _, before = keys_and_hidden(model, rows, [0], 2, 64)
    editor._spread(model, rows, z, IdentityFilter())
    _, after = keys_and_hidden(model, rows, [0], 2, 64)
    assert float((after - z).norm()) < 0.05 * float((before - z).norm())


def test_templates_are_seeded_and_well_formed(tmp_path) -> None:
    """Same seed, same templates; the first is the bare prompt and every other ends in '. {}'."""
    model = tiny_model("gptj")
    reqs = requests(model, 1)
    first, second = (MemitEditor(small_hparams(), corpus(), stats_cache=StatsCache(tmp_path), progress=False) for _ in range(2))
    first.prepare(model, reqs)
    second.prepare(model, reqs)
    assert first.templates == second.templates and len(first.templates) == 6
    assert first.templates[0] == "{}" and all(t.endswith(". {}") for t in first.templates[1:])
    other = MemitEditor(small_hparams(seed=1), corpus(), stats_cache=StatsCache(tmp_path), progress=False)
    other.prepare(model, reqs)
    assert other.templates != first.templates


def test_bad_requests_and_layers_are_clear_errors(tmp_path) -> None:
    model = tiny_model("llama")
    editor = MemitEditor(small_hparams(), corpus(), stats_cache=StatsCache(tmp_path), progress=False)
    with pytest.raises(SpectraError, match="placeholder"):
        editor.prepare(model, [EditRequest(0, "alice lives in", "alice", "rome")])
    deep = MemitEditor(small_hparams(layers=(2, 9)), corpus(), stats_cache=StatsCache(tmp_path), progress=False)
    with pytest.raises(SpectraError, match="out of range"):
        deep.prepare(model, requests(model, 1))
    with pytest.raises(SpectraError, match="prepare"):
        editor.apply_round(model, requests(model, 1), IdentityFilter())


def test_hparams_defaults_and_validation() -> None:
    tiny = MemitHParams.for_model("tiny")
    assert tiny.layers == (0, 1, 2) and tiny.z_layer == 2 and tiny.key_position == "subject_last" and tiny.ridge > 0
    assert MemitHParams.for_model("gpt-j").ridge == 0.0, "real models keep the reference solve"
    assert MemitHParams.for_model("gpt2-xl").mom2_update_weight == 20000
    nse = NseHParams.for_model("gpt2-xl")
    assert nse.mom2_update_weight == 10000 and nse.alpha == 35 and nse.layers == (13, 14, 15, 16, 17)
    assert MemitHParams.for_model("llama3", v_lr=0.2).v_lr == 0.2
    with pytest.raises(SpectraError, match="no MemitHParams defaults"):
        MemitHParams.for_model("bert")
    with pytest.raises(SpectraError, match="ascending"):
        MemitHParams(layers=(3, 1))
    with pytest.raises(SpectraError, match="key_position"):
        MemitHParams(layers=(1,), key_position="first")
    with pytest.raises(SpectraError, match="no hyperparameter"):
        MemitHParams.for_model("tiny", nullspace_threshold=1.0)
    assert tiny.revive_placement == "after" and NseHParams.for_model("tiny").revive_placement == "after"
    with pytest.raises(SpectraError, match="revive_placement"):
        MemitHParams(layers=(1,), revive_placement="before")
    with pytest.raises(SpectraError, match="NSE places a REVIVE filter after"):
        NseHParams.for_model("tiny", revive_placement="in_solve")


@pytest.mark.parametrize("family", FAMILIES)
def test_replaying_the_lower_blocks_equals_running_them(family: str) -> None:
    """The z optimisation's shortcut: blocks 0..L return a recorded output; logits and hooks are unchanged."""
    model = tiny_model(family)
    ids = torch.tensor([[3, 4, 5, 6, 7], [8, 9, 10, 0, 0]])
    mask = (torch.arange(5) < torch.tensor([[5], [3]])).long()
    shift = torch.randn(model.adapter.shape(Site(1, "mlp.down"))[0])
    with torch.no_grad():
        before = model.model(input_ids=ids, attention_mask=mask).logits

    def edit(hidden: torch.Tensor) -> torch.Tensor:
        return hidden + shift

    with record_block_output(model, 1) as recorded, edit_hidden(model, 1, edit):
        full = model.model(input_ids=ids, attention_mask=mask).logits
    with replay_blocks(model, 1, recorded[0]), edit_hidden(model, 1, edit):
        replayed = model.model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(replayed, full)
    assert all("forward" not in model.adapter.block(i).__dict__ for i in range(2)), "blocks get their forward back"
    with torch.no_grad():
        torch.testing.assert_close(model.model(input_ids=ids, attention_mask=mask).logits, before)


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_at_positions_equal_the_full_logits_there(family: str) -> None:
    model = tiny_model(family)
    ids = torch.tensor([[3, 4, 5, 6, 7], [8, 9, 10, 0, 0]])
    mask = (torch.arange(5) < torch.tensor([[5], [3]])).long()
    with torch.no_grad():
        full = model.model(input_ids=ids, attention_mask=mask).logits
        picked = logits_at(model, ids, mask, [[0, 3, 4], [2]])
    torch.testing.assert_close(picked, torch.stack([full[0, 0], full[0, 3], full[0, 4], full[1, 2]]))


def test_registry_is_lazy_and_rejects_duplicates() -> None:
    registry = builtin_registry()
    assert registry.names() == ["alphaedit", "memit", "nse", "prune", "rect"]
    with pytest.raises(SpectraError, match="already registered"):
        registry.register("memit", MemitEditor)
    with pytest.raises(SpectraError, match="Unknown editor"):
        registry.resolve("rome")
    custom = EditorRegistry()
    custom.register("mine", "spectra.editing.memit:MemitEditor")
    assert custom.resolve("mine") is MemitEditor
    editor = make_editor("memit", "tiny", corpus=corpus(2))
    assert isinstance(editor, MemitEditor) and editor.hparams.mom2_update_weight == MemitHParams.for_model("tiny").mom2_update_weight


def test_joint_z_optimisation_equals_one_request_at_a_time() -> None:
    """The batched z optimisation is n independent optimisations (Adam is elementwise, losses add)."""
    model = tiny_model("gpt2")
    reqs = requests(model, 3)
    settings = MemitEditor(small_hparams(v_num_grad_steps=8)).z_settings()
    templates = ["{}", "the big city . {}"]
    joint = optimize_targets(model, reqs, templates, settings)
    alone = torch.cat([optimize_targets(model, [r], templates, settings) for r in reqs], dim=1)
    torch.testing.assert_close(joint, alone, rtol=1e-4, atol=1e-5)


def test_a_long_statistics_pass_is_announced_before_it_starts(tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.setitem(stats_module._ASSUMED_FLOPS, "cpu", 1.0)
    model = tiny_model("llama")
    with caplog.at_level("WARNING", logger="spectra.editing.stats"):
        KeyStatistics(corpus(3), max_length=16, cache=StatsCache(tmp_path), progress=False).second_moments(model, [1, 2])
    assert "not cached" in caplog.text and "2 layers" in caplog.text


def test_bf16_models_are_edited_through_float32_masters(tmp_path) -> None:
    """A bf16 model's edited matrices keep float32 masters (saved in the state) that round to the weights."""
    model = tiny_model("llama")
    model.model.to(torch.bfloat16)
    reqs = requests(model, 2)
    editor = MemitEditor(small_hparams(), corpus(), stats_cache=StatsCache(tmp_path), progress=False)
    editor.prepare(model, reqs)
    editor.apply_round(model, reqs, IdentityFilter())
    state = editor.state_dict()
    for site in editor.edited_sites(model):
        master = state[f"master.{site}"]
        assert master.dtype == torch.float32
        torch.testing.assert_close(master.to(torch.bfloat16), model.adapter.read(site), rtol=0, atol=0)
