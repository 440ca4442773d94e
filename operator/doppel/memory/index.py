"""The person's message index: BM25 (bm25s) over what they wrote, built with the adapter, searched per reply.

Why BM25 picks the messages: a question and the earlier message that answers it share the question's rare
words more often than its meaning (measured on the real exports: a static embedding model found the answer
no more often), and an index of 100,000 messages answers in about a millisecond from memory-mapped arrays
(see tests/bench/bench_memory.py). Embeddings (`doppel.memory.meaning`: WordLlama, no torch) serve the
abstention, which needs the question's meaning.

Layout, inside the adapter directory (so it is versioned, written atomically and removed with it):

    ADAPTER/memory/memory.json     who and what: team, person, entry count, build parameters
    ADAPTER/memory/entries.jsonl   one entry per message: text, the message it answered, channel, ts...
    ADAPTER/memory/bm25/           bm25s's arrays and vocabulary (numpy files, memory-mapped on load)
    ADAPTER/memory/counts.npy      how often the person wrote each term (by vocabulary id), for the support
    ADAPTER/memory/embeddings.npy  each entry's embedding (float32, memory-mapped), for the relatedness
    ADAPTER/memory/calibration.npy the relatedness of the questions the person answered: their threshold

Scores: a hit's `coverage` is its BM25 score over the query's own maximum for a typical message (the sum
of the IDF of its terms the messages know: about the share of that information the message matches),
times the share of the query's terms the messages know at all (a question about something never written
about is mostly unknown words; a greeting or a typo costs a little). The person's own name is not a
term: people address them by it. Hits under `min_coverage` are not used.

Abstention: a question whose *support* (`doppel.memory.support`: how much more often the person uses its
words than people do in general, over wordfreq's lists) is under `min_support`, or none of whose words the
person ever wrote, is one their messages do not cover, and the doppel abstains (`Recall.abstain`); so is a
question whose *relatedness* (`doppel.memory.meaning`: its meaning against theirs) is under the person's own
threshold. The word counts and embeddings these need are kept with the index.

Budget: hits are taken best first while their prompt lines fit `budget_tokens`, counted as
`ceil(UTF-8 bytes / BYTES_PER_TOKEN)`: no tokenizer in the bot image, and English BPE tokens average about
four characters, so three over-counts on purpose. Bytes, not characters: a Japanese or Chinese character is
three bytes and about a token (SmolLM2: 0.9 characters a token on haskell-jp, 3.6 on hyperledger), so a
budget counted in characters let Japanese memory take three times its share of the prompt.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import bm25s
import numpy as np
import Stemmer
from bm25s.stopwords import STOPWORDS_EN

from doppel.errors import BadInput
from doppel.fsutil import atomic_directory
from doppel.memory import meaning
from doppel.memory.support import DEFAULT_MIN_SUPPORT, MIN_WORDS, clean, support

# bm25s sets its own logger to DEBUG on import: each index build's "Building index from tokens" would reach
# whatever handler the root logger has (the CLI's stage lines, the bot's log).
logging.getLogger("bm25s").setLevel(logging.WARNING)

MEMORY_DIR = "memory"
META_FILE = "memory.json"
ENTRIES_FILE = "entries.jsonl"
BM25_DIR = "bm25"
COUNTS_FILE = "counts.npy"
# doppel.memory.meaning, one row per entry. float32 on disk, memory-mapped: the bot keeps many indexes
# (page cache the kernel can reclaim, not its own memory), and numpy's float16 product is ten times slower.
EMBEDDINGS_FILE = "embeddings.npy"
CALIBRATION_FILE = "calibration.npy"  # the relatedness of the questions the person answered, sorted
FORMAT = 2  # 2: CJK text indexed as character pairs, term counts for the support
BYTES_PER_TOKEN = 3
DEFAULT_K = 3
# Memory in a prompt crowds out the conversation it answers: with 512-token samples (the CPU budget), 256
# tokens of it raised SmolLM2's held-out loss on hyperledger's ghaskins by 9% (3.55 -> 3.87) against 128.
DEFAULT_BUDGET_TOKENS = 128
DEFAULT_MIN_COVERAGE = 0.3
ANSWERED_CHARS = 200  # of the message an entry answered, in the prompt line and the index
_SPLIT = re.compile(r"(?u)\b\w\w+\b")  # bm25s's default splitter
_STOPWORDS = frozenset(STOPWORDS_EN)
_CJK_CHARS = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\uff66-\uff9f"
_CJK = re.compile(f"[{_CJK_CHARS}]")
_CJK_SPLIT = re.compile(f"([{_CJK_CHARS}]+)")
_HIRAGANA = re.compile("[\u3040-\u309f]+")
_QUESTION = re.compile(
    r"[?？]|^\s*(who|what|when|where|why|how|which|whose|is|are|was|were|do|does|did|can|could|should|"
    r"would|will|have|has|any|anyone)\b",
    re.IGNORECASE | re.MULTILINE,
)


@dataclass(frozen=True)
class Entry:
    """One message of the person, with what it answered and where it was."""

    text: str
    channel: str
    channel_id: str
    ts: str
    thread_ts: str
    team: str = ""
    answered: str = ""  # the message it answered ("Bob: ..."), empty for an opening message
    permalink: str | None = None

    @property
    def thread(self) -> str:
        return f"{self.channel_id}/{self.thread_ts}"

    def day(self, now: dt.datetime | None = None) -> str:
        """ "12 Mar", with the year when it is not this year's."""
        when = dt.datetime.fromtimestamp(float(self.ts), dt.UTC)
        now = now or dt.datetime.now(dt.UTC)
        return f"{when.day} {when:%b}" + ("" if when.year == now.year else f" {when.year}")

    def line(self) -> str:
        """How the entry reads in the prompt: where and when, what it answered, what the person wrote."""
        answered = _clip(self.answered, ANSWERED_CHARS)
        answering = f" (answering {answered})" if answered else ""
        return f"[#{self.channel}, {self.day()}]{answering} {self.text}"

    def source(self, workspace_url: str | None = None) -> dict[str, Any]:
        """What `doppel chat --json` and the Slack context block show of it."""
        link = self.permalink or (permalink(workspace_url, self) if workspace_url else None)
        return {"channel": self.channel, "ts": self.ts, "permalink": link, "text": self.text}


