"""spectra editability: the exact factorisation of one edit's cost, and the command measured against direct edits."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from spectra.data.records import EditRequest
from spectra.editing import make_editor
from spectra.editing.filters import IdentityFilter
from spectra.experiments.editability import EditabilityConfig, _longest_run, edit_cost, run_editability
from spectra.glossary import GLOSSARY
from spectra.models import load_model
from spectra.results import load_run
from spectra.spectral import Delta
from spectra_cli.main import app


def _random(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_a_factored_delta_has_the_spectral_norm_of_its_dense_matrix():
    left, right = _random(0, 30, 4), _random(1, 50, 4)
    dense = torch.linalg.matrix_norm(left @ right.T, ord=2)
    assert Delta.factored(left, right).spectral_norm() == pytest.approx(float(dense), rel=1e-10)
    assert Delta.of(left @ right.T).spectral_norm() == pytest.approx(float(dense), rel=1e-10)


def test_edit_cost_factors_are_their_definitions_and_multiply_to_the_spectral_ratio():
    W, k = _random(2, 20, 40), _random(3, 40)
    delta = Delta.factored(_random(4, 20, 3), _random(5, 40, 3))
    dW = delta.to_dense()
    sigma1 = float(torch.linalg.matrix_norm(W, ord=2))
    cost = edit_cost(W, k, delta, sigma1)
    assert cost["write_demand"] == pytest.approx(float((dW @ k).norm() / (W @ k).norm()))
    assert cost["key_gain"] == pytest.approx(float((W @ k).norm() / (k.norm() * sigma1)))
    assert cost["off_key_excess"] == pytest.approx(float(torch.linalg.matrix_norm(dW, ord=2) * k.norm() / (dW @ k).norm()))
    product = cost["write_demand"] * cost["key_gain"] * cost["off_key_excess"]
    assert product == pytest.approx(cost["delta_spectral_rel"], rel=1e-10)
    assert cost["delta_spectral_rel"] == pytest.approx(float(torch.linalg.matrix_norm(dW, ord=2)) / sigma1)
    assert cost["off_key_excess"] >= 1 and 0 < cost["key_gain"] <= 1


def test_an_update_along_the_top_singular_key_has_unit_gain_and_no_excess():
    W = _random(6, 20, 40)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    k = 3.0 * Vh[0]
    r = _random(7, 20)
    cost = edit_cost(W, k, Delta.factored(r[:, None], (k / k.pow(2).sum())[:, None]), float(S[0]))
    assert cost["key_gain"] == pytest.approx(1.0)
    assert cost["off_key_excess"] == pytest.approx(1.0)
    assert cost["write_demand"] == pytest.approx(float(r.norm() / (W @ k).norm()))


def test_longest_run_counts_consecutive_blocks():
    assert _longest_run([]) == 0
    assert _longest_run([0, 1, 2, 4, 5]) == 3
    assert _longest_run([3]) == 1


def test_recorded_single_edit_costs_are_the_weight_changes_a_direct_edit_makes(world_model, tmp_path):
    """Each recorded ||dW||_2 / sigma_1 equals the one of the same edit made directly, and the model is left unedited."""
    corpus = world_model / "small_corpus.txt"
    config = EditabilityConfig(model=str(world_model), device="cpu", edits=2, facts=6, stats_corpus=corpus,
                               out=tmp_path / "run")
    run = load_run(run_editability(config, progress=False))
    rows = run.rows
    assert {"edits", "facts", "editor", "model", "stats_corpus"} <= set(run.config)
    assert not {"tau", "revive", "rounds", "represent_prompts", "fluency"} & set(run.config)
    assert set(rows["metric"]) <= set(GLOSSARY) and rows["unit"].notna().all()
    costs = rows[rows["metric"].isin(["delta_spectral_rel", "write_demand", "key_gain", "off_key_excess"])]
    wide = costs.pivot_table(index=["case_id", "site"], columns="metric", values="value")
    assert ((wide["write_demand"] * wide["key_gain"] * wide["off_key_excess"]) / wide["delta_spectral_rel"]).sub(1).abs().max() < 1e-9
    fill = rows[rows["metric"] == "covariance_fill"]["value"]
    assert len(fill) == wide.index.get_level_values("site").nunique() and fill.between(0, 1).all()
    assert len(rows[rows["metric"] == "p_true"]) == 6 and rows[rows["metric"] == "p_true"]["value"].between(0, 1).all()

    records = json.loads((world_model / "counterfact.json").read_text())[:2]
    shifts = rows[rows["metric"] == "subject_shift"].set_index("case_id")["value"]
    for record in records:
        model = load_model(str(world_model), device="cpu")
        editor = make_editor("memit", "tiny", corpus=corpus, progress=False)
        sites = editor.edited_sites(model)
        before = {site: model.adapter.read(site).double().clone() for site in sites}
        state_before = _subject_state(model, record, max(site.layer for site in sites))
        request = EditRequest.from_counterfact(record)
        editor.prepare(model, [request])
        editor.apply_round(model, [request], IdentityFilter())
        state_after = _subject_state(model, record, max(site.layer for site in sites))
        expected = (state_after - state_before).norm() / state_before.norm()
        assert shifts[record["case_id"]] == pytest.approx(float(expected), rel=1e-4)
        for site in sites:
            direct = torch.linalg.matrix_norm(model.adapter.read(site).double() - before[site], ord=2)
            direct /= torch.linalg.matrix_norm(before[site], ord=2)
            recorded = wide.loc[(record["case_id"], str(site)), "delta_spectral_rel"]
            assert recorded == pytest.approx(float(direct), rel=1e-4)


def _subject_state(model, record: dict, layer: int, last: bool = False) -> torch.Tensor:
    """Block ``layer``'s output at the subject's last token (or the last token) of the rewrite prompt, from
    transformers' own hidden states."""
    rewrite = record["requested_rewrite"]
    prefix = rewrite["prompt"].split("{}")[0] + rewrite["subject"]
    ids = torch.tensor([model.tokenizer(rewrite["prompt"].format(rewrite["subject"]))["input_ids"]])
    position = ids.shape[1] - 1 if last else len(model.tokenizer(prefix.strip())["input_ids"]) - 1
    with torch.no_grad():
        states = model.model(input_ids=ids, output_hidden_states=True).hidden_states
    return states[layer + 1][0, position].double()


