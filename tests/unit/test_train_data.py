"""Training data rules: validation, reply-only labels, left clipping, the split by time, batching."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from doppel.errors import BadInput
from doppel.slack.conversation import ThreadMessage, build_conversation
from doppel.train import data

EOT = "<|eot_id|>"


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path):
    return AutoTokenizer.from_pretrained(tiny_model)


def _sample(context: list[tuple[str, str]], reply: str, thread: str = "t1") -> data.Sample:
    messages = build_conversation(
        "Pat", "U0PAT", [ThreadMessage(uid, uid.title(), text) for uid, text in context], reply
    )
    return data.Sample(messages, thread, reply_offset=len(messages[-1]["content"]) - len(reply))


def labelled_runs(encoded: data.Encoded, tokenizer) -> list[str]:
    """The labelled runs of tokens, decoded; a label is either the token itself or ignored."""
    runs: list[list[int]] = []
    previous_labelled = False
    for token, label in zip(encoded.input_ids, encoded.labels, strict=True):
        assert label in (token, data.IGNORE_INDEX)
        labelled = label != data.IGNORE_INDEX
        if labelled and not previous_labelled:
            runs.append([])
        if labelled:
            runs[-1].append(token)
        previous_labelled = labelled
    return [tokenizer.decode(run) for run in runs]


def test_labels_cover_exactly_the_reply(tokenizer):
    # Pat speaks twice: "almost" is the reply of its own sample; here it is context, not trained again.
    sample = _sample([("bob", "is the deploy done?"), ("U0PAT", "almost"), ("ana", "ok, ping me")], "done ☠")
    encoded = data.encode(sample, tokenizer, 1024, data.EncodeStats())
    assert encoded is not None
    text = tokenizer.apply_chat_template(sample.messages, tokenize=False)
    assert encoded.input_ids == tokenizer(text, add_special_tokens=False)["input_ids"]

    # The labelled tokens decode to exactly the reply and its end-of-turn token (the model learns to stop).
    assert labelled_runs(encoded, tokenizer) == ["done ☠" + EOT]
    unlabelled = [t for t, lab in zip(encoded.input_ids, encoded.labels, strict=True) if lab == -100]
    assert "is the deploy done?" in tokenizer.decode(unlabelled) and "almost" in tokenizer.decode(unlabelled)
    assert "assistant" in tokenizer.decode(unlabelled)  # the role header is prompt, not reply


def test_the_persons_messages_just_before_the_reply_are_context(tokenizer):
    # "on it" and the reply share the last assistant turn; only the reply is labelled.
    sample = _sample([("bob", "is the deploy done?"), ("U0PAT", "on it")], "done now")
    assert sample.messages[-1]["content"] == "on it\ndone now" and sample.reply == "done now"
    encoded = data.encode(sample, tokenizer, 1024, data.EncodeStats())
    assert encoded is not None
    assert labelled_runs(encoded, tokenizer) == ["done now" + EOT]


def test_a_context_weight_also_teaches_the_context_at_that_weight(tokenizer):
    sample = _sample([("bob", "is the deploy done?"), ("ana", "ok, ping me")], "done now")
    plain = data.encode(sample, tokenizer, 1024, data.EncodeStats())
    weighted = data.encode(sample, tokenizer, 1024, data.EncodeStats(), context_weight=0.25)
    assert plain is not None and weighted is not None and weighted.input_ids == plain.input_ids
    assert plain.weights is None
    # Every token but the first is a target now: the reply's weigh 1, the rest of the thread 0.25.
    assert weighted.labels == [data.IGNORE_INDEX, *weighted.input_ids[1:]]
    assert weighted.weights is not None and weighted.weights[0] == 0.0
    reply = [w for w, label in zip(weighted.weights, plain.labels, strict=True) if label != data.IGNORE_INDEX]
    context = [w for w, label in zip(weighted.weights[1:], plain.labels[1:], strict=True) if label == -100]
    assert reply and set(reply) == {1.0}
    assert context and set(context) == {0.25}
    # A batch weighs its labels (the loss's normaliser); an unweighted sample beside it weighs 1 a label.
    batch = data.collate([weighted, plain])
    assert batch.label_weight == pytest.approx(2 * len(reply) + 0.25 * len(context))
    shorter = len(plain.input_ids) - 3
    clipped = data.encode(sample, tokenizer, shorter, data.EncodeStats(), context_weight=0.25)
    assert clipped is not None and clipped.weights is not None
    assert len(clipped.weights) == len(clipped.labels) == len(clipped.input_ids)
    assert clipped.weights[-len(reply) :] == [1.0] * len(reply)


def test_long_context_is_clipped_from_the_left_and_counted(tokenizer):
    context = [("bob", f"message number {i} about the release plan") for i in range(40)]
    sample = _sample(context, "the final reply stays whole")
    stats = data.EncodeStats()
    full = data.encode(sample, tokenizer, 100_000, data.EncodeStats())
    clipped = data.encode(sample, tokenizer, 120, stats)
    assert full is not None and clipped is not None
    assert len(full.input_ids) > 120
    assert len(clipped.input_ids) == 120
    assert stats.clipped == 1
    decoded = tokenizer.decode(clipped.input_ids)
    assert decoded.startswith("<|begin_of_text|><|start_header_id|>system")  # system prompt kept
    assert decoded.endswith("the final reply stays whole" + EOT)  # target turn whole
    assert "message number 39" in decoded and "message number 0 " not in decoded  # oldest dropped
    assert clipped.input_ids[-40:] == full.input_ids[-40:]


def test_a_reply_too_long_to_fit_keeps_its_beginning_after_the_newest_context(tokenizer):
    context = [("bob", f"message number {i} about the release plan") for i in range(40)]
    reply = "first the plan: " + " ".join(f"step {i} of the long write-up." for i in range(60))
    stats = data.EncodeStats()
    cut = data.encode(_sample(context, reply), tokenizer, 200, stats)
    assert cut is not None and len(cut.input_ids) == 200
    assert (stats.clipped, stats.reply_cut, stats.dropped_too_long) == (0, 1, 0)
    decoded = tokenizer.decode(cut.input_ids)
    assert decoded.startswith("<|begin_of_text|><|start_header_id|>system")  # system prompt kept
    assert "message number 39" in decoded and "message number 30 " not in decoded  # a quarter: the newest
    (learnt,) = labelled_runs(cut, tokenizer)
    assert learnt.startswith("first the plan: step 0") and "step 59" not in learnt and EOT not in learnt
    assert sum(label != data.IGNORE_INDEX for label in cut.labels) > 200 // 3  # most of the sample


def test_sample_whose_system_prompt_leaves_no_room_for_its_reply_is_dropped_and_counted(tokenizer):
    stats = data.EncodeStats()
    sample = _sample([("bob", "hi")], "a very long reply " * 30)
    head = len(tokenizer.apply_chat_template(sample.messages[:1], tokenize=True))
    assert data.encode(sample, tokenizer, head + 8, stats) is None
    assert (stats.clipped, stats.reply_cut, stats.dropped_too_long) == (0, 0, 1)


def timed(ts: float, conversation: float, reply: str = "r") -> data.Sample:
    messages = [{"role": "user", "content": f"q{ts}"}, {"role": "assistant", "content": reply or f"r{ts}"}]
    return data.Sample(messages, f"c{conversation}", ts=ts, context_ts=conversation)


def test_split_holds_out_the_latest_whole_conversations():
    # 20 replies, one conversation every two; the conversation starting at 15 spans the cut at 17.
    samples = [timed(t, t - t % 2 - (2 if t == 17 else 0), reply=f"reply {t}") for t in range(20)]
    split = data.split_by_time(samples, 0.15)  # the latest 3 replies: 17, 18, 19
    assert split.cut_ts == 17
    assert [s.ts for s in split.eval] == [18, 19]  # 17 belongs to a conversation that began at 14
    assert [s.ts for s in split.train] == list(range(17))
    assert split.straddling == 1 and split.leaking == 0  # 17 itself: neither side


def test_split_leaves_out_training_samples_that_hold_a_held_out_reply():
    samples = [timed(t, t, reply=f"reply {t}") for t in range(10)]
    samples[2] = data.Sample(
        [{"role": "user", "content": "Bob: reply 9"}, {"role": "assistant", "content": "ok"}],
        "c2",
        ts=2,
        context_ts=2,
    )
    split = data.split_by_time(samples, 0.1)
    assert [s.ts for s in split.eval] == [9]
    assert split.leaking == 1 and 2 not in [s.ts for s in split.train]


def test_samples_without_a_conversation_start_split_by_their_own_times(tmp_path):
    """samples.jsonl of an earlier scrape has Slack times (meta.ts) but no meta.context_ts: a conversation
    then starts at its thread's first reply, in Slack time too, not at a line number of the file (which
    put every conversation before any cut and left nothing to train on)."""
    rows = []
    for thread in range(30):
        start = 1_700_000_000 + thread * 1000
        for k in range(2):
            messages = [
                {"role": "system", "content": "You are Pat."},
                {"role": "user", "content": f"Bob: question {thread}.{k}"},
                {"role": "assistant", "content": f"answer {thread}.{k}"},
            ]
            meta = {"channel_id": "C1", "thread_ts": f"{start}.000100", "ts": f"{start + 10 * k}.000100"}
            rows.append({"messages": messages, "meta": meta})
    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    samples = data.load_samples(path)
    assert [s.context_ts for s in samples[:2]] == [1_700_000_000.0001] * 2
    split = data.split_by_time(samples, 0.15)
    assert split.cut_ts is not None and split.cut_ts > 1e9
    # The latest 9 replies (15%) begin with a thread's second: the threads after it held out, it neither.
    assert (len(split.train), len(split.eval), split.straddling) == (51, 8, 1)
    assert {s.thread for s in split.train}.isdisjoint(s.thread for s in split.eval)


def test_thread_key_comes_from_slack_metadata(tmp_path):
    path = tmp_path / "s.jsonl"
    reply = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    rows = [
        {"messages": reply, "meta": {"channel_id": "C1", "thread_ts": "1.0"}},
        {"messages": reply, "meta": {"channel_id": "C2", "thread_ts": "1.0"}},
        {"messages": reply},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    threads = [s.thread for s in data.load_samples(path)]
    assert threads[0] != threads[1]
    assert threads[2] == "opening:hi"


def test_padded_batch_gives_the_same_logits_as_separate_samples(tiny_model: Path):
    """Padding is invisible: attention and loss ignore it."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    items = [data.Encoded(list(range(5, 5 + n)), list(range(5, 5 + n)), "t") for n in (7, 3, 11)]
    batch = data.collate(items)
    assert [len(row) for row in batch.input_ids] == [11, 11, 11]
    assert (batch.tokens, batch.padding, batch.label_tokens) == (21, 12, 21)
    assert batch.labels[1][3:] == [data.IGNORE_INDEX] * 8
    with torch.no_grad():
        logits = model(
            input_ids=torch.tensor(batch.input_ids), attention_mask=torch.tensor(batch.attention_mask)
        ).logits
        for row, item in enumerate(items):
            alone = model(input_ids=torch.tensor([item.input_ids])).logits[0]
            torch.testing.assert_close(logits[row, : len(item.input_ids)], alone, atol=1e-4, rtol=1e-4)


