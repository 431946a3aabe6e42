"""The one exception type for bad user data, so CLIs can print it without a traceback.

It sits at the bottom of the package (it imports nothing), so every layer can raise it without
importing another: `masks` reads mask files and `data` reads exports that carry one.
"""


class DataError(ValueError):
    """Input data is missing, malformed or unusable; the message names the path and the fix."""
