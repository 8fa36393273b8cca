"""Errors a user can cause: the CLI prints them as one line and exits non-zero.

Defined at the bottom layer (asyncps.protos.wire_errors) because the transport (protos/security.py,
protos/serving.py) raises them and protos/ imports nothing above itself; this is their public home.
"""
from asyncps.protos.wire_errors import ConfigError, DataError, UserError

__all__ = ["ConfigError", "DataError", "UserError"]
