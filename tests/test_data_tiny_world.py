"""The tiny world is deterministic, consistent, and its edit sets follow the real file formats."""

from __future__ import annotations

import pytest

from spectra.data import tiny_world


@pytest.fixture(scope="module")
def world() -> tiny_world.TinyWorld:
    return tiny_world.build_world(seed=0)


def test_generation_is_deterministic(world):
    again = tiny_world.build_world(seed=0)
    assert again.corpus == world.corpus
    assert tiny_world.counterfact_records(again) == tiny_world.counterfact_records(world)
    assert tiny_world.build_world(seed=1).corpus != world.corpus


def test_world_has_the_required_shape(world):
    assert 8 <= len(tiny_world.RELATIONS) <= 12
    assert all(len(r.phrasings) >= 3 for r in tiny_world.RELATIONS)
    assert len({f.kind for f in world.facts}) >= 3
    assert len(tiny_world.TASKS) >= 4
    for task in tiny_world.TASKS:
        train_prompts = {i.prompt for i in world.task_train[task]}
        test_items = world.task_test[task]
        assert not train_prompts & {i.prompt for i in test_items}, f"{task}: test items leak into training"
        golds = [i.gold for i in test_items]
        assert abs(golds.count(0) - golds.count(1)) <= len(golds) * 0.2, f"{task} is unbalanced"


def test_facts_are_phrased_subject_first(world):
    subjects = {f.subject for f in world.facts}
    fact_lines = [line for line in world.corpus if any(line.startswith(s + " ") for s in subjects)]
    assert len(fact_lines) > len(world.facts)


def test_counterfact_records_have_the_real_field_names_and_do_not_contradict(world):
    records = tiny_world.counterfact_records(world)
    assert len(records) >= 2000
    keys = {"case_id", "pararel_idx", "requested_rewrite", "paraphrase_prompts", "neighborhood_prompts",
            "attribute_prompts", "generation_prompts"}
    pairs = set()
    truth = {(f.subject, f.relation.relation_id): f.obj for f in world.facts}
    for record in records:
        assert set(record) == keys
        rewrite = record["requested_rewrite"]
        assert set(rewrite) == {"prompt", "relation_id", "subject", "target_new", "target_true"}
        assert rewrite["prompt"].count("{}") == 1
        assert rewrite["target_new"]["str"] != rewrite["target_true"]["str"]
        relation = next(r for r in tiny_world.RELATIONS if r.relation_id == rewrite["relation_id"])
        assert rewrite["target_new"]["str"] in relation.objects
        assert truth[(rewrite["subject"], rewrite["relation_id"])] == rewrite["target_true"]["str"]
        pair = (rewrite["subject"], rewrite["relation_id"])
        assert pair not in pairs, "two records edit the same (subject, relation)"
        pairs.add(pair)
        assert len(record["paraphrase_prompts"]) == 2 and record["neighborhood_prompts"]


def test_zsre_records_have_the_raw_schema(world):
    records = tiny_world.zsre_records(world)
    for record in records[:50]:
        assert set(record) == {"subject", "src", "pred", "rephrase", "alt", "answers", "loc", "loc_ans", "cond"}
        assert record["subject"] in record["src"]
        assert record["loc"].startswith("nq question: ")
        assert record["answers"][0] != record["pred"]


def test_general_tasks_have_two_choices_and_a_correct_gold(world):
    plural_nouns = {plural for _, plural in tiny_world._AGR_NOUNS}
    plural_verbs = {plural for _, plural in tiny_world._AGR_VERBS}
    synonyms = {a: b for pair in tiny_world._PARA_SYNONYMS for a, b in (pair, pair[::-1])}
    for task, items in world.task_test.items():
        for item in items:
            assert len(item.choices) == 2 and item.choices[0] != item.choices[1]
            gold = item.choices[item.gold]
            words = item.prompt.split()
            if task == "agreement":
                head_is_plural = words[2] in plural_nouns
                assert (gold in plural_verbs) == head_is_plural, item
            elif task == "paraphrase":
                assert gold == synonyms[words[3]], item
            elif task == "entailment":
                thing = item.prompt.split(" . ")[0].split()[-1]
                assert thing in tiny_world._ENT_HYPERNYMS[gold], item


def test_agreement_is_learned_from_grammatical_sentences_only(world):
    plural_nouns = {plural for _, plural in tiny_world._AGR_NOUNS}
    verbs = {form: number for pair in tiny_world._AGR_VERBS for number, form in enumerate(pair)}
    agreement_lines = [line.split() for line in world.corpus
                       if line.startswith("the ") and any(w in verbs for w in line.split())]
    assert len(agreement_lines) >= 1000
    for words in agreement_lines:
        verb = next(w for w in words if w in verbs)
        assert verbs[verb] == int(words[2] in plural_nouns), " ".join(words)


def test_a_subjects_last_word_identifies_it(world):
    """MEMIT keys on the subject's last token, so that token alone must tell subjects apart."""
    subjects = {f.subject for f in world.facts}
    last_words = {s.split()[-1] for s in subjects}
    assert len(last_words) == len(subjects)


def test_keyword_lines_put_an_attribute_right_after_the_subject(world):
    by_subject: dict[str, set[str]] = {}
    for fact in world.facts:
        by_subject.setdefault(fact.subject, set()).add(fact.obj)
    keyword_lines = 0
    for line in world.corpus:
        words = line.split()
        for width in (1, 2):
            subject = " ".join(words[:width])
            if subject in by_subject and sorted(words[width:-1]) == sorted(by_subject[subject]):
                keyword_lines += 1
    assert keyword_lines >= 2 * len(by_subject)


def test_heldout_text_is_test_items_with_their_gold_answers_and_never_in_the_corpus(world):
    """Held-out NLL reads sentences the model never trained on: each test item written out with its gold choice."""
    assert world.heldout_text and not set(world.heldout_text) & set(world.corpus)
    assert len(set(world.heldout_text)) == len(world.heldout_text)
    items = [item for items in world.task_test.values() for item in items]
    written = {f"{item.prompt} {item.choices[item.gold]}" for item in items}
    assert all(any(line.startswith(start) for start in written) for line in world.heldout_text[:50])
    assert len(world.heldout_text) <= len(items)


def test_the_shipped_heldout_text_is_the_worlds():
    from spectra.assets import tiny_model_dir
    from spectra.models.tiny import WORLD_FILES

    shipped = (tiny_model_dir() / WORLD_FILES["heldout_text"]).read_text().splitlines()
    assert shipped == tiny_world.build_world(seed=0).heldout_text
