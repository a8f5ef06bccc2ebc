"""The PII detector: each kind found and checked (positive and negative cases), overlaps, redaction, a 1 MB text."""

from __future__ import annotations

import itertools

import pytest

from lmforge.errors import ConfigError
from lmforge.guard.core import Detection
from lmforge.guard.pii import PII_KINDS, PIIDetector, iban_ok, luhn_ok, redact

DETECTOR = PIIDetector()


def found(text: str) -> list[tuple[str, str]]:
    """(label, matched text) for every detection in `text`."""
    return [(d.label, text[d.span[0]:d.span[1]]) for d in DETECTOR.detect(text)]


def assert_only(kind: str, value: str, before: str = "see ", after: str = " here") -> None:
    assert found(before + value + after) == [(kind, value)]


def assert_none(text: str) -> None:
    assert found(text) == []


# ---------------------------------------------------------------------------------------------------------------
# each kind

@pytest.mark.parametrize("value", ["a@b.io", "john.doe+news@mail.example.co.uk", "X_Y%z@sub-domain.org"])
def test_email(value):
    assert_only("EMAIL", value, before="mail ", after=". Thanks")


@pytest.mark.parametrize("text", ["user@localhost", "a@b.c", "@handle", "name at example dot com"])
def test_not_email(text):
    assert_none(text)


@pytest.mark.parametrize("value", [
    "+1 (415) 555-2671", "+44 20 7946 0958", "+44 (0)20 7946 0958", "+14155552671", "+49 30 12345678",
    "+33 1 23 45 67 89", "415-555-2671", "415.555.2671", "(415) 555-2671", "(020) 7946 0958", "06 12 34 56 78",
    "1-800-555-1234",
])
def test_phone(value):
    assert_only("PHONE", value, before="call ", after=" now")


@pytest.mark.parametrize("text", [
    "released 2024-01-15", "on 15.01.2024 and 01-15-2024", "2024-01-15 123 people came", "id 12345678901",
    "1234567890", "population 1 234 567 890", "ISBN 0-306-40615-2", "call 555-2671", "+1 2", "pi is 3.14159265358",
    "12:30:45", "version 10.15.7",
])
def test_not_phone(text):
    assert_none(text)


@pytest.mark.parametrize("value", [
    "4111 1111 1111 1111", "4111-1111-1111-1111", "4111111111111111", "5555 5555 5555 4444", "3782 822463 10005",
    "6011111111111117", "4222222222222",
])
def test_credit_card(value):
    assert_only("CREDIT_CARD", value, before="card ", after=", exp 12/29")
    assert DETECTOR.detect(value)[0].score == 1.0


@pytest.mark.parametrize("text", [
    "4111 1111 1111 1112",  # Luhn fails
    "1234 5678 9012 3452",  # Luhn passes, but no issuer starts with 1
    "4111 1111-1111 1111",  # mixed separators
    "41111111111111111111111",  # too long
])
def test_not_credit_card(text):
    assert_none(text)


def test_card_keeps_its_digits_apart_from_a_trailing_count():
    assert found("4111 1111 1111 1111 2 times") == [("CREDIT_CARD", "4111 1111 1111 1111")]
    assert luhn_ok("79927398713") and not luhn_ok("79927398710")


@pytest.mark.parametrize("value", ["GB82 WEST 1234 5698 7654 32", "GB82WEST12345698765432",
                                   "DE89 3704 0044 0532 0130 00", "NO9386011117947"])
def test_iban(value):
    assert_only("IBAN", value, before="pay to ", after=". Ref")
    assert DETECTOR.detect(value)[0].score == 1.0


@pytest.mark.parametrize("text", ["GB83 WEST 1234 5698 7654 32", "GB82 WEST 1234 5698 7654 33", "XX00 1234"])
def test_not_iban(text):
    assert "IBAN" not in [label for label, _ in found(text)]


def test_iban_stops_before_a_following_word():
    assert found("GB82 WEST 1234 5698 7654 32 EUR") == [("IBAN", "GB82 WEST 1234 5698 7654 32")]
    assert iban_ok("gb82 west 1234 5698 7654 32".upper()) and not iban_ok("GB82")


@pytest.mark.parametrize("value", ["192.168.1.100", "10.0.0.1", "255.255.255.255",
                                   "1.2.3.4"])  # a dotted-quad version string is an IPv4 address (documented)
def test_ipv4(value):
    assert_only("IPV4", value, before="host ", after=".")


