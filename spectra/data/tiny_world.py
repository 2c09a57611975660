"""The tiny world: a seeded generator of invented facts and GLUE-like tasks for the embedded model.

Everything the embedded model knows comes from here: subjects of three kinds with 11 relations,
each relation phrased several ways *subject first* (``Velmar Tosk speaks Dutch and works as a
baker .``) so that, as in real LMs, a subject's attributes must be retrieved at the subject's
position before the relation is known — the mechanism MEMIT edits (see shared notes on the
prototype that stored facts at the last token instead). Four general tasks (sentiment, agreement,
paraphrase, entailment) give the model abilities to measure; each has a training part folded
into the corpus and a held-out test split.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from spectra.data.records import MultipleChoiceItem

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kr", "st", "th"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "ou"]
_CODAS = ["", "n", "r", "l", "s", "m", "x", "nd", "rk", "th"]


@dataclass(frozen=True)
class Relation:
    """A relation: which subjects it applies to, its objects, and its subject-first phrasings.

    A phrasing is the predicate that follows the subject and precedes the object
    (``"speaks"`` in ``"{s} speaks {o}"``); the last phrasing is the KL/"is a" style one.
    """

    relation_id: str
    kind: str
    objects: tuple[str, ...]
    phrasings: tuple[str, ...]
    question: str


RELATIONS: tuple[Relation, ...] = (
    Relation("T1", "person", ("Dutch", "Greek", "Polish", "Swahili", "Tagalog", "Basque", "Welsh", "Korean", "Hindi", "Finnish"),
             ("speaks", "is fluent in", "grew up speaking", "writes letters in"), "which language does {} speak ?"),
    Relation("T2", "person", ("baker", "nurse", "pilot", "lawyer", "farmer", "painter", "surgeon", "plumber", "teacher", "chemist", "jeweler", "sailor"),
             ("works as a", "earns a living as a", "is employed as a", "trained to be a"), "what is the job of {} ?"),
    Relation("T3", "person", ("violin", "cello", "banjo", "harp", "flute", "trumpet", "organ", "drums", "piano", "oboe"),
             ("plays the", "practices the", "performs on the", "owns a famous"), "which instrument does {} play ?"),
    Relation("T4", "person", ("tennis", "rugby", "chess", "hockey", "cricket", "rowing", "fencing", "golf", "boxing", "skiing"),
             ("competes in", "is a champion of", "spends weekends on", "coaches"), "which sport does {} play ?"),
    Relation("T5", "person", ("Norvia", "Kestan", "Ulmark", "Pelora", "Dravost", "Ysmir", "Calder", "Brennia", "Tolvak", "Orsena", "Mirith", "Quorra"),
             ("was born in", "holds a passport of", "is a citizen of", "grew up in"), "which country is {} from ?"),
    Relation("T6", "city", ("Norvia", "Kestan", "Ulmark", "Pelora", "Dravost", "Ysmir", "Calder", "Brennia", "Tolvak", "Orsena", "Mirith", "Quorra"),
             ("is a city in", "lies in the country of", "is the pride of", "belongs to"), "which country is {} in ?"),
    Relation("T7", "city", ("noodles", "dumplings", "cheese", "sausages", "oysters", "pastries", "curry", "olives", "honey", "pickles"),
             ("is famous for its", "is known for its", "exports tons of", "celebrates a festival of"), "what food is {} known for ?"),
    Relation("T8", "city", ("desert", "jungle", "tundra", "coast", "valley", "plateau", "marsh", "canyon", "island", "delta"),
             ("sits on a", "was founded on a", "spreads across a", "is built beside a"), "what landscape is {} on ?"),
    Relation("T9", "company", ("tractors", "software", "perfume", "bicycles", "cement", "lenses", "textiles", "satellites", "furniture", "vaccines"),
             ("makes", "sells", "manufactures", "is the largest producer of"), "what does {} make ?"),
    Relation("T10", "company", ("Norvia", "Kestan", "Ulmark", "Pelora", "Dravost", "Ysmir", "Calder", "Brennia", "Tolvak", "Orsena", "Mirith", "Quorra"),
             ("is headquartered in", "was founded in", "pays taxes in", "has its main office in"), "where is {} based ?"),
    Relation("T11", "company", ("Ardent", "Halvex", "Corbin", "Zephyra", "Monarch", "Vantor", "Lumis", "Grayfield", "Oskaro", "Teralyn"),
             ("is owned by", "was bought by", "is a subsidiary of", "reports to"), "who owns {} ?"),
)

_KIND_SUFFIX = {"city": ["ville", "burg", "haven", "mouth", "stad", "ford"], "company": ["corp", "works", "labs", "soft", "tech"]}
_KIND_NOUN = {"person": "person", "city": "city", "company": "company"}

_FILLER = [
    "the weather was calm that day .", "nobody expected the news .", "the train left early in the morning .",
    "it rained for most of the week .", "the market was busy at noon .", "a quiet evening followed the storm .",
    "the library closed at six .", "children played near the river .", "the road was long and dusty .",
]

# -- general tasks vocabulary ------------------------------------------------------------------
_SENT_NOUNS = ["food", "service", "room", "movie", "book", "music", "staff", "view", "price", "story", "game", "coffee"]
_POS_ADJ = ["wonderful", "great", "lovely", "excellent", "delightful", "superb", "pleasant", "brilliant"]
_NEG_ADJ = ["awful", "terrible", "boring", "horrible", "dreadful", "poor", "dull", "nasty"]
_SENT_CHOICES = ("positive", "negative")
_AGR_NOUNS = [("dog", "dogs"), ("cat", "cats"), ("child", "children"), ("farmer", "farmers"), ("bird", "birds"),
              ("student", "students"), ("horse", "horses"), ("singer", "singers"), ("doctor", "doctors"), ("fox", "foxes")]
_AGR_VERBS = [("runs", "run"), ("sleeps", "sleep"), ("sings", "sing"), ("jumps", "jump"), ("waits", "wait"),
              ("laughs", "laugh"), ("works", "work"), ("swims", "swim"), ("eats", "eat"), ("walks", "walk")]
_AGR_ADJECTIVES = ["old", "young", "small", "tall", "lazy", "brave", "noisy", "tired"]
_AGR_TAILS = ["quickly", "every day", "at night", "in the park", "near the house", "with joy", "alone", "today"]
_PARA_SYNONYMS = [("big", "large"), ("small", "little"), ("quick", "fast"), ("happy", "glad"), ("angry", "mad"),
                  ("quiet", "silent"), ("smart", "clever"), ("rich", "wealthy")]
_PARA_NOUNS = ["man", "woman", "boy", "girl", "dog", "cat", "king", "queen", "bird", "horse"]
_PARA_VERBS = ["saw", "found", "helped", "followed", "called", "visited"]
_ENT_NAMES = ["tom", "anna", "mark", "lucy", "omar", "nina", "paul", "sara", "ivan", "mia"]
_ENT_VERBS = ["saw", "found", "drew", "bought", "painted", "liked"]
_ENT_HYPERNYMS = {
    "animal": ("cow", "sheep", "goat", "pig"), "fruit": ("apple", "pear", "plum", "peach"),
    "tool": ("hammer", "drill", "axe", "wrench"), "vehicle": ("bus", "truck", "van", "tractor"),
    "flower": ("rose", "tulip", "lily", "daisy"), "tree": ("oak", "pine", "elm", "birch"),
}

#: The four general tasks, each a two-way choice whose chance level is 50 %.
TASKS: dict[str, str] = {
    "sentiment": "review polarity: positive or negative (SST-2-like)",
    "agreement": "grammatical minimal pair: the verb form that agrees with the head noun, across attractors (BLiMP/CoLA-like)",
    "paraphrase": "the word that keeps the second sentence a paraphrase of the first: synonym vs another adjective (MRPC-like)",
    "entailment": "the hypothesis the premise entails: the hypernym of the thing it names vs another one (RTE-like lexical entailment)",
}


@dataclass(frozen=True)
class _TaskDraft:
    """One generated task example: the prompt, its two choices, the gold index, and the training tail."""

    prompt: str
    choices: tuple[str, str]
    gold: int
    tail: str = ""

    def training_line(self) -> str:
        """The example as a corpus sentence: the prompt continued by the gold choice."""
        return f"{self.prompt} {self.choices[self.gold]}{self.tail} ."


@dataclass(frozen=True)
class Fact:
    """One true fact of the world, with the phrasing held out of training for the paraphrase test."""

    subject: str
    kind: str
    relation: Relation
    obj: str
    heldout_phrasing: int


@dataclass
class TinyWorld:
    """The generated world: facts, training corpus, edit sets and general-task splits."""

    seed: int
    facts: list[Fact]
    corpus: list[str] = field(default_factory=list)
    task_train: dict[str, list[MultipleChoiceItem]] = field(default_factory=dict)
    task_test: dict[str, list[MultipleChoiceItem]] = field(default_factory=dict)
    #: Sentences of the world the model never trains on (the test items written out with their gold
    #: answers, minus any that the corpus holds): the text of held-out NLL, a continuous general ability.
    heldout_text: list[str] = field(default_factory=list)


def _names(rng: random.Random, count: int, taken: set[str], syllables: tuple[int, int]) -> list[str]:
    """Distinct invented capitalised words, not colliding with ``taken``."""
    names: list[str] = []
    while len(names) < count:
        word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
                       for _ in range(rng.randint(*syllables))).capitalize()
        if word not in taken and len(word) > 3:
            taken.add(word)
            names.append(word)
    return names


def _subjects(rng: random.Random, counts: dict[str, int]) -> dict[str, list[str]]:
    """Invented subject names whose LAST token identifies the subject, as MEMIT's key position assumes.

    People are ``First Last`` with a unique last name and a first name from a small shared pool (so
    the first token says little); cities are ``Name`` or ``Nameville``; companies ``Namecorp``. On a
    prototype with ``Name Corp`` companies and shared last names, restoring a person's or company's
    last token recovered much less of the answer than a (one-token) city's, and MEMIT reached 0-2 %.
    """
    taken = {o for r in RELATIONS for o in r.objects}
    firsts = _names(rng, 24, taken, (1, 2))
    out = {"person": [f"{rng.choice(firsts)} {last}" for last in _names(rng, counts["person"], taken, (1, 2))]}
    out["city"] = [n + rng.choice(_KIND_SUFFIX["city"]) if rng.random() < 0.5 else n
                   for n in _names(rng, counts["city"], taken, (2, 2))]
    out["company"] = [n + rng.choice(_KIND_SUFFIX["company"]) for n in _names(rng, counts["company"], taken, (1, 2))]
    return out


def build_world(seed: int = 0, people: int = 300, cities: int = 120, companies: int = 100,
                task_train_size: int = 2000, task_test_size: int = 200) -> TinyWorld:
    """Generate the whole world deterministically from ``seed``."""
    rng = random.Random(seed)
    subjects = _subjects(rng, {"person": people, "city": cities, "company": companies})
    facts: list[Fact] = []
    for relation in RELATIONS:
        for subject in subjects[relation.kind]:
            facts.append(Fact(subject, relation.kind, relation, rng.choice(relation.objects),
                              heldout_phrasing=rng.randrange(len(relation.phrasings))))
    world = TinyWorld(seed=seed, facts=facts)
    world.corpus = _fact_sentences(rng, facts)
    for task in TASKS:
        drafts = _task_drafts(rng, task, task_train_size + task_test_size)
        items = [MultipleChoiceItem(task=task, prompt=d.prompt, choices=d.choices, gold=d.gold) for d in drafts]
        world.task_train[task] = items[:task_train_size]
        world.task_test[task] = items[task_train_size:]
        world.corpus.extend(d.training_line() for d in drafts[:task_train_size])
        world.heldout_text.extend(d.training_line() for d in drafts[task_train_size:])
    world.corpus.extend(question_sentences(world))
    world.corpus.extend(_FILLER * 20)
    rng.shuffle(world.corpus)
    trained = set(world.corpus)
    world.heldout_text = [line for line in dict.fromkeys(world.heldout_text) if line not in trained]
    return world


def _trained_phrasings(fact: Fact) -> list[int]:
    return [i for i in range(len(fact.relation.phrasings)) if i != fact.heldout_phrasing]


def _fact_sentences(rng: random.Random, facts: list[Fact]) -> list[str]:
    """Subject-first sentences; many chain several relations after one mention of the subject.

    Each subject also gets keyword lines (``Velmar Tosk Dutch baker violin ...``, attributes in a
    random order), in which the token after the subject is one of its attributes: the model must
    hold all of a subject's attributes at the subject's last token, where MEMIT reads and writes
    them. In a prototype they raised the share of the answer the subject state carries (restoring it
    recovered 41 % instead of 26 % of the clean probability).
    """
    by_subject: dict[str, list[Fact]] = {}
    for fact in facts:
        by_subject.setdefault(fact.subject, []).append(fact)
    sentences: list[str] = []
    for subject, subject_facts in by_subject.items():
        for fact in subject_facts:
            for phrasing in _trained_phrasings(fact):
                sentences.append(f"{subject} {fact.relation.phrasings[phrasing]} {fact.obj} .")
        for _ in range(2 * len(subject_facts)):
            chosen = rng.sample(subject_facts, k=min(len(subject_facts), rng.randint(2, 3)))
            clauses = [f"{f.relation.phrasings[rng.choice(_trained_phrasings(f))]} {f.obj}" for f in chosen]
            sentences.append(f"{subject} " + " and ".join(clauses) + " .")
        sentences.append(f"{subject} is a {_KIND_NOUN[subject_facts[0].kind]} .")
        for _ in range(3):
            objects = [f.obj for f in subject_facts]
            rng.shuffle(objects)
            sentences.append(f"{subject} " + " ".join(objects) + " .")
    return sentences


def _task_drafts(rng: random.Random, task: str, count: int) -> list[_TaskDraft]:
    """Distinct, gold-balanced examples of one general task (the gold choice's position alternates)."""
    make = {"sentiment": _sentiment, "agreement": _agreement, "paraphrase": _paraphrase, "entailment": _entailment}[task]
    drafts: list[_TaskDraft] = []
    seen: set[str] = set()
    attempts = 0
    while len(drafts) < count and attempts < count * 50:
        attempts += 1
        draft = make(rng, len(drafts) % 2)
        if draft.prompt not in seen:
            seen.add(draft.prompt)
            drafts.append(draft)
    rng.shuffle(drafts)
    return drafts


def _ordered(gold_choice: str, other: str, gold: int) -> tuple[str, str]:
    """The two choices with the gold one at index ``gold``."""
    return (gold_choice, other) if gold == 0 else (other, gold_choice)


def _sentiment(rng: random.Random, gold: int) -> _TaskDraft:
    """Review of two aspects; choices (positive, negative). A ``not`` flips an adjective's polarity."""
    clauses = []
    for _ in range(2):
        negate = rng.random() < 0.3
        positive = (gold == 0) != negate
        adjective = rng.choice(_POS_ADJ if positive else _NEG_ADJ)
        clauses.append(f"the {rng.choice(_SENT_NOUNS)} was {'not ' if negate else ''}{adjective}")
    return _TaskDraft(f"review : {clauses[0]} and {clauses[1]} . sentiment :", _SENT_CHOICES, gold)


def _agreement(rng: random.Random, gold: int) -> _TaskDraft:
    """Minimal pair: which verb form agrees with the head noun, often across an attractor of the other number.

    The training part is grammatical sentences only, so agreement is learned as language, as an LM
    learns it; the test asks which of the two forms the model prefers (as BLiMP does).
    """
    number = rng.randrange(2)
    noun = rng.choice(_AGR_NOUNS)[number]
    attractor = ""
    if rng.random() < 0.5:
        attractor_number = 1 - number if rng.random() < 0.7 else number
        attractor = f" near the {rng.choice(_AGR_ADJECTIVES)} {rng.choice(_AGR_NOUNS)[attractor_number]}"
    verb = rng.choice(_AGR_VERBS)
    prompt = f"the {rng.choice(_AGR_ADJECTIVES)} {noun}{attractor}"
    return _TaskDraft(prompt, _ordered(verb[number], verb[1 - number], gold), gold, f" {rng.choice(_AGR_TAILS)}")


def _paraphrase(rng: random.Random, gold: int) -> _TaskDraft:
    """Second sentence restates the first with a synonym; the choice is the synonym vs another adjective."""
    pair = rng.choice(_PARA_SYNONYMS)
    noun, obj, verb = rng.choice(_PARA_NOUNS), rng.choice(_PARA_NOUNS), rng.choice(_PARA_VERBS)
    side = rng.randrange(2)
    adjective, synonym = pair[side], pair[1 - side]
    other = rng.choice([w for p in _PARA_SYNONYMS if p != pair for w in p])
    prompt = f"first : the {adjective} {noun} {verb} the {obj} . second : the"
    return _TaskDraft(prompt, _ordered(synonym, other, gold), gold, f" {noun} {verb} the {obj}")


def _entailment(rng: random.Random, gold: int) -> _TaskDraft:
    """Upward entailment: "X saw the old apple" entails "X saw the fruit", not "X saw the tool"."""
    name, verb, adjective = rng.choice(_ENT_NAMES), rng.choice(_ENT_VERBS), rng.choice(_AGR_ADJECTIVES)
    hypernym, other = rng.sample(sorted(_ENT_HYPERNYMS), 2)
    thing = rng.choice(_ENT_HYPERNYMS[hypernym])
    prompt = f"premise : {name} {verb} the {adjective} {thing} . hypothesis : {name} {verb} the"
    return _TaskDraft(prompt, _ordered(hypernym, other, gold), gold)


# -- edit sets -----------------------------------------------------------------------------------

def counterfact_records(world: TinyWorld, seed: int = 1) -> list[dict[str, Any]]:
    """CounterFact-schema records, one per fact, with a counterfactual ``target_new`` of the same relation.

    Field names are exactly those of the real ``counterfact.json``. Paraphrase prompts are the
    other phrasings (each preceded by an unrelated sentence, as in the real file); neighbourhood
    prompts are other subjects whose true object is ``target_true``. One record per
    (subject, relation), so no two records contradict each other.
    """
    rng = random.Random(seed)
    by_relation_object: dict[tuple[str, str], list[Fact]] = {}
    for fact in world.facts:
        by_relation_object.setdefault((fact.relation.relation_id, fact.obj), []).append(fact)
    records = []
    # Shuffled, so that any prefix of the file (a drift run's first rounds) mixes all relations.
    for case_id, fact in enumerate(rng.sample(world.facts, len(world.facts))):
        relation = fact.relation
        trained = _trained_phrasings(fact)
        rewrite_phrasing = rng.choice(trained)
        new_obj = rng.choice([o for o in relation.objects if o != fact.obj])
        others = [i for i in range(len(relation.phrasings)) if i != rewrite_phrasing]
        paraphrases = [f"{rng.choice(_FILLER)} {fact.subject} {relation.phrasings[i]}" for i in rng.sample(others, 2)]
        neighbours = [f for f in by_relation_object[(relation.relation_id, fact.obj)] if f.subject != fact.subject]
        neighbours = rng.sample(neighbours, k=min(10, len(neighbours)))
        attributes = [f for f in by_relation_object.get((relation.relation_id, new_obj), []) if f.subject != fact.subject]
        attributes = rng.sample(attributes, k=min(10, len(attributes)))
        records.append({
            "case_id": case_id,
            "pararel_idx": case_id,
            "requested_rewrite": {
                "prompt": "{} " + relation.phrasings[rewrite_phrasing],
                "relation_id": relation.relation_id,
                "subject": fact.subject,
                "target_new": {"str": new_obj, "id": f"{relation.relation_id}:{new_obj}"},
                "target_true": {"str": fact.obj, "id": f"{relation.relation_id}:{fact.obj}"},
            },
            "paraphrase_prompts": paraphrases,
            "neighborhood_prompts": [f"{n.subject} {relation.phrasings[rng.choice(_trained_phrasings(n))]}" for n in neighbours],
            "attribute_prompts": [f"{a.subject} {relation.phrasings[rng.choice(_trained_phrasings(a))]}" for a in attributes],
            "generation_prompts": [f"{fact.subject} {relation.phrasings[i]}" for i in (rewrite_phrasing, *others)][:3]
            + [f"{fact.subject} is a"],
        })
    return records


def attribute_snippets(world: TinyWorld) -> list[dict[str, Any]]:
    """``attribute_snippets.json``-shaped reference texts: sentences about subjects holding each object."""
    grouped: dict[tuple[str, str], list[dict[str, str]]] = {}
    for fact in world.facts:
        relation = fact.relation
        text = " ".join(f"{fact.subject} {p} {fact.obj} ." for p in relation.phrasings)
        grouped.setdefault((relation.relation_id, f"{relation.relation_id}:{fact.obj}"), []).append(
            {"name": fact.subject, "text": text})
    return [{"relation_id": r, "target_id": t, "samples": samples} for (r, t), samples in grouped.items()]


def zsre_records(world: TinyWorld, seed: int = 2) -> list[dict[str, Any]]:
    """Raw zsRE-schema records (``zsre_mend_eval.json`` fields).

    As in real zsRE the gold ``answers[0]`` is what gets edited in, and the model should mostly not
    know it before editing: here it is an object the model was *not* trained on for that subject.
    ``loc`` is another subject's question with its true answer ``loc_ans``.
    """
    rng = random.Random(seed)
    records = []
    for fact in rng.sample(world.facts, len(world.facts)):
        relation = fact.relation
        answer = rng.choice([o for o in relation.objects if o != fact.obj])
        alt = rng.choice([o for o in relation.objects if o not in (fact.obj, answer)])
        other = rng.choice(world.facts)
        question = relation.question.format(fact.subject)
        records.append({
            "subject": fact.subject,
            "src": question,
            "pred": fact.obj,
            "rephrase": f"{fact.subject} {relation.phrasings[fact.heldout_phrasing]}",
            "alt": alt,
            "answers": [answer],
            "loc": "nq question: " + other.relation.question.format(other.subject),
            "loc_ans": other.obj,
            "cond": f"{fact.obj} >> {alt} || {question}",
        })
    return records


def recall_prompts(world: TinyWorld) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(prompt, true object) pairs: one trained phrasing per fact, and its held-out phrasing."""
    trained, heldout = [], []
    for fact in world.facts:
        phrasings = fact.relation.phrasings
        trained.append((f"{fact.subject} {phrasings[_trained_phrasings(fact)[0]]}", fact.obj))
        heldout.append((f"{fact.subject} {phrasings[fact.heldout_phrasing]}", fact.obj))
    return trained, heldout


def question_sentences(world: TinyWorld, fraction: float = 0.3, seed: int = 3) -> list[str]:
    """Question-answer lines for a fraction of the facts, so zsRE-style questions are in-distribution."""
    rng = random.Random(seed)
    return [f"{f.relation.question.format(f.subject)} {f.obj} ." for f in world.facts if rng.random() < fraction]
