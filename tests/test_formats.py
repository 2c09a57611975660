"""The field's own formats: EasyEdit/official hyperparameter files, precomputed layer_stats .npz, safe loading."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_editing_support import SMALL, corpus, requests, tiny_model
from test_editing_support import single_thread  # noqa: F401 - autouse fixture, applied to this module

from spectra.editing import AlphaEditHParams, IdentityFilter, KeyStatistics, MemitHParams, StatsCache, make_editor
from spectra.editing.hparams_files import resolve_hparams
from spectra.editing.stats import accumulate_second_moments, read_corpus
from spectra.editing.stats_import import ImportedStatistics, locate_statistics
from spectra.errors import SpectraError

#: EasyEdit's hparams/MEMIT/llama3.2-3b.yaml, with this test model's layers and short z optimisation.
EASYEDIT_YAML = """alg_name: "MEMIT"
model_name: "meta-llama/Llama-3.2-3B-Instruct"
stats_dir: "./data/stats"
device: 0
layers: [1, 2]
clamp_norm_factor: 4
layer_selection: "all"
fact_token: "subject_last"
v_num_grad_steps: 5
v_lr: 5e-1
v_loss_layer: 3
v_weight_decay: 1e-3
kl_factor: 0.0625
mom2_adjustment: true
mom2_update_weight: 15000
rewrite_module_tmp: "model.layers.{}.mlp.down_proj"
layer_module_tmp: "model.layers.{}"
mlp_module_tmp: "model.layers.{}.mlp"
attn_module_tmp: "model.layers.{}.self_attn"
ln_f_module: "model.norm"
lm_head_module: "lm_head"
mom2_dataset: "wikipedia"
mom2_n_samples: 100000
mom2_dtype: "float32"
model_parallel: false
"""


def test_an_easyedit_yaml_resolves_with_its_extra_keys_reported(tmp_path) -> None:
    path = tmp_path / "memit.yaml"
    path.write_text(EASYEDIT_YAML)
    resolved = resolve_hparams(MemitHParams, "memit", "./my-model", None, path, ["v_lr=0.25", "layers=[0,2]"])
    hp = resolved.hparams
    assert hp.layers == (0, 2) and hp.v_lr == 0.25 and hp.v_weight_decay == 1e-3 and hp.key_position == "subject_last"
    assert isinstance(hp.clamp_norm_factor, float) and hp.mom2_n_samples == 100000
    assert {"device", "rewrite_module_tmp", "stats_dir", "v_loss_layer", "model_name"} <= set(resolved.ignored)
    assert "device" in resolved.ignored_note() and resolved.provenance()["values"]["v_lr"] == 0.25
    official = tmp_path / "alphaedit.json"
    official.write_text('{"layers": [1, 2], "fact_token": "last", "L2": 10, "nullspace_threshold": 2e-2, '
                        '"v_loss_layer": 3, "mom2_dtype": "float32"}')
    alpha = resolve_hparams(AlphaEditHParams, "alphaedit", "x", "gpt2", official).hparams
    assert alpha.l2 == 10.0 and alpha.key_position == "last" and alpha.mom2_update_weight == 20000, "gpt2 defaults below"


@pytest.mark.parametrize("text, needle", [
    ("layers: [1]\nlearning_rate: 3\n", "learning_rate"),
    ("alg_name: AlphaEdit\nlayers: [1]\n", "alg_name"),
    ("layers: [1]\nlayer_selection: random\n", "layer_selection"),
    ("layers: !!python/object/apply:os.system ['echo hacked']\n", "never runs code"),
    ("layers: [1]\nv_lr: fast\n", "v_lr"),
    ("- 1\n- 2\n", "one mapping"),
    ("v_lr: 0.5\n", "lack layers"),
])
def test_bad_hyperparameter_files_are_one_paragraph_errors(tmp_path, text: str, needle: str) -> None:
    path = tmp_path / "hp.yaml"
    path.write_text(text)
    with pytest.raises(SpectraError, match=needle):
        resolve_hparams(MemitHParams, "memit", "./my-model", None, path)


def test_a_model_without_defaults_names_hparams() -> None:
    with pytest.raises(SpectraError, match="--hparams FILE"):
        resolve_hparams(MemitHParams, "memit", "./my-model", None)


def _layer_stats_npz(path, total: np.ndarray, count: int, sample_size: object = 40) -> None:
    """A file as the official layer_stats.py writes it (CombinedStat(mom2=SecondMoment()) + sample_size)."""
    np.savez(path, **{"mom2.constructor": np.array("util.runningstats.SecondMoment()"), "mom2.count": count,
                      "mom2.mom2": total.astype(np.float32), "sample_size": sample_size})


def test_an_imported_layer_stats_npz_gives_the_same_solve_as_spectras_statistics(tmp_path) -> None:
    model = tiny_model("llama")
    docs = corpus()
    hparams = MemitHParams(**SMALL)
    sums, tokens = accumulate_second_moments(model, hparams.layers, read_corpus(docs, None), 32, 64, progress=False)
    folder = tmp_path / "stats" / "test-llama" / "wikipedia_stats"
    folder.mkdir(parents=True)
    for layer, total in sums.items():
        _layer_stats_npz(folder / f"model.layers.{layer}.mlp.down_proj_float32_mom2_40.npz", total.numpy(), tokens)
    files = locate_statistics(tmp_path / "stats", hparams.layers, n_samples=40)
    assert {f.count for f in files.values()} == {tokens} and files[1].module == "model.layers.1.mlp.down_proj"
    own = KeyStatistics(docs, max_length=32, cache=StatsCache(tmp_path / "cache"), progress=False)
    reqs = requests(model, 3)
    written = {}
    for name, statistics in (("own", own), ("imported", ImportedStatistics(files))):
        editor = make_editor("memit", hparams=hparams, statistics=statistics, progress=False)
        original = {site: model.adapter.read(site).clone() for site in editor.edited_sites(model)}
        editor.prepare(model, reqs)
        written[name] = {site: delta.to_dense() for site, delta in editor.apply_round(model, reqs, IdentityFilter()).items()}
        for site, weight in original.items():
            model.adapter.write(site, weight)
    for site, delta in written["own"].items():
        torch.testing.assert_close(written["imported"][site], delta, rtol=1e-4, atol=1e-5)
    cached = locate_statistics(tmp_path / "cache", hparams.layers, n_samples=None)
    assert {f.layout for f in cached.values()} == {"spectra"} and cached[2].count == tokens


def test_statistics_files_that_need_pickle_or_belong_elsewhere_are_refused(tmp_path) -> None:
    model = tiny_model("llama")
    pickled = tmp_path / "model.layers.1.mlp.down_proj_float32_mom2_40.npz"
    np.savez(pickled, **{"mom2.count": 5, "mom2.mom2": np.eye(64, dtype=np.float32),
                         "sample_size": np.array([None], dtype=object)})
    with pytest.raises(SpectraError, match="never unpickles"):
        locate_statistics(pickled, [1], 40)
    wrong = tmp_path / "wrong" / "model.layers.1.mlp.down_proj_float32_mom2_40.npz"
    wrong.parent.mkdir()
    _layer_stats_npz(wrong, np.eye(32), 10)
    with pytest.raises(SpectraError, match="32x32 moment"):
        ImportedStatistics(locate_statistics(wrong, [1], 40)).second_moments(model, [1])
    with pytest.raises(SpectraError, match="for layer 2 it found none"):
        locate_statistics(wrong.parent, [1, 2], 40)
    renamed = tmp_path / "layer1.npz"
    renamed.write_bytes(wrong.read_bytes())
    with pytest.raises(SpectraError, match="which layer"):
        locate_statistics(renamed, [1], 40)


def test_hub_ids_of_known_models_get_their_defaults() -> None:
    from spectra.experiments.common import defaults_key

    assert defaults_key("meta-llama/Meta-Llama-3-8B-Instruct") == "llama3"
    assert defaults_key("openai-community/gpt2") == defaults_key("gpt2") == "gpt2"
    assert defaults_key("./my-qwen") is None
    assert MemitHParams.for_model("gpt2").layers == (2, 3, 4)


def knowedit_records(subjects: list[str], objects: list[str]) -> list[dict]:
    """KnowEdit-style (zsRE-style) records over the test tokenizer's words: locality and portability groups."""
    records = []
    for i, subject in enumerate(subjects):
        new, true, other = objects[i % len(objects)], objects[(i + 1) % len(objects)], subjects[(i + 1) % len(subjects)]
        records.append({
            "subject": subject, "prompt": f"{subject} lives in", "target_new": new, "ground_truth": [true],
            "rephrase_prompt": f"the {subject} lives in",
            "locality": {"Relation_Specificity": [{"prompt": f"{other} works in", "ground_truth": [[true, "x"]]}]},
            "portability": {"Reasoning": [{"prompt": f"{subject} sees the city of", "ground_truth": new}]},
        })
    return records


