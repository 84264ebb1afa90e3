"""Personal data, enabled per profile: email, phone, payment card, IBAN, US SSN.

Checks that need code run on candidates only: Luhn and an issuer prefix for cards, mod-97 for
IBANs, the never-issued ranges for SSNs, a digit count for phone numbers.
"""

from __future__ import annotations

from cellblock.redact.rule import Rule

KINDS = ("email", "phone", "card", "iban", "ssn")


def _email_span(candidate: str) -> tuple[int, int] | None:
    at = candidate.find("@")
    if at < 1:
        return None
    return max(0, at - 64), len(candidate)


def _digits(value: str) -> str:
    return "".join(c for c in value if c.isdigit())


def luhn_ok(number: str) -> bool:
    total = 0
    for i, c in enumerate(reversed(number)):
        d = ord(c) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def card_ok(value: str) -> bool:
    """13-19 digits, a known issuer prefix (Visa, Mastercard, Amex, Discover, JCB, Diners), Luhn."""
    digits = _digits(value)
    if not 13 <= len(digits) <= 19 or len(set(digits)) < 2:
        return False
    if not (digits[0] in "3456" or "2221" <= digits[:4] <= "2720"):
        return False
    return luhn_ok(digits)


def iban_ok(value: str) -> bool:
    """ISO 13616: country code, check digits, BBAN; moved and read as a number, mod 97 == 1."""
    iban = value.replace(" ", "").upper()
    if not 15 <= len(iban) <= 34 or not iban[:2].isalpha() or not iban[2:4].isdigit():
        return False
    moved = iban[4:] + iban[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


def ssn_ok(value: str) -> bool:
    area, group, serial = value.split("-")
    return area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000"


def phone_ok(value: str) -> bool:
    return 8 <= len(_digits(value)) <= 15


RULES: dict[str, tuple[Rule, ...]] = {
    "email": (
        Rule(
            "email",
            r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,24}\b",
            320,
            secret=_email_span,
            clip_end=True,
        ),
    ),
    "phone": (
        # E.164-ish with a leading +, separators allowed; and North American 3-3-4.
        Rule(
            "phone",
            r"\+[1-9][0-9]{0,3}[ .-]?(?:\(?[0-9]{1,4}\)?[ .-]?){1,4}[0-9]{2,4}\b",
            32,
            validate=phone_ok,
        ),
        Rule(
            "phone", r"(?:\([2-9][0-9]{2}\) ?|\b[2-9][0-9]{2}[ .-])[2-9][0-9]{2}[ .-][0-9]{4}\b", 16
        ),
    ),
    "card": (
        Rule("card", r"\b[0-9]{13,19}\b", 19, validate=card_ok, not_after="."),
        Rule(
            "card",
            r"\b[0-9]{4}[ -][0-9]{4}[ -][0-9]{4}[ -][0-9]{1,7}\b",
            24,
            validate=card_ok,
            all_ends=True,
        ),
        Rule("card", r"\b[0-9]{4}[ -][0-9]{6}[ -][0-9]{4,5}\b", 17, validate=card_ok),
    ),
    "iban": (
        Rule(
            "iban",
            r"\b[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b",
            42,
            validate=iban_ok,
            all_ends=True,
        ),
    ),
    "ssn": (Rule("ssn", r"\b[0-9]{3}-[0-9]{2}-[0-9]{4}\b", 11, validate=ssn_ok),),
}
