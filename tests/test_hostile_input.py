"""Hostile input over real gRPC: every ParameterServer RPC against a real shard server.

Hypothesis builds random and adversarial requests (wrong dtypes, shapes that disagree with the
bytes, negative or huge dimensions, duplicate and out-of-range sparse rows, NaN and Inf, chunks
out of order or missing, unknown workers, replayed sequence numbers, garbage bytes as the raw
request). For each one:

- the server answers (no crash: a health check and a snapshot work afterwards);
- an error is a precise status (never UNKNOWN or INTERNAL), the one the defect calls for;
- a rejected request changes nothing: the shard's snapshot (values, slots, version, per-worker
  sequence numbers and clocks) is identical before and after;
- a valid request (a replay, duplicate sparse rows) does exactly what the arithmetic says
  (SGD, learning rate 1: w -= g; a replay: nothing).

The figures (inputs tried, statuses, crashes and corruptions, per case) are written to
`hostile-input.txt` in pytest's base temporary directory, and printed too under `pytest -s`.
``ASYNCPS_FUZZ_EXAMPLES`` scales the default run; the `slow` tests run 10x more.
"""
from __future__ import annotations

import contextlib
import os
from collections import Counter

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asyncps.config import Config
from asyncps.protos import codec, ps_pb2, tensor_pb2
from asyncps.protos.rpc import PS_METHODS, SERVICE, ps_stub
from asyncps.protos.serving import MAX_MESSAGE_BYTES
from asyncps.partition import place
from asyncps.ps.server import ShardServer
from asyncps.ps_client import PSClient, channel_options

EXAMPLES = int(os.environ.get("ASYNCPS_FUZZ_EXAMPLES", "120"))
SLOW_EXAMPLES = 10 * EXAMPLES
C = grpc.StatusCode
IMPRECISE = {C.UNKNOWN, C.INTERNAL}
WORKERS = 4  # cluster.workers; 0 and 1 registered, 2 and 3 not, 4+ out of range
VARS = {"w": ((3, 4), np.float32), "emb": ((8, 4), np.float32), "frozen/t": ((2, 2), np.float32)}
TALLY: Counter = Counter()  # inputs tried, outcomes, crashes, corruptions (written to a file at the end)


# ----------------------------------------------------------------------------------------------
# A real shard, a well-behaved client for reference reads, and a raw channel for hostile calls


class Target:
    def __init__(self):
        cfg = Config()
        cfg.cluster.ps, cfg.cluster.workers, cfg.cluster.rpc_timeout = 1, WORKERS, 5.0
        cfg.optimizer.learning_rate = 1.0
        cfg.train.frozen = ["frozen/*"]
        self.server = ShardServer(cfg, 0)
        self.address = f"127.0.0.1:{self.server.start()}"
        rng = np.random.default_rng(0)
        self.params0 = {n: (rng.integers(-64, 64, size=s) / 8).astype(d) for n, (s, d) in VARS.items()}
        self.client = PSClient([self.address], place({n: (s, d) for n, (s, d) in VARS.items()}, 1), cfg)
        self.client.init(self.params0)
        self.client.register(0)
        self.client.register(1)
        self.channel = grpc.insecure_channel(self.address, options=channel_options())
        self.stub = ps_stub(self.channel)
        self.raw = {name: getattr(self.channel, kind)(f"/{SERVICE}/{name}") for name, (kind, _, _) in PS_METHODS.items()}
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.next_seq = {0: 0, 1: 0}

    def snapshot(self) -> codec.Snapshot:
        return self.client.snapshot()[0]

    def alive(self) -> bool:
        try:
            reply = self.health.Check(health_pb2.HealthCheckRequest(), timeout=5)
            self.client.stats()
            return reply.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError:
            return False

    def reset(self, snap: codec.Snapshot) -> None:
        """Back to `snap` after a request that was accepted (garbage that happened to parse)."""
        self.client.resume()
        for w in self.client.stats()[0].workers:  # garbage may have registered or retired one
            self.client.register(w.worker, retire=w.worker not in (0, 1))
        self.client.restore([snap])
        for worker in (0, 1):
            self.next_seq[worker] = snap.last_seq.get(worker, -1) + 1

    def close(self):
        self.client.close()
        self.channel.close()
        self.server.stop(0)


