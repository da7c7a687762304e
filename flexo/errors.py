"""The one exception type every stage raises for a problem the user can fix.

Its message is a single line that names the bad value and says what to do; the CLI prints it as
``flexo: error: <message>`` and exits with status 2, without a traceback.
"""


class FlexoError(Exception):
    """A user-fixable problem: bad params, missing inputs, mismatched artifacts."""

    def __init__(self, message: str):
        # Keep it to one line so that logs, DVC and Prefect show the whole message.
        super().__init__(" ".join(str(message).split()))


def first_line(e: BaseException) -> str:
    """An exception's first line of text (or its type's name): for quoting a library error in one line."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