def test_the_shift_is_read_where_z_lives_when_the_key_is_the_last_token(world_model, tmp_path):
    corpus = world_model / "small_corpus.txt"
    config = EditabilityConfig(model=str(world_model), device="cpu", edits=1, facts=3, stats_corpus=corpus,
                               hparams_set=["key_position=last"], out=tmp_path / "run")
    rows = load_run(run_editability(config, progress=False)).rows
    recorded = float(rows.loc[rows["metric"] == "subject_shift", "value"].iloc[0])
    record = json.loads((world_model / "counterfact.json").read_text())[0]
    model = load_model(str(world_model), device="cpu")
    editor = make_editor("memit", "tiny", corpus=corpus, progress=False, key_position="last")
    top = max(site.layer for site in editor.edited_sites(model))
    before = _subject_state(model, record, top, last=True)
    request = EditRequest.from_counterfact(record)
    editor.prepare(model, [request])
    editor.apply_round(model, [request], IdentityFilter())
    after = _subject_state(model, record, top, last=True)
    assert recorded == pytest.approx(float((after - before).norm() / before.norm()), rel=1e-4)


def test_the_command_prints_the_targets_and_refuses_bad_sizes(world_model, tmp_path):
    runner = CliRunner()
    args = ["editability", "--model", str(world_model), "--stats-corpus", str(world_model / "small_corpus.txt"),
            "--edits", "1", "--facts", "3", "--device", "cpu"]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    for line in ("causal trace", "MLP write / hidden state", "key-covariance fill", "P(true) before editing",
                 "write_demand", "key_gain of the corpus keys", "off_key_excess", "subject state moved", "run directory:"):
        assert line in result.output
    bad = runner.invoke(app, [*args[:5], "--edits", "0", "--device", "cpu"])
    assert bad.exit_code == 2 and "--edits and --facts must be at least 1" in bad.output


def test_isotropic_key_gain_is_the_rms_gain_on_random_keys_and_near_the_gaussian_value():
    from spectra.experiments.editability import isotropic_key_gain

    W = _random(8, 64, 256)
    keys = _random(9, 256, 20000)
    sigma1 = float(torch.linalg.matrix_norm(W, ord=2))
    rms_gain = float(((W @ keys).pow(2).sum(0) / keys.pow(2).sum(0)).mean().sqrt()) / sigma1
    assert isotropic_key_gain(W, sigma1) == pytest.approx(rms_gain, rel=0.02)
    assert isotropic_key_gain(W, sigma1) == pytest.approx(8 / (8 + 16), rel=0.1)


def test_corpus_key_gain_is_the_energy_weighted_gain_on_the_corpus_keys():
    """sqrt(sum ||W k||^2 / sum ||k||^2) / sigma_1 over explicit keys equals the covariance form, and white keys
    give the isotropic gain."""
    from spectra.experiments.editability import corpus_key_gain, isotropic_key_gain

    W = _random(10, 64, 256)
    keys = _random(11, 256, 500) * torch.linspace(0.1, 3.0, 256, dtype=torch.float64)[:, None]  # anisotropic keys
    sigma1 = float(torch.linalg.matrix_norm(W, ord=2))
    direct = float(((W @ keys).pow(2).sum() / keys.pow(2).sum()).sqrt()) / sigma1
    assert corpus_key_gain(W, keys @ keys.T / keys.shape[1], sigma1) == pytest.approx(direct, rel=1e-10)
    assert corpus_key_gain(W, torch.eye(256, dtype=torch.float64), sigma1) == pytest.approx(
        isotropic_key_gain(W, sigma1), rel=1e-10)
    top = torch.linalg.svd(W)[2][0]
    assert corpus_key_gain(W, torch.outer(top, top), sigma1) == pytest.approx(1.0, rel=1e-10)
