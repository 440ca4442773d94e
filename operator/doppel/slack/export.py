"""Import a standard Slack export ZIP (`doppel scrape --export workspace.zip`).

The export holds `users.json` (`org_users.json` in an Enterprise Grid organisation's export), `channels.json`
(public channels; `groups.json`, `mpims.json` and `dms.json` for private channels, group DMs and DMs when the
export includes them) and one folder per channel with one JSON file per day, each a list of messages.
Replies sit in the day they were posted, linked to their thread by `thread_ts`, so threads are rebuilt by
grouping on it; from there the same functions as the API scrape make the samples. Archived channels are
taken by default (they are part of the person's history), and the cutoff counts back from the person's
newest message in the export rather than from today.

An export is often re-zipped before it reaches doppel: inside a top folder, with macOS's `__MACOSX/` entries,
with Windows' backslashes, or with UTF-8 names the ZIP does not flag as such (macOS's Archive Utility), which
Python would read as cp437. Entry names are taken back to the export's own ('/'-separated, UTF-8, NFC), so a
channel named in another script keeps its messages. What cannot be read (a password, Deflate64, two exports
in one ZIP, a timestamp that is not one, a file too large to read or packed like a ZIP bomb) is refused
with the reason, before anything is written.
"""

from __future__ import annotations

import contextlib
import json
import re
import unicodedata
import zipfile
import zlib
from dataclasses import replace
from pathlib import Path
from typing import Any

from doppel.errors import BadInput
from doppel.slack.normalize import message_author
from doppel.slack.samples import (
    Manifest,
    ScrapeOptions,
    build_samples,
    list_channels,
    resolve_person,
    select_channels,
    threads_from_messages,
    ts_key,
    write_output,
)

_DAY_FILE = re.compile(r"^([^/]+)/(\d{4}-\d{2}-\d{2})\.json$")  # from the export's folder
_USER_LISTS = ("users.json", "org_users.json")
# What Python's zipfile decompresses: Windows Explorer writes large ZIPs in Deflate64 (method 9), which it
# cannot.
_READABLE = frozenset({zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA})
_METHOD_NAMES = {9: "Deflate64", 98: "PPMd", 95: "XZ", 93: "Zstandard"}
_ENCRYPTED = 0x1  # general purpose flag bits of a ZIP entry
_UTF8_NAME = 0x800
# An entry is read whole into memory (JSON), and parsed it takes several times its size: one larger than
# this, or packed tighter than JSON ever packs (Slack's exports: at most ~25 to 1), is refused unread, so a
# ZIP bomb (300 KB unpacking to 300 MB) is bad input rather than an out-of-memory kill.
MAX_ENTRY_BYTES = 256 * 1024 * 1024
MAX_RATIO = 200
_RATIO_FROM_BYTES = 1024 * 1024  # a small file may pack tightly ("[]" and little else): too little to harm
_USER_ID = re.compile(r"^[UW][A-Z0-9]{6,}$")
_SLACK_TS = re.compile(r"^\d+(?:\.\d+)?$")


def scrape_export(zip_path: Path, user: str, out: Path, options: ScrapeOptions | None = None) -> Manifest:
    """Samples of `user` from the export at `zip_path`, written to `out`; BadInput for a bad export."""
    options = options or ScrapeOptions()
    zip_path = Path(zip_path)
    if not zip_path.is_file():
        raise BadInput(f"{zip_path}: no such file")
    try:
        with zipfile.ZipFile(zip_path) as archive:
            _check_readable(archive, zip_path)
            if archive.testzip() is not None:
                raise BadInput(f"{zip_path}: the ZIP is corrupt")
            return _scrape(_Export(archive, zip_path), user, Path(out), options)
    except (zipfile.BadZipFile, zlib.error) as exc:
        raise BadInput(f"{zip_path}: not a Slack export ZIP ({exc})") from None


def _scrape(export: _Export, user: str, out: Path, options: ScrapeOptions) -> Manifest:
    users = export.users()
    channels = export.channels("channels.json")
    for listing, kind in (("groups.json", "is_private"), ("mpims.json", "is_mpim"), ("dms.json", "is_im")):
        if export.has(listing):
            channels += export.channels(listing, kind, users)
    try:
        person = resolve_person(users, user)
    except BadInput:
        if _writes_here(export, user):
            raise BadInput(
                f"{user} wrote in this export but is not one of its people ({' or '.join(_USER_LISTS)}): "
                "someone of another organisation, in a Slack Connect channel, is never cloned"
            ) from None
        raise
    team = options.team or _team_of(users, person.id)
    days = export.day_files()
    # In an export, archived channels are part of the person's history.
    options = replace(options, include_archived=options.include_archived is not False)
    chosen = select_channels(channels, options)
    messages = {
        c["id"]: [
            m
            for day in sorted(days.get(_nfc(str(c.get("folder", c["name"]))), []))
            for m in export.messages(day)
        ]
        for c in channels
    }
    if options.now is None:
        options = replace(options, now=_last_written(chosen, messages, person.id))
    threads = []
    for channel in chosen:
        threads += threads_from_messages(channel["id"], channel["name"], messages[channel["id"]], 0)
    channel_names = {c["id"]: c["name"] for c in channels}
    samples, manifest = build_samples(
        threads, person, users, channel_names, options, team=team, source=f"export:{export.path.name}"
    )
    list_channels(manifest, channels, options, messages)
    return write_output(out, samples, manifest, options.max_samples)