@dataclass(frozen=True)
class Hit:
    entry: Entry
    coverage: float


@dataclass(frozen=True)
class Recall:
    """What a search found for one reply."""

    hits: list[Hit] = field(default_factory=list)
    coverage: float = 0.0  # the best message's, kept or not
    question: bool = False
    support: float | None = None  # doppel.memory.support; None: too few content words to say
    min_support: float = DEFAULT_MIN_SUPPORT
    relatedness: float | None = None  # doppel.memory.meaning; None for an index without embeddings
    min_relatedness: float | None = None  # the person's own threshold; None: not enough to calibrate

    @property
    def abstain(self) -> bool:
        """A question about something the person does not write about: its support is under the threshold,
        its meaning is further from what they write about than the threshold allows, or none of its words
        is in anything they wrote (what decides for a person of few messages, whose support stays near 0
        for want of evidence)."""
        if not self.question or self.support is None:
            return False
        unrelated = (
            self.relatedness is not None
            and self.min_relatedness is not None
            and self.relatedness < self.min_relatedness
        )
        return self.support < self.min_support or unrelated or self.coverage == 0

    def lines(self) -> list[str]:
        return [hit.entry.line() for hit in self.hits]

    def sources(self, workspace_url: str | None = None) -> list[dict[str, Any]]:
        return [hit.entry.source(workspace_url) for hit in self.hits]


def is_question(text: str) -> bool:
    """Whether `text` asks something (a question mark, or a line opening like a question)."""
    return bool(_QUESTION.search(text))


def tokens(text: str) -> int:
    """Tokens `text` is counted as against a budget."""
    return math.ceil(len(text.encode("utf-8")) / BYTES_PER_TOKEN)


