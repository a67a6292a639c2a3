"""PII redaction before training: each kind is caught, ordinary text is left alone."""
from __future__ import annotations

import pytest

from adapters.redact import redact, redact_counts


@pytest.mark.parametrize("text, expected", [
    ("write to jane.doe+news@mail.example.co.uk today", "write to [EMAIL] today"),
    ("my card is 4111 1111 1111 1111, expiry soon", "my card is [CARD], expiry soon"),
    ("card 5500-0000-0000-0004 please", "card [CARD] please"),
    ("IBAN GB82 WEST 1234 5698 7654 32 for rent", "IBAN [IBAN] for rent"),
    ("pay into DE89370400440532013000", "pay into [IBAN]"),
    ("my account number is 12345678", "my account number is [ACCOUNT]"),
    ("sort code 20-00-00 and account 55779911", "sort code [ACCOUNT] and account [ACCOUNT]"),
    ("call me on +44 20 7946 0958 tonight", "call me on [PHONE] tonight"),
    ("ring (555) 123-4567 after six", "ring [PHONE] after six"),
    ("or 555-123-4567", "or [PHONE]"),
    ("or +14155552671", "or [PHONE]"),
    ("I live at 221B Baker Street, London", "I live at [ADDRESS], London"),
    ("send it to 1600 Pennsylvania Ave, Apt 4 please", "send it to [ADDRESS] please"),
    ("we moved to 42 Old Mill Lane last year", "we moved to [ADDRESS] last year"),
])
def test_each_kind_of_pii_is_replaced_by_its_placeholder(text, expected):
    assert redact(text) == expected


@pytest.mark.parametrize("text", [
    "In 2024 I ran 3 marathons.",
    "Meet at 10:30 on 2025-03-14.",
    "It cost $1,299.99 at the shop.",
    "Python 3.11.7 and version 10.2.1 work.",
    "I live near the park and walk 5 km a day.",
    "Order 1234567890123 arrived",            # 13 digits failing Luhn: not a card
    "Room 12, floor 3, building 7.",
    "The population is 8 000 000 people.",
])
def test_ordinary_text_is_untouched(text):
    assert redact(text) == text


def test_several_kinds_in_one_text_are_all_counted():
    text, counts = redact_counts("Mail a@b.io or b@c.io, call +1 415 555 2671, card 4111111111111111.")
    assert text == "Mail [EMAIL] or [EMAIL], call [PHONE], card [CARD]."
    assert counts == {"EMAIL": 2, "PHONE": 1, "CARD": 1}


def test_redaction_is_idempotent():
    once = redact("jane@x.org, +44 20 7946 0958, 221B Baker Street, 4111 1111 1111 1111")
    assert redact(once) == once
