"""Secrets and personal data out of text: the one function applied to what is trained on and to what the
bot posts (`scrub_text`), and the phone regions it reads national numbers in (`message_regions`: the
workspace's setting and the people's time zones; `phone_regions` checks a setting).

What is found, and by what:
- credentials: detect-secrets' detectors (AWS keys, private keys, Slack/GitHub/GitLab/Stripe/... tokens,
  JWTs, passwords in URLs, keyword `key=value` secrets, high-entropy quoted strings) plus detectors of
  the same kind for what it misses (Slack's other `xox?-` tokens: app-level `xapp-`, browser session
  `xoxc-` and cookie `xoxd-`, refresh `xoxe-`; a URL's password holding `$ & !` or `@`, or with no user
  name; PEM private keys it does not list, `ENCRYPTED PRIVATE KEY`), and passwords said in words ("my
  password is hunter2"): `<secret>`;
- emails, by a plain address pattern: `<email>`;
- IBANs, validated by python-stdnum (country length, BBAN structure, mod-97): `<iban>`;
- payment card numbers: a card network's prefix and length, and a valid Luhn digit (python-stdnum):
  `<card>`;
- US social security numbers, Presidio-style: the dashed form alone, other forms only near a context word
  ("SSN", "social security"); area, group and serial checked by python-stdnum: `<ssn>`;
- phone numbers, by libphonenumber (`phonenumbers`): international ones (`+44 …`) always, national ones
  ("020 7946 0958") as written in any of the regions given (the author's, the workspace's; `US` when none
  is known), each valid for its region and written in its digit groups.

detect-secrets reports a secret's value, sometimes only a prefix of it (`ghp` for a GitHub token) or a
part of a larger token (a JWT without its signature); so each hit is widened to the whole token around it,
and a private key to its whole block, so that no fragment of it survives.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from functools import cache
from importlib import resources
from pathlib import Path
from typing import NamedTuple

import phonenumbers
from detect_secrets.core.plugins.util import get_mapping_from_secret_type_to_class
from detect_secrets.plugins.base import BasePlugin, RegexBasedDetector
from detect_secrets.plugins.high_entropy_strings import Base64HighEntropyString, HighEntropyStringsPlugin
from detect_secrets.plugins.keyword import CONFIG_DENYLIST_REGEX_TO_GROUP, DENYLIST_REGEX, KeywordDetector
from detect_secrets.plugins.private_key import PrivateKeyDetector
from stdnum import iban, luhn
from stdnum.us import ssn

SECRET, EMAIL, PHONE, CARD, IBAN, SSN = "<secret>", "<email>", "<phone>", "<card>", "<iban>", "<ssn>"
PLACEHOLDERS = (SECRET, EMAIL, PHONE, CARD, IBAN, SSN)
# Numbers written without a country code are read as North American ones when nothing tells otherwise.
DEFAULT_PHONE_REGIONS = ("US",)
# Public IP addresses are not credentials, and a log paste is full of them.
_SKIPPED_DETECTORS = frozenset({"IPPublicDetector"})
_TOKEN_CHAR = re.compile(r"[A-Za-z0-9_\-+/=.~%]")
_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_KEY_END = re.compile(r"-----END [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----|\Z")
# A keyword secret must look like one: `password: hunter2` is, `secret: sauce` or `key: value` is not.
_PLAIN_WORD = re.compile(r"[A-Za-z]+")
# An unquoted token this long, mixing cases and digits, with base64-like entropy is a key, not a word.
_BARE_TOKEN = re.compile(r"(?<![\w+/=.-])(?=[\w+/=-]*[a-z])(?=[\w+/=-]*[A-Z])(?=[\w+/=-]*\d)[\w+/=-]{32,}")
# Cheap tests first: most messages name no secret keyword and hold too few digits for a number.
_KEYWORD = re.compile(DENYLIST_REGEX, re.IGNORECASE)
_MIN_DIGITS = 7

# "my password is hunter2", "the wifi password for the office is 'open sesame'", "PIN: 4921".
_PASSWORD = re.compile(
    r"\b(?P<word>pass(?:word|wd|phrase|code)|pw|passwort|mot de passe|contrase[ñn]a|pin(?: code)?)\b"
    r"(?:\s+(?:for|to|of|on|at)\s+(?:the\s+|my\s+|our\s+)?[\w.@/:-]+){0,2}"
    r"(?:\s*(?::|=|->)\s*|(?:\s+(?:is|was|will be|ist|est|es)|['’]s)(?:\s+(?:now|still))?:?\s+)"
    r"(?P<value>\"[^\"\n]{1,100}\"|'[^'\n]{1,100}'|`[^`\n]{1,100}`|“[^”\n]{1,100}”|\S+)",
    re.IGNORECASE,
)
# What follows "the password is" in talk about passwords rather than in a password.
_NOT_A_PASSWORD = frozenset(
    """
    a an the my your our their his her its this that these those it not no never still now in on at for
    to of from with by being been too very so just also and or but if same different wrong right
    correct incorrect invalid expired changed reset set required needed missing empty blank weak strong
    long short there here above below attached pinned saved stored shared sent updated rotated ok okay
    fine good bad great secure insecure case what which where how why who hidden encrypted hashed
    somewhere something nothing stuck broken working locked unchanged known unknown easy hard simple
    """.split()  # noqa: SIM905
)

_IBAN_CANDIDATE = re.compile(r"(?<![A-Za-z0-9])[A-Za-z]{2}\d{2}(?:[ -]?[A-Za-z0-9]){11,30}")
# Card numbers: 12 to 19 digits, bare or in groups split by one kind of separator.
_CARD_CANDIDATE = re.compile(r"(?<![\w.,/:-])\d{4}(?:([ -]?)\d{2,6})(?:\1\d{1,6}){0,4}(?![\w-]|[.,:/]\d)")
# Card networks' number prefixes (IIN ranges) and lengths; other numbers are order and account IDs.
_CARD_NETWORKS: tuple[tuple[tuple[int, int], frozenset[int]], ...] = (
    ((4, 4), frozenset({13, 16, 19})),  # Visa
    ((51, 55), frozenset({16})),  # Mastercard
    ((2221, 2720), frozenset({16})),  # Mastercard
    ((34, 34), frozenset({15})),  # American Express
    ((37, 37), frozenset({15})),
    ((6011, 6011), frozenset(range(16, 20))),  # Discover
    ((644, 649), frozenset(range(16, 20))),
    ((65, 65), frozenset(range(16, 20))),
    ((3528, 3589), frozenset(range(16, 20))),  # JCB
    ((300, 305), frozenset(range(14, 20))),  # Diners Club
    ((36, 36), frozenset(range(14, 20))),
    ((38, 39), frozenset(range(16, 20))),
    ((62, 62), frozenset(range(16, 20))),  # UnionPay
    ((50, 50), frozenset(range(12, 20))),  # Maestro
    ((56, 58), frozenset(range(12, 20))),
)
_SSN_CANDIDATE = re.compile(r"(?<![\w.,/:-])\d{3}(?P<sep>[- .]?)\d{2}(?P=sep)\d{4}(?![\w-]|[.,:/]\d)")
# Presidio's context words for a US SSN; without one only the dashed form counts.
_SSN_CONTEXT = re.compile(r"\b(?:ssns?|ss#|ssn#|social(?:\s+security)?|sozialversicherung\w*)", re.I)
_SSN_CONTEXT_CHARS = 60
# Valid numbers written in their country's digit groups: a log's "37.230937  1537" is no phone number.
_PHONE_LENIENCY = phonenumbers.Leniency.STRICT_GROUPING
# A bare ten-digit number starting with 1 reads as a Unix time in a log, not as a national phone number.
_UNIX_TIME = re.compile(r"1\d{9}")


class Scrubbed(NamedTuple):
    text: str
    counts: Counter[str]  # kind ("secret", "email", "iban", "card", "ssn", "phone") -> replacements made


def scrub_text(text: str, regions: Iterable[str] = ()) -> Scrubbed:
    """`text` with every secret and piece of personal data replaced by its placeholder, and the counts.

    `regions`: ISO 3166 codes whose national phone formats are read (the author's, the workspace's);
    none: `DEFAULT_PHONE_REGIONS`. Numbers with a country code are found whatever the regions."""
    counts: Counter[str] = Counter()
    if not text:
        return Scrubbed(text, counts)
    wanted = tuple(dict.fromkeys(regions)) or DEFAULT_PHONE_REGIONS
    steps: tuple[tuple[str, str, Callable[[str], list[tuple[int, int]]]], ...] = (
        ("secret", SECRET, _secret_spans),
        ("email", EMAIL, lambda t: [m.span() for m in _EMAIL.finditer(t)]),
        ("iban", IBAN, _iban_spans),
        ("card", CARD, _card_spans),
        ("ssn", SSN, _ssn_spans),
        ("phone", PHONE, lambda t: _phone_spans(t, wanted)),
    )
    for kind, placeholder, find in steps:
        spans = _merge(find(text))
        if spans:
            text = _replace(text, spans, placeholder)
            counts[kind] += len(spans)
    return Scrubbed(text, counts)


def phone_regions(values: Iterable[str]) -> tuple[str, ...]:
    """Region codes from configuration (`gb`, ` DE `), upper-cased; ValueError names one libphonenumber
    does not know."""
    regions = tuple(dict.fromkeys(v.strip().upper() for v in values if v.strip()))
    unknown = [r for r in regions if r not in phonenumbers.SUPPORTED_REGIONS]
    if unknown:
        hint = "use an ISO 3166 country code such as GB or DE"
        raise ValueError(f"unknown phone region {unknown[0]!r}: {hint}")
    return regions


def message_regions(workspace: Sequence[str], *timezones: str | None) -> tuple[str, ...]:
    """The regions a message's national phone numbers are read in: the workspace's (`US` when not set),
    then the country of each time zone given (its author's, the cloned person's)."""
    found = (timezone_region(tz) for tz in timezones)
    return tuple(dict.fromkeys([*(workspace or DEFAULT_PHONE_REGIONS), *(r for r in found if r)]))


def timezone_region(tz: str | None) -> str | None:
    """The country of an IANA time zone (a Slack user's `tz`, "Europe/London" -> "GB"), when it has one."""
    return _zone_countries().get(tz or "")


@cache
def _zone_countries() -> dict[str, str]:
    try:
        table = resources.files("tzdata").joinpath("zoneinfo", "zone.tab").read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError):
        system = Path("/usr/share/zoneinfo/zone.tab")
        table = system.read_text(encoding="utf-8") if system.exists() else ""
    rows = (line.split("\t") for line in table.splitlines() if line and not line.startswith("#"))
    return {row[2]: row[0] for row in rows if len(row) >= 3 and row[0] in phonenumbers.SUPPORTED_REGIONS}


