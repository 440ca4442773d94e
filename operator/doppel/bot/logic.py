"""Pure logic of the bot: parsing commands and mentions, splitting replies, describing doppels.

Nothing here talks to Slack, Kubernetes or vLLM, so it is tested directly.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

COMMANDS = ("train", "list", "switch", "status", "forget", "help")
NEEDS_USER = {"train", "switch", "forget"}
HELP = (
    "`/doppel train <user>`: clone someone (yourself, or anyone who approves)\n"
    "`/doppel list`: every doppel of this workspace and its state\n"
    "`/doppel switch <user>`: make that doppel answer mentions\n"
    "`/doppel status [user]`: phase, progress and sample count\n"
    "`/doppel forget <user>`: delete a doppel, its data and its adapter\n"
    "Mention the bot to talk to the active doppel, or `@doppel as <user> ...` to pick one."
)
# Replies longer than this many messages are cut: a runaway generation must not flood a channel.
MAX_REPLY_MESSAGES = 5
# Each of them at most this long (Slack takes 40,000 characters but shows a wall; a person writes less).
MAX_MESSAGE_CHARS = 3000
# The model may separate its messages with a blank line or with this marker.
MESSAGE_SEPARATOR = "<|msg|>"
# Hex digits of the person's user id hash in a DoppelUser name whose handle had to be rewritten or cut.
NAME_HASH_CHARS = 8


@dataclass(frozen=True)
class Snapshot:
    """A namespace's DoppelUsers and the name of its active doppel, as read at one moment."""

    doppels: list[dict[str, Any]]
    active: str | None


@dataclass(frozen=True)
class Tenant:
    """Whose request this is: the workspace every object it reads or writes is scoped to, and the
    installation that signed it (a workspace's, or an Enterprise Grid org's for an org-wide install)."""

    team_id: str
    enterprise_id: str | None = None
    org_wide: bool = False


def is_guest(user: dict[str, Any]) -> bool:
    """A single- or multi-channel guest (`is_ultra_restricted`, `is_restricted`): not a full member."""
    return bool(user.get("is_restricted") or user.get("is_ultra_restricted"))


def is_admin(user: dict[str, Any]) -> bool:
    """A workspace admin or owner (`is_admin`, `is_owner`, `is_primary_owner`)."""
    return bool(user.get("is_admin") or user.get("is_owner") or user.get("is_primary_owner"))


def is_member(
    user: dict[str, Any], tenant: Tenant, *, guests: bool = False, deactivated: bool = False
) -> bool:
    """Whether a `users.info` user belongs to the tenant: a member of its workspace, or, for an org-wide
    installation, of its Grid org. Slack Connect users of other organisations never do; guests only when
    `guests` (the chart's `bot.allowGuests`), deactivated people only when `deactivated` (to forget them)."""
    if not user or user.get("is_stranger") or (user.get("deleted") and not deactivated):
        return False
    if is_guest(user) and not guests:
        return False
    grid = user.get("enterprise_user") or {}
    if user.get("team_id") == tenant.team_id or tenant.team_id in (grid.get("teams") or []):
        return True
    same_org = tenant.enterprise_id and grid.get("enterprise_id") == tenant.enterprise_id
    return bool(tenant.org_wide and same_org)


def foreign_teams(body: dict[str, Any], tenant: Tenant) -> set[str]:
    """Teams a payload names for the person acting (`user_team`, `source_team`, a block action's
    `user.team_id`) other than the tenant's, when the tenant is a plain workspace (for a Grid tenant another
    workspace of the org may be fine: `is_member` decides on `users.info`)."""
    if tenant.enterprise_id:
        return set()
    event = body.get("event") or {}
    user = body.get("user") if isinstance(body.get("user"), dict) else {}
    named = {event.get("user_team"), event.get("source_team"), (user or {}).get("team_id")}
    return {str(t) for t in named if t} - {tenant.team_id}


REFUSAL = (
    "Sorry, doppels here are only for members of this workspace: "
    "guests and people from other organisations cannot talk to them, train them or be trained."
)
SHARED_CHANNEL = (
    "Doppels stay silent in channels shared with other organisations: mention me in one of this "
    "workspace's own channels."
)

