"""Edit datasets by name or path: where each file is expected, what is present, and loading one."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from spectra.data.counterfact import COUNTERFACT_HOST, read_json, records_list, validate_counterfact
from spectra.data.easyedit import CORE_FIELDS, convert_easyedit, is_easyedit
from spectra.data.zsre import ZsreTarget, convert_zsre
from spectra import assets
from spectra.errors import SpectraError

DatasetKind = Literal["counterfact", "zsre", "easyedit"]


@dataclass(frozen=True)
class DataFile:
    """A file spectra can use, under its exact name, and what it is for."""

    name: str
    filename: str
    kind: str
    purpose: str


#: Files looked up in the data directory, in order of preference for each dataset name.
DATA_FILES: tuple[DataFile, ...] = (
    DataFile("mcf", "multi_counterfact.json", "counterfact", "MultiCounterFact: sequential/batch editing (REVIVE, AlphaEdit)"),
    DataFile("cf", "counterfact.json", "counterfact", "CounterFact: single edits (ROME)"),
    DataFile("zsre", "zsre_mend_eval.json", "zsre", "zsRE, MEND eval split (19,086 records)"),
    DataFile("snippets", "attribute_snippets.json", "auxiliary", "Consistency reference texts"),
    DataFile("idf", "idf.npy", "auxiliary", "Consistency TF-IDF weights"),
    DataFile("tfidf_vocab", "tfidf_vocab.json", "auxiliary", "Consistency TF-IDF vocabulary"),
    DataFile("known", "known_1000.json", "auxiliary", "factual prompts for representation probes"),
)

#: Dataset names users type, and the data files they try in order (``counterfact`` prefers MCF, which the
#: sequential protocol needs: it has no two records that contradict each other).
DATASET_NAMES: dict[str, tuple[str, ...]] = {
    "counterfact": ("multi_counterfact.json", "counterfact.json"),
    "mcf": ("multi_counterfact.json",),
    "cf": ("counterfact.json",),
    "zsre": ("zsre_mend_eval.json",),
}


def data_dir() -> Path:
    """The data directory: ``$SPECTRA_DATA`` if set, else ``~/.cache/spectra/data``."""
    configured = os.environ.get("SPECTRA_DATA")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "spectra" / "data"


def _tiny_file(filename: str) -> Path:
    """A file of the embedded tiny world."""
    return assets.tiny_model_dir() / filename


@dataclass(frozen=True)
class DataStatus:
    """Whether one data file is present locally, and where it was looked for."""

    file: DataFile
    path: Path
    present: bool


#: The tiny world's edit sets, shipped with the embedded model (dataset names ``tiny`` and ``tiny-zsre``).
TINY_FILES: tuple[DataFile, ...] = (
    DataFile("tiny", "counterfact.json", "counterfact", "tiny world, CounterFact format (ships with the tiny model)"),
    DataFile("tiny-zsre", "zsre.json", "zsre", "tiny world, zsRE format (ships with the tiny model)"),
)


def local_data() -> list[DataStatus]:
    """Every file spectra can use, with the exact path it is expected at and whether it is there."""
    directory = data_dir()
    found = [DataStatus(f, directory / f.filename, (directory / f.filename).is_file()) for f in DATA_FILES]
    return found + [DataStatus(f, _tiny_file(f.filename), _tiny_file(f.filename).is_file()) for f in TINY_FILES]


def where_to_put() -> str:
    """One paragraph telling the user where data files go and where they come from."""
    return (
        f"spectra never downloads datasets. Put the files, under exactly these names, into {data_dir()} "
        f"(or set SPECTRA_DATA to another directory): {', '.join(f.filename for f in DATA_FILES)}. They are "
        f"published at {COUNTERFACT_HOST}. The tiny world's files ship with the embedded model."
    )


#: Every edit-set format spectra reads, with a three-line example record each (shown by ``spectra data``).
FORMATS: tuple[tuple[str, str, str], ...] = (
    ("counterfact", "CounterFact / MultiCounterFact (ROME, MEMIT, AlphaEdit)",
     '{"case_id": 0, "requested_rewrite": {"prompt": "{} plays the", "subject": "Miles Davis",\n'
     ' "target_new": {"str": "violin"}, "target_true": {"str": "trumpet"}},\n'
     ' "paraphrase_prompts": ["Miles Davis is known for the"], "neighborhood_prompts": ["Chet Baker plays the"]}'),
    ("zsre", "zsRE, MEND split (edit target: answers[0]; EasyEdit's portability is read too)",
     '{"subject": "Epaspidoceras", "src": "Which family does Epaspidoceras belong to?",\n'
     ' "answers": ["Aspidoceratidae"], "rephrase": "What family are Epaspidoceras?",\n'
     ' "loc": "nq question: who wrote hamlet", "loc_ans": "William Shakespeare", "alt": "Noctuidae"}'),
    ("easyedit", "EasyEdit / KnowEdit, CounterFact-style (EasyEdit's counterfact files)",
     '{"subject": "Miles Davis", "prompt": "Miles Davis plays the", "target_new": "violin",\n'
     ' "ground_truth": "trumpet", "rephrase_prompt": "Miles Davis is known for the",\n'
     ' "locality_prompt": "Chet Baker plays the", "locality_ground_truth": "trumpet"}'),
    ("easyedit", "EasyEdit / KnowEdit, zsRE-style (KnowEdit's ZsRE, wiki_counterfact, wiki_recent)",
     '{"subject": "Epaspidoceras", "prompt": "Which family does Epaspidoceras belong to?", "target_new": "Noctuidae",\n'
     ' "ground_truth": ["Aspidoceratidae"], "rephrase_prompt": "What family are Epaspidoceras?",\n'
     ' "locality": {"Relation_Specificity": [{"prompt": "The taxon rank of Epaspidoceras is", "ground_truth": "genus"}]},'
     ' "portability": {"Reasoning": [{"prompt": "...", "ground_truth": "Owlet moths"}]}}'),
)


def detect_kind(records: list, path: Path) -> DatasetKind:
    """Whether parsed records are CounterFact-schema, raw zsRE or EasyEdit/KnowEdit, judged by the first record's fields."""
    first = records[0] if records else {}
    if isinstance(first, dict) and "requested_rewrite" in first:
        return "counterfact"
    if isinstance(first, dict) and {"src", "answers"} <= first.keys():
        return "zsre"
    if is_easyedit(first):
        return "easyedit"
    raise SpectraError(
        f"Cannot tell the format of {path}: its first record has neither 'requested_rewrite' (CounterFact), 'src' and "
        f"'answers' (zsRE), nor {', '.join(repr(f) for f in CORE_FIELDS)} (EasyEdit/KnowEdit). `spectra data` shows an "
        "example record of each format."
    )


