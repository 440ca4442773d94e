"""Does the person write about what a question asks? The abstention measure.

A question's *support* is how much more often the person uses its words than people do in general: for each
content word w of the question (Slack mentions, links, emoji, stop words and the person's own name left out;
common words such as "from" stay: a person of another language does not use them),

    log10( p_person(w) / p_general(w) ),   p_person(w) = (count(w) + MU * p_general(w)) / (total + MU)

averaged over the words. `count`/`total` are the word's stem's occurrences in the person's messages and all
of theirs (counted when the index is built); `p_general` is the word's frequency in general language
(wordfreq's lists: English, or Japanese/Chinese/Korean for CJK terms). MU smooths towards the background,
so a person with few messages is not judged on them (a word they never used scores log10(MU / (total +
MU)): about -0.2 at 500 words written, -2.4 at 250,000). Near 0: the question's words are used as people
use them; above 0: the person's own subjects; below: words they do not use (another topic, another
language, another workspace). It is a mean of log ratios, so it reads the same for any question length and
any person: a threshold means the same everywhere (`DEFAULT_MIN_SUPPORT`).

A question with fewer than `MIN_WORDS` content words ("any idea?", "from cli?") has no support (None): it
asks about the conversation, not a subject, and is never abstained on.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Collection
from functools import lru_cache
from typing import Any

MU = 1000.0
MIN_WORDS = 2
# Log10 units: the question's words, on average, about three times rarer in the person's messages than in
# general language. Measured on the real exports (docs/memory.md, tests/bench/bench_memory.py abstention).
DEFAULT_MIN_SUPPORT = -0.5
_FLOOR = 1e-8  # a word no list has: rarer than any listed
_CJK_FLOOR = 1e-7  # a CJK character pair that is not a word of the list
# Slack markup that says nothing of the subject: <@U123>, <#C123|name>, <!here>, <https://...>, :emoji:
_MARKUP = re.compile(r"<[@#!][^>]*>|<https?://[^>]*>|https?://\S+|:[a-z0-9_+'-]+:", re.IGNORECASE)
_HANGUL = re.compile("[\uac00-\ud7af]")


def clean(text: str) -> str:
    """`text` without Slack mentions, links and emoji codes."""
    return _MARKUP.sub(" ", text)


@lru_cache(maxsize=8)
def _frequencies(lang: str) -> dict[str, float]:
    import wordfreq

    return wordfreq.get_frequency_dict(lang, wordlist="best")


def background(word: str, cjk: bool) -> float:
    """The frequency of `word` in general language."""
    if not cjk:
        return max(_frequencies("en").get(word, 0.0), _FLOOR)
    langs = ("ko",) if _HANGUL.search(word) else ("ja", "zh")
    return max(max(_frequencies(lang).get(word, 0.0) for lang in langs), _CJK_FLOOR)


def support(
    words: Collection[tuple[str, str, bool]], count: Callable[[str], int], total: int
) -> float | None:
    """The support of a question's content `words` ((word, stem, is CJK) each) for a person who used each
    stem `count(stem)` times in `total` words; None under `MIN_WORDS` words."""
    ratios = []
    for word, stem, cjk in words:
        general = background(word, cjk)
        person = (count(stem) + MU * general) / (total + MU)
        ratios.append(math.log10(person / general))
    return sum(ratios) / len(ratios) if len(ratios) >= MIN_WORDS else None


def warm() -> Any:
    """Load the English list now (about a second), not on a first reply."""
    return _frequencies("en")
