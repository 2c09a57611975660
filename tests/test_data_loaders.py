"""Dataset loaders: valid fixtures load, and every malformed record names its file, index and field."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from spectra.data import datasets
from spectra.data.counterfact import load_attribute_snippets, load_counterfact, load_known_facts, load_tfidf_stats
from spectra.data.general import load_general_items, load_task_hf_cache, load_task_jsonl, subsample
from spectra.data.records import EditRequest, MultipleChoiceItem
from spectra.data.zsre import load_zsre
from spectra.errors import SpectraError

FIXTURES = Path(__file__).parent / "fixtures"


def _write(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_counterfact_fixture_loads_and_feeds_edit_requests() -> None:
    records = load_counterfact(FIXTURES / "counterfact_small.json")
    assert [r["case_id"] for r in records] == [0, 7]
    request = EditRequest.from_counterfact(records[0])
    assert (request.filled(), request.target_new, request.target_true) == ("the capital of france is", "rome", "paris")
    assert len(load_counterfact(FIXTURES / "counterfact_small.json", limit=1)) == 1


def _del(*keys: str):
    def mutate(record: dict) -> None:
        target = record
        for key in keys[:-1]:
            target = target[key]
        del target[keys[-1]]
    return mutate


def _set(value: object, *keys: str):
    def mutate(record: dict) -> None:
        target = record
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value
    return mutate


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (_del("case_id"), "case_id"),
        (_set("7", "case_id"), "case_id"),
        (_set(0, "case_id"), "case_id"),  # duplicates record 0
        (_del("requested_rewrite"), "requested_rewrite"),
        (_set("{} and {} live in", "requested_rewrite", "prompt"), "requested_rewrite.prompt"),
        (_set("", "requested_rewrite", "subject"), "requested_rewrite.subject"),
        (_del("requested_rewrite", "target_new", "str"), "requested_rewrite.target_new.str"),
        (_set("rome", "requested_rewrite", "target_true"), "requested_rewrite.target_true"),
        (_set(64, "requested_rewrite", "target_new", "id"), "requested_rewrite.target_new.id"),
        (_set("a b", "paraphrase_prompts"), "paraphrase_prompts"),
        (_set(["ok", 3], "neighborhood_prompts"), "neighborhood_prompts[1]"),
        (_set([""], "generation_prompts"), "generation_prompts[0]"),
    ],
)
def test_malformed_counterfact_record_names_file_index_and_field(tmp_path: Path, mutate, field: str) -> None:
    records = json.loads((FIXTURES / "counterfact_small.json").read_text())
    mutate(records[1])
    path = _write(tmp_path / "bad_cf.json", records)
    with pytest.raises(SpectraError) as err:
        load_counterfact(path)
    message = str(err.value)
    assert str(path) in message and "record 1" in message and f"'{field}'" in message


def test_missing_and_truncated_files_say_where_to_put_them(tmp_path: Path) -> None:
    with pytest.raises(SpectraError, match="does not exist.*SPECTRA_DATA"):
        load_counterfact(tmp_path / "multi_counterfact.json")
    truncated = tmp_path / "zsre_mend_eval.json"
    truncated.write_text((FIXTURES / "zsre_small.json").read_text()[:200])
    with pytest.raises(SpectraError, match="not valid JSON.*zsre_mend_eval.json"):
        load_zsre(truncated)
    with pytest.raises(SpectraError, match="JSON list"):
        load_counterfact(_write(tmp_path / "dict.json", {"case_id": 0}))


def test_zsre_conversion_follows_mendqa_semantics() -> None:
    records = load_zsre(FIXTURES / "zsre_small.json")
    first = records[0]
    assert first["case_id"] == 0
    assert first["requested_rewrite"]["prompt"] == "where does {} live ?"
    assert first["requested_rewrite"]["target_new"] == {"str": "rome city"}
    assert first["paraphrase_prompts"] == ["ann lives"]
    assert first["neighborhood_prompts"] == [{"prompt": "nq question: who is bob?", "target": "rome"}]
    request = EditRequest.from_counterfact(first)
    assert (request.filled(), request.target_new, request.target_true) == ("where does ann live ?", "rome city", None)


def test_zsre_alt_target_skips_records_without_alt() -> None:
    records = load_zsre(FIXTURES / "zsre_small.json", target="alt")
    assert [r["case_id"] for r in records] == [0]
    assert records[0]["requested_rewrite"]["target_new"] == {"str": "berlin"}
    assert records[0]["requested_rewrite"]["target_true"] == {"str": "rome city"}
    with pytest.raises(SpectraError, match="Unknown zsRE target"):
        load_zsre(FIXTURES / "zsre_small.json", target="pred")


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (_set("where does he live ?", "src"), "src"),
        (_set([], "answers"), "answers"),
        (_set(["ok", 1], "answers"), "answers[1]"),
        (_set("who is bob", "loc"), "loc"),
        (_del("loc_ans"), "loc_ans"),
        (_del("rephrase"), "rephrase"),
    ],
)
def test_malformed_zsre_record_names_file_index_and_field(tmp_path: Path, mutate, field: str) -> None:
    records = json.loads((FIXTURES / "zsre_small.json").read_text())
    mutate(records[1])
    path = _write(tmp_path / "bad_zsre.json", records)
    with pytest.raises(SpectraError) as err:
        load_zsre(path)
    message = str(err.value)
    assert str(path) in message and "record 1" in message and f"'{field}'" in message


def test_resolve_dataset_by_name_path_and_tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPECTRA_DATA", str(tmp_path))
    with pytest.raises(SpectraError, match="multi_counterfact.json or .*counterfact.json"):
        datasets.resolve_dataset("counterfact", "gpt2")
    cf = json.loads((FIXTURES / "counterfact_small.json").read_text())
    _write(tmp_path / "counterfact.json", cf)
    assert datasets.resolve_dataset("counterfact", "gpt2")[1][1]["case_id"] == 7
    mcf = copy.deepcopy(cf[:1])
    _write(tmp_path / "multi_counterfact.json", mcf)
    kind, records = datasets.resolve_dataset("auto", "gpt2")
    assert (kind, len(records)) == ("counterfact", 1)
    kind, records = datasets.resolve_dataset(str(FIXTURES / "zsre_small.json"), "gpt2", limit=1)
    assert (kind, records[0]["requested_rewrite"]["subject"]) == ("zsre", "ann")
    with pytest.raises(SpectraError, match="neither a dataset name"):
        datasets.resolve_dataset("nonsense", "gpt2")
    with pytest.raises(SpectraError, match="Cannot tell the format"):
        datasets.resolve_dataset(str(_write(tmp_path / "odd.json", [{"x": 1}])), "gpt2")
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    _write(tiny / "counterfact.json", cf)
    _write(tiny / "zsre.json", json.loads((FIXTURES / "zsre_small.json").read_text()))
    monkeypatch.setattr("spectra.assets.tiny_model_dir", lambda: tiny)
    assert datasets.resolve_dataset("auto", "tiny")[0] == "counterfact"
    assert datasets.resolve_dataset("tiny-zsre", "tiny")[0] == "zsre"


def test_local_data_lists_exact_names_and_presence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPECTRA_DATA", str(tmp_path))
    (tmp_path / "zsre_mend_eval.json").write_text("[]")
    monkeypatch.setattr("spectra.assets.tiny_model_dir", lambda: tmp_path / "tiny")
    status = {s.file.name: s for s in datasets.local_data()}
    assert status["zsre"].present and not status["mcf"].present and not status["tiny"].present
    assert status["cf"].path == tmp_path / "counterfact.json"
    assert status["tiny-zsre"].path == tmp_path / "tiny" / "zsre.json"
    assert str(tmp_path) in datasets.where_to_put() and "attribute_snippets.json" in datasets.where_to_put()


def test_auxiliary_counterfact_files(tmp_path: Path) -> None:
    import numpy as np

    snippets = [
        {"relation_id": "P36", "target_id": "Q220", "samples": [{"name": "x", "text": "rome is a city"}]},
        {"relation_id": "P36", "target_id": "Q220", "samples": [{"name": "y", "text": "rome in italy"}]},
    ]
    assert load_attribute_snippets(_write(tmp_path / "s.json", snippets)) == {
        ("P36", "Q220"): ["rome is a city", "rome in italy"]
    }
    np.save(tmp_path / "idf.npy", np.array([1.0, 2.0]))
    vocab, idf = load_tfidf_stats(tmp_path / "idf.npy", _write(tmp_path / "v.json", {"rome": 0, "city": 1}))
    assert vocab == {"rome": 0, "city": 1} and idf.tolist() == [1.0, 2.0]
    with pytest.raises(SpectraError, match="same fit"):
        load_tfidf_stats(tmp_path / "idf.npy", _write(tmp_path / "v3.json", {"a": 0, "b": 1, "c": 2}))
    known = [{"template": "{} is located in the continent", "subject": "Vinson Massif"}]
    assert load_known_facts(_write(tmp_path / "k.json", known)) == [("{} is located in the continent", "Vinson Massif")]


def test_glue_jsonl_items_and_rte_label_direction() -> None:
    sst = load_task_jsonl("sst2", FIXTURES / "sst2.jsonl", n_items=None)
    assert len(sst) == 5 and sst[0].choices == ("negative", "positive")
    assert {item.prompt: item.gold for item in sst}["Review :dull and far too long\nSentiment :"] == 0
    rte = load_task_jsonl("rte", FIXTURES / "rte.jsonl", n_items=None)
    gold = {item.prompt.split("\n")[0]: item.gold for item in rte}
    assert gold == {"Ann lives in Rome.": 1, "Bob has a cat.": 0}  # entailment -> "True" (index 1)
    inverted = load_task_jsonl("rte", FIXTURES / "rte.jsonl", n_items=None, compat="alphaedit")
    assert {item.prompt.split("\n")[0]: item.gold for item in inverted} == {"Ann lives in Rome.": 0, "Bob has a cat.": 1}
    mmlu = load_task_jsonl("mmlu", FIXTURES / "mmlu.jsonl", n_items=None)
    first = next(item for item in mmlu if "2 + 2" in item.prompt)
    assert first.prompt == "Question: What is 2 + 2?\n(A) 3\n(B) 4\n(C) 5\n(D) 22\nAnswer:" and first.gold == 1
    assert sorted(item.gold for item in mmlu) == [0, 1]


def test_glue_jsonl_errors(tmp_path: Path) -> None:
    bad = tmp_path / "cola.jsonl"
    bad.write_text('{"sentence": "ok", "label": 1}\n{"sentence": "ok", "label": 5}\n')
    with pytest.raises(SpectraError, match=r"record 1 is malformed: field 'label'"):
        load_task_jsonl("cola", bad)
    bad.write_text('{"sentence": "ok", "label": 1}\n{"sentence": \n')
    with pytest.raises(SpectraError, match="line 2 is not valid JSON"):
        load_task_jsonl("cola", bad)
    with pytest.raises(SpectraError, match="Unknown general-ability task"):
        load_task_jsonl("squad", bad)


def test_subsample_is_balanced_interleaved_and_seeded() -> None:
    items = [MultipleChoiceItem("t", f"p{i}", ("a", "b"), int(i < 30)) for i in range(100)]
    picked = subsample(items, 10, seed=3)
    assert [item.gold for item in picked] == [0, 1] * 5
    assert picked == subsample(items, 10, seed=3) and picked != subsample(items, 10, seed=4)


def test_hf_cache_without_datasets_is_a_clear_error() -> None:
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(SpectraError, match="needs the `datasets` package"):
            load_task_hf_cache("sst2")
    else:
        pytest.skip("datasets is installed here")


def test_general_items_file(tmp_path: Path) -> None:
    tasks = load_general_items(FIXTURES / "general_items.json")
    assert {name: len(items) for name, items in tasks.items()} == {"capitals": 3, "three": 1}
    assert tasks["three"][0] == MultipleChoiceItem("three", "the capital of italy is", ("berlin", "rome", "paris"), 2)
    bad = json.loads((FIXTURES / "general_items.json").read_text())
    bad[2]["gold"] = 2
    path = _write(tmp_path / "items.json", bad)
    with pytest.raises(SpectraError, match=r"record 2 is malformed: field 'gold'"):
        load_general_items(path)
