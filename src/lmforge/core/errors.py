"""The one exception type users see: a clear message, no traceback."""


class LmforgeError(Exception):
    """A problem with the user's input or environment, reported as one line with exit code 2."""
