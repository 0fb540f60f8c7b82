"""Exceptions with a one-line message for the user; the CLI prints them without a stack trace."""


class DinolabError(Exception):
    """an error with a one-line message for the user; the CLI prints it without a stack trace."""


class WeightsNotFoundError(DinolabError, FileNotFoundError):
    """Weights are neither cached nor downloadable; the message says which file goes where."""


class ChecksumError(DinolabError):
    """A weights file does not match its expected SHA-256."""