class SlackAppTokenDetector(RegexBasedDetector):
    """Slack tokens detect-secrets 1.5 does not know: app-level (`xapp-`), and any `xox?-` token besides
    its `xox[abposr]-` ones: a browser session's `xoxc-`, its `d` cookie `xoxd-` (URL-encoded), a refresh
    `xoxe-`. A digit is required, so that "xoxo-hugs" stays a word."""

    secret_type = "Slack App-Level, Session or Refresh Token"
    denylist = (
        re.compile(r"\bxapp-\d+-[A-Za-z0-9]+-\d+-[A-Za-z0-9]+"),
        re.compile(r"\bxox[a-z]-(?=[A-Za-z0-9%-]*\d)[A-Za-z0-9%-]{8,}"),
    )


class UrlPasswordDetector(RegexBasedDetector):
    """A URL's password where detect-secrets' BasicAuthDetector, keeping to RFC 3986, finds none: with
    sub-delimiters in it (`Pa$$w0rd`, `Tr0ub4dor&3`, `S3cret!`), a raw `@` or `:` (`pa:ss`, `P@ss`), or no
    user name (`redis://:p4ss@redis`). The userinfo ends at the authority's last `@`; only the password
    (group `password`) is a secret, so the scheme, user and host stay readable."""

    secret_type = "URL Password"
    denylist = (
        re.compile(
            r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s:/?#@]*:(?P<password>[^\s/?#]{1,200})@(?=[\w\[])",
        ),
    )