@contextlib.contextmanager
def target():
    t = Target()
    try:
        yield t
    finally:
        t.close()


def same_state(a: codec.Snapshot, b: codec.Snapshot) -> bool:
    if (a.version, a.last_seq, a.clocks, a.updates, a.optimizer) != (b.version, b.last_seq, b.clocks, b.updates, b.optimizer):
        return False
    if a.values.keys() != b.values.keys() or any(not np.array_equal(a.values[n], b.values[n]) for n in a.values):
        return False
    return all(np.array_equal(a.slots[n][s], b.slots[n][s]) for n in a.slots for s in a.slots[n])


def call(t: Target, method: str, request, raw: bool = False):
    """(status code, reply) of one call; stream replies are drained."""
    fn = (t.raw if raw else vars(t.stub))[method]
    kind = PS_METHODS[method][0]
    try:
        reply = fn(iter(request) if kind.startswith("stream") else request, timeout=5)
        if kind.endswith("_stream"):
            reply = list(reply)
        return C.OK, reply
    except grpc.RpcError as err:
        return err.code(), err.details()


def check(t: Target, case: str, code, expect, before: codec.Snapshot) -> codec.Snapshot:
    """Tallies one input and asserts the contract; returns the snapshot after."""
    TALLY["inputs"] += 1
    TALLY[f"case {case}"] += 1
    TALLY[f"status {code.name}"] += 1
    if not t.alive():
        TALLY["crashes"] += 1
        pytest.fail(f"{case}: the server stopped answering")
    after = t.snapshot()
    assert code not in IMPRECISE, f"{case}: imprecise status {code.name}"
    if code != C.OK and not same_state(before, after):
        TALLY["corruptions"] += 1
        pytest.fail(f"{case}: rejected with {code.name} but the shard's state changed")
    if expect is not None:
        assert code in expect, f"{case}: got {code.name}, expected one of {sorted(c.name for c in expect)}"
    return after


# ----------------------------------------------------------------------------------------------
# Building push streams piece by piece


def piece(name, dtype="float32", shape=(), data=b"", offset=0, total=None, sparse=False, rows=b"", slot=""):
    return tensor_pb2.Tensor(name=name, dtype=dtype, shape=list(shape), data=data, offset=offset,
                             total=len(data) if total is None else total, sparse=sparse, rows=rows, slot=slot)


def dense(name, array: np.ndarray):
    return piece(name, array.dtype.name, array.shape, array.tobytes())


def sparse(name, rows: np.ndarray, values: np.ndarray):
    return piece(name, values.dtype.name, values.shape, values.tobytes(), sparse=True,
                 rows=np.asarray(rows, "<i8").tobytes())


def stream(header: ps_pb2.PushHeader | None, messages: list[list]) -> list[bytes]:
    out = []
    for i, tensors in enumerate(messages or [[]]):
        chunk = ps_pb2.PushChunk(tensors=tensors)
        if i == 0 and header is not None:
            chunk.header.CopyFrom(header)
        out.append(chunk.SerializeToString())
    return out


eighths = st.integers(-512, 512).map(lambda k: k / 8)  # exact in float32: the arithmetic is exact


def arrays(shape):
    n = int(np.prod(shape))
    return st.lists(eighths, min_size=n, max_size=n).map(lambda v: np.array(v, np.float32).reshape(shape))


@st.composite
def valid_grads(draw):
    """A valid gradient for some of the trainable variables: {name: array or (rows, values)}."""
    grads = {}
    if draw(st.booleans()):
        grads["w"] = draw(arrays((3, 4)))
    if draw(st.booleans()):
        k = draw(st.integers(1, 6))
        rows = np.array(draw(st.lists(st.integers(0, 7), min_size=k, max_size=k)), np.int64)  # duplicates allowed
        grads["emb"] = (rows, draw(arrays((k, 4))))
    return grads


def grad_pieces(grads) -> list:
    return [sparse(n, *g) if isinstance(g, tuple) else dense(n, g) for n, g in grads.items()]


def expected_after(values: dict, grads) -> dict:
    out = {n: v.copy() for n, v in values.items()}
    for n, g in grads.items():
        if isinstance(g, tuple):
            np.subtract.at(out[n], g[0], g[1])
        else:
            out[n] -= g
    return out


