"""Benchmark: the person's message index at 100,000 messages of one person.

Prints:
- the time to build the index and its size on disk (bytes per message too), and the time to load it (what
  the bot pays once per adapter version);
- the added latency of retrieval per reply (search, within the default budget, and the prompt lines), p50
  and p99 over 2,000 questions, against the target of 20 ms, and as a ratio of the baseline: assembling the
  same reply's prompt without retrieval (`build_conversation` over a ten-message thread);
- the same with the training-time filters (older messages of other threads only), which training pays
  once per sample.

The messages are synthetic: words drawn from a Zipf distribution over a 30,000-word vocabulary (the shape
of real text's word frequencies, which is what sets BM25's posting-list lengths), 8 to 60 words each, and
each answers a question drawn the same way. Questions mix words of existing messages with unknown ones.

Run: .venv/bin/python tests/bench/bench_memory.py [MESSAGES]
"""

from __future__ import annotations

import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "operator"))

from doppel.memory.index import Entry, MemoryIndex, write_index
from doppel.slack.conversation import ThreadMessage, build_conversation

MESSAGES = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
VOCABULARY = 30_000
QUESTIONS = 2_000
TARGET_MS = 20.0
T0 = 1_700_000_000.0


def words(rng: np.random.Generator, vocabulary: list[str], n: int) -> str:
    picks = np.minimum(rng.zipf(1.3, n), len(vocabulary)) - 1
    return " ".join(vocabulary[i] for i in picks)


def corpus(rng: np.random.Generator) -> tuple[list[Entry], list[str]]:
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "pa", "do", "fi", "gu", "he", "ja"]
    vocabulary = list(
        dict.fromkeys("".join(rng.choice(syllables, rng.integers(2, 5))) for _ in range(VOCABULARY * 2))
    )[:VOCABULARY]
    entries = [
        Entry(
            text=words(rng, vocabulary, int(rng.integers(8, 60))),
            channel=f"channel-{i % 40}",
            channel_id=f"C{i % 40:03d}",
            ts=f"{T0 + i * 60:.6f}",
            thread_ts=f"{T0 + (i - i % 3) * 60:.6f}",
            team="TBENCH",
            answered="Bob: " + words(rng, vocabulary, int(rng.integers(4, 20))) + "?",
        )
        for i in range(MESSAGES)
    ]
    questions = [
        words(rng, vocabulary, int(rng.integers(3, 12))) + " zzunknown" * int(rng.integers(0, 2)) + "?"
        for _ in range(QUESTIONS)
    ]
    return entries, questions


def thread(question: str) -> list[ThreadMessage]:
    lines = [f"earlier message number {i} of the thread, of a usual length for Slack" for i in range(9)]
    people = [ThreadMessage("U2", "Bob", text, T0 + i) for i, text in enumerate(lines)]
    return [*people, ThreadMessage("U3", "Carol", question, T0 + 10)]


def timed(fn, items: list[str]) -> list[float]:
    times = []
    for item in items:
        started = time.perf_counter()
        fn(item)
        times.append((time.perf_counter() - started) * 1000)
    return times


def p(times: list[float], q: float) -> float:
    return float(np.percentile(times, q))


def main() -> None:
    rng = np.random.default_rng(0)
    entries, questions = corpus(rng)
    where = Path(tempfile.mkdtemp(prefix="bench-memory-")) / "memory"
    try:
        started = time.perf_counter()
        write_index(entries, where, team="TBENCH", person_id="U1", person_name="Alice")
        build_s = time.perf_counter() - started
        size = sum(f.stat().st_size for f in where.rglob("*") if f.is_file())
        started = time.perf_counter()
        index = MemoryIndex.load(where, team="TBENCH", person_id="U1")
        load_s = time.perf_counter() - started
        print(
            f"{MESSAGES:,} messages: index built in {build_s:.1f} s, {size / 2**20:.1f} MiB on disk "
            f"({size / MESSAGES:.0f} bytes a message), loaded in {load_s * 1000:.0f} ms"
        )

        def baseline(question: str) -> None:
            build_conversation("Alice", "U1", thread(question), channel="general")

        def retrieval(question: str) -> None:
            index.search(question).lines()

        def training(question: str) -> None:
            index.search(question, before_ts=T0 + MESSAGES * 30, exclude_thread=f"C001/{T0:.6f}")

        for fn in (baseline, retrieval):  # warm up
            timed(fn, questions[:50])
        base = timed(baseline, questions)
        added = timed(retrieval, questions)
        train = timed(training, questions[:500])
        hits = statistics.mean(len(index.search(q).hits) for q in questions[:200])
        print(
            f"prompt assembly without retrieval (baseline): p50 {p(base, 50):.3f} ms, "
            f"p99 {p(base, 99):.3f} ms"
        )
        print(
            f"added retrieval per reply: p50 {p(added, 50):.2f} ms, p99 {p(added, 99):.2f} ms "
            f"(target < {TARGET_MS:.0f} ms: p99 at {p(added, 99) / TARGET_MS:.2f} of it); "
            f"{p(added, 50) / p(base, 50):.1f}x the baseline's p50; {hits:.1f} messages retrieved on average"
        )
        print(
            f"training-time retrieval (older, other threads): p50 {p(train, 50):.2f} ms, "
            f"p99 {p(train, 99):.2f} ms a sample"
        )
    finally:
        shutil.rmtree(where.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
