"""The values a shard exchanges with its clients, one definition each for every role: a
`Snapshot` (a shard's whole state, for checkpoints and restores) and a `PushResult` (what the
shard did with a push). `SparseRows` lives in asyncps.sparse. The wire codec (protos/codec.py)
encodes these, so they are defined at the bottom layer (asyncps.protos.wire_types, which imports
nothing above protos/); the shard (ps/), its client and the chief import them from here."""
from asyncps.protos.wire_types import PushResult, Snapshot

__all__ = ["PushResult", "Snapshot"]