@pytest.mark.parametrize("text", ["999.1.1.1", "1.2.3.256", "1.2.3.4.5", "v1.2.3.4", "1.2.3", "01.02.03.04"])
def test_not_ipv4(text):
    assert_none(text)


@pytest.mark.parametrize("value", ["2001:db8::1", "2001:0db8:85a3:0000:0000:8a2e:0370:7334", "fe80::1",
                                   "::ffff:192.0.2.1", "2001:db8:0:0:0:0:2:1"])
def test_ipv6(value):
    assert_only("IPV6", value, before="[", after="]:8080")


@pytest.mark.parametrize("text", ["12:30:45", "00:1A:2B:3C:4D:5E", "std::vector<int>", "x[1::2]", "1::2::3",
                                  "2001:db8:::1"])
def test_not_ipv6(text):
    assert_none(text)


@pytest.mark.parametrize("value", ["123-45-6789", "078-05-1120", "899-99-9999"])
def test_us_ssn(value):
    assert_only("US_SSN", value, before="SSN: ", after=".")


@pytest.mark.parametrize("text", ["000-12-3456", "666-12-3456", "900-12-3456", "999-12-3456", "123-00-4567",
                                  "123-45-0000", "123-45-67890", "1234-56-7890", "123 45 6789"])
def test_not_us_ssn(text):
    assert "US_SSN" not in [label for label, _ in found(text)]


JWT = ("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0."
       "dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U")
PEM = ("-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,3F17F5316E2BAC89\n\n"
       "MIIBOgIBAAJBAKj34GkxFhD90vcNLYLInFEX6Ppy1tPf9Cnzj4p4WGeKLs1Pt8Qu\n-----END RSA PRIVATE KEY-----")


PUBLIC_KEY = "-----BEGIN PUBLIC KEY-----\nMFwwDQYJKoZIhvcNAQEBBQADSwAwSAJBAKj34Gkx\n-----END PUBLIC KEY-----"


@pytest.mark.parametrize("value", [
    "AKIAIOSFODNN7EXAMPLE", "ASIAY34FZKBOKMUTVV7A", "ghp_" + "a1B2" * 9, "gho_" + "Z9y8" * 9,
    "github_pat_11ABCDEFG0123456789abc_" + "x" * 59, "xoxb-123456789012-1234567890123-AbCdEfGhIjKl",
    "sk-proj-abc123DEF456ghi789JKL", "AIzaSyA1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q", "sk_live_4eC39HqLyjWDarjtT1zdp7dc",
    "rk_live_4eC39HqLyjWDarjtT1zdp7dc", JWT, PEM,
    "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----",
])
def test_secret_with_a_prefix(value):
    assert_only("SECRET", value, before="key ", after=" end")


@pytest.mark.parametrize("text, value", [
    ('api_key = "abc123def456"', "abc123def456"),
    ("API-KEY: abc123def456ghi", "abc123def456ghi"),
    ("password: hunter2hunter2.", "hunter2hunter2"),
    ("export AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG", "wJalrXUtnFEMI/K7MDENG"),
    ("https://x.io/cb?token=abcdef123456&user=5", "abcdef123456"),
    ('{"client_secret": "correct horse battery"}', "correct horse battery"),
])
def test_secret_assignment_tags_the_value_only(text, value):
    assert found(text) == [("SECRET", value)]


@pytest.mark.parametrize("text", [
    "token = tokenizer.encode(text)", "password = os.environ['DB_PASSWORD']", "max_tokens = 4096",
    "token: short", "secretary: somebody_important", "sk-learn-is-a-library-name", "AKIAIOSFODNN7EXAMPL",
    "a task-abcdefghijklmnopqrst1234", PUBLIC_KEY,
])
def test_not_secret(text):
    assert_none(text)


# ---------------------------------------------------------------------------------------------------------------
# the detector as a whole

def test_detections_carry_category_span_detector_label_and_score():
    text = "Mail a@b.io or call +44 20 7946 0958; card 4111 1111 1111 1111."
    detections = DETECTOR.detect(text)
    assert [d.label for d in detections] == ["EMAIL", "PHONE", "CREDIT_CARD"]
    for d in detections:
        assert isinstance(d, Detection) and d.category == "pii" and d.detector == "pii" == DETECTOR.name
    scores = {d.label: d.score for d in detections}
    assert scores["CREDIT_CARD"] == 1.0 and 0.5 < scores["PHONE"] < 1.0 and 0.5 < scores["EMAIL"] < 1.0
    assert [text[s:e] for s, e in (d.span for d in detections)] == ["a@b.io", "+44 20 7946 0958",
                                                                   "4111 1111 1111 1111"]


