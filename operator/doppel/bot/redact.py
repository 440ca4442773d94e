"""Tokens never reach the logs: every log record is redacted when it is created, whoever logs it
(slack_sdk logs whole API responses at DEBUG, OAuth access tokens included)."""

from __future__ import annotations

import logging
import re
from typing import Any

# Slack tokens (bot, user, app-level, refresh, config) and client secrets passed as parameters.
TOKEN = re.compile(r"\b(xox[a-z]|xapp|xoxe\.xox[a-z])-[A-Za-z0-9-]+|(client_secret=)[^&\s'\"]+")
_installed = False


def redact(text: str) -> str:
    return TOKEN.sub(lambda m: (m.group(2) or m.group(0)[:5]) + "[redacted]", text)


def install_token_redaction() -> None:
    """Wrap the log-record factory once per process so that formatted messages carry no token."""
    global _installed
    if _installed:
        return
    _installed = True
    factory = logging.getLogRecordFactory()

    def safe_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a broken format string is the logger's problem, not ours
            return record
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and record.exc_info[0] is not None:
            # Formatters reuse exc_text when set: a traceback quoting an API response is redacted too.
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return record

    logging.setLogRecordFactory(safe_record)
