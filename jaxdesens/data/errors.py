"""The one exception type for bad user data, so CLIs can print it without a traceback."""


class DataError(ValueError):
    """Input data is missing, malformed or unusable; the message names the path and the fix."""