class PemPrivateKeyDetector(PrivateKeyDetector):
    """Every PEM private key block, also those detect-secrets' list leaves out (`ENCRYPTED PRIVATE KEY`,
    PKCS#8's password-protected form, which `openssl genpkey -aes256` writes)."""

    secret_type = "PEM Private Key"
    denylist = (re.compile(r"BEGIN [A-Z0-9 ]*PRIVATE KEY"),)


@cache
def _detectors() -> tuple[BasePlugin, ...]:
    found = tuple(
        cls()
        for cls in get_mapping_from_secret_type_to_class().values()
        if cls.__name__ not in _SKIPPED_DETECTORS
    )
    return (*found, SlackAppTokenDetector(), UrlPasswordDetector(), PemPrivateKeyDetector())


def _secret_spans(text: str) -> list[tuple[int, int]]:
    spans = _password_spans(text)
    for detector in _detectors():
        if isinstance(detector, PrivateKeyDetector):
            for regex in detector.denylist:
                for match in regex.finditer(text):
                    start = text.rfind("-----", 0, match.start())
                    start = start if start >= 0 and match.start() - start <= 5 else match.start()
                    spans.append((start, _KEY_END.search(text, match.end()).end()))  # type: ignore[union-attr]
        elif isinstance(detector, UrlPasswordDetector):
            # Not widened: the password may end in a character a token does not (`S3cret!`).
            spans += [m.span("password") for regex in detector.denylist for m in regex.finditer(text)]
        elif isinstance(detector, RegexBasedDetector):
            for regex in detector.denylist:
                for match in regex.finditer(text):
                    spans.append(_widen(text, *_value_span(match)))
        elif isinstance(detector, KeywordDetector) and _KEYWORD.search(text):
            for regex, group in CONFIG_DENYLIST_REGEX_TO_GROUP.items():
                for match in regex.finditer(text):
                    start = match.start(group)
                    end = (
                        start + len(match.group(group).split(None, 1)[0])
                        if match.group(group).strip()
                        else start
                    )
                    value = text[start:end]
                    if len(value) >= 6 and not _PLAIN_WORD.fullmatch(value):
                        spans.append((start, end))
        elif isinstance(detector, HighEntropyStringsPlugin):
            for value in detector.analyze_string(text):
                if detector.calculate_shannon_entropy(value) > detector.entropy_limit:
                    spans += [(m.start(), m.end()) for m in re.finditer(re.escape(value), text)]
            if isinstance(detector, Base64HighEntropyString):
                for match in _BARE_TOKEN.finditer(text):
                    if detector.calculate_shannon_entropy(match.group()) > detector.entropy_limit:
                        spans.append(match.span())
    return spans


