"""Secrets and personal data never reach the model or a reply: scraped from an export and through the Web
API, tokenised into training batches, and posted by the bot mentioned outside a thread."""

from __future__ import annotations

import html
import json
import random
import time

from click.testing import CliRunner
from tests.support.bot_fixtures import CHANNEL, NAMESPACE, doppel_body, kube_for, mention_payload, say
from tests.support.secret_fixtures import NATIONAL_PHONES, PASTE, leaked
from tests.support.slack_fixtures import ACME_TOKEN, write_export_zip

from doppel.cli import main
from doppel.slack.samples import Person, ScrapeOptions, build_samples, threads_from_messages

GENERAL = "C01GENERAL"


LONDON_LINE = f"and from the London office call me on {NATIONAL_PHONES['GB']}, it rings at my desk all day"


def pasted_messages(now: float) -> list[dict[str, str]]:
    """Bob pastes everything in #general and, living in London, gives his desk phone the British way;
    Alice answers with it all again a minute later."""
    return [
        {"type": "message", "ts": f"{int(now) - 120}.000100", "user": "U02BOB", "text": PASTE},
        {"type": "message", "ts": f"{int(now) - 90}.000100", "user": "U02BOB", "text": LONDON_LINE},
        {"type": "message", "ts": f"{int(now) - 60}.000100", "user": "U01ALICE", "text": "thanks! " + PASTE},
    ]


def in_london(users: list[dict]) -> None:
    """Bob's Slack profile says Europe/London (users.list and exports carry each person's `tz`)."""
    next(u for u in users if u["id"] == "U02BOB")["tz"] = "Europe/London"


def scrape(out, *args, emulator=None):
    argv = ["scrape", "--user", "alice", "--out", str(out), "--rate-scale", "1000", *args]
    env = {"SLACK_BOT_TOKEN": ACME_TOKEN, "SLACK_API_URL": emulator.base_url if emulator else ""}
    return CliRunner().invoke(main, argv, env=env)


def written(out) -> tuple[str, dict]:
    return (out / "samples.jsonl").read_text(), json.loads((out / "manifest.json").read_text())


def test_an_export_full_of_secrets_gives_clean_samples(slack_workspace, tmp_path):
    in_london(slack_workspace["users"])
    newest = max(float(m["ts"]) for msgs in slack_workspace["messages"].values() for m in msgs)
    slack_workspace["messages"]["general"] += pasted_messages(newest)
    export = write_export_zip(slack_workspace, tmp_path / "export.zip")
    assert scrape(tmp_path / "out", "--export", str(export)).exit_code == 0
    samples, manifest = written(tmp_path / "out")
    assert "thanks! ok here is everything" in samples  # the message is there, scrubbed
    assert not leaked(samples) and NATIONAL_PHONES["GB"] not in samples
    assert "from the London office call me on <phone>" in samples
    # Both pastes, each with 9 secrets, an email, a phone number, an SSN, a card and an IBAN; Bob's desk
    # phone read in his region (the workspace has more emails).
    scrubbed = manifest["scrubbed"]
    assert scrubbed["secret"] == 18 and scrubbed["phone"] == 3
    assert scrubbed["ssn"] == scrubbed["card"] == scrubbed["iban"] == 2 and scrubbed["email"] >= 2
    # Off only when asked: then every kind is there (what the check above would have caught).
    assert scrape(tmp_path / "raw", "--export", str(export), "--no-scrub").exit_code == 0
    raw = written(tmp_path / "raw")[0]
    assert len(leaked(raw)) == 16 and NATIONAL_PHONES["GB"] in raw
    # Scraped again into the same directory with the other setting: every sample is of the new one (merged,
    # the earlier samples would win and keep their secrets), memory.jsonl too.
    assert scrape(tmp_path / "raw", "--export", str(export)).exit_code == 0
    assert written(tmp_path / "raw")[0] == samples
    assert not leaked((tmp_path / "raw" / "memory.jsonl").read_text())
    assert scrape(tmp_path / "out", "--export", str(export), "--no-scrub").exit_code == 0
    assert written(tmp_path / "out")[0] == raw


