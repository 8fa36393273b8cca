"""Hostile input to the chief: every Chief RPC against a real chief process (and its shard).

Hypothesis builds random and adversarial Register, Heartbeat and ReportMetrics messages (empty,
huge and non-ASCII host names, pids <= 0, indices out of range, negative steps, NaN and Inf
metrics, metric names that collide with the log row's own keys, too many metrics, garbage bytes
as the raw request). A model of the membership rules (chief/membership.py) predicts each answer:

- the chief answers (no crash: health SERVING, its process alive, no traceback in its log);
- an error is the precise status the defect calls for (never UNKNOWN or INTERNAL);
- a rejected call changes nothing: no membership event and no row in metrics.jsonl, and every
  member keeps its index (a Register of its identity returns it);
- an accepted call does what the model says: the preferred index if free, else the lowest free
  one, idempotent registration,
  adoption of an index never handed out, one strict-JSON `worker` row per report.

No worker process runs: the chief waits for steps that never come while the test talks to it.
The figures (inputs tried, statuses per case, crashes, corruptions) are written to
`chief-hostile-input.txt` in pytest's base temporary directory, and printed too under
`pytest -s`. ``ASYNCPS_FUZZ_EXAMPLES`` scales the run.
"""
from __future__ import annotations

import json
import math
import os
import socket
from collections import Counter
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asyncps.cli.launch import plan_children
from asyncps.cli.processes import stop_all
from asyncps.config import load_config
from asyncps.protos import chief_pb2, chief_pb2_grpc

from cli_runner import CONFIGS

MAX_METRICS = 64  # per report (chief/servicer.py)
RESERVED_METRICS = {"kind", "step", "time", "worker", "worker_step"}  # the metrics.jsonl row's own keys
EXAMPLES = int(os.environ.get("ASYNCPS_FUZZ_EXAMPLES", "120"))
WORKERS = 4
C = grpc.StatusCode
IMPRECISE = {C.UNKNOWN, C.INTERNAL}
TIMEOUT = 3.0  # a Register with every slot taken waits TIMEOUT - 1 s before RESOURCE_EXHAUSTED
# The deadline of a Register the model expects RESOURCE_EXHAUSTED for: the chief waits 0.5 s (not
# 2 s) for a slot that nothing here frees (heartbeat_timeout is an hour), keeping the same 1 s for
# its answer. Once the table filled, such calls were up to a quarter of the examples: 1.4 s to
# 60 s a run, as the draws went.
FULL_TIMEOUT = 1.5
TALLY: Counter = Counter()
MEMBERSHIP_KINDS = ("worker_joined", "worker_dead", "worker_adopted")
OTHER_HOST = "fuzz-host-" + socket.gethostname()  # never this host: liveness by heartbeat timeout only


class Chief:
    """A real chief and shard (as `asyncps launch` starts them, without workers), a raw channel,
    and the model of what its membership should be."""

    def __init__(self, run_dir: Path):
        cfg = load_config(CONFIGS / "linear_regression.yaml", [
            f"run_dir={run_dir}", f"cluster.workers={WORKERS}", "cluster.ps=1", "cluster.heartbeat_timeout=3600",
            "train.max_steps=100000000", "train.eval_every=0",
            "cluster.start_barrier=false"])  # no worker will ever be ready: rows are written at once
        self.run_dir = run_dir
        self.children = [c for c in plan_children(cfg) if c.role != "worker"]
        for child in self.children:
            child.start()
        self.address = json.loads(self.children[-1].env["TF_CONFIG"])["cluster"]["chief"][0]
        self.channel = grpc.insecure_channel(self.address)
        grpc.channel_ready_future(self.channel).result(timeout=120)
        self.stub = chief_pb2_grpc.ChiefStub(self.channel)
        self.slots: dict[int, tuple[str, int]] = {}  # index -> (hostname, pid); ("adopted", 0) if adopted
        self.events = 0  # membership rows expected in metrics.jsonl
        self.reports = 0  # `worker` rows expected

    # what the chief wrote
    def rows(self) -> list[dict]:
        path = self.run_dir / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        return [json.loads(line, parse_constant=_reject_constant) for line in lines]

    def observed(self) -> tuple[int, int]:
        rows = self.rows()
        return sum(r["kind"] in MEMBERSHIP_KINDS for r in rows), sum(r["kind"] == "worker" for r in rows)

    def healthy(self) -> bool:
        if any(c.poll() is not None for c in self.children):
            return False
        health = health_pb2_grpc.HealthStub(self.channel)
        reply = health.Check(health_pb2.HealthCheckRequest(service="asyncps.Chief"), timeout=10)
        log = (self.run_dir / "chief.log").read_text()
        return reply.status == health_pb2.HealthCheckResponse.SERVING and "Traceback" not in log

    def close(self) -> None:
        self.channel.close()
        stop_all(self.children)