# Who may do what to someone else's doppel (docs/security.md has this table). `train` of someone else is
# never on this list: it takes that person's consent (unless the chart turns consent off).
PERMISSIONS = {
    "switch": ("the person", "whoever asked for the doppel", "workspace admins and owners"),
    "forget": ("the person", "whoever asked for the doppel", "workspace admins and owners"),
}


def may_manage(actor: dict[str, Any], person_id: str, requester: str | None) -> bool:
    """Whether `actor` (a `users.info` user) may switch or forget the doppel of `person_id` that
    `requester` asked for: the person, the requester, or a workspace admin or owner (`PERMISSIONS`)."""
    return actor.get("id") in {person_id, requester} or is_admin(actor)


def is_shared_channel(channel: dict[str, Any]) -> bool:
    """A Slack Connect channel (shared with another organisation), from `conversations.info`."""
    return bool(channel.get("is_ext_shared") or channel.get("is_pending_ext_shared"))


class CommandError(ValueError):
    """A /doppel command that cannot be understood; the message is shown to the user."""


@dataclass(frozen=True)
class UserRef:
    """A person named in a command: a Slack user id (from `<@U123|alice>`) and/or a handle."""

    user_id: str | None
    handle: str | None


@dataclass(frozen=True)
class Command:
    verb: str
    user: UserRef | None


_MENTION = re.compile(r"^<@([A-Z0-9]+)(?:\|([^>]*))?>$")
_HANDLE = re.compile(r"^@?([a-zA-Z0-9][a-zA-Z0-9._-]{0,79})$")


def parse_user(text: str) -> UserRef:
    token = text.strip()
    mention = _MENTION.match(token)
    if mention:
        return UserRef(mention.group(1), mention.group(2) or None)
    handle = _HANDLE.match(token)
    if handle:
        return UserRef(None, handle.group(1))
    raise CommandError(f"`{token}` is not a Slack user: write @name")


def parse_command(text: str) -> Command:
    """`train <@U1|alice>` -> Command("train", UserRef("U1", "alice")); raises CommandError."""
    words = text.split()
    if not words:
        return Command("help", None)
    verb = words[0].lower()
    if verb not in COMMANDS:
        raise CommandError(f"unknown command `{words[0]}`; try `/doppel help`")
    args = words[1:]
    if len(args) > 1:
        raise CommandError(f"`/doppel {verb}` takes one user, got {len(args)} words")
    if verb in NEEDS_USER and not args:
        raise CommandError(f"`/doppel {verb}` needs a user: `/doppel {verb} @name`")
    if verb in {"list", "help"} and args:
        raise CommandError(f"`/doppel {verb}` takes no argument")
    return Command(verb, parse_user(args[0]) if args else None)


_AS = re.compile(r"^\s*as\s+(<@[A-Z0-9]+(?:\|[^>]*)?>|@?[a-zA-Z0-9][a-zA-Z0-9._-]*)[\s,:]*", re.IGNORECASE)


def strip_bot_mention(text: str, bot_user_id: str | None) -> str:
    """The message without the leading mention of the bot that triggered it."""
    if bot_user_id:
        text = re.sub(rf"^\s*<@{re.escape(bot_user_id)}(\|[^>]*)?>[\s,:]*", "", text)
    return text.strip()


def pick_doppel(text: str, doppels: Sequence[dict[str, Any]]) -> tuple[UserRef | None, str]:
    """(`as <user>` target if the message starts with one, the rest of the message). "as" selects only
    before a mention (`as <@U…>`) or the handle of one of the workspace's `doppels`: "as discussed
    yesterday, ..." is a question for the active doppel, whole."""
    match = _AS.match(text)
    if not match:
        return None, text
    ref = parse_user(match.group(1))
    if ref.user_id is None and not any(is_of(d, ref) for d in doppels):
        return None, text
    return ref, text[match.end() :]


def pick(snapshot: Snapshot, ref: UserRef | None) -> dict[str, Any] | None:
    """The doppel a mention talks to: the one named (`as <user>`, by user id or handle), else the active
    one, else the only one."""
    if ref is not None:
        return next((d for d in snapshot.doppels if is_of(d, ref)), None)
    by_name = {d["metadata"]["name"]: d for d in snapshot.doppels}
    if snapshot.active in by_name:
        return by_name[snapshot.active or ""]
    return snapshot.doppels[0] if len(snapshot.doppels) == 1 else None