def test_length_grouping_wastes_little_on_padding():
    rng = random.Random(0)
    lengths = [rng.randint(20, 400) for _ in range(512)]
    items = [data.Encoded([1] * n, [1] * n, f"t{i}") for i, n in enumerate(lengths)]
    grouped = data.epoch_batches(items, 8, random.Random(1))
    naive = [data.collate(items[i : i + 8]) for i in range(0, len(items), 8)]
    assert (
        sum(b.tokens for b in grouped) == sum(b.tokens for b in naive) == sum(len(i.input_ids) for i in items)
    )
    waste = sum(b.padding for b in grouped) / sum(b.tokens for b in grouped)
    naive_waste = sum(b.padding for b in naive) / sum(b.tokens for b in naive)
    assert waste < 0.1 < 0.5 < naive_waste
    assert data.epoch_batches(items, 8, random.Random(1)) == grouped  # seeded: reproducible
    assert data.epoch_batches(items, 8, random.Random(2)) != grouped  # and still shuffled


def test_micro_batches_split_the_steps_without_changing_them():
    """Accumulating gradients saves memory only: with 2 x 4 a step holds the samples a batch of 8 holds."""
    rng = random.Random(0)
    items = [data.Encoded([1] * rng.randint(20, 400), [1], f"t{i}") for i in range(100)]

    def rows(batch: data.Batch) -> list[list[int]]:
        return [row[: sum(mask)] for row, mask in zip(batch.input_ids, batch.attention_mask, strict=True)]

    whole = data.epoch_batches(items, 8, random.Random(1))
    steps = data.epoch_steps(items, 2, 4, random.Random(1))
    assert len(steps) == len(whole) == 13
    for batch, step in zip(whole, steps, strict=True):
        assert all(len(micro.input_ids) <= 2 for micro in step)
        assert [row for micro in step for row in rows(micro)] == rows(batch)


