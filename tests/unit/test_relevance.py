"""`relevance`: how much more a reply is like the real reply to its own context than the person's replies to
the others (TF-IDF cosine), so a reply that says what this conversation is about scores above one that would
fit any conversation."""

from __future__ import annotations

from doppel.train.likeness import mean_relevance, relevance_scores

REAL = [
    "Yarr! printer be shipshape, matey",
    "Yarr! demo be shipshape, matey",
    "Yarr! schedule be shipshape, matey",
    "Yarr! lunch be shipshape, matey",
]


def test_replies_naming_their_own_topic_score_above_the_same_reply_for_every_context():
    on_topic = relevance_scores(REAL, REAL)
    generic = relevance_scores(["Yarr! ticket be shipshape, matey"] * 4, REAL)
    swapped = relevance_scores([*REAL[1:], REAL[0]], REAL)  # each names another context's topic
    assert on_topic is not None and generic is not None and swapped is not None
    assert all(score > 0 for score in on_topic)
    assert all(abs(score) < 1e-6 for score in generic)  # as like every real reply as any other
    assert all(score < 0 for score in swapped)
    assert mean_relevance(on_topic) > mean_relevance(generic) > mean_relevance(swapped)


def test_too_few_contexts_or_nothing_but_stop_words_gives_no_figure():
    assert relevance_scores(["yes"], ["yes"]) is None  # one context: nothing to weigh it against
    assert relevance_scores(["!", "?"], ["...", "!!"]) is None  # no word at all
    assert mean_relevance(None) is None and mean_relevance([]) is None
