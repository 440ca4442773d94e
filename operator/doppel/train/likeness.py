"""The fidelity report's text measures: who wrote a reply, does it answer, is it varied, is it copied.

Pure scikit-learn and standard-library logic over strings, so each measure is cheap to test:

- `AuthorClassifier`: character n-gram TF-IDF and logistic regression over the workspace's real people (the
  person, each colleague with enough messages, authors from message user IDs) plus the base model as one
  more class, so that "not the base model's voice" is not enough to be taken for the person;
- `relevance_scores`: TF-IDF cosine of each reply to the real reply of its context minus its mean cosine to
  the person's other held-out replies: above 0 when a reply is closer to what was actually said there;
- `distinct`: the share of replies that are not near-duplicates (difflib ratio >= `NEAR_DUPLICATE`) of
  another reply of the same set to another context (the same question asked twice may get the same reply);
- `copy_rate`: the share of replies that repeat a span of `COPY_SPAN_WORDS` or more words of a training
  message;
- `characteristic_scores`: how much each of the person's messages reads as theirs rather than their
  colleagues' (the training budget's choice of samples, `doppel.train.data.choose`).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence
from typing import Any

PERSON_CLASS = "person"
BASE_CLASS = "base model"
NEAR_DUPLICATE = 0.8
# What a reply answers is the end of its context: compared there only (difflib is quadratic in the length,
# and a long thread's whole context took minutes to compare).
ASKED_CHARS = 500
COPY_SPAN_WORDS = 12
_WORD = re.compile(r"\w+", re.UNICODE)


class AuthorClassifier:
    """Who wrote a message: the person, one of the colleagues, or the base model."""

    def __init__(self, pipeline: Any) -> None:
        self.pipeline = pipeline

    @classmethod
    def fit(cls, texts: Sequence[str], labels: Sequence[str]) -> AuthorClassifier | None:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline

        pairs = [(t, y) for t, y in zip(texts, labels, strict=True) if t.strip()]
        if len({y for _, y in pairs}) < 2:
            return None
        pipeline = make_pipeline(
            TfidfVectorizer(
                analyzer="char_wb", ngram_range=(2, 4), sublinear_tf=True, min_df=1, max_features=200_000
            ),
            LogisticRegression(max_iter=2000, class_weight="balanced", C=10.0),
        )
        pipeline.fit([t for t, _ in pairs], [y for _, y in pairs])
        return cls(pipeline)

    @property
    def classes(self) -> list[str]:
        return [str(c) for c in self.pipeline.classes_]

    def predict(self, texts: Sequence[str]) -> list[str]:
        if not texts:
            return []
        # An empty reply is nobody's style; the vectoriser would still place it somewhere.
        return [
            str(p) if t.strip() else ""
            for p, t in zip(self.pipeline.predict(list(texts)), texts, strict=True)
        ]

    def taken_for_person(self, texts: Sequence[str]) -> list[bool]:
        """Whether each of `texts` is attributed to the person."""
        return [p == PERSON_CLASS for p in self.predict(texts)]

    @staticmethod
    def person_share(taken: Sequence[bool]) -> float | None:
        """The share of replies taken for the person's, from `taken_for_person`'s flags."""
        if not taken:
            return None
        return round(sum(taken) / len(taken), 4)

    def accuracy(self, texts: Sequence[str], labels: Sequence[str]) -> float | None:
        if not texts:
            return None
        predicted = self.predict(texts)
        return round(sum(p == y for p, y in zip(predicted, labels, strict=True)) / len(labels), 4)


def characteristic_scores(person: Sequence[str], others: Sequence[str], folds: int = 3) -> list[float]:
    """For each of `person`'s messages, the probability that a person-vs-colleagues classifier (character
    n-grams, as `AuthorClassifier`) gives the person, out of fold: no message is scored by a model that saw
    it. 0.5 each when there are too few messages to tell anyone apart."""
    if min(len(person), len(others)) < folds:
        return [0.5] * len(person)
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    texts = [t or " " for t in (*person, *others)]
    labels = [1] * len(person) + [0] * len(others)
    # The vocabulary and its weights come from every text (no label in them); only the classifier is fitted
    # out of fold, which keeps this a few seconds on a CPU.
    vectors = TfidfVectorizer(
        analyzer="char_wb", ngram_range=(2, 4), sublinear_tf=True, max_features=100_000
    ).fit_transform(texts)
    classifier = LogisticRegression(class_weight="balanced", C=10.0, solver="liblinear")
    folding = StratifiedKFold(folds, shuffle=True, random_state=0)
    proba = cross_val_predict(classifier, vectors, labels, cv=folding, method="predict_proba")
    return [round(float(p), 6) for p in proba[: len(person), 1]]


def mean_relevance(scores: Sequence[float] | None) -> float | None:
    """The relevance of a set of replies from its per-context scores (`relevance_scores`)."""
    return None if not scores else round(sum(scores) / len(scores), 4)


def relevance_scores(replies: Sequence[str], real: Sequence[str]) -> list[float] | None:
    """Per context: cos(reply, its real reply) - mean cos(reply, the other real replies)."""
    if len(real) < 2 or len(replies) != len(real):
        return None
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.metrics.pairwise import cosine_similarity

    try:
        vectors = TfidfVectorizer(sublinear_tf=True).fit([*real, *replies])
    except ValueError:  # nothing but stop-words and punctuation
        return None
    sims = cosine_similarity(vectors.transform(replies), vectors.transform(real))
    n = len(real)
    return [round(float(sims[i, i] - (sims[i].sum() - sims[i, i]) / (n - 1)), 6) for i in range(n)]


def distinct(replies: Sequence[str], contexts: Sequence[str] | None = None) -> float | None:
    """Share of `replies` that are not near-duplicates of another one of them. Given the `contexts` they
    answer, two replies to near-duplicate contexts (the same question asked twice) may be alike: a template
    is the same reply to different questions."""
    if not replies:
        return None
    normal = [_normal(r) for r in replies]
    asked = [_normal(c)[-ASKED_CHARS:] for c in contexts] if contexts is not None else None
    duplicate = [False] * len(normal)
    for i in range(len(normal)):
        for j in range(i + 1, len(normal)):
            if _near(normal[i], normal[j]) and not (asked is not None and _near(asked[i], asked[j])):
                duplicate[i] = duplicate[j] = True
    return round(1 - sum(duplicate) / len(normal), 4)


def _normal(text: str) -> str:
    return " ".join(text.lower().split())


def _near(a: str, b: str) -> bool:
    matcher = difflib.SequenceMatcher(None, a, b, autojunk=False)
    return matcher.real_quick_ratio() >= NEAR_DUPLICATE and matcher.ratio() >= NEAR_DUPLICATE


def word_spans(texts: Iterable[str], size: int = COPY_SPAN_WORDS) -> set[int]:
    """Hashes of every run of `size` words (case-folded) in `texts`."""
    spans: set[int] = set()
    for text in texts:
        found = [w.casefold() for w in _WORD.findall(text)]
        spans.update(hash(tuple(found[i : i + size])) for i in range(len(found) - size + 1))
    return spans


def copy_rate(replies: Sequence[str], training_spans: set[int], size: int = COPY_SPAN_WORDS) -> float | None:
    """Share of `replies` holding a run of `size` words that a training message holds."""
    if not replies:
        return None
    copied = sum(1 for reply in replies if word_spans([reply], size) & training_spans)
    return round(copied / len(replies), 4)