def _last_written(
    channels: list[dict[str, Any]], messages: dict[str, list[dict[str, Any]]], person_id: str
) -> float | None:
    """Where an export's cutoff counts back from: the person's newest message in `channels`, else the
    export's. An export is a snapshot of its day, and the person may have left the workspace years before
    it was taken: their last year is the person as they wrote last, not a year without them."""
    stamps = [
        (message_author(m) == person_id, ts_key(m["ts"]))  # a string: `_Export.messages`
        for c in channels
        for m in messages[c["id"]]
        if m.get("ts")
    ]
    own = [stamp for theirs, stamp in stamps if theirs]
    newest = max(own or [stamp for _, stamp in stamps], default=None)
    return float("{}.{:06d}".format(*newest)) if newest else None


def _conversation(entry: dict[str, Any], kind: str, users: list[dict[str, Any]]) -> dict[str, Any]:
    """A private channel, group DM or DM entry as a channel; a DM has no name (its folder is its ID), so it
    is named after its members."""
    channel = {**entry, kind: True}
    if not channel.get("name"):
        handles = {u["id"]: u.get("name") or "someone" for u in users}
        members = "-".join(sorted(str(handles.get(m, "someone")) for m in set(entry.get("members") or [])))
        channel.update(name=f"dm-{members}", folder=entry["id"])
    return channel


def _writes_here(export: _Export, user_id: str) -> bool:
    """Whether messages of the export are by `user_id` (read only to explain a person not found)."""
    wanted = user_id.strip().lstrip("@").upper()
    if not _USER_ID.match(wanted):
        return False
    return any(
        m.get("user") == wanted
        for days in export.day_files().values()
        for day in days
        for m in export.messages(day)
    )


def _check_readable(archive: zipfile.ZipFile, zip_path: Path) -> None:
    """Refuse, with the way out, a ZIP whose entries Python cannot open or that would not fit in memory."""
    for info in archive.infolist():
        _check_size(info, zip_path)
        if info.flag_bits & _ENCRYPTED:
            raise BadInput(
                f"{zip_path}: the ZIP is password-protected; unzip it and zip the folder again without one"
            )
        if info.compress_type not in _READABLE:
            method = _METHOD_NAMES.get(info.compress_type, f"method {info.compress_type}")
            raise BadInput(
                f"{zip_path}: {info.filename} is compressed with {method}, which doppel cannot read; "
                "unzip the export and zip the folder again (zip -r, or Python's zipfile)"
            )


def _check_size(info: zipfile.ZipInfo, zip_path: Path) -> None:
    """Refuse a JSON entry over `MAX_ENTRY_BYTES` unpacked, or any entry packed over `MAX_RATIO` to 1. The
    sizes are the ZIP's own: zipfile never unpacks more than an entry declares (more fails its CRC)."""
    mib = 1024 * 1024
    if info.filename.endswith(".json") and info.file_size > MAX_ENTRY_BYTES:
        raise BadInput(
            f"{zip_path}: {info.filename} unpacks to {info.file_size / mib:,.0f} MiB, more than doppel reads "
            f"of one file ({MAX_ENTRY_BYTES // mib} MiB)"
        )
    ratio = info.file_size / max(info.compress_size, 1)
    if info.file_size > _RATIO_FROM_BYTES and ratio > MAX_RATIO:
        raise BadInput(
            f"{zip_path}: {info.filename} unpacks to {ratio:,.0f} times its packed size "
            f"(an export packs at most {MAX_RATIO} to 1): a ZIP bomb, not a Slack export"
        )


def _entry_name(info: zipfile.ZipInfo) -> str:
    """The path the export gave an entry: UTF-8 even where the ZIP tool did not flag it (zipfile then reads
    it as cp437), '/'-separated, in NFC (macOS writes decomposed accents)."""
    name = info.filename
    if not info.flag_bits & _UTF8_NAME:
        with contextlib.suppress(UnicodeError):  # else a name truly in cp437
            name = name.encode("cp437").decode("utf-8")
    return _nfc(name.replace("\\", "/"))