def test_overlaps_keep_the_longest_match():
    assert found("via ::ffff:192.0.2.1 today") == [("IPV6", "::ffff:192.0.2.1")]  # not also its IPv4 tail
    assert found(f"token={JWT}") == [("SECRET", JWT)]  # the JWT and the assignment: one detection
    assert found("+1 123-45-6789") == [("PHONE", "+1 123-45-6789")]  # the SSN inside the phone is dropped
    spans = [d.span for d in DETECTOR.detect("a@b.io 10.0.0.1 " * 50 + "4111 1111 1111 1111")]
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))  # sorted and disjoint


def test_kinds_select_and_validate():
    text = "a@b.io 10.0.0.1 4111 1111 1111 1111"
    assert [d.label for d in PIIDetector(["email"]).detect(text)] == ["EMAIL"]
    assert [d.label for d in PIIDetector(["IPV4", "credit_card"]).detect(text)] == ["IPV4", "CREDIT_CARD"]
    assert PIIDetector("EMAIL").kinds == ("email",)
    assert PIIDetector().kinds == tuple(PII_KINDS)
    with pytest.raises(ConfigError, match="unknown PII kind.*'passport'.*choose from"):
        PIIDetector(["email", "passport"])


def test_a_megabyte_of_adversarial_text_finishes():
    # Runs that make careless patterns scan from every position, plus a few real matches to find in between.
    runs = ["1" * 9000, "1 " * 4500, "1." * 4500, "a" * 9000, "a@" * 4500, ":" * 9000, "abcd:" * 1800,
            "(1)" * 3000, "password=" * 1000, 'token="' * 1300, "-----BEGIN RSA PRIVATE KEY-----\n" * 280,
            "eyJ" * 3000, "GB82 " * 1800, "sk-" * 3000]
    chunk = " ".join(runs) + " a@b.io 4111 1111 1111 1111 +44 20 7946 0958 "
    text = (chunk * (2**20 // len(chunk) + 1))[:2**20]
    detections = DETECTOR.detect(text)
    labels = {d.label for d in detections}
    assert {"EMAIL", "CREDIT_CARD", "PHONE"} <= labels
    assert len(redact(text, detections)) > 0


# ---------------------------------------------------------------------------------------------------------------
# redaction

def test_redact_reads_well():
    assert redact("mail me at a@b.io", DETECTOR.detect("mail me at a@b.io")) == "mail me at <EMAIL>"
    text = "Card 4111-1111-1111-1111, IBAN GB82 WEST 1234 5698 7654 32, host 10.0.0.1."
    assert redact(text, DETECTOR.detect(text)) == "Card <CREDIT_CARD>, IBAN <IBAN>, host <IPV4>."
    assert redact("nothing here", DETECTOR.detect("nothing here")) == "nothing here"


def test_redact_merges_overlaps_and_takes_any_detector():
    text = "0123456789abcdef"
    detections = [
        Detection("pii", 0.9, (2, 6), "pii", "EMAIL"),
        Detection("privacy", 0.7, (4, 10), "rules", "ADDRESS"),  # overlaps EMAIL and is longer: its label wins
        Detection("hate", 0.8, (12, 14), "semantic"),  # no label
        Detection("hate", 0.8, (14, 15), "semantic", "X"),  # touches the previous one: kept apart
        Detection("hate", 0.99, None, "semantic", "WHOLE"),  # about the whole text: ignored by redact
        Detection("pii", 0.9, (1, 1), "pii", "EMPTY"),  # empty: nothing to hide
    ]
    assert redact(text, detections) == "01<ADDRESS>ab<REDACTED><X>f"
    assert redact(text, list(reversed(detections))) == "01<ADDRESS>ab<REDACTED><X>f"  # any order
    assert redact(text, [Detection("pii", 1.0, (0, 16), "pii", "ALL"), *detections]) == "<ALL>"


def test_redact_rejects_a_span_from_another_text():
    with pytest.raises(ValueError, match=r"span \(5, 40\).*outside a text of 10 characters"):
        redact("short text", [Detection("pii", 1.0, (5, 40), "pii", "EMAIL")])