def test_a_random_init_model_in_a_directory_drifts_with_easyedit_hparams_and_knowedit_data(tmp_path) -> None:
    """`spectra drift --model DIR --hparams memit.yaml --dataset knowedit.json --stats DIR`: no spectra defaults needed."""
    import json

    from test_editing_support import OBJECTS, SUBJECTS
    from typer.testing import CliRunner

    from spectra.results import load_run
    from spectra_cli.main import app

    model = tiny_model("llama")
    model_dir = tmp_path / "my-model"
    model.model.save_pretrained(model_dir)
    model.tokenizer.save_pretrained(model_dir)
    (tmp_path / "memit.yaml").write_text(EASYEDIT_YAML)
    (tmp_path / "knowedit.json").write_text(json.dumps(knowedit_records(SUBJECTS, OBJECTS)))
    sums, tokens = accumulate_second_moments(model, [1, 2], corpus(), 32, 64, progress=False)
    stats = tmp_path / "stats" / "my-model" / "wikipedia_stats"
    stats.mkdir(parents=True)
    for layer, total in sums.items():  # the official layer_stats layout, as EasyEdit users have them
        _layer_stats_npz(stats / f"model.layers.{layer}.mlp.down_proj_float32_mom2_100000.npz", total.numpy(), tokens)
    glue = tmp_path / "glue"
    glue.mkdir()
    (glue / "sst2.jsonl").write_text("\n".join(json.dumps({"sentence": f"{s} likes {o}", "label": i % 2})
                                               for i, (s, o) in enumerate(zip(SUBJECTS, OBJECTS))) + "\n")
    out = tmp_path / "run"
    args = ["drift", "--model", str(model_dir), "--hparams", str(tmp_path / "memit.yaml"), "--set", "v_num_grad_steps=3",
            "--dataset", str(tmp_path / "knowedit.json"), "--stats", str(tmp_path / "stats"),
            "--tasks", "sst2", "--glue-dir", str(glue), "--items-per-task", "2", "--rounds", "1", "--batch-size", "2",
            "--eval-records", "2", "--represent-prompts", "2", "--log-samples", "--fluency"]
    result = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "Ignored in" in result.output and "rewrite_module_tmp" in result.output
    run = load_run(out)
    hparams = run.provenance["hparams"]
    assert hparams["values"]["layers"] == [1, 2] and hparams["values"]["v_lr"] == 0.5
    assert hparams["values"]["v_num_grad_steps"] == 3 and hparams["defaults"] is None and "device" in hparams["ignored"]
    assert {layer: entry["tokens"] for layer, entry in run.provenance["statistics"].items()} == {"1": tokens, "2": tokens}
    metrics = set(run.rows["metric"])
    assert {"efficacy", "paraphrase", "neighborhood", "portability", "fluency", "LS", "accuracy"} <= metrics
    assert_samples_reproduce_the_edit_metrics(run)
    bare = CliRunner().invoke(app, [a for a in args if a not in ("--hparams", str(tmp_path / "memit.yaml"))])
    assert bare.exit_code == 2 and "--hparams FILE" in bare.output