def test_without_the_contexts_gradient_a_step_holds_the_same_samples_split_where_replies_start():
    """Split where the replies start: a step holds the samples it holds with the context's gradient
    (the same mix of long and short replies), its micro-batches made of replies of similar length;
    contexts left-padded to end together, replies right-padded after them."""
    rng = random.Random(0)
    ignore = data.IGNORE_INDEX
    items = []
    for i in range(200):
        context, reply = rng.randint(20, 300), rng.choice([rng.randint(3, 30), rng.randint(60, 200)])
        ids = [rng.randint(5, 900) for _ in range(context + reply)]
        items.append(data.Encoded(ids, [ignore] * context + ids[context:], f"t{i}"))
    whole = data.epoch_steps(items, 4, 2, random.Random(1))
    steps = data.epoch_steps(items, 4, 2, random.Random(1), context_gradient=False)
    assert len(steps) == len(whole) == 25

    def rows(batch: data.ReplyBatch) -> list[tuple[int, ...]]:
        out = []
        for context, cmask, reply, rmask in zip(
            batch.context_ids, batch.context_mask, batch.reply_ids, batch.reply_mask, strict=True
        ):
            assert cmask[-1] == 1 and rmask[0] == 1  # left-padded contexts, right-padded replies
            out.append(tuple(t for t, m in zip(context + reply, cmask + rmask, strict=True) if m))
        return out

    for step, same in zip(steps, whole, strict=True):
        assert all(isinstance(b, data.ReplyBatch) and len(b.reply_ids) <= 4 for b in step)
        held = [row for batch in step for row in rows(batch)]
        assert sorted(held) == sorted(
            tuple(r[: sum(m)]) for b in same for r, m in zip(b.input_ids, b.attention_mask, strict=True)
        )
        widths = [len(b.reply_ids[0]) for b in step]
        assert widths == sorted(widths)  # the shorter replies together, the longer together
    micro = [batch for step in steps for batch in step]
    assert sum(b.tokens for b in micro) == sum(len(i.input_ids) for i in items)
    assert sum(b.label_tokens for b in micro) == sum(data.reply_tokens(i) for i in items)
    # Each target is the token after its position, the reply's first predicted from the context's last.
    one = data.collate_replies([items[0]])
    start = data.reply_start(items[0])
    assert one.context_ids[0] == items[0].input_ids[: start - 1]
    assert one.targets[0][:-1] == items[0].input_ids[start:] and one.targets[0][-1] == ignore
    # What a step costs: the context its forward pass alone, the replies' part more than a whole sample's.
    assert data.train_cost(items[0]) == len(items[0].input_ids)
    cheaper = data.train_cost(items[0], context_gradient=False)
    assert cheaper == pytest.approx(
        data.CACHED_CONTEXT_TOKEN_COST * start + data.REPLY_PART_TOKEN_COST * data.reply_tokens(items[0])
    )


