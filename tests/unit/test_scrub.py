"""The scrubber: every kind of secret and personal data becomes its placeholder; talk stays as it was."""

import pytest
from tests.support.secret_fixtures import CORPUS, NATIONAL_PHONES, ORDINARY, PASTE, SECRETS, leaked

from doppel.slack.scrub import message_regions, phone_regions, scrub_text

PLACEHOLDER = {"email": "<email>", "phone": "<phone>", "ssn": "<ssn>", "card": "<card>", "iban": "<iban>"}


@pytest.mark.parametrize("kind", sorted(SECRETS))
def test_each_kind_becomes_its_placeholder(kind):
    value = SECRETS[kind]
    if kind == "url_password":
        text = f"clone https://deploy:{value}@git.example.com/repo.git please"
    elif kind == "key_value":
        text = f"set api_key={value} in the env"
    elif kind == "password_phrase":
        text = f"here you go: my password is {value} (do not share)"
    else:
        text = f"here you go: {value} (do not share)"
    scrubbed = scrub_text(text)
    assert not leaked(scrubbed.text), scrubbed.text
    wanted = PLACEHOLDER.get(kind, "<secret>")
    assert wanted in scrubbed.text and scrubbed.counts == {wanted.strip("<>"): 1}
    assert scrubbed.text.startswith(("here you go: ", "clone https://deploy:", "set api_key="))


def test_a_message_with_everything_keeps_its_words():
    scrubbed = scrub_text(PASTE)
    assert not leaked(scrubbed.text)
    assert scrubbed.counts == {"secret": 9, "email": 1, "phone": 1, "ssn": 1, "card": 1, "iban": 1}
    assert "the hook is https://deploy:<secret>@ci.example.com/hook" in scrubbed.text
    assert scrubbed.text.startswith("ok here is everything for the staging box, the AWS key <secret>")
    assert scrubbed.text.endswith(
        "socket mode needs <secret>; my password is <secret> for payroll, SSN <ssn>, card <card>, IBAN <iban>"
    )


@pytest.mark.parametrize(("kind", "text", "part"), CORPUS, ids=[f"{c[0]}{i}" for i, c in enumerate(CORPUS)])
def test_the_corpus_of_fake_but_valid_numbers_and_phrases_is_caught(kind, text, part):
    scrubbed = scrub_text(text)
    assert part not in scrubbed.text and scrubbed.counts == {kind: 1}, scrubbed.text


@pytest.mark.parametrize("region", sorted(NATIONAL_PHONES))
def test_a_national_phone_number_is_caught_in_its_authors_region(region):
    text = f"ring me on {NATIONAL_PHONES[region]} after lunch"
    assert scrub_text(text, [region]) == ("ring me on <phone> after lunch", {"phone": 1})
    # Read as a US number (the default) it is no valid number: the region has to come from somewhere.
    assert scrub_text(text, ["US"]) == (text, {})


def test_the_regions_come_from_the_workspace_setting_and_the_peoples_time_zones():
    assert message_regions((), "Europe/London", "Europe/Berlin") == ("US", "GB", "DE")
    assert message_regions(("FR",), None, "Europe/Paris", "Mars/Olympus") == ("FR",)
    text = f"the London office is {NATIONAL_PHONES['GB']}, Berlin {NATIONAL_PHONES['DE']}"
    scrubbed = scrub_text(text, message_regions((), "Europe/London", "Europe/Berlin"))
    assert scrubbed == ("the London office is <phone>, Berlin <phone>", {"phone": 2})
    assert phone_regions([" gb", "DE", "gb", ""]) == ("GB", "DE")
    with pytest.raises(ValueError, match="unknown phone region 'UK'"):
        phone_regions(["UK"])


def test_ordinary_talk_full_of_numbers_stays_as_it_was_in_every_region():
    """Versions, dates, times, ticket IDs, hashes, IP-like strings: none of them is a phone number, a card,
    an IBAN or an SSN, read in any of the regions the corpus has numbers for."""
    regions = ["US", *NATIONAL_PHONES]
    changed = [text for text in ORDINARY if scrub_text(text, regions).text != text]
    assert changed == []


@pytest.mark.parametrize(
    "text",
    [
        'Nope. Just "install" the executor.',
        "The key point is that the password policy changed; secret sauce is key: value",
        "see https://github.com/mesos/mesos/commit/abcdef0123456789abcdef0123456789abcdef01",
        "https://mesos-magellan.slack.com/files/U0BMS113R/F0VNAKDE2/100_cities.js",
        "I0327 00:57:37.230937  1537 exec.cpp:134] Version: 0.27.0 took 26.39s, fitness 28919.8689279",
        "release 2016-02-14, build 1455462000, issue #12345678, port 5432",
        "ReallyLongCamelCaseIdentifierNameForTesting is a fine name",
        "",
    ],
)
def test_ordinary_talk_is_left_alone(text):
    assert scrub_text(text) == (text, {})
