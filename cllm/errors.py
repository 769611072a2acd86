"""One exception type for user-facing errors: the CLI prints it on one line and exits with code 2."""


class CllmError(Exception):
    """Bad input or an unusable environment, explained in one line (file, line or argument named)."""
