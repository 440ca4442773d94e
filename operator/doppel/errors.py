"""Errors shared by every stage.

`BadInput` is the one exception that means "the user must fix something": the CLI turns it into exit
code 2 with its message as a single line on stderr, and the operator into a non-retried failure.
"""


class BadInput(Exception):
    """Input the user must fix (a malformed file, an unknown user, too little data...)."""
