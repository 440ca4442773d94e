"""A deterministic synthetic Slack workspace, written as a standard Slack export ZIP.

`doppel local --demo` and the tests scrape it instead of a real workspace. Its people write in clearly
different styles, built from small phrase pools so that a tiny model with a LoRA adapter trained for a
minute or two on CPU visibly picks up the demo person's habits:

- Margaret (the demo person): formal and long; opens with "Thank you for ...", closes with
  "Kind regards, Margaret";
- Dev: terse, always with an emoji;
- Sam: medium length, always ends with a question;
- Jo: lowercase, links and channel references, "fwiw ... ty!".

The export has what a real one has: `users.json`, `channels.json` and one folder per channel with one JSON
file per day; threads (`thread_ts`, `reply_count`, `replies`), a few subtypes (`channel_join`,
`bot_message`, `thread_broadcast`, `channel_topic`), mentions `<@U..>`, links and channel references.

Run as `python -m doppel.demo.workspace OUT.zip`, or call `write_export(path)`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import os
import random
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_SEED = 8
TEAM_ID = "T0DEMO0001"
# Monday 2024-03-04 09:00 UTC: the export spans the working days after it.
START = dt.datetime(2024, 3, 4, 9, 0, tzinfo=dt.UTC)
WORKING_DAYS = 24
# When the export was taken: scrapes of it measure their "last N days" cutoff from here, not from today.
EXPORTED_AT = START + dt.timedelta(days=40)
THREADS_PER_DAY = 3
# Fixed ZIP entry times: the same seed always gives the same bytes.
ZIP_DATE = (2024, 4, 1, 0, 0, 0)


@dataclass(frozen=True)
class Person:
    id: str
    name: str
    real_name: str
    title: str

    @property
    def first_name(self) -> str:
        return self.real_name.split()[0]


MARGARET = Person("U0DEMOMARG", "margaret", "Margaret Okafor", "Head of Platform")
DEV = Person("U0DEMODEVP", "dev", "Dev Patel", "Backend engineer")
SAM = Person("U0DEMOSAML", "sam", "Sam Lee", "Product manager")
JO = Person("U0DEMOJORV", "jo", "Jo Rivera", "Site reliability engineer")
PEOPLE = (MARGARET, DEV, SAM, JO)
DEMO_PERSON = MARGARET.name
BOT_ID = "B0DEMODPLY"
BOT_NAME = "deploybot"
SIGN_OFF = "Kind regards, Margaret"

CHANNELS = {
    "general": "C0DEMOGENR",
    "engineering": "C0DEMOENGR",
    "incidents": "C0DEMOINCD",
    "random": "C0DEMORAND",
}
WORK_CHANNELS = ("general", "engineering", "incidents")

# (subject, slug): what the threads are about.
TOPICS = (
    ("the billing migration", "billing-migration"),
    ("the on-call rotation", "on-call"),
    ("the database upgrade", "db-upgrade"),
    ("the quarterly roadmap", "roadmap"),
    ("the search latency", "search-latency"),
    ("the release checklist", "release-checklist"),
    ("the staging cluster", "staging"),
    ("the hiring plan", "hiring"),
    ("the API deprecation", "api-deprecation"),
    ("the cost report", "cost-report"),
)

# How each asker opens a thread ({who} mentions the demo person or greets everyone), in their own style.
QUESTIONS = {
    "sam": (
        "{who} can we ship {subject} this Friday or should we wait?",
        "{who} I lost track, what is the plan for {subject}?",
        "{who} is anyone owning {subject} at the moment?",
        "{who} do we need a review before touching {subject}?",
    ),
    "dev": (
        "{who} {subject}: ship friday? :eyes:",
        "{who} {subject} blocked :warning:",
        "{who} who owns {subject}? :thinking_face:",
    ),
    "jo": (
        "fwiw {who} any objections to changing {subject} next week? ty!",
        "fwiw {who} who should sign off on {subject}? ty!",
    ),
}

MARGARET_OPENERS = (
    "Thank you for raising this, {asker}.",
    "Thank you for the question, {asker}.",
    "Thank you for flagging this, {asker}.",
)
MARGARET_STANCES = (
    "In my view we should {action} before we proceed.",
    "I would recommend that we {action} first.",
    "On balance, I believe it would be prudent to {action}.",
)
MARGARET_ACTIONS = (
    "document the rollback plan for {subject}",
    "agree a clear owner for {subject}",
    "review {subject} with the wider team",
    "schedule a short design review of {subject}",
)
MARGARET_DETAILS = (
    "Please ensure the relevant ticket is updated so that everyone has the full context.",
    "I have summarised the considerations in the shared document for reference.",
    "It would be helpful to record the decision in the team notes for future reference.",
    "I have asked {helper} to confirm the timeline with the stakeholders.",
)
MARGARET_FOLLOW_UPS = (
    "Thank you, {asker}. That addresses my concern entirely.",
    "Thank you for the additional detail, {asker}. I am comfortable with that approach.",
    "Thank you, {asker}. Please keep me informed of any changes to the schedule.",
)
MARGARET_ANNOUNCEMENTS = (
    "Thank you all for your patience this week. I would like to remind everyone that {subject} is "
    "discussed at Thursday's review, so please add your notes to the agenda beforehand.",
    "Thank you all for the excellent work on {subject}. I would recommend that we take a moment to "
    "record what went well and what we would change next time.",
)

DEV_LINES = (
    "lgtm :+1:",
    "on it :rocket:",
    "shipped :tada:",
    "done ✅",
    "yep :eyes:",
    "merged :ship:",
    "nope, rolled back :fire:",
    "ack :saluting_face:",
)

SAM_STATEMENTS = (
    "I looked at {subject} this morning and the numbers are moving in the right direction.",
    "Customers keep asking me about {subject} on every call this week.",
    "I put {subject} on the agenda for the planning meeting tomorrow.",
    "The sales team would love a date for {subject} soon.",
)
SAM_QUESTIONS = (
    "Have we checked the dashboards since the last deploy?",
    "Could we get a rough estimate by Thursday?",
    "Does anyone see a risk I am missing here?",
    "What do you all think?",
)

JO_LINES = (
    "fwiw the runbook for {subject} is here <https://wiki.example.com/{slug}|runbook>, ty!",
    "fwiw we talked about {subject} in <#{incidents}|incidents> last week, ty!",
    "fwiw i'd keep an eye on <https://grafana.example.com/d/{slug}> while this rolls out, ty!",
)

# What `doppel local --demo` asks the cloned person: new questions in the askers' styles, `{mention}` to be
# filled with the person's mention as ingestion normalises it (`@Margaret`). See `demo_questions`.
DEMO_QUESTIONS = (
    (SAM, "{mention} can we ship the search latency fix this Friday or should we wait?"),
    (DEV, "{mention} the staging cluster: upgrade monday? :eyes:"),
    (JO, "fwiw {mention} who should sign off on the new status page? ty!"),
    (MARGARET, "Thank you all. {mention}, could you summarise where we are with the hiring plan?"),
)
QUESTIONS_ASKED = 3


def demo_questions(person_id: str) -> list[tuple[Person, str]]:
    """The questions put to the demo person `person_id`, none asked by that person."""
    person = next(p for p in PEOPLE if p.id == person_id)
    asked = [(p, text.format(mention=f"@{person.first_name}")) for p, text in DEMO_QUESTIONS if p != person]
    return asked[:QUESTIONS_ASKED]


class _Writer:
    """Accumulates the messages of every channel, then lays them out as export files."""

    def __init__(self) -> None:
        self.messages: dict[str, list[dict[str, Any]]] = {name: [] for name in CHANNELS}

    def post(self, channel: str, message: dict[str, Any]) -> dict[str, Any]:
        self.messages[channel].append(message)
        return message

    def files(self) -> dict[str, Any]:
        """Export paths -> JSON content, one file per channel and UTC day, messages in ts order."""
        out: dict[str, Any] = {}
        for channel, messages in self.messages.items():
            by_day: dict[str, list[dict[str, Any]]] = {}
            for message in sorted(messages, key=lambda m: float(m["ts"])):
                day = dt.datetime.fromtimestamp(float(message["ts"]), dt.UTC).date().isoformat()
                by_day.setdefault(day, []).append(message)
            for day, day_messages in by_day.items():
                out[f"{channel}/{day}.json"] = day_messages
        return out


def _ts(when: dt.datetime) -> str:
    return f"{when.timestamp():.6f}"


def _mention(person: Person) -> str:
    return f"<@{person.id}>"


def _user_message(person: Person, ts: str, text: str) -> dict[str, Any]:
    return {
        "type": "message",
        "user": person.id,
        "text": text,
        "ts": ts,
        "team": TEAM_ID,
        "user_profile": {
            "real_name": person.real_name,
            "display_name": person.first_name,
            "name": person.name,
        },
    }


def _margaret_reply(rng: random.Random, asker: Person, subject: str) -> str:
    helper = rng.choice([p for p in PEOPLE if p not in (MARGARET, asker)])
    action = rng.choice(MARGARET_ACTIONS).format(subject=subject)
    parts = [
        rng.choice(MARGARET_OPENERS).format(asker=asker.first_name),
        rng.choice(MARGARET_STANCES).format(action=action),
        rng.choice(MARGARET_DETAILS).format(helper=_mention(helper)),
    ]
    return " ".join(parts) + "\n" + SIGN_OFF


def _line_for(rng: random.Random, person: Person, subject: str, slug: str) -> str:
    """A thread reply in `person`'s style (anyone but Margaret)."""
    if person is DEV:
        return rng.choice(DEV_LINES)
    if person is SAM:
        statement = rng.choice(SAM_STATEMENTS).format(subject=subject)
        return f"{statement} {rng.choice(SAM_QUESTIONS)}"
    return rng.choice(JO_LINES).format(subject=subject, slug=slug, incidents=CHANNELS["incidents"])