def test_an_emulated_workspace_full_of_secrets_gives_clean_samples_and_batches(
    slack_emulator, tiny_model, tmp_path
):
    in_london(slack_emulator.team.users)
    for message in pasted_messages(time.time()):
        slack_emulator.add_message(GENERAL, message)
    # First scraped with --no-scrub, then scrubbed: the second reads every thread again (its incremental
    # state would otherwise skip them all) and keeps nothing of the first.
    result = scrape(tmp_path / "out", "--no-scrub", emulator=slack_emulator)
    assert result.exit_code == 0, result.output
    assert leaked(written(tmp_path / "out")[0])
    result = scrape(tmp_path / "out", emulator=slack_emulator)
    assert result.exit_code == 0, result.output
    samples, manifest = written(tmp_path / "out")
    assert "thanks! ok here is everything" in samples and not leaked(samples)
    assert not leaked((tmp_path / "out" / "memory.jsonl").read_text())
    assert NATIONAL_PHONES["GB"] not in samples and "call me on <phone>" in samples
    assert manifest["scrubbed"]["secret"] == 18 and manifest["scrubbed"]["card"] == 2

    # What the trainer feeds the adapter: the tokenised batches of those samples.
    from transformers import AutoTokenizer

    from doppel.train import data

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    stats = data.EncodeStats()
    encoded = [
        data.encode(s, tokenizer, 4096, stats) for s in data.load_samples(tmp_path / "out" / "samples.jsonl")
    ]
    batches = data.epoch_batches([e for e in encoded if e], 4, random.Random(0))
    decoded = "".join(tokenizer.decode(row) for batch in batches for row in batch.input_ids)
    assert "thanks! ok here is everything" in decoded and "<secret>" in decoded
    assert not leaked(decoded)


async def test_the_bot_answers_a_channel_mention_from_its_window_and_never_posts_a_secret(
    bot_harness, bot_kube, slack_emulator, slack_workspace
):
    asked = []

    async def chat(model, messages):
        asked.append([dict(m) for m in messages])
        return "sure, here it is again: " + PASTE  # a model that memorised a secret anyway

    bot = await bot_harness(chat=chat)
    await kube_for(bot_kube[1]).create_doppel(
        NAMESPACE, doppel_body("alice", "U01ALICE", served_name="alice-v1")
    )
    now = int(time.time())
    old = {"type": "message", "ts": f"{now - 86400}.000100", "user": "U02BOB", "text": "lunch anyone?"}
    slack_emulator.add_message(GENERAL, old)
    slack_emulator.add_message(
        GENERAL,
        {"type": "message", "ts": f"{now - 100}.000100", "user": "U02BOB", "text": "is the deploy at 5?"},
    )
    slack_emulator.add_message(
        GENERAL, {"type": "message", "ts": f"{now - 50}.000100", "user": "U01ALICE", "text": "yes, 5pm"}
    )
    text = "<@U0DOPPEL> and the password for staging?"  # the only doppel: no `as alice` needed
    ts = say(slack_emulator, "U03CAROL", text)
    await bot.event(mention_payload(text, ts, event_id="EvWINDOW", user="U03CAROL"))
    posts = await bot.wait_posts(CHANNEL, 1)
    # What Slack shows: posted text is escaped as Slack requires (`&lt;secret&gt;` reads `<secret>`).
    shown = [html.unescape(p["text"]) for p in posts]
    assert posts and not leaked(" ".join(shown))
    assert "<secret>" in shown[0] and "<email>" in " ".join(shown)

    # Serving matches training: the prompt is the sample the same channel messages would make, had Alice
    # answered the mention herself. The day-old message is outside the window (past the longest pause the
    # channel's pace allows).
    (prompt,) = asked
    history = [m for m in slack_emulator.team.messages[GENERAL] if not m.get("bot_id")]
    answered = {"type": "message", "ts": f"{int(float(ts)) + 1}.000100", "user": "U01ALICE", "text": "x"}
    threads = threads_from_messages(GENERAL, "general", [*history, answered], 0)
    options = ScrapeOptions(min_length=1, bot_user_id="U0DOPPEL", scrub=True)
    samples, _ = build_samples(
        threads,
        Person("U01ALICE", "Alice Martin"),
        slack_workspace["users"],
        {},
        options,
        team="T",
        source="t",
    )
    assert prompt == samples[-1]["messages"][:-1]
    assert prompt[1:] == [
        {"role": "user", "content": "bobby: is the deploy at 5?"},
        {"role": "assistant", "content": "yes, 5pm"},
        {"role": "user", "content": "Carol Diaz: @doppel and the password for staging?"},
    ]


def test_the_workspace_region_is_a_scrape_option_and_a_bad_one_is_refused(slack_workspace, tmp_path):
    """Nobody's time zone says London here: `--phone-region GB` reads British numbers all the same."""
    newest = max(float(m["ts"]) for msgs in slack_workspace["messages"].values() for m in msgs)
    slack_workspace["messages"]["general"] += pasted_messages(newest)
    export = write_export_zip(slack_workspace, tmp_path / "export.zip")
    assert scrape(tmp_path / "us", "--export", str(export)).exit_code == 0
    assert NATIONAL_PHONES["GB"] in written(tmp_path / "us")[0]  # read as a US number: no number at all
    result = scrape(tmp_path / "gb", "--export", str(export), "--phone-region", "gb")
    assert result.exit_code == 0, result.output
    samples, manifest = written(tmp_path / "gb")
    assert NATIONAL_PHONES["GB"] not in samples and manifest["options"]["phone_regions"] == ["GB"]
    refused = scrape(tmp_path / "bad", "--export", str(export), "--phone-region", "UK")
    assert refused.exit_code == 2 and "unknown phone region 'UK'" in refused.output
    assert not (tmp_path / "bad").exists()