def test_a_context_learnt_with_a_weight_cannot_be_split_off():
    item = data.Encoded([1, 2, 3, 4], [data.IGNORE_INDEX, 2, 3, 4], "t", weights=[0.0, 0.25, 1.0, 1.0])
    with pytest.raises(ValueError, match="needs its gradient"):
        data.collate_replies([item])


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("{not json", "not valid JSON"),
        ('["a list"]', "expected a JSON object"),
        ('{"messages": []}', "'messages' must be a non-empty list"),
        ('{"messages": [{"role": "bot", "content": "x"}]}', "role 'bot'"),
        ('{"messages": [{"role": "user", "content": "x"}]}', "last message must be the person's"),
        ('{"messages": [{"role": "assistant", "content": 3}]}', "no string 'content'"),
    ],
)
def test_malformed_line_names_its_line_number(tmp_path, line, problem):
    good = json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
    path = tmp_path / "samples.jsonl"
    path.write_text(f"{good}\n\n{good}\n{line}\n{good}\n")
    with pytest.raises(BadInput, match=rf"samples\.jsonl:4: .*{problem}"):
        data.load_samples(path)


def test_a_budget_uses_the_newest_distinct_replies_and_a_spread_of_held_out_ones():
    samples = [timed(t, t, reply="same words" if t in (97, 98) else f"reply {t}") for t in range(100)]
    split = data.budget_split(samples, 0.2, max_train=10, max_eval=5)
    assert split.available == 80 and split.summary()["train_available"] == 80
    # The newest ten training replies; the held-out loss on five spread over the held-out period.
    assert [s.ts for s in split.train] == list(range(70, 80))
    assert [s.ts for s in split.eval] == [80, 84, 88, 92, 96]
    repeated = [timed(t, t, reply="ok then" if t % 2 else f"reply {t}") for t in range(20)]
    chosen = data.choose(repeated, 6)
    assert len(chosen) == 6 and sum(s.reply == "ok then" for s in chosen) == 1