def _thread(writer: _Writer, rng: random.Random, channel: str, start: dt.datetime) -> None:
    """One thread: someone asks (often mentioning Margaret), Margaret and others answer."""
    subject, slug = rng.choice(TOPICS)
    asker = rng.choice((DEV, SAM, JO))
    who = _mention(MARGARET) if rng.random() < 0.7 else "all:"
    question = rng.choice(QUESTIONS[asker.name]).format(who=who, subject=subject)
    parent = writer.post(channel, _user_message(asker, _ts(start), question))
    replies: list[dict[str, Any]] = []
    when = start

    def reply(person: Person, text: str) -> dict[str, Any]:
        nonlocal when
        when += dt.timedelta(minutes=rng.randint(2, 40), seconds=rng.randint(0, 59))
        message = _user_message(person, _ts(when), text)
        message.update(thread_ts=parent["ts"], parent_user_id=asker.id)
        replies.append(writer.post(channel, message))
        return message

    others = [p for p in (DEV, SAM, JO) if p is not asker]
    if rng.random() < 0.5:
        other = rng.choice(others)
        reply(other, _line_for(rng, other, subject, slug))
    if rng.random() < 0.9:
        reply(MARGARET, _margaret_reply(rng, asker, subject))
        reply(asker, _line_for(rng, asker, subject, slug))
        if rng.random() < 0.5:
            reply(MARGARET, rng.choice(MARGARET_FOLLOW_UPS).format(asker=asker.first_name) + "\n" + SIGN_OFF)
    if asker is not SAM and rng.random() < 0.15:
        # "Also send to channel": the reply is shown in the channel too.
        broadcast = reply(SAM, _line_for(rng, SAM, subject, slug))
        broadcast.update(subtype="thread_broadcast", root={"text": question, "user": asker.id})
    if replies:
        parent.update(
            thread_ts=parent["ts"],
            reply_count=len(replies),
            reply_users_count=len({r["user"] for r in replies}),
            latest_reply=replies[-1]["ts"],
            reply_users=sorted({r["user"] for r in replies}),
            replies=[{"user": r["user"], "ts": r["ts"]} for r in replies],
            is_locked=False,
            subscribed=False,
        )


