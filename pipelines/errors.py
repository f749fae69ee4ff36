"""The one exception type that means "the user gave us something wrong".

Library code raises `UserError` with a message that names the bad value and
says what to do; `app/` prints that message on one line and exits with status
2, without a traceback. Any other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input from the user: a missing file, a bad flag value, a bad workdir."""
