"""What every guard detector returns, and the hazard taxonomy it returns it in.

A detector looks at one text and returns Detections: which hazard category, how sure (0..1), where in the text
(character offsets into the text it was given; None for the text as a whole), and which detector said so. The
policy (guard/policy.py) turns detections into an action per direction: block, redact, flag or allow.

The categories follow the MLCommons AI Safety hazard taxonomy as Llama Guard 3 uses it (S1..S14), plus `pii` for
personal data found by pattern (e-mail, phone, card numbers, ...), which redaction replaces with a readable tag.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

CATEGORIES = {  # name -> (Llama Guard 3 code, what it covers)
    "violent_crimes": ("S1", "terrorism, murder, assault, kidnapping, animal abuse"),
    "non_violent_crimes": ("S2", "fraud, theft, hacking, drugs, weapons trafficking, money laundering"),
    "sex_related_crimes": ("S3", "sex trafficking, sexual assault, harassment"),
    "child_sexual_exploitation": ("S4", "any sexual content involving minors"),
    "defamation": ("S5", "verifiably false statements that injure a living person's reputation"),
    "specialized_advice": ("S6", "dangerous financial, medical or legal advice"),
    "privacy": ("S7", "sensitive non-public personal information"),
    "intellectual_property": ("S8", "infringing copyrights, trademarks or patents"),
    "indiscriminate_weapons": ("S9", "chemical, biological, radiological, nuclear and explosive weapons"),
    "hate": ("S10", "demeaning people for protected characteristics"),
    "suicide_self_harm": ("S11", "suicide, self-injury, disordered eating"),
    "sexual_content": ("S12", "explicit sexual content"),
    "elections": ("S13", "false information about electoral processes"),
    "code_interpreter_abuse": ("S14", "abusing code execution: escapes, denial of service, privilege escalation"),
    "pii": ("PII", "personal data found by pattern: e-mail, phone, card, IBAN, IP address, SSN, secrets"),
}


@dataclass(frozen=True)
class Detection:
    category: str  # a key of CATEGORIES
    score: float  # 0..1: how sure the detector is
    span: tuple[int, int] | None  # [start, end) character offsets in the text given to the detector; None = all
    detector: str  # the detector's name, e.g. "rules", "pii", "semantic"
    label: str | None = None  # what redaction writes in place of the span, e.g. "EMAIL" -> "<EMAIL>"


class Detector(Protocol):
    name: str

    def detect(self, text: str) -> list[Detection]:
        """Every hazard found in `text`; an empty list when none is."""
        ...