def test_a_budget_of_tokens_trains_the_samples_it_prefers_once_rather_than_part_of_them_all():
    """Where the training samples cost more than the budget's tokens, the newest that fit are chosen (the
    trainer would otherwise stop its one pass over them all part way, at random); where they all fit, all
    are kept (more passes than one are the steps' business)."""
    samples = [timed(t, t, reply=f"reply {t}") for t in range(100)]
    cost = {id(s): 10.0 + (s.ts % 3) for s in samples}  # 10 to 12 tokens each
    split = data.budget_split(samples, 0.2, None, None, cost=lambda s: cost[id(s)], max_cost=300)
    spent = sum(cost[id(s)] for s in split.train)
    assert 300 - 12 < spent <= 300 and split.available == 80
    assert [s.ts for s in split.train] == list(range(80 - len(split.train), 80))
    # A sample count that binds first still binds.
    fewer = data.budget_split(samples, 0.2, 20, None, cost=lambda s: cost[id(s)], max_cost=300)
    assert [s.ts for s in fewer.train] == list(range(60, 80))
    everything = data.budget_split(samples, 0.2, None, None, cost=lambda s: cost[id(s)], max_cost=10_000)
    assert len(everything.train) == 80
    # Never fewer than training needs.
    floor = data.budget_split(samples, 0.2, None, None, cost=lambda s: cost[id(s)], max_cost=50, at_least=20)
    assert len(floor.train) == 20
    # Samples too long to train were never the budget's to choose: not counted as available to it.
    fitting = data.budget_split(samples, 0.2, None, None, fits=lambda s: s.ts % 10 != 0)
    assert fitting.available == len(fitting.train) == 72


def test_a_budget_prefers_the_replies_most_like_the_person_among_the_recent_ones():
    """Against colleagues' messages from before the cut, the person's characteristic replies (here their
    habit of 'yarr' and lower case) are chosen over generic ones of the same period."""
    habit = [f"yarr the {w} is fine, ship it" for w in ("build", "test", "docs", "lint", "deploy", "merge")]
    generic = [
        f"The {w} looks good to me. Thanks!" for w in ("build", "test", "docs", "lint", "deploy", "merge")
    ]
    replies = [text for pair in zip(habit, generic, strict=True) for text in pair] * 3
    samples = [timed(t, t, reply=f"{text} ({t})") for t, text in enumerate(replies)] + [
        timed(100 + t, 100 + t, reply=f"later {t}") for t in range(8)
    ]
    others = [
        (float(t), f"The {w} looks good to me. Thanks! ({t})") for t, w in enumerate(["a", "b", "c"] * 8)
    ]
    split = data.budget_split(samples, 0.2, max_train=8, max_eval=None, colleagues=others)
    assert len(split.train) == 8 and sum("yarr" in s.reply for s in split.train) >= 7
    # Without colleagues to compare with, the newest are taken.
    assert [s.ts for s in data.budget_split(samples, 0.2, max_train=8, max_eval=None).train] == list(
        range(27, 35)
    )
