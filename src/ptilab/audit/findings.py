"""Findings: what an audit reports, each with an id, a severity and a why."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum


class Severity(IntEnum):
    INFO = 0
    LOW = 1
    MEDIUM = 2
    HIGH = 3
    CRITICAL = 4

    @classmethod
    def parse(cls, text: str) -> "Severity":
        from ptilab.errors import UsageError

        try:
            return cls[text.upper()]
        except KeyError:
            raise UsageError(f"unknown severity {text!r}; choose one of: "
                             f"{', '.join(s.name.lower() for s in cls)}") from None


@dataclass(frozen=True)
class Span:
    """A virtual range a finding points at, with what it maps."""

    start: int
    end: int
    view: str  # "user" or "kernel"
    rights: str
    label: str = ""

    def as_dict(self) -> dict:
        return {"start": f"{self.start:#018x}", "end": f"{self.end:#018x}", "view": self.view,
                "rights": self.rights, "label": self.label}


@dataclass(frozen=True)
class Finding:
    id: str  # stable, e.g. "PTI-LEAK"
    severity: Severity
    title: str
    explanation: str
    spans: tuple[Span, ...] = field(default=())

    def as_dict(self) -> dict:
        return {"id": self.id, "severity": self.severity.name.lower(), "title": self.title,
                "explanation": self.explanation, "spans": [s.as_dict() for s in self.spans]}