def _password_spans(text: str) -> list[tuple[int, int]]:
    """The value of a password said in words; the words around it stay ("my password is <secret>")."""
    spans = []
    for match in _PASSWORD.finditer(text):
        value = match.group("value")
        word = value.strip("\"'`“”.,;:!?()").lower()
        if len(word) < 3 or word in _NOT_A_PASSWORD:
            continue
        if match.group("word").lower().startswith("pin") and not any(c.isdigit() for c in value):
            continue  # "the pin is stuck": a PIN is digits
        spans.append(match.span("value"))
    return spans


def _iban_spans(text: str) -> list[tuple[int, int]]:
    """IBANs, printed in groups or not; the candidate is cut back to the longest valid one (the pattern
    also takes the words after it)."""
    spans = []
    for match in _IBAN_CANDIDATE.finditer(text):
        start = match.start()
        for end in range(match.end(), start + 14, -1):
            at_boundary = text[end - 1].isalnum() and (end == len(text) or not text[end].isalnum())
            if at_boundary and iban.is_valid(text[start:end]):
                spans.append((start, end))
                break
    return spans


def _card_spans(text: str) -> list[tuple[int, int]]:
    if sum(map(str.isdigit, text)) < 12:
        return []
    spans = []
    for match in _CARD_CANDIDATE.finditer(text):
        # "4111 1111 1111 1111 2031": the card may be the first groups only.
        groups = list(re.finditer(r"\d+", match.group()))
        for count in range(len(groups), 0, -1):
            digits = "".join(g.group() for g in groups[:count])
            if len(digits) >= 12 and _card_network(digits) and luhn.is_valid(digits):
                spans.append((match.start(), match.start() + groups[count - 1].end()))
                break
    return spans


def _card_network(digits: str) -> bool:
    for (low, high), lengths in _CARD_NETWORKS:
        prefix = int(digits[: len(str(low))])
        if low <= prefix <= high and len(digits) in lengths:
            return True
    return False


def _ssn_spans(text: str) -> list[tuple[int, int]]:
    spans = []
    for match in _SSN_CANDIDATE.finditer(text):
        if not ssn.is_valid(re.sub(r"\D", "", match.group())):
            continue
        if match.group("sep") != "-":
            start, end = match.start() - _SSN_CONTEXT_CHARS, match.end() + _SSN_CONTEXT_CHARS
            if not _SSN_CONTEXT.search(text[max(start, 0) : end]):
                continue
        spans.append(match.span())
    return spans


def _phone_spans(text: str, regions: Sequence[str]) -> list[tuple[int, int]]:
    if sum(map(str.isdigit, text)) < _MIN_DIGITS:
        return []
    spans = []
    for region in regions:
        for match in phonenumbers.PhoneNumberMatcher(text, region, leniency=_PHONE_LENIENCY):
            if not _UNIX_TIME.fullmatch(match.raw_string):
                spans.append((match.start, match.end))
    return spans


def _value_span(match: re.Match[str]) -> tuple[int, int]:
    """Where the secret is in a detector's match: the captured value when it is inside the match (a URL's
    password), the whole match when the capture is only its prefix (`ghp` of `ghp_...`)."""
    if match.re.groups and match.group(match.re.groups) and match.start(match.re.groups) > match.start():
        return match.span(match.re.groups)
    return match.span()


def _widen(text: str, start: int, end: int) -> tuple[int, int]:
    """The whole token around `text[start:end]` (a match may include a delimiter or miss a tail)."""
    while start < end and not _TOKEN_CHAR.match(text[start]):
        start += 1
    while end > start and not _TOKEN_CHAR.match(text[end - 1]):
        end -= 1
    while start > 0 and _TOKEN_CHAR.match(text[start - 1]):
        start -= 1
    while end < len(text) and _TOKEN_CHAR.match(text[end]):
        end += 1
    return start, end


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, end in sorted(s for s in spans if s[1] > s[0]):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _replace(text: str, spans: list[tuple[int, int]], placeholder: str) -> str:
    parts, last = [], 0
    for start, end in spans:
        parts += [text[last:start], placeholder]
        last = end
    return "".join([*parts, text[last:]])