def _reject_constant(name):
    raise ValueError(f"metrics.jsonl holds {name}: not strict JSON")


@pytest.fixture(scope="module")
def chief(tmp_path_factory):
    target = Chief(tmp_path_factory.mktemp("chief"))
    yield target
    target.close()


@pytest.fixture(scope="module", autouse=True)
def figures(request, tmp_path_factory):
    """After the module: the tally to a file (on the terminal only under -s: pytest's progress
    stays readable). A crash or a corruption fails the input's own test at once."""
    TALLY.clear()
    yield
    TALLY.update(crashes=0, corruptions=0)  # listed even when none happened (update adds)
    line = "chief hostile input: " + ", ".join(f"{k}={v}" for k, v in sorted(TALLY.items()))
    path = tmp_path_factory.getbasetemp() / "chief-hostile-input.txt"
    path.write_text(line + "\n")
    if request.config.getoption("capture") == "no":
        print(f"\n{line}\n(written to {path})")


# ----------------------------------------------------------------------------------------------
# The model: what each request should get


def expect_register(chief: Chief, hostname: str, pid: int, preferred: int | None = None):
    """(status, index or None) the membership rules call for; updates the model if accepted."""
    if not hostname or len(hostname.encode()) > 255 or pid <= 0:
        return C.INVALID_ARGUMENT, None
    if preferred is not None and not 0 <= preferred < WORKERS:
        return C.INVALID_ARGUMENT, None
    for index, identity in chief.slots.items():
        if identity == (hostname, pid):
            return C.OK, index
    free = [i for i in range(WORKERS) if i not in chief.slots]
    if not free:
        return C.RESOURCE_EXHAUSTED, None
    index = preferred if preferred in free else free[0]
    chief.slots[index] = (hostname, pid)
    chief.events += 1
    return C.OK, index


def expect_heartbeat(chief: Chief, index: int, step: int):
    if not 0 <= index < WORKERS or step < 0:
        return C.INVALID_ARGUMENT
    if index not in chief.slots:  # an index never handed out is adopted
        chief.slots[index] = ("adopted", 0)
        chief.events += 1
    return C.OK


def expect_report(chief: Chief, index: int, step: int, wall_time: float, values: dict):
    if not 0 <= index < WORKERS or step < 0 or not math.isfinite(wall_time) or len(values) > MAX_METRICS:
        return C.INVALID_ARGUMENT
    if any(not k or len(k) > 128 or k in RESERVED_METRICS or not math.isfinite(v) for k, v in values.items()):
        return C.INVALID_ARGUMENT
    if index not in chief.slots:
        return C.NOT_FOUND
    chief.reports += 1
    return C.OK


def call(method, request, timeout: float = TIMEOUT):
    """(status, reply) of one call; never raises for a status."""
    try:
        return C.OK, method(request, timeout=timeout)
    except grpc.RpcError as err:
        return err.code(), err.details()


def register_timeout(expected) -> float:
    return FULL_TIMEOUT if expected == C.RESOURCE_EXHAUSTED else TIMEOUT


def check(chief: Chief, case: str, got, expected) -> None:
    """The answer is the expected one, the chief is alive, and its log says exactly the model."""
    TALLY["inputs"] += 1
    TALLY[f"{case}: {got.name}"] += 1
    if not chief.healthy():
        TALLY["crashes"] += 1
        pytest.fail(f"{case}: the chief crashed or logged a traceback")
    assert got not in IMPRECISE, f"{case}: imprecise status {got}"
    assert got == expected, f"{case}: got {got}, expected {expected}"
    observed = chief.observed()
    if observed != (chief.events, chief.reports):
        TALLY["corruptions"] += 1
        pytest.fail(f"{case}: metrics.jsonl has (membership rows, reports) {observed}, the model {chief.events, chief.reports}")


# ----------------------------------------------------------------------------------------------
# Strategies

hostnames = st.one_of(
    st.just(OTHER_HOST), st.just(""), st.just("adopted"), st.text(max_size=40).map(lambda s: OTHER_HOST + s),
    st.text(min_size=250, max_size=300), st.text(alphabet="\x00\n\t é漢🙂", max_size=20),
)
pids = st.one_of(st.integers(1, 8), st.integers(-(2**63), 0), st.integers(2**31, 2**63 - 1))
indices = st.one_of(st.integers(-3, WORKERS + 2), st.integers(-(2**31), 2**31 - 1))
steps = st.one_of(st.integers(0, 10**6), st.integers(-(2**63), -1), st.just(2**63 - 1))
metric_names = st.one_of(st.sampled_from(sorted(RESERVED_METRICS)), st.just(""), st.just("train/loss"),
                         st.text(max_size=20), st.text(min_size=129, max_size=140))
