"""Edit requests: the one shape every editor consumes, built from CounterFact / ZsRE records."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping


@dataclass(frozen=True)
class EditRequest:
    """One fact to write: ``prompt.format(subject)`` should be completed by ``target_new``.

    ``prompt`` contains exactly one ``{}`` for the subject. Targets carry no leading space; code
    that tokenizes them prepends one (word-initial tokens, as the reference editors do).
    """

    case_id: int
    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None

    def filled(self) -> str:
        """The prompt with the subject inserted."""
        return self.prompt.format(self.subject)

    @classmethod
    def from_counterfact(cls, record: Mapping[str, Any]) -> "EditRequest":
        """Build from a CounterFact-schema record (``requested_rewrite`` with ``target_new.str``)."""
        rewrite = record["requested_rewrite"]
        true = rewrite.get("target_true") or {}
        return cls(
            case_id=int(record["case_id"]),
            prompt=rewrite["prompt"],
            subject=rewrite["subject"],
            target_new=rewrite["target_new"]["str"],
            target_true=true.get("str"),
        )


@dataclass(frozen=True)
class MultipleChoiceItem:
    """A general-ability test item: score each choice as a continuation of ``prompt``; ``gold`` wins.

    Choices carry no leading space (the scorer prepends one, as for edit targets).
    """

    task: str
    prompt: str
    choices: tuple[str, ...]
    gold: int