def is_of(doppel: dict[str, Any], ref: UserRef) -> bool:
    """Whether `doppel` is of the person `ref` names: by user id when known, else by their exact handle
    (never by object name: `alice.b` and `alice-b` are two people whose handles rewrite alike)."""
    if ref.user_id:
        return target_of(doppel) == ref.user_id
    return bool(ref.handle) and handle_of(doppel).lower() == (ref.handle or "").lower()


def target_of(doppel: dict[str, Any]) -> str | None:
    """The Slack user id of the person a doppel is of."""
    return ((doppel.get("spec") or {}).get("target") or {}).get("userId")


def handle_of(doppel: dict[str, Any]) -> str:
    """The person's Slack handle, as people call the doppel (its object name carries the team too)."""
    target = (doppel.get("spec") or {}).get("target") or {}
    return str(target.get("handle") or doppel["metadata"]["name"])


def team_of(doppel: dict[str, Any]) -> str | None:
    """The workspace a DoppelUser belongs to: the team its scrape reads (`spec.slack.teamId`)."""
    return ((doppel.get("spec") or {}).get("slack") or {}).get("teamId")


def split_reply(text: str) -> list[str]:
    """The model's answer as Slack messages: split on blank lines and on the message separator, at most
    `MAX_REPLY_MESSAGES` of them, each cut at `MAX_MESSAGE_CHARS` (a cut one ends with "…")."""
    parts = re.split(rf"\n\s*\n|{re.escape(MESSAGE_SEPARATOR)}", text)
    messages = [part.strip() for part in parts if part.strip()]
    return [_cut(m, MAX_MESSAGE_CHARS) for m in messages[:MAX_REPLY_MESSAGES]]


