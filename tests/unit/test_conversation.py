from doppel.slack.conversation import (
    ThreadMessage,
    WindowRule,
    build_conversation,
    channel_window,
    system_prompt,
)

ALICE = "U_ALICE"


def msg(author_id: str, text: str, name: str | None = None) -> ThreadMessage:
    return ThreadMessage(author_id, name or author_id.removeprefix("U_").title(), text)


def test_sides_merge_and_prefix_only_the_user_side():
    context = [
        msg("U_BOB", "deploy is red"),
        msg("U_CAROL", "again?"),
        msg(ALICE, "on it"),
        msg("U_BOB", "ty"),
    ]
    out = build_conversation("Alice", ALICE, context, reply="fixed, flaky test")
    assert out == [
        {"role": "system", "content": system_prompt("Alice")},
        {"role": "user", "content": "Bob: deploy is red\nCarol: again?"},
        {"role": "assistant", "content": "on it"},
        {"role": "user", "content": "Bob: ty"},
        {"role": "assistant", "content": "fixed, flaky test"},
    ]


def test_thread_opened_by_the_person_gets_an_opening_user_turn():
    out = build_conversation("Alice", ALICE, [], reply="standup moved to 10", channel="general")
    assert [m["role"] for m in out] == ["system", "user", "assistant"]
    assert out[1]["content"] == "(a new thread in #general)"


def test_reply_after_own_message_merges_into_one_assistant_turn():
    out = build_conversation("Alice", ALICE, [msg("U_BOB", "q"), msg(ALICE, "first")], reply="second")
    assert out[-1] == {"role": "assistant", "content": "first\nsecond"}


def test_inference_ends_with_the_user_turn_to_answer():
    out = build_conversation("Alice", ALICE, [msg("U_BOB", "what do you think?")])
    assert out[-1] == {"role": "user", "content": "Bob: what do you think?"}


def test_budget_drops_oldest_first_and_never_the_newest():
    context = [msg("U_BOB", "old " * 50), msg("U_BOB", "x" * 30, name="Bo")]
    out = build_conversation("Alice", ALICE, context, budget_chars=40)
    assert out[-1]["content"] == "Bo: " + "x" * 30
    clipped = build_conversation("Alice", ALICE, [msg("U_BOB", "y" * 500, name="Bo")], budget_chars=50)
    assert clipped[-1]["content"].startswith("Bo: …") and clipped[-1]["content"].endswith("y")
    assert len(clipped[-1]["content"]) <= 50


def at(ts: float, author_id: str, text: str) -> ThreadMessage:
    return ThreadMessage(author_id, author_id.removeprefix("U_").title(), text, ts)


def test_a_channel_window_reaches_back_over_short_gaps_only():
    flow = [at(0, "U_BOB", "lunch?"), at(1000, "U_BOB", "deploy at 5?"), at(1100, "U_CAROL", "or 6?")]
    target = at(1200, ALICE, "5, as always")
    assert channel_window([*flow, target], WindowRule(gap_seconds=300)) == [*flow[1:], target]
    assert channel_window([*flow, target], WindowRule(gap_seconds=5000)) == [*flow, target]
    assert channel_window([*flow, target], WindowRule(gap_seconds=99)) == [target]
    # At most max_messages, the answered one included.
    assert channel_window([*flow, target], WindowRule(gap_seconds=5000, max_messages=2)) == [flow[-1], target]
    assert channel_window([], WindowRule()) == []


def test_doppel_chat_cuts_its_prompt_with_the_same_window():
    """`doppel chat` is one channel: after a long pause the earlier talk is no longer the context."""
    from doppel.serve.chat import ChatSession

    prompts: list[list[dict[str, str]]] = []

    class Recording:
        def stream(self, adapter, messages, params):
            prompts.append(list(messages))
            yield "noted"

    now = [1000.0]
    session = ChatSession(Recording(), "a", "Alice", window=WindowRule(gap_seconds=300), clock=lambda: now[0])
    list(session.reply("deploy at 5?"))
    now[0] += 60
    list(session.reply("and the retro?"))
    assert [m["content"] for m in prompts[-1][1:]] == ["You: deploy at 5?", "noted", "You: and the retro?"]
    now[0] += 3600
    list(session.reply("new topic"))
    assert [m["content"] for m in prompts[-1][1:]] == ["You: new topic"]
