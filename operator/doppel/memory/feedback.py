"""Feedback on a doppel's replies and the person's corrections, kept in the doppel's own data directory.

Where: `USER_DIR/feedback/`, USER_DIR being the doppel's directory on the shared volume
(`DATA_ROOT/NAMESPACE/NAME`, or `WORKDIR/data/USER` for `doppel local`). So it sits with the doppel's
other data, goes when `forget` removes that directory, and no other doppel (nor workspace: one namespace
per workspace) has a path to it.

    feedback/replies/<reply ts>.json            what the doppel answered and the prompt it answered
    feedback/votes/<reply ts>--<user>.json      one 👍/👎 per person and reply (a second click replaces it)
    feedback/corrections/<reply ts>.json        what the person would have said instead

One small file per event, each written atomically (temporary file and rename): several bot replicas can
write at once on a ReadWriteMany volume without locks, and a reader never sees half a record.

The next training reads it (`training_samples`, `preference_pairs`): a correction becomes a training
sample weighted above ordinary messages, and the reply it corrected its rejected alternative. What is read
back for training is scrubbed (`doppel.slack.scrub.scrub_text`, as the samples are): the person writes
their correction freely, a connection string or a phone number included. The records stay as written.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from doppel.fsutil import atomic_write_text
from doppel.slack.scrub import scrub_text

FEEDBACK_DIR = "feedback"
CORRECTION_WEIGHT = 3  # a correction counts as this many ordinary messages in training
Vote = Literal["up", "down"]
_KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._]{0,63}$")  # a Slack ts or ID: never a path


@dataclass(frozen=True)
class Counts:
    replies: int = 0
    up: int = 0
    down: int = 0
    corrections: int = 0


class FeedbackStore:
    """The feedback of one doppel, rooted at its data directory."""

    def __init__(self, user_dir: Path, *, scrub: bool = True) -> None:
        self.root = Path(user_dir) / FEEDBACK_DIR
        self.scrub = scrub  # the doppel's scrub setting (`--no-scrub`: False), for what training reads

    def record_reply(
        self,
        reply_ts: str,
        *,
        messages: Sequence[dict[str, str]],
        reply: str,
        adapter: str | None = None,
        sources: Sequence[dict[str, Any]] = (),
        abstained: bool = False,
    ) -> None:
        """Keep the prompt a posted reply answered, so a later 👎 or correction has its context."""
        self._write(
            "replies",
            reply_ts,
            {
                "reply_ts": reply_ts,
                "messages": list(messages),
                "reply": reply,
                "adapter": adapter,
                "sources": list(sources),
                "abstained": abstained,
                "at": _now(),
            },
        )

    def reply(self, reply_ts: str) -> dict[str, Any] | None:
        return self._read("replies", reply_ts)

    def vote(self, reply_ts: str, user_id: str, vote: Vote) -> None:
        if vote not in ("up", "down"):
            raise ValueError(f"vote must be up or down, not {vote!r}")
        self._write("votes", (reply_ts, user_id), {"reply_ts": reply_ts, "user": user_id, "vote": vote})

    def correct(self, reply_ts: str, user_id: str, text: str) -> None:
        """The person's own words for reply `reply_ts` (their latest correction wins)."""
        record = {"reply_ts": reply_ts, "user": user_id, "text": text, "at": _now()}
        self._write("corrections", reply_ts, record)

    def counts(self) -> Counts:
        votes = [v["vote"] for v in self._all("votes")]
        return Counts(
            replies=self._count("replies"),
            up=votes.count("up"),
            down=votes.count("down"),
            corrections=self._count("corrections"),
        )

    def training_samples(self, person: str | None = None) -> list[dict[str, Any]]:
        """samples.jsonl records of the corrections: the prompt the reply answered, ending with the person's
        own words, weighted `CORRECTION_WEIGHT` (`meta.weight`)."""
        samples = []
        for correction, reply in self._corrected():
            meta = {"source": "correction", "reply_ts": correction["reply_ts"], "weight": CORRECTION_WEIGHT}
            if person:
                meta["person"] = person
            messages = [*reply["messages"], {"role": "assistant", "content": correction["text"]}]
            samples.append({"messages": messages, "meta": meta})
        return samples

    def preference_pairs(self) -> list[dict[str, Any]]:
        """Preference pairs (TRL's conversational format): the prompt, the person's correction as chosen and
        the reply it corrected as rejected."""
        return [
            {
                "prompt": reply["messages"],
                "chosen": [{"role": "assistant", "content": correction["text"]}],
                "rejected": [{"role": "assistant", "content": reply["reply"]}],
            }
            for correction, reply in self._corrected()
            if correction["text"].strip() != reply["reply"].strip()
        ]

    def corrections(self) -> list[dict[str, Any]]:
        """Each correction with its context: {reply_ts, messages (the prompt answered), reply (what the
        doppel wrote), text (what the person would have said)}, oldest first."""
        return [
            {
                "reply_ts": correction["reply_ts"],
                "messages": reply["messages"],
                "reply": reply["reply"],
                "text": correction["text"],
            }
            for correction, reply in self._corrected()
        ]

    def _corrected(self) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """Each correction with the reply it corrected, their texts scrubbed unless the doppel is not."""
        pairs = []
        for correction in self._all("corrections"):
            reply = self.reply(correction["reply_ts"])
            if reply and correction.get("text", "").strip():
                pairs.append((self._scrubbed(correction), self._scrubbed(reply)))
        return pairs

    def _scrubbed(self, record: dict[str, Any]) -> dict[str, Any]:
        """`record` with its text, reply and prompt messages scrubbed (a copy; the file stays as written).
        The prompt was scrubbed when the bot built it, the reply before it was posted: scrubbed again, they
        come out the same, and a record from before either or written by another tool is covered too."""
        if not self.scrub:
            return record
        clean = dict(record)
        for key in ("text", "reply"):
            if isinstance(record.get(key), str):
                clean[key] = scrub_text(record[key]).text
        if isinstance(record.get("messages"), list):
            clean["messages"] = [
                {**m, "content": scrub_text(m["content"]).text} if isinstance(m.get("content"), str) else m
                for m in record["messages"]
            ]
        return clean

    def _path(self, kind: str, key: str | tuple[str, ...]) -> Path:
        parts = (key,) if isinstance(key, str) else key
        for part in parts:
            if not _KEY.match(part):
                raise ValueError(f"not a Slack timestamp or ID: {part!r}")
        return self.root / kind / f"{'--'.join(parts)}.json"

    def _write(self, kind: str, key: str | tuple[str, ...], record: dict[str, Any]) -> None:
        atomic_write_text(self._path(kind, key), json.dumps(record, ensure_ascii=False) + "\n")

    def _read(self, kind: str, key: str) -> dict[str, Any] | None:
        try:
            return json.loads(self._path(kind, key).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None

    def _all(self, kind: str) -> list[dict[str, Any]]:
        folder = self.root / kind
        if not folder.is_dir():
            return []
        # Sorted: the reply ts leads each name, so oldest first and the same order every run.
        return [json.loads(p.read_text(encoding="utf-8")) for p in sorted(folder.glob("*.json"))]

    def _count(self, kind: str) -> int:
        folder = self.root / kind
        return sum(1 for _ in folder.glob("*.json")) if folder.is_dir() else 0


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
