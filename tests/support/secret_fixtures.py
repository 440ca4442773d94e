"""Secrets and personal data as people paste them into Slack, for the scrubber's tests.

Each value is made up but has its real shape, so that a detector that misses the real thing misses it here
too. `LEAKS` lists, per kind, the strings that must never reach samples, training batches or bot replies
(for a private key: its body lines too).
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
}
LEAKS = {**SECRETS, "private_key": PRIVATE_KEY_BODY, "phone": "555-0134"}

# One message holding every kind, written as a person would (long enough to be a sample).
PASTE = (
    f"ok here is everything for the staging box, the AWS key {SECRETS['aws']} and the deploy key:\n"
    f"{SECRETS['private_key']}\n"
    f"the bot token is {SECRETS['slack']}, my GitHub token {SECRETS['github']}, "
    f"a session JWT {SECRETS['jwt']}\n"
    f"the hook is https://deploy:{SECRETS['url_password']}@ci.example.com/hook "
    f"and API_KEY={SECRETS['key_value']}\n"
    f"questions to {SECRETS['email']} or call me on {SECRETS['phone']}"
)


def leaked(text: str) -> list[str]:
    """The kinds whose secret appears in `text`."""
    return [kind for kind, value in LEAKS.items() if value in text]
