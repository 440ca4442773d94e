"""The scrubber: every kind of secret and personal data becomes its placeholder; talk stays as it was."""

import pytest
from tests.support.secret_fixtures import PASTE, SECRETS, leaked

from doppel.slack.scrub import scrub_text

PLACEHOLDER = {"email": "<email>", "phone": "<phone>"}


@pytest.mark.parametrize("kind", sorted(SECRETS))
def test_each_kind_becomes_its_placeholder(kind):
    value = SECRETS[kind]
    if kind == "url_password":
        text = f"clone https://deploy:{value}@git.example.com/repo.git please"
    elif kind == "key_value":
        text = f"set api_key={value} in the env"
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
    assert scrubbed.counts == {"secret": 7, "email": 1, "phone": 1}
    assert "the hook is https://deploy:<secret>@ci.example.com/hook" in scrubbed.text
    assert scrubbed.text.startswith("ok here is everything for the staging box, the AWS key <secret>")


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
