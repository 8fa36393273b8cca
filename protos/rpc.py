"""The ParameterServer methods as gRPC handlers and client callables, on the codec's fast path.

Tensor-carrying streams travel as wire bytes produced and parsed by `asyncps.protos.codec`
(`encode_wire`, `Assembler.add_wire`), so those directions use identity (de)serializers; small
control messages use the generated protobuf classes. The bytes on the wire are standard
protobuf either way: a peer using the generated ``ParameterServerStub`` interoperates.

The ``...One`` methods are unary twins of Pull, Push and PushPull (one message each way, every
tensor unchunked); `PSClient` picks them for transfers of at most ``UNARY_BYTES``.
"""
from __future__ import annotations

from types import SimpleNamespace

import grpc

from asyncps.protos import ps_pb2

SERVICE = "asyncps.ParameterServer"
WIRE = None  # marks a direction carried as serialized bytes (codec fast path)

# method -> (kind, request class or WIRE, response class or WIRE); checked against ps.proto by
# tests/test_ps_protos.py.
PS_METHODS = {
    "Init": ("stream_unary", WIRE, ps_pb2.InitReply),
    "RegisterWorker": ("unary_unary", ps_pb2.RegisterWorkerRequest, ps_pb2.RegisterWorkerReply),
    "Pull": ("unary_stream", ps_pb2.PullRequest, WIRE),
    "Push": ("stream_unary", WIRE, ps_pb2.PushReply),
    "PushPull": ("stream_stream", WIRE, WIRE),
    "PullOne": ("unary_unary", ps_pb2.PullRequest, WIRE),
    "PushOne": ("unary_unary", WIRE, ps_pb2.PushReply),
    "PushPullOne": ("unary_unary", WIRE, WIRE),
    "PushPullSession": ("stream_stream", WIRE, WIRE),
    "Pause": ("unary_unary", ps_pb2.PauseRequest, ps_pb2.PauseReply),
    "Resume": ("unary_unary", ps_pb2.ResumeRequest, ps_pb2.ResumeReply),
    "Snapshot": ("unary_stream", ps_pb2.SnapshotRequest, WIRE),
    "Restore": ("stream_unary", WIRE, ps_pb2.RestoreReply),
    "Stats": ("unary_unary", ps_pb2.StatsRequest, ps_pb2.StatsReply),
    "Stop": ("unary_unary", ps_pb2.StopRequest, ps_pb2.StopReply),
    "ShmOpen": ("unary_unary", ps_pb2.ShmOpenRequest, ps_pb2.ShmOpenReply),
    "ShmPushPull": ("unary_unary", ps_pb2.ShmRequest, ps_pb2.ShmReply),
    "SnapshotTable": ("unary_stream", ps_pb2.TableSnapshotRequest, ps_pb2.TableChunk),
    "RestoreTable": ("stream_unary", ps_pb2.TableChunk, ps_pb2.RestoreReply),
}


class StatusError(grpc.RpcError):
    """A failure raised on the client side of a call, shaped like the gRPC error the same call
    would raise (code() and details()), so callers handle both alike (shm_control.ControlError,
    ps_session.SessionTimeout)."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def _identity(x):
    return x


def _serializer(cls):
    return _identity if cls is WIRE else cls.SerializeToString


def _deserializer(cls):
    return _identity if cls is WIRE else cls.FromString


def ps_handler(servicer) -> grpc.GenericRpcHandler:
    """The handler that serves `servicer`'s methods (named as in PS_METHODS)."""
    handlers = {
        name: getattr(grpc, f"{kind}_rpc_method_handler")(
            getattr(servicer, name), request_deserializer=_deserializer(req), response_serializer=_serializer(rep)
        )
        for name, (kind, req, rep) in PS_METHODS.items()
    }
    return grpc.method_handlers_generic_handler(SERVICE, handlers)


def ps_stub(channel: grpc.Channel) -> SimpleNamespace:
    """Client callables for every method, with the same (de)serializers as `ps_handler`."""
    return SimpleNamespace(**{
        name: getattr(channel, kind)(f"/{SERVICE}/{name}", request_serializer=_serializer(req),
                                     response_deserializer=_deserializer(rep))
        for name, (kind, req, rep) in PS_METHODS.items()
    })
