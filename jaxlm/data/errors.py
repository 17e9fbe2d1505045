"""The data layer's user-facing error (a leaf module: every data module raises it)."""


class DataError(ValueError):
    """Bad or missing training data; the CLI prints it and exits with code 2."""
