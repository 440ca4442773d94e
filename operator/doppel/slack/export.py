"""Import a standard Slack export ZIP (`doppel scrape --export workspace.zip`).

The export holds `users.json`, `channels.json` (public channels; `groups.json`, `mpims.json` and `dms.json`
for private channels, group DMs and DMs when the export includes them) and one folder per channel with one
JSON file per day, each a list of messages. Replies sit in the day they were posted, linked to their thread
by `thread_ts`, so threads are rebuilt by grouping on it; from there the same functions as the API scrape
make the samples. Archived channels are taken by default (they are part of the person's history), and the
cutoff counts back from the person's newest message in the export rather than from today.
"""

from __future__ import annotations

import json
import re
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

_DAY_FILE = re.compile(r"^(?:.*/)?([^/]+)/(\d{4}-\d{2}-\d{2})\.json$")


def scrape_export(zip_path: Path, user: str, out: Path, options: ScrapeOptions | None = None) -> Manifest:
    """Samples of `user` from the export at `zip_path`, written to `out`; BadInput for a bad export."""
    options = options or ScrapeOptions()
    zip_path = Path(zip_path)
    if not zip_path.is_file():
        raise BadInput(f"{zip_path}: no such file")
    try:
        with zipfile.ZipFile(zip_path) as archive:
            if archive.testzip() is not None:
                raise BadInput(f"{zip_path}: the ZIP is corrupt")
            return _scrape(archive, zip_path, user, Path(out), options)
    except (zipfile.BadZipFile, zlib.error) as exc:
        raise BadInput(f"{zip_path}: not a Slack export ZIP ({exc})") from None


def _scrape(
    archive: zipfile.ZipFile, zip_path: Path, user: str, out: Path, options: ScrapeOptions
) -> Manifest:
    names = archive.namelist()
    prefix = _root_prefix(names, zip_path)
    users = _read_list(archive, prefix + "users.json", zip_path)
    channels = _read_list(archive, prefix + "channels.json", zip_path)
    for listing, kind in (("groups.json", "is_private"), ("mpims.json", "is_mpim"), ("dms.json", "is_im")):
        if prefix + listing in names:
            channels += [
                _conversation(c, kind, users) for c in _read_list(archive, prefix + listing, zip_path)
            ]
    person = resolve_person(users, user)
    team = options.team or _team_of(users, person.id)
    days: dict[str, list[str]] = {}
    for name in names:
        match = _DAY_FILE.match(name)
        if match and name.startswith(prefix):
            days.setdefault(match.group(1), []).append(name)
    # In an export, archived channels are part of the person's history.
    options = replace(options, include_archived=options.include_archived is not False)
    chosen = select_channels(channels, options)
    messages = {
        c["id"]: [
            m
            for day in sorted(days.get(c.get("folder", c["name"]), []))
            for m in _read_list(archive, day, zip_path)
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
        threads, person, users, channel_names, options, team=team, source=f"export:{zip_path.name}"
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
        (message_author(m) == person_id, ts_key(str(m["ts"])))
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


def _root_prefix(names: list[str], zip_path: Path) -> str:
    """Exports are sometimes re-zipped inside a top folder; find the folder holding users.json."""
    candidates = sorted((n for n in names if n.rsplit("/", 1)[-1] == "users.json"), key=len)
    if not candidates:
        raise BadInput(f"{zip_path}: not a Slack export (no users.json)")
    return candidates[0][: -len("users.json")]


def _read_list(archive: zipfile.ZipFile, name: str, zip_path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(archive.read(name))
    except KeyError:
        raise BadInput(f"{zip_path}: not a Slack export (no {name})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadInput(f"{zip_path}: {name} is not valid JSON ({exc})") from None
    except zipfile.BadZipFile as exc:
        raise BadInput(f"{zip_path}: the ZIP is corrupt ({exc})") from None
    if not isinstance(data, list) or not all(isinstance(item, dict) for item in data):
        raise BadInput(f"{zip_path}: {name} is not a list of objects")
    return data


def _team_of(users: list[dict[str, Any]], person_id: str) -> str:
    for user in users:
        if user.get("id") == person_id:
            return str(user.get("team_id") or user.get("team") or "")
    return ""
