"""Sample building: who, which channels, which messages, and how they are written."""

import json

import pytest

from doppel.errors import BadInput
from doppel.slack.conversation import ThreadMessage, build_conversation, system_prompt
from doppel.slack.samples import (
    Person,
    ScrapeOptions,
    build_samples,
    resolve_person,
    select_channels,
    skip_reason,
    threads_from_messages,
    write_output,
)

ALICE = Person("U01ALICE", "Alice Martin")


def all_threads(workspace, options):
    ids = {c["name"]: c["id"] for c in workspace["channels"]}
    threads = []
    for channel in select_channels(workspace["channels"], options):
        msgs = workspace["messages"].get(channel["name"], [])
        threads += threads_from_messages(ids[channel["name"]], channel["name"], msgs, options.cutoff_ts())
    return threads


def samples_of(workspace, **kwargs):
    options = ScrapeOptions(bot_user_id="U0DOPPEL", **kwargs)
    names = {c["id"]: c["name"] for c in workspace["channels"]}
    return build_samples(
        all_threads(workspace, options), ALICE, workspace["users"], names, options, team="T1", source="test"
    )


@pytest.mark.parametrize("query", ["U01ALICE", "alice", "@alice", "Alice Martin", "alice martin"])
def test_person_by_id_handle_or_real_name(slack_workspace, query):
    assert resolve_person(slack_workspace["users"], query) == ALICE


def test_ambiguous_handle_names_every_candidate(slack_workspace):
    with pytest.raises(BadInput) as err:
        resolve_person(slack_workspace["users"], "sam")
    assert "U05SAML" in str(err.value) and "U06SAMP" in str(err.value)
    assert resolve_person(slack_workspace["users"], "Sam Park").id == "U06SAMP"


def test_unknown_person_and_bots_are_bad_input(slack_workspace):
    with pytest.raises(BadInput, match=r"no user 'alicia'.*Alice Martin"):
        resolve_person(slack_workspace["users"], "alicia")
    with pytest.raises(BadInput, match="no user"):
        resolve_person(slack_workspace["users"], "deploybot")


def test_default_channels_are_public_live_and_not_shared(slack_workspace):
    chosen = select_channels(slack_workspace["channels"], ScrapeOptions())
    assert [c["name"] for c in chosen] == ["design", "engineering", "general"]


def test_include_takes_any_kind_and_exclude_wins(slack_workspace):
    options = ScrapeOptions(
        channels=["secret-plans", "C05PARTNER", "#random", "general"], exclude_channels=["general"]
    )
    assert [c["name"] for c in select_channels(slack_workspace["channels"], options)] == [
        "partners",
        "random",
        "secret-plans",
    ]
    with pytest.raises(BadInput, match=r"unknown channel.*nope.*available: design"):
        select_channels(slack_workspace["channels"], ScrapeOptions(channels=["nope"]))


def test_threads_are_rebuilt_from_thread_ts_and_cutoff_applies(slack_workspace):
    general = slack_workspace["messages"]["general"]
    threads = threads_from_messages("C01GENERAL", "general", general, ScrapeOptions().cutoff_ts())
    first = threads[0]
    assert [m["ts"] for m in first.messages] == sorted(
        m["ts"] for m in general if m.get("thread_ts") == first.ts or m["ts"] == first.ts
    )
    assert len(first.messages) == 5  # root, three replies and the broadcast
    everything = threads_from_messages("C01GENERAL", "general", general, 0)
    assert len(everything) == len(threads) + 1  # the year-old message


def test_skip_reasons():
    assert skip_reason({"user": "U1", "text": "x"}) is None
    for kept in ("thread_broadcast", "file_share", "me_message"):
        assert skip_reason({"user": "U1", "subtype": kept}) is None
    assert skip_reason({"bot_id": "B1", "user": "U1"}) == "bot"
    assert skip_reason({"subtype": "channel_join", "user": "U1"}) == "subtype:channel_join"


def test_each_long_message_of_the_person_is_one_sample(slack_workspace):
    samples, manifest = samples_of(slack_workspace)
    replies = [s["messages"][-1]["content"] for s in samples]
    assert all(s["messages"][-1]["role"] == "assistant" for s in samples)
    assert all(s["meta"]["user"] == "U01ALICE" and s["meta"]["team"] == "T1" for s in samples)
    # meta.person is the name the system prompt uses (doppel chat's default --person after training).
    assert all(s["messages"][0]["content"] == system_prompt(s["meta"]["person"]) for s in samples)
    assert any(r.startswith("Update for everyone") for r in (x.split("\n")[-1] for x in replies))
    assert any("is heading out for lunch" in r for r in replies)  # me_message
    assert any("comparison sheet" in r for r in replies)  # file_share
    assert not any("archived" in r or "Private channel" in r or "year older" in r for r in replies)
    assert all(len(s["messages"][-1]["content"].split("\n")[-1]) >= 100 for s in samples)
    assert manifest.dropped == {"too_short": 2}
    assert manifest.skipped == {
        "bot": 1,
        "subtype:channel_join": 1,
        "subtype:channel_leave": 1,
        "subtype:channel_topic": 1,
    }
    assert manifest.threads == sum(c["threads"] for c in manifest.channels.values())


def test_sample_is_the_shared_conversation_of_its_thread(slack_workspace):
    samples, _ = samples_of(slack_workspace)
    spaces = next(s for s in samples if "Spaces, always spaces" in s["messages"][-1]["content"])
    assert spaces["messages"] == build_conversation(
        "Alice Martin",
        "U01ALICE",
        [ThreadMessage("U04DAVE", "dave", "@doppel what would alice say about tabs vs spaces, @editors?")],
        "Spaces, always spaces. @doppel is going to learn that from me whether it likes it or not, "
        "and so will @bobby eventually.",
        channel="general",
    )


def test_min_length_and_max_samples_keep_the_newest(slack_workspace):
    every, _ = samples_of(slack_workspace, min_length=1)
    assert len(every) == 10
    newest, manifest = samples_of(slack_workspace, min_length=1, max_samples=3)
    assert newest == every[-3:]
    assert manifest.dropped["over_max_samples"] == 7


def test_budget_bounds_the_context(slack_workspace):
    samples, _ = samples_of(slack_workspace, budget_chars=200)
    for sample in samples:
        context = sum(len(m["content"]) for m in sample["messages"][1:-1])
        assert context <= 200 + len("(a new thread in #engineering)")


def test_output_is_deterministic_and_merges_without_duplicates(slack_workspace, tmp_path):
    samples, manifest = samples_of(slack_workspace)
    write_output(tmp_path / "a", samples, manifest, 500)
    again, manifest2 = samples_of(slack_workspace)
    written = write_output(tmp_path / "a", again, manifest2, 500)
    assert written.added == 0 and written.samples == len(samples)
    lines = (tmp_path / "a" / "samples.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == samples
    data = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert data["samples"] == len(samples)
    assert data["channels"]["general"]["samples"] == 4
    assert data["time_range"]["oldest"] < data["time_range"]["newest"]


def test_output_refuses_to_mix_people(slack_workspace, tmp_path):
    samples, manifest = samples_of(slack_workspace)
    write_output(tmp_path, samples, manifest, 500)
    before = (tmp_path / "samples.jsonl").read_text()
    manifest.person = {"id": "U02BOB", "name": "Bob Chen"}
    with pytest.raises(BadInput, match="holds samples of U01ALICE"):
        write_output(tmp_path, samples, manifest, 500)
    assert (tmp_path / "samples.jsonl").read_text() == before
