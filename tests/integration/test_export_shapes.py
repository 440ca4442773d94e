"""`doppel scrape --export` on exports as they reach users: re-zipped by other tools, from an Enterprise
Grid organisation, written by converters, or in a form Python cannot open (each refused with the way out)."""

import copy
import json
import struct
import unicodedata
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from tests.support.slack_fixtures import assert_bad_input, write_export_zip

from doppel.cli import main

LOCAL_HEADER = b"PK\x03\x04"
CENTRAL_HEADER = b"PK\x01\x02"
DEFLATE64 = 9


def scrape(export: Path, out: Path, user: str = "alice"):
    return CliRunner().invoke(main, ["scrape", "--export", str(export), "--user", user, "--out", str(out)])


def samples(out: Path) -> list[tuple[str, str, str]]:
    """What a sample says, whatever ZIP it came from: its channel, timestamp and messages."""
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    return [(s["meta"]["channel"], s["meta"]["ts"], json.dumps(s["messages"])) for s in rows]


def assert_refused(export: Path, out: Path, *needles: str, user: str = "alice") -> None:
    assert_bad_input(scrape(export, out, user), out, *needles)
    assert not out.exists() or not any(out.iterdir())  # nothing at all, not even a state file


def rezip(
    source: Path,
    target: Path,
    rename: Callable[[str], str] = str,
    edit: Callable[[str, Any], None] | None = None,
    extra: dict[str, bytes] | None = None,
) -> Path:
    """`source`'s entries under new names, their JSON changed in place by `edit(name, content)`, and
    `extra` entries: the export as another tool wrote it."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as new:
        for info in old.infolist():
            data = old.read(info)
            if edit is not None:
                content = json.loads(data)
                edit(info.filename, content)
                data = json.dumps(content).encode()
            new.writestr(rename(info.filename), data)
        for name, data in (extra or {}).items():
            new.writestr(name, data)
    return target


def patch_headers(path: Path, *, method: int | None = None, set_flags: int = 0, clear_flags: int = 0) -> Path:
    """Rewrite every entry's compression method and general purpose flags in place, in both the local and
    the central headers: what a ZIP written by another tool has (Deflate64, a password, UTF-8 names left
    unflagged), which Python's zipfile cannot write itself."""
    data = bytearray(path.read_bytes())
    for signature, flags_at in ((LOCAL_HEADER, 6), (CENTRAL_HEADER, 8)):
        start = data.find(signature)
        while start != -1:
            (flags,) = struct.unpack_from("<H", data, start + flags_at)
            struct.pack_into("<H", data, start + flags_at, (flags | set_flags) & ~clear_flags)
            if method is not None:
                struct.pack_into("<H", data, start + flags_at + 2, method)
            start = data.find(signature, start + 4)
    path.write_bytes(bytes(data))
    return path


@pytest.fixture
def plain(slack_workspace, tmp_path) -> tuple[Path, list[tuple[str, str, str]]]:
    """The workspace exported as Slack writes it, and the samples it gives."""
    export = write_export_zip(slack_workspace, tmp_path / "plain.zip")
    assert scrape(export, tmp_path / "plain").exit_code == 0
    return export, samples(tmp_path / "plain")


def in_top_folder_from_macos(name: str) -> str:
    return f"Acme Slack export Mar 1 2024/{name}"


def with_backslashes(name: str) -> str:
    return name.replace("/", "\\")


def from_enterprise_grid(name: str) -> str:
    return "org_users.json" if name == "users.json" else name