def _joins(writer: _Writer) -> None:
    for offset, person in enumerate(PEOPLE):
        for channel in CHANNELS:
            ts = _ts(START - dt.timedelta(days=1, minutes=10 - offset))
            message = _user_message(person, ts, f"{_mention(person)} has joined the channel")
            message["subtype"] = "channel_join"
            writer.post(channel, message)
    topic = _user_message(JO, _ts(START - dt.timedelta(hours=20)), "")
    topic.update(subtype="channel_topic", topic="Outages and their follow-ups")
    topic["text"] = f"{_mention(JO)} set the channel topic: Outages and their follow-ups"
    writer.post("incidents", topic)


def _day(writer: _Writer, rng: random.Random, day: dt.datetime, number: int) -> None:
    for slot in range(THREADS_PER_DAY):
        channel = rng.choice(WORK_CHANNELS)
        _thread(writer, rng, channel, day + dt.timedelta(hours=2 * slot, minutes=rng.randint(0, 50)))
    deploy = {
        "type": "message",
        "subtype": "bot_message",
        "bot_id": BOT_ID,
        "username": BOT_NAME,
        "text": f"Deploy #{100 + number} of billing-service finished :white_check_mark:",
        "ts": _ts(day + dt.timedelta(hours=7, seconds=number)),
    }
    writer.post("engineering", deploy)
    chatter = rng.choice((DEV, JO))
    subject, slug = rng.choice(TOPICS)
    writer.post(
        "random",
        _user_message(chatter, _ts(day + dt.timedelta(hours=5)), _line_for(rng, chatter, subject, slug)),
    )
    if number % 4 == 0:
        text = rng.choice(MARGARET_ANNOUNCEMENTS).format(subject=subject) + "\n" + SIGN_OFF
        writer.post("general", _user_message(MARGARET, _ts(day + dt.timedelta(minutes=5)), text))