def _cut(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    cut = text[: limit - 1]
    space = cut.rfind(" ", limit // 2)  # at a word's end when there is one near
    cut = cut[:space] if space > 0 else cut
    # Never half a link (`<https://…>`) or half an escape (`&amp;`): Slack would show the pieces.
    if cut.rfind("<") > cut.rfind(">"):
        cut = cut[: cut.rfind("<")]
    if cut.rfind("&") > cut.rfind(";"):
        cut = cut[: cut.rfind("&")]
    return cut.rstrip() + "…"


def object_name(handle: str, team_id: str = "", user_id: str | None = None, *, hashed: bool = False) -> str:
    """A DNS-1123 name for a DoppelUser from a Slack handle and its workspace (`alice` of T0ACME ->
    `alice-t0acme`): several workspaces share a namespace, and each may have its own alice. A handle that is
    no name as it is (`alice.b`, `alice_b`, one too long) is rewritten, which can make two people's names
    alike: given the person's `user_id`, such a name carries a short hash of it (`alice-b-1f2e3d4c-t0acme`).
    A handle that is a name already keeps it, so the objects of existing installations keep theirs (unless
    `hashed`: its plain name is someone else's object)."""
    suffix = f"-{team_id.lower()}" if team_id else ""
    if not re.fullmatch(r"[-a-z0-9]*", suffix):
        raise CommandError(f"`{team_id}` is not a Slack team id")
    room = 63 - len(suffix)
    lowered = handle.lower()
    name = re.sub(r"[^a-z0-9-]+", "-", lowered).strip("-")
    if user_id and (hashed or name != lowered or len(name) > room):
        tag = hashlib.sha256(user_id.encode()).hexdigest()[:NAME_HASH_CHARS]
        name = f"{name[: room - len(tag) - 1].strip('-')}-{tag}".lstrip("-")
    name = name[:room].strip("-")
    if not name:
        raise CommandError(f"cannot make a doppel name from `{handle}`")
    return name + suffix


def event_key(team_id: str, event_id: str) -> str:
    """A Kubernetes-safe, fixed-length key for one Slack event of one workspace."""
    return hashlib.sha256(f"{team_id}/{event_id}".encode()).hexdigest()[:40]


def mention_key(event: dict[str, Any]) -> str:
    """What makes a mention the same mention: its message (channel and ts). Slack's retries repeat the
    event id, but an edit of the message comes as a new `app_mention` with a new event id and the same ts."""
    return f"mention/{event.get('channel')}/{event.get('ts')}"


def from_a_bot(event: dict[str, Any], bot_user_id: str | None) -> bool:
    """A message written by a bot (another app, a classic bot_message, a workflow) or by this bot itself:
    answering those could start an endless conversation between bots."""
    return bool(
        event.get("bot_id")
        or event.get("bot_profile")
        or event.get("subtype") == "bot_message"
        or not event.get("user")
        or event.get("user") == bot_user_id
    )


def phase(doppel: dict[str, Any]) -> str:
    return str((doppel.get("status") or {}).get("phase") or "Pending")


def served_name(doppel: dict[str, Any]) -> str | None:
    """The vLLM model name of the adapter a doppel serves, else None. `status.adapter` is switched only
    once a new version is loaded everywhere, so it answers through re-scrapes, queueing, retraining and
    re-registration (and a failed retrain) alike; only a doppel that was never Ready has none."""
    adapter = (doppel.get("status") or {}).get("adapter") or {}
    return str(adapter["servedName"]) if adapter.get("servedName") else None


def describe(doppel: dict[str, Any]) -> str:
    """`alice: Training (40%), 812 samples` — what list and status show."""
    status = doppel.get("status") or {}
    name = handle_of(doppel)
    text = f"*{name}*: {phase(doppel)}"
    progress = _progress(status)
    if progress:
        text += f" ({progress})"
    samples = status.get("samples")
    if samples is not None:
        text += f", {samples} samples"
    fidelity = _fidelity(status)
    if fidelity:
        text += f", {fidelity}"
    why = status.get("message") or status.get("reason")  # the operator's sentence, else its reason code
    if (status.get("phase") == "Failed" or status.get("reason") == "FidelityRegressed") and why:
        text += f": {why}"
    return text


def not_ready_reply(doppel: dict[str, Any]) -> str:
    name = handle_of(doppel)
    if phase(doppel) == "Failed":
        return f"Sorry, {name}'s doppel failed to train: {describe(doppel)}."
    progress = _progress(doppel.get("status") or {})
    detail = phase(doppel) + (f", {progress}" if progress else "")
    return f"{name}'s doppel is still training ({detail}). Ask again when it is Ready."


def progress_note(doppel: dict[str, Any]) -> str | None:
    """The progress message sent to whoever asked for a doppel, for the phase it has reached."""
    name = handle_of(doppel)
    status = doppel.get("status") or {}
    samples = status.get("samples")
    return {
        "Training": f"{name}'s doppel: scraped {samples if samples is not None else 'the'} samples, "
        "training started.",
        "Ready": f"{name}'s doppel is ready: mention me with `as {name}` to talk to it.",
        "Failed": f"{name}'s doppel failed: "
        f"{status.get('message') or status.get('reason') or 'see `/doppel status`'}.",
    }.get(phase(doppel))


def _fidelity(status: dict[str, Any]) -> str | None:
    """`likeness 0.62 (persona prompt 0.07, real replies 0.70)` from `status.eval`, when the train Job
    measured it."""
    figures = status.get("eval") or {}
    adapter, prompted = figures.get("likenessAdapter"), figures.get("likenessPromptedBase")
    if adapter is None or prompted is None:
        return None
    real = figures.get("likenessReal")
    ceiling = f", real replies {real:.2f}" if real is not None else ""
    return f"likeness {adapter:.2f} (persona prompt {prompted:.2f}{ceiling})"


def _progress(status: dict[str, Any]) -> str | None:
    """How far scraping or training is, from `status.scraping` (channels done of the total, messages so far,
    the current wait for Slack) or `status.training` (steps done of the planned total)."""
    scraping = status.get("scraping") or {}
    if status.get("phase") == "Scraping" and scraping.get("channelsTotal"):
        text = f"{scraping.get('channelsDone', 0)} of {scraping['channelsTotal']} channels"
        text += f", {scraping.get('messages', 0)} messages"
        wait = scraping.get("waitS")
        if wait:
            text += f", waiting {_seconds(wait)} for Slack's rate limit"
        return text
    training = status.get("training") or {}
    step, total = training.get("step"), training.get("totalSteps")
    if status.get("phase") != "Training" or step is None:
        return None
    return f"{step / total:.0%} of {total} steps" if total else f"step {step}"


def _seconds(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"
