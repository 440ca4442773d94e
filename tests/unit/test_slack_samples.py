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
    with pytest.raises(BadInput, match=r"'deploybot' is a bot \(U07DEPLOY\), not a person"):
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


def channel(*messages):
    """Threads of one channel #ops from (ts, user, text[, thread_ts]) tuples."""
    raw = [
        {"type": "message", "ts": f"{ts}.000100", "user": user, "text": text}
        | ({"thread_ts": f"{root}.000100"} if root else {})
        for ts, user, text, *rest in messages
        for root in [rest[0] if rest else None]
    ]
    return threads_from_messages("C9OPS", "ops", raw, 0)


PEOPLE = [
    {"id": "U01ALICE", "name": "alice", "profile": {"real_name": "Alice Martin", "display_name": "alice"}},
    {"id": "U02BOB", "name": "bob", "profile": {"display_name": "bobby"}},
]
T0 = 1_700_000_000


def build(threads, **options):
    opts = ScrapeOptions(**{"min_length": 1, "now": T0 + 86400, **options})
    return build_samples(threads, ALICE, PEOPLE, {"C9OPS": "ops"}, opts, team="T1", source="test")


def test_channel_messages_get_their_window_and_thread_replies_their_thread():
    threads = channel(
        (T0, "U02BOB", "is the deploy at 5?"),
        (T0 + 60, "U01ALICE", "yes, 5pm as always"),
        (T0 + 4000, "U01ALICE", "deploy done"),  # an hour later: a new window
        (T0 + 4100, "U02BOB", "thanks!", T0 + 4000),
        (T0 + 4200, "U01ALICE", "you are welcome", T0 + 4000),
    )
    samples, _ = build(threads)
    by_reply = {s["messages"][-1]["content"]: s["messages"][1:-1] for s in samples}
    assert by_reply["yes, 5pm as always"] == [{"role": "user", "content": "bobby: is the deploy at 5?"}]
    assert by_reply["deploy done"] == [{"role": "user", "content": "(a new thread in #ops)"}]
    # The reply in the thread sees its thread (root first), not the channel.
    assert by_reply["you are welcome"] == [
        {"role": "user", "content": "(a new thread in #ops)"},
        {"role": "assistant", "content": "deploy done"},
        {"role": "user", "content": "bobby: thanks!"},
    ]
    wide, _ = build(threads, window_gap_s=5000)
    assert [m["content"] for m in wide[1]["messages"][1:]] == [
        "bobby: is the deploy at 5?",
        "yes, 5pm as always\ndeploy done",
    ]


def test_pastes_are_dropped_or_cut_and_counted():
    log = "here is the log:\n```" + "ERROR something failed at line 42\n" * 40 + "```"
    threads = channel(
        (T0, "U02BOB", "what broke?"), (T0 + 30, "U01ALICE", log), (T0 + 90, "U01ALICE", "the db")
    )
    dropped, manifest = build(threads)
    assert [s["messages"][-1]["content"] for s in dropped] == ["the db"] and manifest.dropped == {"paste": 1}
    cut, manifest = build(threads, paste_action="cut", paste_chars=200)
    pasted = cut[0]["messages"][-1]["content"]
    assert manifest.cut == {"paste": 1} and len(pasted) < 210 and pasted.endswith("…```")


def test_scrubbing_is_counted_and_can_be_turned_off():
    threads = channel(
        (T0, "U01ALICE", "mail me at alice@example.com, token ghp_R8aVx2LmQ4pTz7NcW1bY5dKf9HsJ3uE6gA0o")
    )
    (sample,), manifest = build(threads)
    assert sample["messages"][-1]["content"] == "mail me at <email>, token <secret>"
    assert manifest.scrubbed == {"email": 1, "secret": 1}
    (raw,), manifest = build(threads, scrub=False)
    assert "alice@example.com" in raw["messages"][-1]["content"] and manifest.scrubbed == {}


def test_no_samples_writes_nothing_and_says_why(tmp_path):
    threads = channel((T0, "U01ALICE", "ok"))
    samples, manifest = build(threads, min_length=50)
    with pytest.raises(
        BadInput, match="all 1 messages of Alice Martin after the cutoff are shorter than --min-length 50"
    ):
        write_output(tmp_path / "out", samples, manifest, 500)
    assert not (tmp_path / "out").exists()
    samples, manifest = build(threads, cutoff_days=0.5)
    with pytest.raises(
        BadInput, match=r"none of Alice Martin's 1 messages is after the cutoff .* newest is from 2023"
    ):
        write_output(tmp_path / "out", samples, manifest, 500)


def test_a_user_missing_from_the_user_list_is_named_from_the_profile_in_the_message():
    ghost = {
        "type": "message",
        "ts": f"{T0}.000100",
        "user": "U09GHOST",
        "text": "who owns <@U08NOBODY>'s task?",
    }
    ghost["user_profile"] = {"display_name": "ghosty", "real_name": "Gus Host"}
    answer = {"type": "message", "ts": f"{T0 + 30}.000100", "user": "U01ALICE", "text": "<@U09GHOST> me"}
    (sample,), _ = build(threads_from_messages("C9OPS", "ops", [ghost, answer], 0))
    assert [m["content"] for m in sample["messages"][1:]] == [
        "ghosty: who owns @someone's task?",
        "@ghosty me",
    ]


def test_channel_policy_says_why_a_channel_is_not_taken():
    from doppel.slack.samples import channel_skip_reason

    kinds = {
        "pub": {},
        "old": {"is_archived": True},
        "priv": {"is_private": True},
        "dm": {"is_im": True},
        "group-dm": {"is_mpim": True},
        "ext": {"is_ext_shared": True},
    }
    channels = [{"id": f"C{i}", "name": name, **flags} for i, (name, flags) in enumerate(kinds.items())]

    def taken(**options):
        return {c["name"]: channel_skip_reason(c, ScrapeOptions(**options)) for c in channels}

    assert taken(include_archived=True) == {
        "pub": None,
        "old": None,
        "priv": "private (--include-private takes it)",
        "dm": "direct messages (--include-dms takes them)",
        "group-dm": "direct messages (--include-dms takes them)",
        "ext": "shared with another organisation (--channel takes it)",
    }
    every = taken(include_archived=False, include_private=True, include_dms=True)
    assert every["old"] == "archived (--exclude-archived)" and every["priv"] is every["dm"] is None
    assert taken(channels=["ext"], exclude_channels=["pub"])["ext"] is None
    assert taken(exclude_channels=["pub"])["pub"] == "excluded (--exclude-channel)"


def test_the_reasons_name_the_length_and_who_chose_it():
    """A reason says "from their median" only for a length the scrape chose, not for one the user gave nor
    for a manifest written before the scrape chose lengths (it was a fixed 100 then)."""
    from doppel.slack.samples import min_length_flag

    chosen = min_length_flag({"min_length": 35, "min_length_given": False})
    assert chosen == "--min-length 35 (from their median message length)"
    assert min_length_flag({"min_length": 60, "min_length_given": True}) == "--min-length 60"
    assert min_length_flag({"min_length": 100}) == "--min-length 100"
