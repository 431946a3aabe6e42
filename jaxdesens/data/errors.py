"""`DataError` under its historical name (defined in `jaxdesens.errors`, below every layer)."""

from jaxdesens.errors import DataError

__all__ = ["DataError"]