# Defects of one tensor: (name, strategy of (pieces, expected codes)).
def _bad(pieces, *codes):
    return pieces, set(codes)


W_BYTES = np.zeros((3, 4), np.float32).tobytes()
text = st.text(max_size=12)


DEFECTS = ["bad dtype name", "wrong dtype", "bytes short", "bytes long", "total mismatch", "negative dim",
           "huge dims", "wrong shape", "unknown name", "rows out of range", "rows bytes mismatch", "nan or inf",
           "nan in sparse", "chunk out of order", "chunk missing", "chunk overlap", "piece past total",
           "sent twice", "frozen", "dense on scalar rows", "sparse row shape"]


@st.composite
def defective_tensor(draw, kind=None):
    kind = kind or draw(st.sampled_from(DEFECTS))
    if kind == "bad dtype name":
        name = draw(text.filter(lambda s: s not in codec.DTYPES))
        return kind, _bad([piece("w", name, (3, 4), W_BYTES, total=48)], C.INVALID_ARGUMENT)
    if kind == "wrong dtype":
        # (float16 and bfloat16 are accepted for a float32 variable: cluster.compression)
        dt = np.dtype(draw(st.sampled_from(["float64", "int32", "int64", "int8", "uint8", "bool", "int16"])))
        return kind, _bad([dense("w", np.zeros((3, 4), dt))], C.INVALID_ARGUMENT)
    if kind == "bytes short":
        n = draw(st.integers(0, 47))
        return kind, _bad([piece("w", "float32", (3, 4), W_BYTES[:n], total=48)], C.INVALID_ARGUMENT)
    if kind == "bytes long":
        extra = draw(st.binary(min_size=1, max_size=64))
        return kind, _bad([piece("w", "float32", (3, 4), W_BYTES + extra, total=48)], C.INVALID_ARGUMENT)
    if kind == "total mismatch":
        total = draw(st.integers(-(2**63), 2**63 - 1).filter(lambda v: v != 48))
        return kind, _bad([piece("w", "float32", (3, 4), W_BYTES, total=total)], C.INVALID_ARGUMENT)
    if kind == "negative dim":
        shape = draw(st.lists(st.integers(-(2**63), 2**63 - 1), min_size=1, max_size=4).filter(lambda s: min(s) < 0))
        return kind, _bad([piece("w", "float32", shape, W_BYTES, total=48)], C.INVALID_ARGUMENT)
    if kind == "huge dims":
        shape = draw(st.lists(st.integers(2**20, 2**62), min_size=1, max_size=3))
        declared = int(np.prod(shape, dtype=object)) * 4
        total = declared if declared < 2**63 else draw(st.integers(0, 2**63 - 1))
        return kind, _bad([piece("w", "float32", shape, W_BYTES, total=total)], C.INVALID_ARGUMENT)
    if kind == "wrong shape":
        shape = tuple(draw(st.lists(st.integers(0, 6), min_size=0, max_size=3)).__iter__())
        if shape == (3, 4):
            shape = (4, 3)
        return kind, _bad([dense("w", np.zeros(shape, np.float32))], C.INVALID_ARGUMENT)
    if kind == "unknown name":
        name = draw(text.filter(lambda s: s not in VARS))
        return kind, _bad([dense(name, np.zeros((3, 4), np.float32))], C.NOT_FOUND)
    if kind == "rows out of range":
        bad = draw(st.one_of(st.integers(8, 2**63 - 1), st.integers(-(2**63), -1)))
        rows = np.array([0, bad, 3])
        return kind, _bad([sparse("emb", rows, np.ones((3, 4), np.float32))], C.INVALID_ARGUMENT)
    if kind == "rows bytes mismatch":
        values = np.ones((2, 4), np.float32)
        rows = draw(st.binary(max_size=40).filter(lambda b: len(b) != 16))
        return kind, _bad([piece("emb", "float32", (2, 4), values.tobytes(), sparse=True, rows=rows)], C.INVALID_ARGUMENT)
    if kind == "nan or inf":
        g = np.zeros((3, 4), np.float32)
        g.flat[draw(st.integers(0, 11))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        return kind, _bad([dense("w", g)], C.INVALID_ARGUMENT)
    if kind == "nan in sparse":
        v = np.zeros((2, 4), np.float32)
        v.flat[draw(st.integers(0, 7))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        return kind, _bad([sparse("emb", np.array([1, 1]), v)], C.INVALID_ARGUMENT)
    if kind in ("chunk out of order", "chunk missing", "chunk overlap", "piece past total"):
        cut = draw(st.integers(1, 47))
        a = piece("w", "float32", (3, 4), W_BYTES[:cut], total=48)
        b = piece("w", "float32", (3, 4), W_BYTES[cut:], offset=cut, total=48)
        if kind == "chunk out of order":
            pieces = [b, a]
        elif kind == "chunk missing":
            pieces = [draw(st.sampled_from([a, b]))]
        elif kind == "chunk overlap":
            back = draw(st.integers(1, cut))
            pieces = [a, piece("w", "float32", (3, 4), W_BYTES[cut - back:], offset=cut - back, total=48)]
        else:
            pieces = [a, piece("w", "float32", (3, 4), W_BYTES[cut:] + b"\0" * draw(st.integers(1, 16)), offset=cut, total=48)]
        return kind, _bad(pieces, C.INVALID_ARGUMENT)
    if kind == "sent twice":
        return kind, _bad([dense("w", np.zeros((3, 4), np.float32))] * 2, C.INVALID_ARGUMENT)
    if kind == "frozen":
        return kind, _bad([dense("frozen/t", np.zeros((2, 2), np.float32))], C.INVALID_ARGUMENT)
    if kind == "dense on scalar rows":
        return kind, _bad([piece("emb", "float32", (), b"\0" * 4, sparse=True, rows=b"")], C.INVALID_ARGUMENT)
    # sparse row shape
    width = draw(st.integers(0, 6).filter(lambda v: v != 4))
    return kind, _bad([sparse("emb", np.array([0]), np.zeros((1, width), np.float32))], C.INVALID_ARGUMENT)


# ----------------------------------------------------------------------------------------------
# The properties


SCENARIOS = [f"defect {k}" for k in DEFECTS] + ["worker", "read_version", "header", "replay", "valid"]


def run_push_cases(data, t: Target, scenario: str | None = None):
    before = t.snapshot()
    method = data.draw(st.sampled_from(["Push", "PushPull"]), label="method")
    worker = data.draw(st.sampled_from([0, 1]), label="worker")
    seq = t.next_seq[worker]
    good = data.draw(valid_grads(), label="valid part")
    scenario = scenario or data.draw(st.sampled_from(SCENARIOS), label="scenario")
    header = ps_pb2.PushHeader(worker=worker, seq=seq, read_version=before.version)
    if scenario.startswith("defect"):
        kind, (pieces, expect) = data.draw(defective_tensor(scenario[7:]), label="defect")
        good.pop(pieces[0].name, None)  # the defect replaces that variable's valid gradient
        all_pieces = grad_pieces(good) + pieces
        at = data.draw(st.integers(0, len(all_pieces)), label="defect position")
        all_pieces = grad_pieces(good)[:at] + pieces + grad_pieces(good)[at:]
        split = data.draw(st.booleans(), label="one piece per message")
        messages = [[p] for p in all_pieces] if split else [all_pieces]
        request, case = stream(header, messages), f"push {kind}"
    elif scenario == "worker":
        header.worker = data.draw(st.one_of(st.sampled_from([2, 3]), st.integers(WORKERS, 2**31 - 1),
                                            st.integers(-(2**31), -1)), label="unknown worker")
        request, case, expect = stream(header, [grad_pieces(good)]), "push unknown worker", {C.FAILED_PRECONDITION, C.INVALID_ARGUMENT}
    elif scenario == "read_version":
        # strategies must not depend on the shard's state (hypothesis replays them): draw offsets
        ahead = data.draw(st.one_of(st.integers(1, 2**40), st.just(None)), label="versions ahead (None: negative)")
        header.read_version = before.version + ahead if ahead else data.draw(st.integers(-(2**63), -1))
        request, case = stream(header, [grad_pieces(good)]), "push bad read_version"
        expect = {C.OUT_OF_RANGE} if ahead else {C.INVALID_ARGUMENT}  # ahead: restored since the pull
    elif scenario == "header":
        request = data.draw(st.sampled_from([[], stream(None, [grad_pieces(good)])]), label="headerless")
        case, expect = "push without header", {C.INVALID_ARGUMENT}
    elif scenario == "replay":
        if seq == 0:  # give the worker a push to replay: an empty one (it still counts)
            t.client.push({}, [before.version], worker, 0)
            seq = t.next_seq[worker] = 1
            before = t.snapshot()
            header.read_version = before.version
        back = data.draw(st.integers(1, 2**63), label="seqs back")
        header.seq = max(seq - back, -(2**63))
        request, case, expect = stream(header, [grad_pieces(good)]), "push replayed seq", {C.OK}
    else:
        request, case, expect = stream(header, [grad_pieces(good)]), "push valid", {C.OK}
    code, reply = call(t, method, request)
    after = check(t, case, code, expect, before)
    if code != C.OK:
        return
    result = (reply if method == "Push" else ps_pb2.PullHeader.FromString(codec.read_header(reply[0])).push).result
    result = ps_pb2.PushReply.Result.Name(result)
    if scenario == "replay":
        assert result == "DUPLICATE" and same_state(before, after), "a replayed push changed the state"
        TALLY["replays answered DUPLICATE"] += 1
        return
    assert result == "APPLIED"
    want = expected_after(before.values, good)
    for n in want:
        if not np.array_equal(after.values[n], want[n]):
            TALLY["corruptions"] += 1
            pytest.fail(f"valid push: {n} = {after.values[n]}, expected {want[n]}")
    assert after.version == before.version + 1 and after.last_seq[worker] == seq
    t.next_seq[worker] = seq + 1
    TALLY["valid pushes applied exactly"] += 1


CONTROL = ["register", "pull worker", "pull names", "init specs", "init same specs", "restore", "stats"]


def run_control_cases(data, t: Target, case: str | None = None):
    before = t.snapshot()
    case = case or data.draw(st.sampled_from(CONTROL), label="case")
    if case == "register":
        worker = data.draw(st.one_of(st.integers(WORKERS, 2**31 - 1), st.integers(-(2**31), -1)))
        code, _ = call(t, "RegisterWorker", ps_pb2.RegisterWorkerRequest(worker=worker, retire=data.draw(st.booleans())))
        check(t, "register out-of-range worker", code, {C.INVALID_ARGUMENT}, before)
    elif case == "pull worker":
        worker = data.draw(st.one_of(st.sampled_from([2, 3]), st.integers(WORKERS, 2**31 - 1), st.integers(-(2**31), -1)))
        code, _ = call(t, "Pull", ps_pb2.PullRequest(worker=worker))
        check(t, "pull unknown worker", code, {C.FAILED_PRECONDITION, C.INVALID_ARGUMENT}, before)
    elif case == "pull names":
        names = data.draw(st.lists(st.one_of(text, st.sampled_from(list(VARS))), min_size=1, max_size=4))
        code, _ = call(t, "Pull", ps_pb2.PullRequest(names=names))
        expect = {C.OK} if set(names) <= set(VARS) else {C.NOT_FOUND}
        after = check(t, "pull names", code, expect, before)
        assert same_state(before, after)
    elif case in ("init specs", "init same specs"):
        if case == "init same specs":
            values = {n: data.draw(arrays(s)) for n, (s, _) in VARS.items()}
            pieces, expect = [dense(n, v) for n, v in values.items()], {C.OK}
        else:
            pieces = data.draw(defective_tensor())[1][0] + data.draw(st.lists(
                st.sampled_from([dense(n, np.zeros(s, d)) for n, (s, d) in VARS.items()]), max_size=3, unique_by=lambda p: p.name))
            # a push defect may be a fine Init (e.g. frozen/t's value): then the specs decide, and
            # OK (a no-op, same specs) is right; either way the variables must not change
            expect = {C.FAILED_PRECONDITION, C.INVALID_ARGUMENT, C.OK}
        code, _ = call(t, "Init", [ps_pb2.InitChunk(tensors=pieces).SerializeToString()])
        after = check(t, case, code, expect, before)
        assert same_state(before, after), "Init over existing variables changed them"
    elif case == "restore":
        snap = codec.Snapshot(version=before.version, values={n: v.copy() for n, v in before.values.items()},
                              slots=before.slots, updates=before.updates, last_seq=dict(before.last_seq),
                              clocks=dict(before.clocks), optimizer=before.optimizer)
        defect = data.draw(st.sampled_from(["optimizer", "nan", "missing var", "shape", "worker id", "version",
                                            "no header"]))
        expect = {C.FAILED_PRECONDITION, C.INVALID_ARGUMENT}
        if defect == "optimizer":
            snap.optimizer = data.draw(text.filter(lambda s: s not in ("", "sgd")))
        elif defect == "nan":
            snap.values["w"][0, 0] = np.nan
        elif defect == "missing var":
            del snap.values["w"]
        elif defect == "shape":
            snap.values["w"] = np.zeros((4, 3), np.float32)
        elif defect == "worker id":
            snap.last_seq[data.draw(st.one_of(st.integers(WORKERS, 2**31 - 1), st.integers(-(2**31), -1)))] = 5
        elif defect == "version":
            snap.version = data.draw(st.integers(-(2**63), -1))
        messages = list(codec.encode_snapshot(snap))
        if defect == "no header":
            messages = [ps_pb2.SnapshotChunk.FromString(m).SerializeToString() for m in messages]
            messages = [ps_pb2.SnapshotChunk(tensors=ps_pb2.SnapshotChunk.FromString(m).tensors).SerializeToString()
                        for m in messages]
        code, _ = call(t, "Restore", messages)
        check(t, f"restore {defect}", code, expect, before)
    else:
        code, reply = call(t, "Stats", ps_pb2.StatsRequest())
        check(t, "stats", code, {C.OK}, before)


GARBAGE = [m for m in PS_METHODS if m != "Stop"]  # Stop that parses would stop the server, as asked
# Streams whose every message is a request of its own, answered (and applied) one by one: a
# refused message ends the call after the earlier ones took effect, so the "refused => nothing
# changed" contract holds per message, and each message is sent in a call of its own.
PER_MESSAGE = {"PushPullSession"}


def run_garbage_case(data, t: Target, method: str | None = None):
    method = method or data.draw(st.sampled_from(GARBAGE), label="method")
    kind = PS_METHODS[method][0]
    blob = st.one_of(st.binary(max_size=200), st.binary(max_size=8).map(lambda b: b"\x12" + b),  # a 'tensors' field
                     st.binary(max_size=60).map(lambda b: b"\x0a\x04\x08\x00\x10\x07" + b),  # header then junk
                     st.binary(max_size=12).map(lambda b: b"\x0a" + bytes([len(b)]) + b))  # a random header
    request = data.draw(st.lists(blob, max_size=3)) if kind.startswith("stream") else data.draw(blob)
    for one in ([[m] for m in request] or [[]]) if method in PER_MESSAGE else [request]:
        before = t.snapshot()
        code, _ = call(t, method, one, raw=True)
        check(t, f"garbage {method}", code, None, before)
        if code == C.OK:
            TALLY["garbage that parsed as a valid request"] += 1
            t.reset(before)
            after = t.snapshot()
            for counters in (after.last_seq, after.clocks):  # workers 2, 3 may now be known (retired)
                for w in [w for w in counters if w not in before.last_seq]:
                    del counters[w]
            assert same_state(before, after)


@pytest.fixture(scope="module")
def shard():
    with target() as t:
        yield t


@pytest.fixture(scope="module", autouse=True)
def figures(request, tmp_path_factory):
    """After the module: the tally to a file (on the terminal only under -s: pytest's progress
    stays readable). A crash or a corruption fails the input's own test at once."""
    TALLY.clear()
    yield
    TALLY.update(crashes=0, corruptions=0)  # listed even when none happened (update adds)
    line = "hostile input: " + ", ".join(f"{k}={v}" for k, v in sorted(TALLY.items()))
    path = tmp_path_factory.getbasetemp() / "hostile-input.txt"
    path.write_text(line + "\n")
    if request.config.getoption("capture") == "no":
        print(f"\n{line}\n(written to {path})")


PER_CASE = max(4, EXAMPLES // 6)
FUZZ = settings(max_examples=PER_CASE, deadline=None, suppress_health_check=list(HealthCheck))
FUZZ_SLOW = settings(FUZZ, max_examples=10 * EXAMPLES)


@pytest.mark.parametrize("scenario", SCENARIOS)
@FUZZ
@given(data=st.data())
def test_push_and_push_pull_reject_every_defect_precisely_and_change_nothing(shard, scenario, data):
    run_push_cases(data, shard, scenario)


@pytest.mark.parametrize("case", CONTROL)
@FUZZ
@given(data=st.data())
def test_control_rpcs_with_adversarial_messages(shard, case, data):
    run_control_cases(data, shard, case)


@pytest.mark.parametrize("method", GARBAGE)
@FUZZ
@given(data=st.data())
def test_garbage_bytes_as_the_raw_request_of_every_method(shard, method, data):
    run_garbage_case(data, shard, method)


@pytest.mark.slow
@FUZZ_SLOW
@given(data=st.data())
def test_push_fuzz_long(shard, data):
    run_push_cases(data, shard)


@pytest.mark.slow
@FUZZ_SLOW
@given(data=st.data())
def test_control_and_garbage_fuzz_long(shard, data):
    if data.draw(st.booleans()):
        run_control_cases(data, shard)
    else:
        run_garbage_case(data, shard)


def test_huge_declared_tensor_is_refused_without_allocating(shard):
    """A first piece declaring 32 GiB (under codec's 64 GiB cap, above this machine's memory)."""
    before = shard.snapshot()
    header = ps_pb2.PushHeader(worker=0, seq=shard.next_seq[0], read_version=before.version)
    for total in (32 << 30, (1 << 36) - 4):
        request = stream(header, [[piece("w", "float32", (total // 4,), b"\0" * 16, total=total)]])
        code, details = call(shard, "Push", request)
        check(shard, "push huge declared size", code, {C.INVALID_ARGUMENT, C.RESOURCE_EXHAUSTED}, before)


def test_oversized_message_is_resource_exhausted(shard):
    before = shard.snapshot()
    header = ps_pb2.PushHeader(worker=0, seq=shard.next_seq[0], read_version=before.version)
    big = np.zeros(MAX_MESSAGE_BYTES // 4 + 16, np.float32)
    code, details = call(shard, "Push", stream(header, [[dense("w", big)]]))
    check(shard, "oversized message", code, {C.RESOURCE_EXHAUSTED}, before)


def test_invalid_utf8_names_are_invalid_argument(shard):
    before = shard.snapshot()
    header = ps_pb2.PushHeader(worker=0, seq=shard.next_seq[0], read_version=before.version)
    good = dense("w", np.zeros((3, 4), np.float32)).SerializeToString()
    bad_name = b"\x0a\x02\xff\xfe" + good[good.index(b"\x12"):]  # field 1 (name) = invalid UTF-8
    message = b"\x0a" + bytes([header.ByteSize()]) + header.SerializeToString() + b"\x12" + bytes([len(bad_name)]) + bad_name
    code, details = call(shard, "Push", [message])
    check(shard, "push invalid utf-8 name", code, {C.INVALID_ARGUMENT}, before)
    code, details = call(shard, "Pull", b"\x12\x02\xff\xfe", raw=True)  # PullRequest.names = invalid UTF-8
    check(shard, "pull invalid utf-8 name", code, {C.INVALID_ARGUMENT}, before)


def test_malformed_headers_are_invalid_argument(shard):
    before = shard.snapshot()
    for method in ("Push", "PushPull", "Restore"):
        code, details = call(shard, method, [b"\x0a\x02\xff\xff"])  # field 1 (header) = bytes that are no message
        check(shard, f"{method} malformed header", code, {C.INVALID_ARGUMENT}, before)


def test_sparse_rows_without_a_row_count_are_invalid_for_a_vector():
    """A sparse declaration of shape () for a 1-D variable: its row shape () matches, so only
    the missing row count tells it apart; refused as INVALID_ARGUMENT (it raised IndexError, an
    INTERNAL answer and a traceback per call, found in review). Both paths declare through
    validate.check_declared: gRPC's admission (codec) and the segment's (ps/shm_transport.py,
    tests/test_shm_transport.py's garbage list has the case end to end)."""
    from types import SimpleNamespace

    from asyncps.ps import validate
    from asyncps.ps.errors import InvalidArgument

    variables = {"b": SimpleNamespace(value=np.zeros(5, np.float32), frozen=False)}
    with pytest.raises(InvalidArgument, match="empty shape"):
        validate.check_declared("b", "", np.dtype(np.float32), (), True, variables)
    validate.check_declared("b", "", np.dtype(np.float32), (2,), True, variables)  # 2 rows of a vector: fine
