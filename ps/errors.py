"""Errors of the shard's domain code, each carrying the gRPC status code the servicer sends.

The domain code does not import grpc: `code` is the name of a ``grpc.StatusCode`` member.
"""


class ShardError(Exception):
    """A request the shard refuses; its state is unchanged. `code` names the gRPC status."""

    code = "INTERNAL"


class InvalidArgument(ShardError):
    """Malformed request: bad shape, dtype, non-finite values, frozen variable, bad worker id."""

    code = "INVALID_ARGUMENT"


class NotFound(ShardError):
    """A variable name the shard does not hold."""

    code = "NOT_FOUND"


class FailedPrecondition(ShardError):
    """The shard is not in a state to serve the request (not initialized, worker unregistered)."""

    code = "FAILED_PRECONDITION"


class OutOfRange(ShardError):
    """A read version ahead of the shard: the shard was restored to an older version since the
    worker pulled (the worker re-registers and re-pulls; not a malformed request)."""

    code = "OUT_OF_RANGE"


class DeadlineExceeded(ShardError):
    """A wait (ssp bound, sync round, pause) outlasted the caller's deadline."""

    code = "DEADLINE_EXCEEDED"


class Unavailable(ShardError):
    """The shard is stopping."""

    code = "UNAVAILABLE"