def permalink(workspace_url: str, entry: Entry) -> str:
    """Slack's permalink of the message: https://WORKSPACE.slack.com/archives/C/p<ts digits>, and for a
    reply in a thread the thread it belongs to."""
    base = f"{workspace_url.rstrip('/')}/archives/{entry.channel_id}/p{entry.ts.replace('.', '')}"
    if entry.thread_ts and entry.thread_ts != entry.ts:
        return f"{base}?thread_ts={entry.thread_ts}&cid={entry.channel_id}"
    return base


def entries_from_samples(records: Iterable[Mapping[str, Any]]) -> list[Entry]:
    """The person's messages as training samples hold them (samples.jsonl records): the final assistant
    turn is what they wrote, the user turn before it what they answered."""
    entries: list[Entry] = []
    for record in records:
        messages, meta = record.get("messages") or [], record.get("meta") or {}
        if not messages or messages[-1].get("role") != "assistant" or "ts" not in meta:
            continue
        before = messages[-2] if len(messages) > 1 and messages[-2].get("role") == "user" else None
        answered = before["content"].splitlines()[-1] if before and before["content"].strip() else ""
        if answered.startswith("(a new thread"):
            answered = ""
        entries.append(
            Entry(
                text=messages[-1]["content"],
                channel=str(meta.get("channel") or meta.get("channel_id") or ""),
                channel_id=str(meta.get("channel_id") or ""),
                ts=str(meta["ts"]),
                thread_ts=str(meta.get("thread_ts") or meta["ts"]),
                team=str(meta.get("team") or ""),
                answered=answered,
                permalink=meta.get("permalink"),
            )
        )
    return entries


def person_entries(records: Iterable[Mapping[str, Any]], memory_file: Path | None = None) -> list[Entry]:
    """Everything the person's memory holds: the messages of `memory_file` (memory.jsonl, written beside
    the samples by the scrape: their messages, short ones too, beyond the newest samples a training takes)
    and those of the samples `records` it lacks (an older scrape's, or one without it), oldest first."""
    entries: dict[tuple[str, str], Entry] = {}
    if memory_file is not None and Path(memory_file).is_file():
        with Path(memory_file).open(encoding="utf-8") as handle:
            for lineno, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    entry = Entry(**json.loads(line))
                except (json.JSONDecodeError, TypeError) as exc:
                    raise BadInput(f"{memory_file}:{lineno}: not a memory entry ({exc})") from None
                entries[(entry.channel_id, entry.ts)] = entry
    for entry in entries_from_samples(records):
        entries.setdefault((entry.channel_id, entry.ts), entry)
    return sorted(entries.values(), key=lambda e: float(e.ts))


