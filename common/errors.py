"""Errors a user can cause: the CLI prints them as one line and exits non-zero."""


class UserError(Exception):
    """A mistake in the user's input (config, data path, port, checkpoint), with one clear line.

    The message names the key or file and what was expected; the CLI prints it without a
    traceback.
    """


class ConfigError(UserError):
    """A config file or override that does not match the schema."""


class DataError(UserError):
    """A data file that is missing, truncated or has the wrong checksum."""