def build_workspace(seed: int = DEFAULT_SEED) -> dict[str, Any]:
    """Every file of the export as path -> JSON content. Pure: the same seed gives the same files."""
    rng = random.Random(seed)
    writer = _Writer()
    _joins(writer)
    day = START
    for number in range(WORKING_DAYS):
        while day.weekday() >= 5:
            day += dt.timedelta(days=1)
        _day(writer, rng, day, number)
        day += dt.timedelta(days=1)
    created = int((START - dt.timedelta(days=30)).timestamp())
    users = [
        {
            "id": p.id,
            "team_id": TEAM_ID,
            "name": p.name,
            "deleted": False,
            "real_name": p.real_name,
            "tz": "Europe/London",
            "is_bot": False,
            "is_admin": p is MARGARET,
            "profile": {
                "title": p.title,
                "real_name": p.real_name,
                "display_name": p.first_name,
                "first_name": p.first_name,
                "last_name": p.real_name.split()[-1],
            },
        }
        for p in PEOPLE
    ]
    users.append(
        {
            "id": "U0DEMOBOT1",
            "team_id": TEAM_ID,
            "name": BOT_NAME,
            "deleted": False,
            "real_name": "Deploy Bot",
            "is_bot": True,
            "profile": {"bot_id": BOT_ID, "real_name": "Deploy Bot", "display_name": BOT_NAME},
        }
    )
    channels = [
        {
            "id": channel_id,
            "name": name,
            "created": created,
            "creator": MARGARET.id,
            "is_archived": False,
            "is_general": name == "general",
            "members": [p.id for p in PEOPLE],
            "topic": {"value": "", "creator": "", "last_set": 0},
            "purpose": {"value": f"The {name} channel", "creator": MARGARET.id, "last_set": created},
        }
        for name, channel_id in CHANNELS.items()
    ]
    return {"users.json": users, "channels.json": channels, **writer.files()}


def export_bytes(seed: int = DEFAULT_SEED) -> bytes:
    """The export as ZIP bytes, identical for identical seeds (fixed entry order and times)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in sorted(build_workspace(seed).items()):
            info = zipfile.ZipInfo(name, date_time=ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, json.dumps(content, indent=4, ensure_ascii=False))
    return buffer.getvalue()


def write_export(path: Path, seed: int = DEFAULT_SEED) -> Path:
    """Write the demo export ZIP to `path` atomically (a reader never sees half a ZIP)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = export_bytes(seed)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not args[0].endswith(".zip"):
        print("usage: python -m doppel.demo.workspace OUT.zip", file=sys.stderr)
        return 2
    out = write_export(Path(args[0]))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