def resolve_dataset(
    name_or_path: str, model_name: str = "tiny", zsre_target: ZsreTarget = "gold", limit: int | None = None
) -> tuple[DatasetKind, list[dict]]:
    """Load an edit dataset by name or path as ``(kind, CounterFact-shaped records)``.

    Names: ``tiny`` / ``tiny-zsre`` (the embedded world's files), ``counterfact`` (MCF, else CF), ``mcf``,
    ``cf``, ``zsre`` (from the data directory), and ``auto`` (``tiny`` for the tiny model, ``counterfact``
    otherwise). Anything else is a path whose format (``FORMATS``) is detected from its fields.
    """
    if name_or_path == "auto":
        name_or_path = "tiny" if model_name == "tiny" else "counterfact"
    tiny = {f.name: f.filename for f in TINY_FILES}
    if name_or_path in tiny:
        path = _tiny_file(tiny[name_or_path])
    elif name_or_path in DATASET_NAMES:
        candidates = [data_dir() / filename for filename in DATASET_NAMES[name_or_path]]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise SpectraError(
                f"The dataset {name_or_path!r} needs {' or '.join(str(p) for p in candidates)}, and none is "
                f"there. {where_to_put()}"
            )
    else:
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise SpectraError(
                f"The dataset {name_or_path!r} is neither a dataset name ({', '.join([*tiny, *DATASET_NAMES])}) nor an "
                f"existing file{' (it is a directory)' if path.is_dir() else ''}. Check the path, or use one of the names "
                "(`spectra data` shows which standard files are present)."
            )
    records = records_list(read_json(path, where_to_put()), path)
    if not records:
        raise SpectraError(f"{path} holds no records (an empty JSON list). Pass a dataset file with CounterFact-, "
                           "zsRE- or EasyEdit/KnowEdit-format records.")
    kind = detect_kind(records, path)
    if kind == "zsre":
        return kind, convert_zsre(records, path, zsre_target, limit)
    if kind == "easyedit":
        return kind, convert_easyedit(records, path, limit)
    return kind, validate_counterfact(records, path, limit)