# What people paste that detect-secrets alone lets through, as (text, what it becomes, what must not
# survive): database URLs whose password holds `$ & !` or has no user name, a browser session's Slack
# token and its cookie, an encrypted PKCS#8 key.
MORE_SECRETS = [
    ("postgres://app:Pa$$w0rd2024@db:5432/app", "postgres://app:<secret>@db:5432/app", "Pa$$w0rd2024"),
    ("redis://:p4ss@redis:6379/0", "redis://:<secret>@redis:6379/0", "p4ss"),
    ("mysql://root:Tr0ub4dor&3@mysql/app", "mysql://root:<secret>@mysql/app", "Tr0ub4dor"),
    ("postgresql://app:S3cret!@host/app", "postgresql://app:<secret>@host/app", "S3cret"),
    ("xoxc-1234567890123-1234567890123-1234567890123-" + "0123456789abcdef" * 4, "<secret>", "xoxc-"),
    ("xoxd-AbCdEf%2FgHiJkLmNoPqRsTuVwXyZ0123456789%2Bab%3D%3D", "<secret>", "HiJkLmNo"),
    (
        "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIFHDBOBgkqhkiG9w0BBQ0wQTApBgkqhkiG9w0BBQwwHAQI\n"
        "-----END ENCRYPTED PRIVATE KEY-----",
        "<secret>",
        "MIIFHDBOBgkqhkiG9w0",
    ),
]


def test_url_passwords_session_tokens_and_encrypted_keys_stay_out_of_samples_and_memory(
    slack_workspace, tmp_path
):
    newest = int(max(float(m["ts"]) for msgs in slack_workspace["messages"].values() for m in msgs))
    for i, (secret, _, _) in enumerate(MORE_SECRETS):
        slack_workspace["messages"]["general"] += [
            {
                "type": "message",
                "ts": f"{newest + 60 * i + 1}.000100",
                "user": "U02BOB",
                "text": "which one?",
            },
            {
                "type": "message",
                "ts": f"{newest + 60 * i + 2}.000100",
                "user": "U01ALICE",
                "text": f"use {secret} ok",
            },
        ]
    export = write_export_zip(slack_workspace, tmp_path / "export.zip")
    result = scrape(tmp_path / "out", "--export", str(export), "--min-length", "5")
    assert result.exit_code == 0, result.output
    samples = (tmp_path / "out" / "samples.jsonl").read_text()
    memory = (tmp_path / "out" / "memory.jsonl").read_text()
    remembered = [json.loads(line)["text"] for line in memory.splitlines()]
    for _, scrubbed, leak in MORE_SECRETS:
        assert leak not in samples and leak not in memory, leak
        assert f"use {scrubbed} ok" in remembered  # only the credential goes: scheme, user and host stay


def test_a_cut_paste_is_scrubbed_whole_before_it_is_cut(slack_workspace, tmp_path):
    """`--paste-action cut` through a database URL's password: cut first, the password's first half would
    no longer look like one and go into the sample."""
    line = "export DATABASE_URL=postgres://svc:Hx7qP2mZ9vLw4tKe@db.prod.example.com/app\n"
    head = "```\n" + "x = compute(1)\n" * 28
    head += "#" * (500 - len(head) - line.index("Hx7q") - 8)  # the 500-character cut inside the password
    paste = head + line + "y = 2\n" * 40 + "```"
    assert paste.index("Hx7q") == 492
    newest = int(max(float(m["ts"]) for msgs in slack_workspace["messages"].values() for m in msgs))
    slack_workspace["messages"]["general"] += [
        {"type": "message", "ts": f"{newest + 1}.000100", "user": "U02BOB", "text": "what does the job run?"},
        {"type": "message", "ts": f"{newest + 2}.000100", "user": "U01ALICE", "text": paste},
    ]
    export = write_export_zip(slack_workspace, tmp_path / "export.zip")
    result = scrape(tmp_path / "out", "--export", str(export), "--paste-action", "cut")
    assert result.exit_code == 0, result.output
    samples, manifest = written(tmp_path / "out")
    assert manifest["cut"] == {"paste": 1} and "Hx7q" not in samples
    (cut,) = [
        json.loads(line)["messages"][-1]["content"] for line in samples.splitlines() if "compute" in line
    ]
    assert cut.endswith("#export DATABASE_URL=postgres://svc:<secret>\n…```")
