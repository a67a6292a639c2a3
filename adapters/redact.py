"""PII redaction of training text: what the adapter must never learn, replaced by typed placeholders.

Applied to every message before it is tokenized for training (memory and the log keep the original; they
never leave the device either, but weights are harder to audit than rows). Patterns are deliberately
conservative where ordinary text looks similar: card numbers must pass the Luhn check, IBANs their
mod-97 check, and bare digit runs count as account numbers only after a word such as "account".
"""
from __future__ import annotations

import collections
import re

PLACEHOLDERS = ("EMAIL", "CARD", "IBAN", "ACCOUNT", "PHONE", "ADDRESS")

EMAIL = re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)*\.[A-Za-z]{2,}\b")
# 13–19 digits, optionally grouped by spaces or dashes (how people type card numbers).
CARD = re.compile(r"\b\d(?:[ -]?\d){12,18}\b")
IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?:[ ]?[A-Z0-9]){11,30}\b")
# A long digit run after a word that says what it is.
ACCOUNT = re.compile(r"(?i)\b((?:account|acct|a/c|routing|sort code|iban|bank)\b[\w ]{0,12}?(?:no\.?|number|#|:)?\s*)"
                     r"(\d[\d -]{4,}\d)")
# International (+CC …) or national with area code: (555) 123-4567, 555-123-4567, 020 7946 0958.
PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,5}\)|\d{2,5})(?:[ .-]\d{2,4}){2,3}(?![\w-])"
                   r"|(?<![\w+])\+\d{8,14}\b")
STREET = (r"Street|St|Avenue|Ave|Road|Rd|Lane|Ln|Boulevard|Blvd|Drive|Dr|Way|Court|Ct|Place|Pl|Terrace|"
          r"Close|Square|Sq|Parkway|Pkwy|Highway|Hwy|Crescent|Gardens")
ADDRESS = re.compile(rf"\b\d{{1,5}}[A-Za-z]?\s+(?:[A-Z][a-z]+\.?\s+){{1,3}}(?:{STREET})\b\.?"
                     r"(?:,?\s+(?:Apt|Apartment|Unit|Suite|Flat|#)\.?\s*\w+)?")


def luhn_ok(digits: str) -> bool:
    """The Luhn checksum every payment card number satisfies (and most random numbers do not)."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_ok(text: str) -> bool:
    """ISO 13616 mod-97 check of an IBAN."""
    compact = text.replace(" ", "")
    moved = compact[4:] + compact[:4]
    number = "".join(str(int(c, 36)) for c in moved)
    return len(compact) >= 15 and int(number) % 97 == 1


DATE = re.compile(r"\d{4}[-./]\d{1,2}[-./]\d{1,2}|\d{1,2}[-./]\d{1,2}[-./]\d{2,4}")


def phone_like(value: str) -> bool:
    """8–15 digits that are not a date written with separators (2025-03-14, 14.03.2025)."""
    return 8 <= len(re.sub(r"\D", "", value)) <= 15 and not DATE.fullmatch(value.strip())


def redact_counts(text: str) -> tuple[str, dict[str, int]]:
    """`text` with PII replaced by [EMAIL], [CARD], [IBAN], [ACCOUNT], [PHONE], [ADDRESS]; and counts."""
    found: collections.Counter[str] = collections.Counter()

    def sub(pattern: re.Pattern[str], label: str, text: str, check=None, group: int = 0) -> str:
        def replace(match: re.Match[str]) -> str:
            value = match.group(group)
            if check is not None and not check(value):
                return match.group(0)
            found[label] += 1
            return match.group(0).replace(value, f"[{label}]")
        return pattern.sub(replace, text)

    text = sub(EMAIL, "EMAIL", text)
    text = sub(IBAN, "IBAN", text, iban_ok)
    text = sub(CARD, "CARD", text, lambda v: luhn_ok(re.sub(r"\D", "", v)))
    text = sub(ACCOUNT, "ACCOUNT", text, group=2)
    text = sub(PHONE, "PHONE", text, phone_like)
    text = sub(ADDRESS, "ADDRESS", text)
    return text, dict(found)


def redact(text: str) -> str:
    """`text` with PII replaced by typed placeholders."""
    return redact_counts(text)[0]