def assert_samples_reproduce_the_edit_metrics(run) -> None:
    """samples.csv's success, averaged per record then over records (x100), equals every edit-metric row."""
    samples = run.table("samples")
    assert {"arm", "round", "case_id", "prompt_kind", "p_new", "p_true", "success"} <= set(samples.columns)
    assert samples["p_new"].between(0, 1).all() and set(samples["arm"]) == set(run.rows["arm"])
    per_record = samples.groupby(["arm", "round", "prompt_kind", "case_id"])["success"].mean()
    recomputed = per_record.groupby(["arm", "round", "prompt_kind"]).mean() * 100
    names = {"rewrite": "efficacy", "paraphrase": "paraphrase", "neighborhood": "neighborhood",
             "portability": "portability"}
    compared = 0
    for (arm, round_, kind), value in recomputed.items():
        row = run.rows[(run.rows["arm"] == arm) & (run.rows["round"] == round_) & (run.rows["metric"] == names[kind])]
        assert row["value"].tolist() == pytest.approx([value]), (arm, round_, kind)
        compared += 1
    assert compared == len(set(run.rows["arm"])) * (run.rows["round"].max() + 1) * 4


def test_fluency_and_consistency_are_round_metrics_in_their_glossary_units() -> None:
    """--fluency / --consistency: one row each per round, from generations seeded by round (arms comparable)."""
    from spectra.editing.loop import Arm
    from spectra.evaluation.consistency import fit_tfidf
    from spectra.experiments.drift import EditMetrics, GenerationMetrics, consistency_references
    from spectra.glossary import unit_of

    model = tiny_model("llama")
    records = [{"case_id": i, "requested_rewrite": {"prompt": "{} lives in", "subject": s, "relation_id": "P1",
                                                     "target_new": {"str": "paris", "id": "Q1"},
                                                     "target_true": {"str": "rome"}},
                "paraphrase_prompts": [], "neighborhood_prompts": [], "generation_prompts": [f"{s} sees"] if i else []}
               for i, s in enumerate(["alice", "bob"])]
    references = {("P1", "Q1"): ["alice lives in paris near the river", "paris is a big city"]}
    observer = GenerationMetrics(EditMetrics(records, 2, 2, seed=0), True, references, fit_tfidf(references[("P1", "Q1")]))
    first, again = (observer(Arm("off"), 1, model).rows for _ in range(2))
    assert first == again and [row["metric"] for row in first] == ["fluency", "consistency"]
    assert unit_of("fluency") == "bits x 100" and 0 < first[0]["value"] and 0 <= first[1]["value"] <= 100
    with pytest.raises(SpectraError, match="relation_id and target_new.id"):
        consistency_references("./my-model", [{"requested_rewrite": {"prompt": "{} x", "subject": "a",
                                                                     "target_new": {"str": "b"}}}])