def _nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


class _Export:
    """The export inside a ZIP: its files by their path from the export's own folder."""

    def __init__(self, archive: zipfile.ZipFile, path: Path) -> None:
        self.archive = archive
        self.path = path
        entries = {_entry_name(info): info for info in archive.infolist() if not info.is_dir()}
        root = _export_root(list(entries), path)
        self.entries = {name[len(root) :]: info for name, info in entries.items() if name.startswith(root)}

    def has(self, name: str) -> bool:
        return name in self.entries

    def users(self) -> list[dict[str, Any]]:
        """users.json and, in an Enterprise Grid organisation's export, org_users.json: each user once."""
        found: dict[str, dict[str, Any]] = {}
        for listing in _USER_LISTS:
            if not self.has(listing):
                continue
            for number, user in enumerate(self.read_list(listing), 1):
                if not isinstance(user.get("id"), str) or not user["id"]:
                    raise BadInput(f"{self.path}: {listing}: user {number} has no id")
                if not isinstance(user.get("profile") or {}, dict):
                    where = f"{self.path}: {listing}: user {number} ({user['id']})"
                    raise BadInput(f"{where} has a profile that is not an object")
                found.setdefault(user["id"], user)
        return list(found.values())

    def channels(
        self, listing: str, kind: str | None = None, users: list[dict[str, Any]] | None = None
    ) -> list[dict[str, Any]]:
        """The channels of `listing`: channels.json, or with `kind` a list of other conversations (a DM is
        named after its `users`). One without an ID or a name is refused by its number: a channel's name is
        its folder, and the channel lists and the manifest are keyed by both."""
        found = []
        for number, entry in enumerate(self.read_list(listing), 1):
            where = f"{self.path}: {listing}: channel {number}"
            if not isinstance(entry.get("id"), str) or not entry["id"]:
                raise BadInput(f"{where} has no id")
            channel = _conversation(entry, kind, users or []) if kind else entry
            if not isinstance(channel.get("name"), str) or not channel["name"]:
                raise BadInput(f"{where} ({entry['id']}) has no name")
            found.append(channel)
        return found

    def day_files(self) -> dict[str, list[str]]:
        """Each channel folder's day files."""
        days: dict[str, list[str]] = {}
        for name in self.entries:
            match = _DAY_FILE.match(name)
            if match:
                days.setdefault(match.group(1), []).append(name)
        return days

    def messages(self, day: str) -> list[dict[str, Any]]:
        """A day file's messages, their timestamps as Slack writes them (a string of seconds.micros)."""
        messages = self.read_list(day)
        for number, message in enumerate(messages, 1):
            for key in ("ts", "thread_ts"):
                value = message.get(key)
                if value in (None, "") or (isinstance(value, str) and _SLACK_TS.match(value)):
                    continue
                if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
                    message[key] = f"{value:.6f}"  # a converter that wrote the number, not the string
                else:
                    raise BadInput(
                        f"{self.path}: {day}: message {number} has {key} {value!r}, not a Slack timestamp"
                    )
        return messages

    def read_list(self, name: str) -> list[dict[str, Any]]:
        if name not in self.entries:
            raise BadInput(f"{self.path}: not a Slack export (no {name})")
        try:
            data = json.loads(self.archive.read(self.entries[name]))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BadInput(f"{self.path}: {name} is not valid JSON ({exc})") from None
        except zipfile.BadZipFile as exc:
            raise BadInput(f"{self.path}: the ZIP is corrupt ({exc})") from None
        if not isinstance(data, list) or not all(isinstance(item, dict) for item in data):
            raise BadInput(f"{self.path}: {name} is not a list of objects")
        return data


def _export_root(names: list[str], zip_path: Path) -> str:
    """The folder holding the export: the ZIP's top, or one folder it was re-zipped inside. Two exports in
    one ZIP are refused rather than one of them read."""
    roots = sorted(
        {
            name[: -len(base)]
            for name in names
            for base in _USER_LISTS
            if (name == base or name.endswith("/" + base)) and not name.startswith("__MACOSX/")
        }
    )
    if not roots:
        raise BadInput(f"{zip_path}: not a Slack export (no users.json)")
    if len(roots) > 1:
        shown = ", ".join(root or "the top of the ZIP" for root in roots)
        raise BadInput(f"{zip_path}: holds {len(roots)} exports ({shown}); give doppel one export a ZIP")
    return roots[0]


def _team_of(users: list[dict[str, Any]], person_id: str) -> str:
    for user in users:
        if user.get("id") == person_id:
            return str(user.get("team_id") or user.get("team") or "")
    return ""
