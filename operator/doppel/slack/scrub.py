"""Secrets and personal data out of text: the one function applied to what is trained on and to what the
bot posts (`scrub_text`).

Credentials are found by detect-secrets' detectors (AWS keys, private keys, Slack/GitHub/GitLab/Stripe/...
tokens, JWTs, passwords in URLs, keyword `key=value` secrets, high-entropy quoted strings), phone numbers
by libphonenumber (`phonenumbers`), emails by a plain address pattern. Each is replaced by a typed
placeholder: `<secret>`, `<email>`, `<phone>`.

detect-secrets reports a secret's value, sometimes only a prefix of it (`ghp` for a GitHub token) or a
part of a larger token (a JWT without its signature); so each hit is widened to the whole token around it,
and a private key to its whole block, so that no fragment of it survives.
"""

from __future__ import annotations

import re
from collections import Counter
from functools import cache
from typing import NamedTuple

import phonenumbers
from detect_secrets.core.plugins.util import get_mapping_from_secret_type_to_class
from detect_secrets.plugins.base import BasePlugin, RegexBasedDetector
from detect_secrets.plugins.high_entropy_strings import Base64HighEntropyString, HighEntropyStringsPlugin
from detect_secrets.plugins.keyword import CONFIG_DENYLIST_REGEX_TO_GROUP, DENYLIST_REGEX, KeywordDetector
from detect_secrets.plugins.private_key import PrivateKeyDetector

SECRET, EMAIL, PHONE = "<secret>", "<email>", "<phone>"
# Public IP addresses are not credentials, and a log paste is full of them.
_SKIPPED_DETECTORS = frozenset({"IPPublicDetector"})
_TOKEN_CHAR = re.compile(r"[A-Za-z0-9_\-+/=.~%]")
_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_KEY_END = re.compile(r"-----END [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----|\Z")
# A keyword secret must look like one: `password: hunter2` is, `secret: sauce` or `key: value` is not.
_PLAIN_WORD = re.compile(r"[A-Za-z]+")
# An unquoted token this long, mixing cases and digits, with base64-like entropy is a key, not a word.
_BARE_TOKEN = re.compile(r"(?<![\w+/=.-])(?=[\w+/=-]*[a-z])(?=[\w+/=-]*[A-Z])(?=[\w+/=-]*\d)[\w+/=-]{32,}")
# Cheap tests first: most messages name no secret keyword and hold too few digits for a phone number.
_KEYWORD = re.compile(DENYLIST_REGEX, re.IGNORECASE)
_PHONE_MIN_DIGITS = 7
_PHONE_REGION = "US"  # numbers without a country code are read as North American ones
# Valid numbers written in their country's digit groups: a log's "37.230937  1537" is no phone number.
_PHONE_LENIENCY = phonenumbers.Leniency.STRICT_GROUPING


class Scrubbed(NamedTuple):
    text: str
    counts: Counter[str]  # kind ("secret", "email", "phone") -> replacements made


def scrub_text(text: str) -> Scrubbed:
    """`text` with every secret, email and phone number replaced by its placeholder, and the counts."""
    counts: Counter[str] = Counter()
    if not text:
        return Scrubbed(text, counts)
    spans = _secret_spans(text)
    if spans:
        text = _replace(text, spans, SECRET)
        counts["secret"] += len(spans)
    text, emails = _EMAIL.subn(EMAIL, text)
    if emails:
        counts["email"] += emails
    phones: list[tuple[int, int]] = []
    if sum(map(str.isdigit, text)) >= _PHONE_MIN_DIGITS:
        matches = phonenumbers.PhoneNumberMatcher(text, _PHONE_REGION, leniency=_PHONE_LENIENCY)
        phones = [(m.start, m.end) for m in matches]
    if phones:
        text = _replace(text, phones, PHONE)
        counts["phone"] += len(phones)
    return Scrubbed(text, counts)


@cache
def _detectors() -> tuple[BasePlugin, ...]:
    return tuple(
        cls()
        for cls in get_mapping_from_secret_type_to_class().values()
        if cls.__name__ not in _SKIPPED_DETECTORS
    )


def _secret_spans(text: str) -> list[tuple[int, int]]:
    spans: list[tuple[int, int]] = []
    for detector in _detectors():
        if isinstance(detector, PrivateKeyDetector):
            for regex in detector.denylist:
                for match in regex.finditer(text):
                    start = text.rfind("-----", 0, match.start())
                    start = start if start >= 0 and match.start() - start <= 5 else match.start()
                    spans.append((start, _KEY_END.search(text, match.end()).end()))  # type: ignore[union-attr]
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
    return _merge(spans)


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