@pytest.mark.parametrize("rename", [in_top_folder_from_macos, with_backslashes, from_enterprise_grid])
def test_an_export_re_zipped_by_another_tool_gives_the_same_samples(plain, tmp_path, rename):
    export, expected = plain
    extra = {}
    if rename is in_top_folder_from_macos:
        extra = {f"__MACOSX/{in_top_folder_from_macos('._users.json')}": b"\0\5\26\7", ".DS_Store": b"Bud1"}
    variant = rezip(export, tmp_path / "variant.zip", rename, extra=extra)
    result = scrape(variant, tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert samples(tmp_path / "out") == expected


def test_timestamps_written_as_numbers_read_as_slack_writes_them(plain, tmp_path):
    export, expected = plain

    def as_numbers(name: str, content: Any) -> None:
        if "/" in name:  # a day file, from a converter that wrote the numbers, not the strings
            for message in content:
                for key in ("ts", "thread_ts"):
                    if key in message:
                        message[key] = float(message[key])

    variant = rezip(export, tmp_path / "numbers.zip", edit=as_numbers)
    assert scrape(variant, tmp_path / "out").exit_code == 0
    assert samples(tmp_path / "out") == expected


def test_a_channel_named_in_another_script_keeps_its_messages_whatever_the_zip_tool(
    slack_workspace, tmp_path
):
    workspace = copy.deepcopy(slack_workspace)
    name = "開発-équipe"
    channel = next(c for c in workspace["channels"] if c["name"] == "engineering")
    channel["name"] = name
    workspace["messages"][name] = workspace["messages"].pop("engineering")
    flagged = write_export_zip(workspace, tmp_path / "flagged.zip")
    assert scrape(flagged, tmp_path / "flagged").exit_code == 0
    expected = samples(tmp_path / "flagged")
    assert any(channel == name for channel, _, _ in expected)
    # macOS's Archive Utility: decomposed accents, UTF-8 names the ZIP does not flag (read back as cp437)
    decomposed = rezip(flagged, tmp_path / "macos.zip", lambda n: unicodedata.normalize("NFD", n))
    unflagged = patch_headers(decomposed, clear_flags=0x800)
    with zipfile.ZipFile(unflagged) as archive:
        assert not any(n.startswith(name) for n in archive.namelist())  # what Python alone would see
    result = scrape(unflagged, tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert samples(tmp_path / "out") == expected


def test_exports_doppel_cannot_read_are_refused_with_the_way_out(plain, slack_workspace, tmp_path):
    export, _ = plain
    out = tmp_path / "out"
    deflate64 = patch_headers(rezip(export, tmp_path / "d64.zip"), method=DEFLATE64)
    assert_refused(deflate64, out, "compressed with Deflate64", "zip the folder again")
    locked = patch_headers(rezip(export, tmp_path / "locked.zip"), set_flags=0x1)
    assert_refused(locked, out, "password-protected")
    two = rezip(export, tmp_path / "two.zip", lambda n: f"2023/{n}")
    with zipfile.ZipFile(export) as old, zipfile.ZipFile(two, "a") as new:
        for info in old.infolist():
            new.writestr(f"2024/{info.filename}", old.read(info))
    assert_refused(two, out, "holds 2 exports (2023/, 2024/)")


def declare_unpacked_size(path: Path, entry: str, size: int) -> Path:
    """Rewrite the unpacked size `entry` declares in both headers: a ZIP whose file is bigger than the
    test should write."""
    data = bytearray(path.read_bytes())
    name = entry.encode()
    for signature, size_at, name_at in ((LOCAL_HEADER, 22, 30), (CENTRAL_HEADER, 24, 46)):
        start = data.find(signature)
        while start != -1:
            if data[start + name_at : start + name_at + len(name)] == name:
                struct.pack_into("<I", data, start + size_at, size)
            start = data.find(signature, start + 4)
    path.write_bytes(bytes(data))
    return path


def test_a_zip_bomb_or_a_file_too_large_to_read_is_refused_unread(plain, tmp_path):
    """A day file of spaces packs 1,000 to 1 (300 KB unpacked to 300 MB once took 650 MB and a kill): the
    entry is named and nothing is written, whatever its declared size; one declared over the cap too."""
    export, _ = plain
    out = tmp_path / "out"
    day = "general/2020-01-01.json"
    bomb = rezip(export, tmp_path / "bomb.zip", extra={day: b"[" + b" " * (4 * 1024 * 1024) + b"]"})
    assert_refused(bomb, out, day, "times its packed size", "ZIP bomb")
    huge = rezip(export, tmp_path / "huge.zip", extra={day: json.dumps([]).encode()})
    huge = declare_unpacked_size(huge, day, 300 * 1024 * 1024)
    assert_refused(huge, out, day, "unpacks to 300 MiB, more than doppel reads of one file (256 MiB)")


def test_a_malformed_record_is_named(plain, tmp_path):
    export, _ = plain
    out = tmp_path / "out"

    def drop_an_id(name: str, content: Any) -> None:
        if name == "users.json":
            del content[2]["id"]

    no_id = rezip(export, tmp_path / "no_id.zip", edit=drop_an_id)
    assert_refused(no_id, out, "users.json: user 3 has no id")
    days: list[str] = []

    def a_word_for_a_timestamp(name: str, content: Any) -> None:
        if name.startswith("general/") and not days:
            days.append(name)
            content[0]["ts"] = "yesterday"

    bad_ts = rezip(export, tmp_path / "bad_ts.zip", edit=a_word_for_a_timestamp)
    assert_refused(bad_ts, out, f"{days[0]}: message 1 has ts 'yesterday', not a Slack timestamp")


def test_a_channel_without_a_name_or_a_profile_that_is_not_an_object_is_named(plain, tmp_path):
    """Records a converter or a hand edit got wrong: exit 2 naming the record, not a KeyError (exit 1)."""
    export, _ = plain
    out = tmp_path / "out"

    def add_a_nameless_channel(name: str, content: Any) -> None:
        if name == "channels.json":
            content.append({"id": "C0NONAME01", "is_archived": False})

    nameless = rezip(export, tmp_path / "nameless.zip", edit=add_a_nameless_channel)
    assert_refused(nameless, out, "channels.json: channel 6 (C0NONAME01) has no name")

    def drop_a_group_id(name: str, content: Any) -> None:
        if name == "groups.json":
            del content[0]["id"]

    no_id = rezip(export, tmp_path / "no_group_id.zip", edit=drop_a_group_id)
    assert_refused(no_id, out, "groups.json: channel 1 has no id")

    def a_word_for_a_profile(name: str, content: Any) -> None:
        if name == "users.json":
            content[1]["profile"] = "bob"

    bad_profile = rezip(export, tmp_path / "profile.zip", edit=a_word_for_a_profile)
    assert_refused(bad_profile, out, "users.json: user 2 (U02BOB) has a profile that is not an object")


def test_a_person_is_found_however_their_name_is_composed_and_a_bot_is_not_one(plain, tmp_path):
    export, _ = plain

    def decomposed_name(name: str, content: Any) -> None:
        if name == "users.json":  # as macOS stores "í": i and a combining accent
            decomposed = unicodedata.normalize("NFD", "Alice Martín")
            content[0]["real_name"] = content[0]["profile"]["real_name"] = decomposed

    variant = rezip(export, tmp_path / "nfd.zip", edit=decomposed_name)
    result = scrape(variant, tmp_path / "found", user="alice martín")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "found" / "manifest.json").read_text())["person"]["id"] == "U01ALICE"
    bot = "'deploybot' is a bot (U07DEPLOY), not a person"
    assert_refused(export, tmp_path / "out", bot, user="deploybot")


def test_someone_of_another_organisation_is_never_cloned_and_told_so(plain, tmp_path):
    export, _ = plain

    def external(name: str, content: Any) -> None:
        if name == "users.json":  # Carol writes in a Slack Connect channel but is of another organisation
            content[:] = [u for u in content if u["id"] != "U03CAROL"]

    variant = rezip(export, tmp_path / "connect.zip", edit=external)
    assert_refused(
        variant,
        tmp_path / "out",
        "U03CAROL wrote in this export but is not one of its people",
        user="U03CAROL",
    )
    assert_refused(variant, tmp_path / "out", "no user 'U09NOBODY'", user="U09NOBODY")
