"""Whom a reply may address (`doppel.serve.addressing`), read from conversations as they are built."""

from doppel.serve.addressing import Addressing, banned_words
from doppel.serve.backend import GenerationParams
from doppel.serve.vllm_protocol import chat_body, parse_chat
from doppel.slack.conversation import ThreadMessage, build_conversation
from doppel.train.fidelity import persona_prompt, with_system

CONTEXT = [
    ThreadMessage("U2", "jyellick", "the build: it fails on arm64"),
    ThreadMessage("U3", "Bob Smith", "any idea why?"),
]


def conversation(person: str = "ghaskins") -> list[dict[str, str]]:
    return build_conversation(person, "U1", CONTEXT, channel="fabric-dev")


def test_the_person_and_the_speakers_are_read_from_the_conversation():
    addressing = Addressing.of(conversation())
    assert addressing == Addressing("ghaskins", ("jyellick", "Bob Smith"))
    # The persona-prompted base model's prompt names the person the same way.
    prompted = with_system(conversation(), persona_prompt("ghaskins", ["hi: there"]))
    assert Addressing.of(prompted) == addressing
    assert addressing.banned_words() == ["@ghaskins", "ghaskins:"]


def test_replies_addressing_the_person_lose_that_opening():
    addressing = Addressing.of(conversation())
    assert addressing.repair("@ghaskins thanks, will do") == "Thanks, will do"
    assert addressing.repair("ghaskins: yes") == "Yes"
    assert addressing.repair("  @GHASKINS: ok") == "  Ok"


def test_an_invented_addressee_becomes_the_latest_speaker_and_real_ones_stay():
    addressing = Addressing.of(conversation())
    assert addressing.repair("@carol no idea") == "@Bob Smith no idea"
    assert addressing.repair("@jyellick it is the toolchain") == "@jyellick it is the toolchain"
    assert addressing.repair("@bob smith, it is the toolchain") == "@bob smith, it is the toolchain"
    # Not an addressee: a label, a mention later in the text.
    assert addressing.repair("Note: see @carol's patch") == "Note: see @carol's patch"


def test_with_nobody_to_address_an_invented_addressee_is_dropped():
    alone = Addressing.of(build_conversation("Margaret Okafor", "U1", [], channel="general"))
    assert alone.person == "Margaret Okafor" and alone.speakers == ()
    assert alone.repair("@zed, sure") == "Sure"
    assert alone.repair("@Margaret sure") == "Sure"
    assert set(alone.banned_words()) == {"@Margaret Okafor", "Margaret Okafor:", "@Margaret", "Margaret:"}


def test_a_stream_holds_back_only_what_could_be_an_addressee():
    addressing = Addressing.of(conversation())
    pieces = ["@gh", "askins", " yes, the toolchain", "\nsecond line", " and more"]
    assert "".join(addressing.repair_stream(pieces)) == "Yes, the toolchain\nsecond line and more"
    assert list(addressing.repair_stream(["@ca", "rol ok"])) == ["@Bob Smith ok"]
    assert list(addressing.repair_stream(["gh", "askins: ", "yes"])) == ["Yes"]
    # Anything else streams as it comes.
    assert list(addressing.repair_stream(["Be", "ep", " boop"])) == ["Be", "ep", " boop"]


def test_a_stream_cut_inside_a_long_invented_addressee_is_repaired_as_the_whole_reply_is():
    # vLLM streams tokens: a name longer than anyone's in the conversation arrives in pieces.
    addressing = Addressing.of(
        build_conversation("Pat", "U1", [ThreadMessage("U2", "Jo", "news?")], "general")
    )
    for pieces in (["@", "Christ", "opher", ", the deploy", " is fine"], ["@", "Pat", ", ", "thanks"]):
        whole = addressing.repair("".join(pieces))
        assert "".join(addressing.repair_stream(pieces)) == whole, pieces
    assert "".join(addressing.repair_stream(["@", "Christ", "opher", ", fine"])) == "@Jo, fine"
    # A reply that is nothing but a long mention still comes out, repaired, when the stream ends.
    assert "".join(addressing.repair_stream(["@", "Christ", "opher"])) == "@Jo"


def test_the_vllm_request_bans_the_self_address_and_its_answer_is_repaired():
    body = chat_body("m", conversation(), GenerationParams(), stream=False)
    assert body["bad_words"] == ["@ghaskins", "ghaskins:"]
    answer = {"choices": [{"message": {"content": "@carol try a clean build"}}]}
    assert parse_chat(answer, conversation()) == "@Bob Smith try a clean build"
    assert banned_words([conversation(), conversation("Ana")]) == ["@ghaskins", "ghaskins:", "@Ana", "Ana:"]
