"""The one exception type that command-line tools turn into a one-line message."""


class UserError(Exception):
    """Bad input from the user (flag, file, prompt, checkpoint): reported without a traceback."""