metric_values = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(-1e6, 1e6))
metric_maps = st.one_of(st.dictionaries(metric_names, metric_values, max_size=6),
                        st.dictionaries(st.text(min_size=1, max_size=8).map(lambda s: "m/" + s), st.just(1.0),
                                        min_size=MAX_METRICS - 1, max_size=MAX_METRICS + 3))
wall_times = st.one_of(st.floats(0, 2e9), st.sampled_from([math.nan, math.inf, -math.inf]))

FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))


@FUZZ
@given(data=st.data())
def test_register_heartbeat_and_metrics_with_adversarial_messages(chief, data):
    # every draw happens whatever the chief's state (hypothesis replays draws): then branch
    kind = data.draw(st.sampled_from(["register", "heartbeat", "report", "re-register"]), label="rpc")
    hostname, pid = data.draw(hostnames, label="hostname"), data.draw(pids, label="pid")
    index, step = data.draw(indices, label="index"), data.draw(steps, label="step")
    wall_time, values = data.draw(wall_times, label="wall_time"), data.draw(metric_maps, label="values")
    member = data.draw(st.integers(0, WORKERS - 1), label="member")
    preferred = data.draw(st.one_of(st.none(), indices), label="preferred index")
    members = sorted((i, s) for i, s in chief.slots.items() if s[1] > 0)
    if kind == "re-register" and members:
        # a member's own identity: idempotent, its index unchanged however full the table is
        index, (hostname, pid) = members[member % len(members)]
        got, reply = call(chief.stub.Register, chief_pb2.RegisterRequest(hostname=hostname, pid=pid))
        check(chief, "Register again", got, C.OK)
        assert reply.worker_index == index
    elif kind in ("register", "re-register"):
        expected, index = expect_register(chief, hostname, pid, preferred)
        request = chief_pb2.RegisterRequest(hostname=hostname, pid=pid, preferred_index=preferred)
        got, reply = call(chief.stub.Register, request, register_timeout(expected))
        check(chief, "Register", got, expected)
        if got == C.OK:
            assert (reply.worker_index, reply.num_workers, reply.data_shard) == (index, WORKERS, index)
    elif kind == "heartbeat":
        expected = expect_heartbeat(chief, index, step)
        got, _ = call(chief.stub.Heartbeat, chief_pb2.HeartbeatRequest(worker_index=index, step=step))
        check(chief, "Heartbeat", got, expected)
    else:
        expected = expect_report(chief, index, step, wall_time, values)
        request = chief_pb2.MetricsReport(worker_index=index, step=step, wall_time=wall_time, values=values)
        got, _ = call(chief.stub.ReportMetrics, request)
        check(chief, "ReportMetrics", got, expected)
        if got == C.OK:
            row = [r for r in chief.rows() if r["kind"] == "worker"][-1]
            assert row["worker"] == index and row["worker_step"] == step and all(row[k] == v for k, v in values.items())


METHODS = {"Register": chief_pb2.RegisterRequest, "Heartbeat": chief_pb2.HeartbeatRequest,
           "ReportMetrics": chief_pb2.MetricsReport}


@FUZZ
@given(method=st.sampled_from(sorted(METHODS)), raw=st.binary(max_size=200))
def test_garbage_bytes_as_the_raw_request_of_every_method(chief, method, raw):
    """Bytes that are not the method's message: INVALID_ARGUMENT. Bytes that happen to parse are
    a message like any other, answered as the model says."""
    try:
        request = METHODS[method].FromString(raw)
    except Exception:  # noqa: BLE001 (protobuf's DecodeError and friends)
        request = None
    if request is None:
        expected = C.INVALID_ARGUMENT
    elif method == "Register":
        preferred = request.preferred_index if request.HasField("preferred_index") else None
        expected, _ = expect_register(chief, request.hostname, request.pid, preferred)
    elif method == "Heartbeat":
        expected = expect_heartbeat(chief, request.worker_index, request.step)
    else:
        expected = expect_report(chief, request.worker_index, request.step, request.wall_time, dict(request.values))
    rpc = chief.channel.unary_unary(f"/asyncps.Chief/{method}", request_serializer=None, response_deserializer=None)
    got, _ = call(rpc, raw, register_timeout(expected) if method == "Register" else TIMEOUT)
    check(chief, f"{method} raw bytes", got, expected)