def test_easyedit_counterfact_style_and_zsre_portability_convert_to_the_shared_shape(tmp_path) -> None:
    import json

    from spectra.data.datasets import resolve_dataset

    flat = [{"case_id": 7, "prompt": "alice lives in", "subject": "alice", "target_new": "paris", "ground_truth": "rome",
             "rephrase_prompt": "the alice lives in", "locality_prompt": "bob lives in", "locality_ground_truth": "rome"}]
    (tmp_path / "cf.json").write_text(json.dumps(flat))
    kind, (record,) = resolve_dataset(str(tmp_path / "cf.json"))
    assert kind == "easyedit" and record["case_id"] == 7 and record["requested_rewrite"]["prompt"] == "{} lives in"
    assert record["neighborhood_prompts"] == [{"prompt": "bob lives in", "target": "rome"}]
    assert record["paraphrase_prompts"] == ["the alice lives in"] and record["portability_prompts"] == []
    zsre = [{"subject": "alice", "src": "where does alice live?", "answers": ["rome"], "rephrase": "alice lives where?",
             "alt": "paris", "loc": "nq question: who is bob", "loc_ans": "a man",
             "portability": {"New Question": "which city does alice see?", "New Answer": "rome"}}]
    (tmp_path / "zsre.json").write_text(json.dumps(zsre))
    _, (converted,) = resolve_dataset(str(tmp_path / "zsre.json"))
    assert converted["portability_prompts"] == [{"prompt": "which city does alice see?", "target": "rome"}]
    (tmp_path / "bad.json").write_text(json.dumps([{**flat[0], "prompt": "he lives in"}]))
    with pytest.raises(SpectraError, match="does not contain the subject 'alice'"):
        resolve_dataset(str(tmp_path / "bad.json"))


def test_hparams_reach_drift_through_the_python_api_and_a_changed_file_cannot_resume(tmp_path) -> None:
    from spectra.experiments.drift import DriftConfig, check_same_hparams, drift_hparams
    from spectra.results import create_run

    config = DriftConfig(model="./my-model", hparams=MemitHParams(**SMALL), hparams_set=["v_lr=0.125"], seed=4)
    resolved = drift_hparams(config, defaults=None)
    assert resolved.hparams.layers == (1, 2) and resolved.hparams.v_lr == 0.125 and resolved.hparams.seed == 4
    writer = create_run("drift", config, out=tmp_path / "run", provenance={"hparams": resolved.provenance()})
    writer.checkpoint(0)
    writer.close()
    check_same_hparams(tmp_path / "run", resolved)
    changed = drift_hparams(DriftConfig(model="./my-model", hparams=MemitHParams(**SMALL), seed=4), defaults=None)
    with pytest.raises(SpectraError, match="v_lr"):
        check_same_hparams(tmp_path / "run", changed)


def test_spectra_data_shows_every_format_with_an_example() -> None:
    from typer.testing import CliRunner

    from spectra.data.datasets import FORMATS
    from spectra_cli.main import app

    result = CliRunner().invoke(app, ["data"])
    assert result.exit_code == 0, result.output
    for kind, title, example in FORMATS:
        assert title in result.output and example in result.output and len(example.splitlines()) == 3
