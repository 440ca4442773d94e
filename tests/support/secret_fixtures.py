"""Secrets and personal data as people paste them into Slack, for the scrubber's tests.

Each value is made up but has its real shape and check digits, so that a detector that misses the real
thing misses it here too. `LEAKS` lists, per kind, the strings that must never reach samples, training
batches or bot replies (for a private key: its body lines too).
"""

from __future__ import annotations

PRIVATE_KEY_BODY = "MIIEowIBAAKCAQEAu1SU1LfVLPHCozMxH2Mo4lgOEePzNm0tRgeLezV6ffAt0gunVTLw7onLRnrq0"
SECRETS = {
    "aws": "AKIA4QX7MZ2PL9WD3KTB",
    "private_key": (
        "-----BEGIN RSA PRIVATE KEY-----\n"
        + PRIVATE_KEY_BODY
        + "\n/vEJr2PeT4N9c8s3Q1s\n-----END RSA PRIVATE KEY-----"
    ),
    "slack": "xoxb-2718281828-3141592653589-ZtQwErTyUiOpAsDfGhJkLz19",
    "github": "ghp_R8aVx2LmQ4pTz7NcW1bY5dKf9HsJ3uE6gA0o",
    "jwt": (
        "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiaWF0IjoxNTE2MjM5"
        "MDIyfQ.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"
    ),
    "url_password": "Sup3rS3cretPw",
    "key_value": "9f8e7d6c5b4a3f2e1d0c",
    "email": "margaret.hale@example.org",
    "phone": "+1 415-555-0134",
    "slack_app": "xapp-1-A0123456789-1234567890123-" + "0123456789abcdef" * 4,
    "password_phrase": "Tr0ub4dor&3",
    "ssn": "536-22-8791",
    "card": "4111 1111 1111 1111",
    "iban": "GB82 WEST 1234 5698 7654 32",
}
LEAKS = {**SECRETS, "private_key": PRIVATE_KEY_BODY, "phone": "555-0134", "card": "1111 1111 1111"}
LEAKS |= {"ssn_digits": "22-8791", "iban_digits": "1234 5698 7654"}

# Numbers written the national way, with the region whose people write them so (fake: drama and
# documentation ranges where the country has them, valid for libphonenumber).
NATIONAL_PHONES = {
    "GB": "020 7946 0958",
    "DE": "030 901820",
    "FR": "01 23 45 67 89",
    "JP": "090-1234-5678",
    "AU": "0412 345 678",
    "IN": "98765 43210",
    "BR": "(11) 91234-5678",
    "NL": "020 123 4567",
}
# Everything else the scrubber must catch, as people write it: kind -> (text, the part that must go).
CORPUS = [
    ("secret", "socket mode token xoxe-1-My0xLTEyMzQ1Njc4OTAtMTIzNDU2Nzg5MDEyMzQtYWJjZGVm ok", "My0xLTEy"),
    ("secret", "my password is hunter2", "hunter2"),
    ("secret", "the wifi password for the office is 'open sesame' btw", "open sesame"),
    ("secret", "my password's still Tr0ub4dor&3, don't tell", "Tr0ub4dor"),
    ("secret", "PIN: 4921", "4921"),
    ("secret", "pw: letmein99", "letmein99"),
    ("secret", "Passwort ist Sommer2024", "Sommer2024"),
    ("ssn", "my SSN is 536 22 8791 if HR asks", "22 8791"),
    ("ssn", "social security number: 536228791", "536228791"),
    ("ssn", "here: 412-67-3301.", "412-67-3301"),
    ("card", "card 5555-5555-5555-4444 exp 12/27", "5555-5555-5555-4444"),
    ("card", "the amex is 3782 822463 10005", "822463"),
    ("card", "discover 6011111111111117", "6011111111111117"),
    ("card", "jcb 3530111333300000", "3530111333300000"),
    ("card", "diners 3056 9309 0259 04", "9309 0259"),
    ("card", "the new mastercard 2223003122003222", "2223003122003222"),
    ("card", "4242 4242 4242 4242 2031 (expiry)", "4242 4242"),
    ("iban", "wire it to DE89 3704 0044 0532 0130 00.", "3704 0044"),
    ("iban", "FR14 2004 1010 0505 0001 3M02 606", "2004 1010"),
    ("iban", "NL91ABNA0417164300 is the account", "0417164300"),
    ("iban", "es91 2100 0418 4502 0005 1332", "0418 4502"),
    ("phone", "call me on +49 30 901820", "901820"),
    ("phone", "office: +33 1 23 45 67 89", "23 45 67"),
]
# Ordinary talk full of numbers that are none of the above: it must come out as it went in.
ORDINARY = [
    "v1.2.3 is out, 2.17.1.4 next, and Windows is on 10.0.19045.3570",
    "due 2024-03-05 (or 05.03.2024, 03/05/2024 for the US folks)",
    "standup 10:30-11:45, the log says 14:05:33.123",
    "JIRA-12345, PROJ-4521, #12345678 and INC0012345 are dupes",
    "reverted 3f2a9c1, see abcdef0123456789abcdef0123456789abcdef01",
    "the node is 192.168.10.254, gateway 10.0.0.1, OID 1.2.840.113549.1.1.11",
    "1 800 000 requests a day; the budget is 4 500 000",
    "event at 1455462000 (ts 1455462000.000100), postgres on port 5432",
    "HTTP 404 on build #20240305",
    "the password is in the vault",
    "the password is wrong, the pin is stuck",
    "the password policy changed; passwords are rotated quarterly",
    "order 1234567890123 shipped",
    "user 348745692838293504 joined",
    "took 123456789 ns, uptime 1234567 s, 7654321 bytes",
    "ISBN 9780306406157",
    "2026-12-04T13:55:50Z",
    "lat 51.5072, lon -0.1276",
    "version 1.20.3040, sprint 2024.12.1",
    "CVE-2024-3094 and RFC 9110",
    "lr 3e-4, warmup 1e-5, 12 epochs",
    "from 100 000 to 2 000 000 rows in 3.5 s",
    "room 4.12 at 3pm",
    "p99 was 1234.5678 ms over 98765 requests",
    "release 2016-02-14, build 1455462000, issue #12345678, port 5432",
]

# One message holding every kind, written as a person would (long enough to be a sample).
PASTE = (
    f"ok here is everything for the staging box, the AWS key {SECRETS['aws']} and the deploy key:\n"
    f"{SECRETS['private_key']}\n"
    f"the bot token is {SECRETS['slack']}, my GitHub token {SECRETS['github']}, "
    f"a session JWT {SECRETS['jwt']}\n"
    f"the hook is https://deploy:{SECRETS['url_password']}@ci.example.com/hook "
    f"and API_KEY={SECRETS['key_value']}\n"
    f"questions to {SECRETS['email']} or call me on {SECRETS['phone']}\n"
    f"socket mode needs {SECRETS['slack_app']}; my password is {SECRETS['password_phrase']} for payroll, "
    f"SSN {SECRETS['ssn']}, card {SECRETS['card']}, IBAN {SECRETS['iban']}"
)


def leaked(text: str) -> list[str]:
    """The kinds whose secret appears in `text`."""
    return [kind for kind, value in LEAKS.items() if value in text]
