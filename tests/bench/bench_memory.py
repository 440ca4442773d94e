"""Benchmark: the person's message index at 100,000 messages of one person.

Prints:
- the time to build the index and its size on disk (bytes per message too), and the time to load it (what
  the bot pays once per adapter version);
- the added latency of retrieval per reply (search, within the default budget, and the prompt lines; for a
  question, the support and the relatedness too: an embedding and a product with every message's), p50
  and p99 over 2,000 questions, against the target of 20 ms, and as a ratio of the baseline: assembling the
  same reply's prompt without retrieval (`build_conversation` over a ten-message thread);
- the same with the training-time filters (older messages of other threads only), which training pays
  once per sample.

The messages are synthetic: words drawn from a Zipf distribution over a 30,000-word vocabulary (the shape
of real text's word frequencies, which is what sets BM25's posting-list lengths), 8 to 60 words each, and
each answers a question drawn the same way. Questions mix words of existing messages with unknown ones.

With `abstention` as argument instead, on the real Hyperledger and haskell-jp exports
(`../shared/real-exports`, skipped when absent): for each export's most active people (`PEOPLE` of each),
the samples split by time as training splits them (the latest 15% held out), the index built from what they
wrote before the cut only (memory.jsonl and the samples, as `doppel train`'s held-out evaluation builds
it), and the abstention rate at several support thresholds (`doppel.memory.support`) and relatedness
shares (`doppel.memory.meaning`) on (a) the questions colleagues asked them after the cut, all of them and
those with a basis in what the person wrote before (`doppel.memory.heldout`: the real reply shares specific
terms with one earlier message), and (b) questions with none: 300 questions of the other real export, the
demo workspace's, the small real exports'.

With `answers`, on the Hyperledger export: for each held-out question with a basis, where retrieval (BM25,
WordLlama) ranks the earliest-ranked earlier message that holds its answer.

Run: .venv/bin/python tests/bench/bench_memory.py [MESSAGES | abstention | answers]
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
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.support.real_exports import REAL_EXPORTS, most_active

from doppel.memory import meaning
from doppel.memory.index import Entry, MemoryIndex, write_index
from doppel.slack.conversation import ThreadMessage, build_conversation

MODE = sys.argv[1] if len(sys.argv) > 1 else "100000"
MESSAGES = int(MODE) if MODE.isdigit() else 100_000
SUPPORTS = (-0.75, -0.5, -0.25)
RELATEDNESS = (0.0, 0.1, 0.15, 0.2)
PEOPLE = 5
REAL = ("hyperledger-slack", "haskell-jp-slack")
SMALL = (
    "hfaran-slack-export-viewer/testarchive.zip",
    "rusq-slackdump/source_export.zip",
    "zulip-slack-fixtures/zulip-slack-fixtures.zip",
)
EVAL_FRACTION = 0.15  # the trainer's default held-out share
FOREIGN = 300
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
            # as remember_samples searches: the lines only, no abstention
            index.search(
                question, min_relatedness=0, before_ts=T0 + MESSAGES * 30, exclude_thread=f"C001/{T0:.6f}"
            )

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


def abstention() -> None:
    """Abstention rates on the real exports (see the module docstring and docs/memory.md)."""
    exports = {name: REAL_EXPORTS / name / f"{name}.zip" for name in REAL}
    if not all(path.is_file() for path in exports.values()):
        print(f"skipped: the real exports are missing under {REAL_EXPORTS}")
        return
    from doppel.memory.heldout import foreign_questions

    foreign = {name: export_questions(path, seed=0)[:FOREIGN] for name, path in exports.items()}
    small = [q for zz in SMALL for q in export_questions(REAL_EXPORTS / zz, seed=0)]
    for name, export in exports.items():
        for person in most_active(export, PEOPLE):
            sets = {f"no basis: {other}": foreign[other] for other in REAL if other != name}
            sets["no basis: demo workspace"] = foreign_questions("")
            sets["no basis: small exports"] = small
            abstention_of(export, person, sets)


def person_index(export: Path, person: str, work: Path) -> tuple[MemoryIndex, list[tuple[Entry, str]]]:
    """The index of what `person` wrote before the held-out cut (as a held-out evaluation must see it),
    and the questions colleagues asked them after it (the entry of each reply, and the question)."""
    import json

    from doppel.local.settings import LOCAL_MAX_SAMPLES
    from doppel.memory.index import asked_question, is_question, person_entries
    from doppel.slack.export import scrape_export
    from doppel.slack.samples import MEMORY_FILE, ScrapeOptions
    from doppel.train.data import load_samples, split_by_time

    # `doppel local`'s samples, whose held-out cut docs/memory.md's figures are of (a scrape's default 2,000
    # put the cut months earlier: fewer messages indexed, more questions after it).
    options = ScrapeOptions(cutoff_days=36500, now=time.time(), max_samples=LOCAL_MAX_SAMPLES)
    scrape_export(export, person, work / "data", options)
    path = work / "data" / "samples.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    cut = split_by_time(load_samples(path), EVAL_FRACTION).cut_ts or float("inf")
    remembered = person_entries(records, work / "data" / MEMORY_FILE)
    before = [e for e in remembered if float(e.ts) < cut]
    meta = records[0]["meta"]
    where = write_index(
        before, work / "memory", team=meta["team"], person_id=meta["user"], person_name=meta["person"]
    )
    later = [(e, asked_question(e)) for e in remembered if float(e.ts) >= cut and e.answered]
    return MemoryIndex.load(where), [(e, q) for e, q in later if is_question(q)]


def abstention_of(export: Path, person: str, foreign: dict[str, list[str]]) -> None:
    """One person's rates (see `abstention`)."""
    import Stemmer

    from doppel.memory.heldout import Earlier
    from doppel.memory.prompt import query

    work = Path(tempfile.mkdtemp(prefix="bench-memory-real-"))
    try:
        index, asked = person_index(export, person, work)
        before = index.entries
        earlier = Earlier([e.text for e in index.entries], Stemmer.Stemmer("english"))
        later = [(q, e.text) for e, q in asked]
        sets = {
            "with basis": [q for q, reply in later if earlier.basis(q, reply)],
            "all asked after the cut": [q for q, _ in later],
            **foreign,
        }
        # Each question judged (two content words or more) as (support, coverage, relatedness).
        judged: dict[str, list[tuple[float, float, float]]] = {}
        for k, questions in sets.items():
            recalls = [(q, index.search(query(q), min_relatedness=0)) for q in questions]
            judged[k] = [
                (r.support, r.coverage, index.relatedness(query(q)) or 0.0)
                for q, r in recalls
                if r.support is not None
            ]
        floors = {share: meaning.threshold(index.calibration, share) for share in RELATEDNESS}
        print(
            f"{export.stem}, {index.person_name}: {len(before)} messages indexed, "
            f"{len(index.calibration)} questions calibrate; judged (two content words or more): "
            + ", ".join(f"{k} {len(v)}" for k, v in judged.items())
        )
        for threshold in SUPPORTS:
            for share, floor in floors.items():
                rates = []
                for k, found in judged.items():
                    out = [
                        sup < threshold or cov == 0 or (floor is not None and rel < floor)
                        for sup, cov, rel in found
                    ]
                    if out:
                        rates.append(f"{k} {statistics.mean(out):.0%}")
                print(
                    f"  min support {threshold:+.2f}, relatedness {share:.2f}: abstains on {', '.join(rates)}"
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def answers() -> None:
    """Where retrieval ranks the earlier messages that hold the answer of a held-out question with a basis
    (`doppel.memory.heldout`: two or more of the specific terms of the real reply), for hyperledger's most
    active people: by the index's BM25 over the question, and by WordLlama's cosine to it."""
    import Stemmer

    from doppel.memory.heldout import Earlier
    from doppel.memory.index import terms
    from doppel.memory.support import clean

    export = REAL_EXPORTS / REAL[0] / f"{REAL[0]}.zip"
    if not export.is_file():
        print(f"skipped: the real exports are missing under {REAL_EXPORTS}")
        return
    stemmer = Stemmer.Stemmer("english")
    ranks: dict[str, list[int]] = {"BM25": [], "WordLlama": []}
    for person in most_active(export, PEOPLE):
        work = Path(tempfile.mkdtemp(prefix="bench-memory-answers-"))
        try:
            index, asked = person_index(export, person, work)
            earlier = Earlier([e.text for e in index.entries], stemmer)
            vocab = index.retriever.vocab_dict
            embeddings = np.load(index.where / "embeddings.npy")
            for entry, question in asked:
                basis = earlier.basis(question, entry.text)
                if basis is None:
                    continue
                holding = [i for i, m in enumerate(earlier.messages) if len(set(basis.answer) & m) >= 2]
                ids = [vocab[t] for t in dict.fromkeys(terms(clean(question), stemmer)) if t in vocab]
                bm25 = index.retriever.get_scores_from_ids(ids) if ids else np.zeros(len(index.entries))
                cosine = embeddings @ meaning.embed([clean(question)])[0]
                for name, scores in (("BM25", bm25), ("WordLlama", cosine)):
                    order = np.argsort(-scores, kind="stable")
                    position = np.empty(len(order), dtype=int)
                    position[order] = np.arange(len(order))
                    ranks[name].append(int(position[holding].min()))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    for name, found in ranks.items():
        print(
            f"{name}: of {len(found)} questions with a basis, a message holding the answer is in the top 3 "
            f"for {sum(r < 3 for r in found)}, top 10 for {sum(r < 10 for r in found)}, top 50 for "
            f"{sum(r < 50 for r in found)}; median rank {statistics.median(found) + 1:.0f}"
        )


def export_questions(export: Path, seed: int) -> list[str]:
    """The questions people asked in `export` (messages with a question form), shuffled by `seed`."""
    import json
    import random
    import zipfile

    from doppel.memory.index import is_question

    found: list[str] = []
    with zipfile.ZipFile(export) as archive:
        for name in archive.namelist():
            if name.endswith(".json") and "/" in name:
                for m in json.loads(archive.read(name)):
                    usable = isinstance(m, dict) and m.get("user") and not m.get("subtype")
                    if usable and is_question(m.get("text", "")):
                        found.append(m["text"])
    found = list(dict.fromkeys(found))
    random.Random(seed).shuffle(found)
    return found


if __name__ == "__main__":
    {"abstention": abstention, "answers": answers}.get(MODE, main)()
