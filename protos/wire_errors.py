"""The errors a user can cause, at the bottom of the import graph (and free of numpy).

The transport raises them (protos/security.py, protos/serving.py), so they live in protos/; the
public home is asyncps.errors, which re-exports them. Kept apart from wire_types.py so that
``import asyncps`` (which needs UserError) loads no numpy, grpc or yaml.
"""
from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input (config, data path, port, checkpoint), with one clear line.

    The message names the key or file and what was expected; the CLI prints it without a
    traceback.
    """


class ConfigError(UserError):
    """A config file or override that does not match the schema."""


class DataError(UserError):
    """A data file that is missing, truncated or has the wrong checksum."""