def write_index(
    entries: Sequence[Entry], where: Path, *, team: str, person_id: str, person_name: str
) -> Path:
    """Build the index of `entries` into `where` (`ADAPTER/memory`), atomically, replacing any earlier one.
    Entries of another workspace are refused: one index holds one person of one workspace."""
    foreign = {e.team for e in entries if e.team and e.team != team}
    if foreign:
        raise BadInput(f"messages of workspace {sorted(foreign)[0]} cannot join {team}'s memory")
    if not entries:
        raise BadInput("no messages to remember")
    stemmer = Stemmer.Stemmer("english")
    corpus = [terms(f"{e.answered}\n{e.text}", stemmer) or [""] for e in entries]
    retriever = bm25s.BM25()
    retriever.index(corpus, show_progress=False)
    vocab = retriever.vocab_dict
    counts = np.zeros(len(vocab), dtype=np.int32)
    for entry in entries:  # what the person wrote, not what they answered
        for term in terms(entry.text, stemmer):
            if term in vocab:
                counts[vocab[term]] += 1
    embeddings, calibration = _meaning(entries, stemmer)
    with atomic_directory(Path(where), replace=True) as tmp:
        retriever.save(str(tmp / BM25_DIR), show_progress=False)
        np.save(tmp / COUNTS_FILE, counts)
        np.save(tmp / EMBEDDINGS_FILE, embeddings)  # float32, as meaning.embed returns it
        np.save(tmp / CALIBRATION_FILE, calibration)
        with (tmp / ENTRIES_FILE).open("w", encoding="utf-8") as handle:
            for entry in entries:
                handle.write(json.dumps(asdict(entry), ensure_ascii=False) + "\n")
        meta = {
            "format": FORMAT,
            "team": team,
            "person_id": person_id,
            "person_name": person_name,
            "entries": len(entries),
            "words": int(counts.sum()),
            "embedding": meaning.MODEL,
            "calibration_questions": len(calibration),
            "built_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "voice": voice_habits([e.text for e in entries]),
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return Path(where)


def asked_question(entry: Entry) -> str:
    """What the entry answered, without its author ("Bob: is it..." -> "is it...")."""
    author, said, text = entry.answered.partition(": ")
    return text if said else author


def _judged(text: str, stemmer: Any) -> bool:
    """Whether `text` is a question abstention judges: two content words or more."""
    return is_question(text) and len(set(terms(clean(text), stemmer))) >= MIN_WORDS


def _meaning(entries: Sequence[Entry], stemmer: Any) -> tuple[np.ndarray, np.ndarray]:
    """The entries' embeddings (what they answered and what the person wrote) and the relatedness of the
    questions the person answered, the calibration of the abstention threshold (doppel.memory.meaning)."""
    embeddings = meaning.embed([clean(f"{asked_question(e)}\n{e.text}") for e in entries])
    questions = meaning.sample([i for i, e in enumerate(entries) if _judged(asked_question(e), stemmer)])
    asked = meaning.embed([clean(asked_question(entries[i])) for i in questions])
    threads: dict[str, int] = {}
    thread_ids = np.array([threads.setdefault(e.thread, len(threads)) for e in entries])
    ts = np.array([float(e.ts) for e in entries])
    return embeddings, meaning.calibrate(questions, embeddings, asked, thread_ids, ts)


def terms(text: str, stemmer: Any) -> list[str]:
    """The index terms of `text`: lower-cased words of two characters or more, English stop words out,
    stemmed (what bm25s's own tokenizer does, without its growing vocabulary cache). Chinese, Japanese and
    Korean are written without spaces: a run of their characters gives its character pairs (the usual
    n-gram indexing of CJK text), cut at hiragana (Japanese grammar: particles, endings), a lone character
    itself."""
    words: list[str] = []
    for word in _SPLIT.findall(text.lower()):
        if not _CJK.search(word):
            if word not in _STOPWORDS:
                words.append(word)
            continue
        for part in _CJK_SPLIT.split(word):
            if not _CJK.search(part):
                if len(part) > 1 and part not in _STOPWORDS:
                    words.append(part)
                continue
            for piece in _HIRAGANA.split(part):
                words += [piece[i : i + 2] for i in range(len(piece) - 1)] or ([piece] if piece else [])
    return stemmer.stemWords(words)


def content_words(text: str, stemmer: Any) -> list[tuple[str, str, bool]]:
    """The content words of `text` (Slack markup and English stop words out), each as (word, its index
    term, whether it is CJK), one per term: what the support and the attribution of sources weigh."""
    words: dict[str, tuple[str, str, bool]] = {}
    for word in _SPLIT.findall(clean(text).lower()):
        if _CJK.search(word):
            found = [(t, t, True) for t in terms(word, stemmer)]
        elif word not in _STOPWORDS:
            found = [(word, stemmer.stemWord(word), False)]
        else:
            found = []
        for item in found:
            words.setdefault(item[1], item)
    return list(words.values())


def voice_habits(texts: Sequence[str]) -> dict[str, float]:
    """How the person writes, as the abstention reply follows it: the share of their messages that start
    lower-case and that end with a full stop."""
    texts = [t.strip() for t in texts if t.strip()]
    if not texts:
        return {"lowercase": 0.0, "full_stop": 1.0}
    lower = sum(1 for t in texts if t[0].isalpha() and t[0].islower())
    stop = sum(1 for t in texts if t.endswith("."))
    return {"lowercase": round(lower / len(texts), 3), "full_stop": round(stop / len(texts), 3)}


class MemoryIndex:
    """A loaded index: read-only, safe to share between threads."""

    def __init__(
        self,
        where: Path,
        meta: dict[str, Any],
        entries: list[Entry],
        retriever: Any,
        counts: Any,
        stored: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        self.where, self.meta, self.entries, self.retriever = where, meta, entries, retriever
        self.counts = counts
        # (embeddings memory-mapped, calibration): an index built before relatedness existed has neither,
        # and the support alone decides
        self._embeddings = stored[0] if stored else None
        self.calibration = stored[1] if stored else None
        self.stemmer = Stemmer.Stemmer("english")
        indptr = np.asarray(retriever.scores["indptr"])
        self._df = np.diff(indptr)
        self._n = len(entries)
        self._ts = np.array([float(e.ts) for e in entries])
        threads: dict[str, int] = {}
        self._threads = np.array([threads.setdefault(e.thread, len(threads)) for e in entries])
        self._thread_ids = threads
        self._name = set(terms(str(meta.get("person_name") or ""), self.stemmer))

    @property
    def person_name(self) -> str:
        return str(self.meta.get("person_name") or "")

    @property
    def name_terms(self) -> frozenset[str]:
        """The index terms of the person's own name: people address them by it, so it says nothing."""
        return frozenset(self._name)

    @classmethod
    def load(cls, where: Path, *, team: str | None = None, person_id: str | None = None) -> MemoryIndex:
        """Open `where` (`ADAPTER/memory`). With `team`/`person_id`, an index of anyone else is refused:
        a doppel never reads another's memory, nor a workspace another's."""
        where = Path(where)
        try:
            meta = json.loads((where / META_FILE).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise BadInput(f"no memory index at {where}") from None
        if meta.get("format") != FORMAT:
            raise BadInput(f"memory index at {where} has format {meta.get('format')}, expected {FORMAT}")
        for key, wanted in (("team", team), ("person_id", person_id)):
            if wanted is not None and meta.get(key) != wanted:
                raise BadInput(f"memory index at {where} is of {key} {meta.get(key)!r}, not {wanted!r}")
        with (where / ENTRIES_FILE).open(encoding="utf-8") as handle:
            entries = [Entry(**json.loads(line)) for line in handle if line.strip()]
        retriever = bm25s.BM25.load(str(where / BM25_DIR), mmap=True, show_progress=False, verbosity=0)
        counts = np.load(where / COUNTS_FILE, mmap_mode="r")
        stored = None
        if (where / CALIBRATION_FILE).is_file():
            stored = (np.load(where / EMBEDDINGS_FILE, mmap_mode="r"), np.load(where / CALIBRATION_FILE))
        return cls(where, meta, entries, retriever, counts, stored)

    def relatedness(self, query: str, mask: np.ndarray | None = None) -> float | None:
        """How close `query` is in meaning to the person's messages (doppel.memory.meaning); None for an
        index without embeddings."""
        if self._embeddings is None:
            return None
        return meaning.relatedness(meaning.embed([clean(query)])[0], self._embeddings, mask)

    def support(self, query: str) -> float | None:
        """How much more often the person uses the words of `query` than people do in general
        (`doppel.memory.support`); None for a question of fewer than two content words."""
        vocab = self.retriever.vocab_dict
        words = [w for w in content_words(query, self.stemmer) if w[1] not in self._name]

        def count(stem: str) -> int:
            return int(self.counts[vocab[stem]]) if stem in vocab else 0

        return support(words, count, int(self.meta.get("words") or 0))

    def search(
        self,
        query: str,
        *,
        k: int = DEFAULT_K,
        budget_tokens: int = DEFAULT_BUDGET_TOKENS,
        min_coverage: float = DEFAULT_MIN_COVERAGE,
        min_support: float = DEFAULT_MIN_SUPPORT,
        min_relatedness: float = meaning.DEFAULT_MIN_RELATEDNESS,
        before_ts: float | None = None,
        exclude_thread: str | None = None,
        exclude_since: tuple[str, float] | None = None,
    ) -> Recall:
        """The person's messages most relevant to `query`, best first, at most `k` and within
        `budget_tokens`; for a question, its support and relatedness (abstention under `min_support`, or
        under the relatedness of the least related `min_relatedness` share of the questions the person
        answered). `before_ts`, `exclude_thread` and `exclude_since` (training) keep out the message being
        trained on, anything newer, its thread and its conversation in the channel flow (channel ID, start):
        a reply of several Slack messages is several entries, the first ones older than the reply."""
        question = is_question(query)
        backing = self.support(query) if question else None  # only a question is abstained on
        mask = self._allowed(before_ts, exclude_thread, exclude_since)
        floor = meaning.threshold(self.calibration, min_relatedness) if backing is not None else None
        related = self.relatedness(query, mask) if floor is not None else None
        query = clean(query)
        stems = [s for s in dict.fromkeys(terms(query, self.stemmer)) if s not in self._name]
        vocab = self.retriever.vocab_dict
        # A term in over half the messages says little (its IDF is under log 2) and costs the most to sum:
        # for this person it is a stop word.
        known = [s for s in stems if s and s in vocab and self._df[vocab[s]] * 2 <= self._n]
        stems = [s for s in stems if s not in vocab or self._df[vocab[s]] * 2 <= self._n]
        ids = [vocab[s] for s in known]
        if not ids or self._n == 0:
            return Recall([], 0.0, question, backing, min_support, related, floor)
        scores = self.retriever.get_scores_from_ids(ids)
        if mask is not None:
            scores = np.where(mask, scores, 0.0)
        # The best score a typical message could have, stretched by the share of unknown terms.
        ceiling = sum(self._typical(int(self._df[vocab[s]])) for s in known) * len(stems) / len(known)
        top = min(max(k, 1) * 4, self._n)
        best = np.argpartition(-scores, top - 1)[:top] if top < self._n else np.arange(self._n)
        best = best[np.argsort(-scores[best], kind="stable")]
        coverage = float(scores[best[0]]) / ceiling if ceiling else 0.0
        hits: list[Hit] = []
        used = 0
        for index in best:
            share = float(scores[index]) / ceiling
            # A score of 0 shares no word with the query, or is masked out (newer, held out, the sample's
            # own conversation): never a hit, even with `min_coverage` 0. Best first: none follow.
            if share <= 0 or share < min_coverage or len(hits) >= k:
                break
            if mask is not None and not mask[index]:
                continue
            entry = self.entries[int(index)]
            cost = tokens(entry.line())
            if used + cost > budget_tokens:
                continue  # a shorter one further down may still fit
            hits.append(Hit(entry, round(share, 4)))
            used += cost
        return Recall(hits, round(coverage, 4), question, backing, min_support, related, floor)

    def _allowed(
        self, before_ts: float | None, exclude_thread: str | None, exclude_since: tuple[str, float] | None
    ) -> np.ndarray | None:
        """The messages older than `before_ts`, outside `exclude_thread` and not in channel `exclude_since[0]`
        from `exclude_since[1]` on; None when all are None (all of them, and no array to build on a reply's
        path)."""
        if before_ts is None and exclude_thread is None and exclude_since is None:
            return None
        mask = np.ones(self._n, dtype=bool)
        if before_ts is not None:
            mask &= self._ts < before_ts
        if exclude_thread is not None and exclude_thread in self._thread_ids:
            mask &= self._threads != self._thread_ids[exclude_thread]
        if exclude_since is not None:
            channel, since = exclude_since
            mask &= (self._channels != channel) | (self._ts < since)
        return mask

    @cached_property
    def _channels(self) -> np.ndarray:
        """Each entry's channel ID; only training excludes by channel, so a serving load never builds it."""
        return np.array([e.channel_id for e in self.entries], dtype=object)

    def _typical(self, df: int) -> float:
        """A term's score in a message of average length holding it once, under bm25s's default ("lucene")
        scoring: IDF log(1 + (N - df + 0.5) / (df + 0.5)) times tf / (tf + k1)."""
        return math.log(1 + (self._n - df + 0.5) / (df + 0.5)) / (1 + self.retriever.k1)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"
