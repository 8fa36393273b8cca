"""The row-wise data plane of id-keyed tables on real shards (threads + real gRPC; shm too):
placement by hash, first-touch rows, pushes of summed row gradients with per-row staleness,
validation, and equality with training the table as a dense variable."""
from __future__ import annotations

import grpc
import numpy as np
import pytest

from asyncps import shm
from asyncps.config import Config
from asyncps.partition import place, table_owners
from asyncps.protos import ps_pb2, table_rows
from asyncps.ps.server import ShardServer
from asyncps.ps.tables import initial_rows
from asyncps.ps_client import PSClient, TableGrad
from asyncps.sparse import SparseRows
from asyncps.worker.autodiff import GradientTape, ops
from asyncps.worker.tables import localize, rows_of
from cli_runner import metrics_rows, wait_until

TABLE, DIM, SEED = "t.embed", 4, 3
DENSE = {"w": np.arange(12, dtype=np.float32).reshape(3, 4)}


def _cfg(shards: int, optimizer: str = "sgd", transport: str = "grpc") -> Config:
    cfg = Config()
    cfg.seed = SEED
    cfg.cluster.ps, cfg.cluster.workers, cfg.cluster.rpc_timeout = shards, 2, 10.0
    cfg.cluster.transport = transport
    cfg.optimizer.name, cfg.optimizer.learning_rate = optimizer, 0.5
    return cfg


class Cluster:
    """`shards` real shard servers and one client (with the table) on 127.0.0.1."""

    def __init__(self, shards: int, params=DENSE, tables=None, **cfg_kw):
        self.cfg = _cfg(shards, **cfg_kw)
        self.servers = [ShardServer(self.cfg, i) for i in range(shards)]
        addresses = [f"127.0.0.1:{s.start()}" for s in self.servers]
        placement = place({n: (a.shape, a.dtype) for n, a in params.items()}, shards)
        self.client = PSClient(addresses, placement, self.cfg, tables={TABLE: DIM} if tables is None else tables)
        self.client.init(params)
        self.client.register(0)

    def close(self):
        self.client.close()
        for s in self.servers:
            s.stop(0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _transports():
    return ["grpc"] + (["shm"] if shm.available() else [])


@pytest.mark.parametrize("transport", _transports())
def test_rows_are_pulled_from_their_owners_and_pushed_back(transport):
    ids = np.array([5, 17, 1 << 40, -3, 99], np.int64)
    with Cluster(2, transport=transport) as c:
        params, versions, rows = c.client.pull_with_rows({TABLE: ids}, worker=0)
        np.testing.assert_array_equal(params["w"], DENSE["w"])
        values, row_versions = rows[TABLE]
        np.testing.assert_array_equal(values, initial_rows(SEED, TABLE, ids, DIM, 0.05))  # first touch
        assert row_versions.tolist() == [0] * 5
        assert c.client.shm_shards() == [transport == "shm"] * 2
        grads = np.ones((5, DIM), np.float32)
        next_ids = np.array([5, 7], np.int64)
        results, params, versions, rows = c.client.push_pull_rows(
            {"w": np.ones((3, 4), np.float32)}, versions, 0, 0,
            table_grads={TABLE: TableGrad(ids, grads, row_versions)}, table_ids={TABLE: next_ids})
        assert [r.result for r in results] == ["APPLIED", "APPLIED"]
        np.testing.assert_array_equal(params["w"], DENSE["w"] - 0.5)
        first = initial_rows(SEED, TABLE, next_ids, DIM, 0.05)
        np.testing.assert_array_equal(rows[TABLE][0][0], first[0] - np.float32(0.5))  # id 5: updated once
        np.testing.assert_array_equal(rows[TABLE][0][1], first[1])  # id 7: made now
        assert rows[TABLE][1].tolist() == [1, 0]
        stats = c.client.stats()
        owners = table_owners(np.append(ids, 7), 2)
        assert [s.tables[0].rows for s in stats] == np.bincount(owners, minlength=2).tolist()
        assert sum(sum(b.histogram) for s in stats for b in s.tables[0].staleness) == 5  # one row update each
        assert not any(s.tables[0].hot_ids for s in stats)  # the chief's polls: no pass over the rows
        hot = {i: u for s in c.client.stats(hot_ids=True) for i, u in zip(s.tables[0].hot_ids, s.tables[0].hot_updates)}
        assert hot == {**dict.fromkeys(ids.tolist(), 1), 7: 0}
        # the chief's read makes no row: an unseen id reads its first values, version 0
        peek = c.client.pull_rows({TABLE: np.array([5, 12345], np.int64)})
        assert peek[TABLE][1].tolist() == [1, 0]
        assert sum(s.tables[0].rows for s in c.client.stats()) == 6


def _raw_push(c: Cluster, shard: int, seq: int, rows_msg) -> grpc.RpcError:
    header = ps_pb2.PushHeader(worker=0, seq=seq, read_version=0, table_grads=[rows_msg])
    stub = c.client._stubs[shard]
    from asyncps.protos import codec

    with pytest.raises(grpc.RpcError) as err:
        stub.PushOne(codec.encode_message({}, header.SerializeToString()), timeout=10)
    return err.value


def test_bad_row_pushes_are_refused_and_change_nothing():
    ids = np.array([1, 2], np.int64)
    with Cluster(1) as c:
        _, _, before = c.client.pull_with_rows({TABLE: ids}, worker=0)
        good = np.ones((2, DIM), np.float32)
        cases = [
            (table_rows.rows_message("nope", ids, good, np.zeros(2)), grpc.StatusCode.NOT_FOUND, "nope"),
            (table_rows.rows_message(TABLE, ids, good[:1], np.zeros(2)), grpc.StatusCode.INVALID_ARGUMENT, "bytes"),
            (table_rows.rows_message(TABLE, ids, good, np.zeros(1)), grpc.StatusCode.INVALID_ARGUMENT, "bytes"),
            (ps_pb2.TableRows(table=TABLE, ids=b"123", versions=b"", values=b""), grpc.StatusCode.INVALID_ARGUMENT,
             "whole int64"),
            (table_rows.rows_message(TABLE, ids, np.full((2, DIM), np.nan), np.zeros(2)),
             grpc.StatusCode.INVALID_ARGUMENT, "non-finite"),
            (table_rows.rows_message(TABLE, ids, good, np.array([0, -1])), grpc.StatusCode.INVALID_ARGUMENT,
             "negative"),
        ]
        for seq, (message, code, words) in enumerate(cases):
            err = _raw_push(c, 0, seq, message)
            assert err.code() == code and words in err.details(), err.details()
        after = c.client.pull_rows({TABLE: ids})[TABLE]
        np.testing.assert_array_equal(after[0], before[TABLE][0])
        assert after[1].tolist() == [0, 0] and c.client.stats()[0].version == 0
        with pytest.raises(grpc.RpcError) as err:  # a pull of an unknown table
            c.client._stubs[0].PullOne(ps_pb2.PullRequest(worker=0, tables=[table_rows.ids_message("nope", ids)]),
                                       timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_tables_are_refused_with_sync_mode():
    cfg = _cfg(1)
    cfg.cluster.mode = "sync"
    server = ShardServer(cfg, 0)
    address = f"127.0.0.1:{server.start()}"
    client = PSClient([address], place({"w": ((3, 4), "float32")}, 1), cfg, tables={TABLE: DIM})
    try:
        with pytest.raises(grpc.RpcError) as err:
            client.init(DENSE)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "async or ssp" in err.value.details()
    finally:
        client.close()
        server.stop(0)


def _loss(table, x):
    """A loss whose gradient depends on the rows (so optimizer state matters)."""
    h = ops.gather(table, x)
    return ops.sum(h * h) * 0.5 + ops.sum(h) * 0.25


def _batches(steps: int, vocab: int):
    rng = np.random.default_rng(1)
    return [rng.integers(0, vocab, size=(6, 3)) for _ in range(steps)]  # duplicates within a batch


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "ftrl"])
def test_row_wise_training_equals_dense_training_bit_for_bit(optimizer):
    """The same batches through (a) an id-keyed table, rows pulled by id, and (b) a dense
    variable holding the same first rows, gradients as SparseRows: identical rows."""
    vocab, steps = 40, 12
    first = initial_rows(SEED, TABLE, np.arange(vocab), DIM, 0.05)
    batches = _batches(steps, vocab)

    with Cluster(2, optimizer=optimizer) as c:  # (a) rows by id, the next batch's rows pulled with the push
        ids, local = localize(batches[0])
        params, versions, rows = c.client.pull_with_rows({TABLE: ids}, worker=0)
        for t in range(steps):
            with GradientTape() as tape:
                watched = tape.watch(rows[TABLE][0])
                loss = _loss(watched, local)
            touched, g = rows_of(tape.gradient(loss, {"t": watched})["t"], ids)
            read = rows[TABLE][1][np.searchsorted(ids, touched)]
            ids_next, local_next = localize(batches[(t + 1) % steps])
            _, params, versions, rows = c.client.push_pull_rows(
                {}, versions, 0, t, table_grads={TABLE: TableGrad(touched, g, read)}, table_ids={TABLE: ids_next})
            ids, local = ids_next, local_next
        table_path = c.client.pull_rows({TABLE: np.arange(vocab)})[TABLE][0]

    dense = {"w": DENSE["w"], "emb": first}
    with Cluster(2, params=dense, tables={}, optimizer=optimizer) as c:  # (b) a dense variable
        params, versions = c.client.pull(worker=0)
        for t in range(steps):
            with GradientTape() as tape:
                watched = tape.watch(params["emb"])
                loss = _loss(watched, batches[t])
            grad = tape.gradient(loss, {"emb": watched})["emb"]
            assert isinstance(grad, SparseRows)
            _, params, versions = c.client.push_pull({"emb": grad}, versions, 0, t)
        dense_path = params["emb"]
    assert not np.array_equal(table_path, first)
    np.testing.assert_array_equal(table_path, dense_path)


def _train_some(c: Cluster, steps: int, rng) -> None:
    """A few push-pulls of random rows (ids with duplicates across steps: hot and cold rows)."""
    ids = np.unique(rng.integers(0, 300, 40))
    _, versions, rows = c.client.pull_with_rows({TABLE: ids}, worker=0)
    seq = max(last for _, last in c.client.register(0)) + 1
    for t in range(steps):
        g = rng.standard_normal((len(ids), DIM)).astype(np.float32)
        nxt = np.unique(rng.integers(0, 300, 40))
        _, _, versions, rows = c.client.push_pull_rows({}, versions, 0, seq + t,
                                                       table_grads={TABLE: TableGrad(ids, g, rows[TABLE][1])},
                                                       table_ids={TABLE: nxt})
        ids = nxt


def _table_state(c: Cluster) -> dict:
    """{id: (row, version, slots)} over every shard, through SnapshotTable."""
    out = {}
    for i in range(len(c.servers)):
        _, chunks = c.client.snapshot_table(i, TABLE, chunk_rows=7)  # small chunks: several per shard
        for ch in chunks:
            for k, id_ in enumerate(ch["ids"].tolist()):
                out[id_] = (ch["values"][k].tolist(), int(ch["versions"][k]),
                            {s: v[k].tolist() for s, v in sorted(ch["slots"].items())})
    return out


def test_table_checkpoint_restores_into_another_shard_count(tmp_path, rng):
    """Rows, versions and Adagrad slots saved in chunks by the chief's checkpoint, verified on
    load, restored from 2 shards into 3 (rows re-placed by hash) and back into 2."""
    from asyncps.chief import checkpoint as ckpt
    from asyncps.chief.checkpointer import Checkpointer
    from asyncps.runs import MetricsLog

    with Cluster(2, optimizer="adagrad") as c:
        c.cfg.checkpoint.every_steps = 1
        _train_some(c, 6, rng)
        saved = _table_state(c)
        saver = Checkpointer(c.cfg, tmp_path, c.client, c.client.placement, MetricsLog(tmp_path / "m.jsonl"))
        saver.save(1.0)
        (folder,) = ckpt.list_checkpoints(tmp_path / "checkpoints")
        checkpoint = ckpt.load(folder)
        assert [t["name"] for t in checkpoint.tables] == [TABLE]
        assert sum(p["rows"] for p in checkpoint.tables[0]["parts"]) == len(saved)
        assert not list((tmp_path / "checkpoints").glob(".ckpt-*"))  # the staging folder is gone
    from asyncps.cli.inspect import describe  # `asyncps inspect`: rows, memory, hottest ids

    shown = describe(checkpoint)["tables"][TABLE]
    assert shown["rows"] == len(saved) and shown["memory_bytes"] > len(saved) * DIM * 4
    assert shown["hottest"][0]["updates"] == max(v for _, v, _ in saved.values())
    for shards in (3, 2):
        with Cluster(shards, optimizer="adagrad") as c:
            c.cfg.checkpoint.every_steps = 1
            Checkpointer(c.cfg, tmp_path, c.client, c.client.placement, MetricsLog(tmp_path / "m.jsonl")
                         ).restore(checkpoint)
            assert _table_state(c) == saved
            owners = table_owners(np.array(sorted(saved)), shards)
            assert [s.tables[0].rows for s in c.client.stats()] == np.bincount(owners, minlength=shards).tolist()
            _train_some(c, 2, rng)  # training goes on from the restored rows
    # a corrupted chunk makes the checkpoint invalid, like any file
    victim = next(folder.glob("table-*.npz"))
    victim.write_bytes(victim.read_bytes()[:-3] + b"xyz")
    with pytest.raises(ckpt.CheckpointError, match="sha256"):
        ckpt.load(folder)


def test_restore_table_refuses_rows_another_shard_owns():
    with Cluster(2) as c:
        ids = np.arange(50, dtype=np.int64)
        theirs = ids[table_owners(ids, 2) == 1]
        chunk = {"ids": theirs, "versions": np.zeros(len(theirs), np.int64),
                 "values": np.zeros((len(theirs), DIM), np.float32), "slots": {}}
        with pytest.raises(grpc.RpcError) as err:
            c.client.restore_table(0, TABLE, DIM, 0, [chunk])
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "does not own" in err.value.details()


# ----------------------------------------------------------------------------------------------
# End to end: `asyncps launch` of the CTR model, a shard killed mid-run


@pytest.mark.slow
def test_launch_ctr_reports_row_staleness_and_restores_tables_of_a_killed_shard(tmp_path):
    """configs/ctr.yaml on 2 shards x 2 workers (shared memory where the host has it): a shard
    killed after a checkpoint comes back empty, every shard restores its variables AND its table
    rows from the checkpoint, and the run finishes with per-row staleness in its report."""
    import contextlib
    import json
    import os
    import signal
    import subprocess
    import sys

    from cli_runner import CONFIGS, REPO, report
    from asyncps.chief import checkpoint as ckpt

    args = [CONFIGS / "ctr.yaml", f"run_dir={tmp_path}", "cluster.ps=2", "cluster.workers=2", "train.max_steps=1500",
            "train.eval_every=500", "checkpoint.every_steps=300", "data.num_train=50000", "data.num_test=5000",
            "delay.kind=constant", "delay.mean_ms=5", "cluster.heartbeat_interval=0.5",
            "cluster.heartbeat_timeout=60"]  # patient: the workers are frozen through the shard's restore
    out = (tmp_path / "launch.out").open("ab") if tmp_path.mkdir(exist_ok=True) is None else None
    proc = subprocess.Popen([sys.executable, "-m", "asyncps.cli", "launch", *map(str, args)], stdout=out,
                            stderr=subprocess.STDOUT, cwd=REPO)
    try:
        saved = wait_until(proc, "a checkpoint", lambda: next(
            (r for r in metrics_rows(tmp_path) if r["kind"] == "checkpoint" and r["step"] >= 300), None))
        folder = ckpt.load(saved["path"])
        assert folder.tables and sum(p["rows"] for p in folder.tables[0]["parts"]) > 0
        pids = json.loads((tmp_path / "pids.json").read_text())
        workers = [pids[f"worker{i}"]["pid"] for i in (0, 1)]
        for pid in workers:  # no step until the restore: the run cannot end first
            os.kill(pid, signal.SIGSTOP)
        try:
            os.kill(pids["ps1"]["pid"], signal.SIGKILL)
            wait_until(proc, "the restore", lambda: any(r["kind"] == "failure" and r["role"] == "ps"
                                                        for r in metrics_rows(tmp_path)))
        finally:
            for pid in workers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
        assert proc.wait(timeout=300) == 0, (tmp_path / "launch.out").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        out.close()
    r = report(tmp_path)
    (failure,) = [f for f in r["failures"] if f["role"] == "ps"]
    assert failure["restored_step"] >= 300 and r["steps"] >= 1500
    table = r["tables"]["ctr.embed"]
    assert table["rows_per_shard"]["1"] > 0 and table["row_staleness"]["count"] > 0
    hc = table["hot_vs_cold"]
    assert hc["hot_mean"] > hc["cold_mean"]  # hot rows are staler than cold ones
    assert r["final"]["auc"] > 0.6
    evals = [row for row in metrics_rows(tmp_path) if row["kind"] == "eval"]
    assert evals and all("row_staleness" in row for row in evals)
    printed = (tmp_path / "launch.out").read_text()
    assert "per-row staleness" in printed
    assert "reference" not in r and "planted model" not in printed  # data ctr has no planted model to show


def test_bytes_per_step_follow_the_unique_ids_not_the_table():
    """One push-pull of 10 rows costs the same bytes with a table of 10 rows or of 20,010."""
    from asyncps.protos import codec

    def step_bytes(c: Cluster, ids, seq: int) -> int:
        _, versions, rows = c.client.pull_with_rows({TABLE: ids}, worker=0)
        pushed = c.client._rows.split_grads({TABLE: TableGrad(ids, np.ones((len(ids), DIM), np.float32), rows[TABLE][1])})
        asked, _ = c.client._rows.split_ids({TABLE: ids})
        total = 0
        for i, stub in enumerate(c.client._stubs):
            header = ps_pb2.PushHeader(worker=0, seq=seq, read_version=versions[i], table_grads=pushed[i],
                                       table_pull=asked[i])
            request = codec.encode_message({}, header.SerializeToString())
            total += len(request) + len(stub.PushPullOne(request, timeout=10))  # raw wire bytes both ways
        return total

    ids = np.arange(10, dtype=np.int64)
    with Cluster(2) as c:
        small = step_bytes(c, ids, 0)
        c.client.pull_with_rows({TABLE: np.arange(100, 20100, dtype=np.int64)}, worker=0)  # 20,000 more rows
        assert sum(s.tables[0].rows for s in c.client.stats()) == 20010
        large = step_bytes(c, ids, 1)
        assert abs(large - small) <= 32  # varints of versions and seq (a zero field is not sent at all)
        assert large < 10 * (8 + 8 + 4 * DIM) * 3 + 2 * DENSE["w"].nbytes + 400


def test_workers_and_chief_refuse_what_tables_do_not_train_with():
    from types import SimpleNamespace

    from asyncps.errors import UserError
    from asyncps.worker.main import id_tables_of

    model = SimpleNamespace(name="ctr", id_tables={TABLE: DIM})
    assert id_tables_of(model, _cfg(2)) == {TABLE: DIM}
    assert id_tables_of(SimpleNamespace(name="mlp"), _cfg(2)) == {}
    for key, value in (("mode", "sync"), ("mode", "softsync")):
        cfg = _cfg(2)
        setattr(cfg.cluster, key, value)
        with pytest.raises(UserError, match="async or ssp"):
            id_tables_of(model, cfg)
    cfg = _cfg(2)
    cfg.optimizer.staleness_policy.name = "lr_scale"
    with pytest.raises(UserError, match="staleness_policy"):
        id_tables_of(model, cfg)
    with pytest.raises(UserError, match="one table per model"):
        id_tables_of(SimpleNamespace(name="two", id_tables={"a": 1, "b": 2}), _cfg(2))


def test_table_capacity_evicts_and_counts_on_the_shards():
    from asyncps.chief.report import tables_section
    from asyncps.config import from_dict
    from asyncps.errors import ConfigError

    with pytest.raises(ConfigError, match="table_capacity"):
        from_dict({"cluster": {"table_capacity": 0}})
    c = Cluster.__new__(Cluster)
    cfg = _cfg(1)
    cfg.cluster.table_capacity, cfg.cluster.table_eviction = 5, "lfu"
    c.cfg, c.servers = cfg, [ShardServer(cfg, 0)]
    c.client = PSClient([f"127.0.0.1:{c.servers[0].start()}"], place({"w": ((3, 4), "float32")}, 1), cfg,
                        tables={TABLE: DIM})
    with c:
        c.client.init(DENSE)
        c.client.register(0)
        c.client.pull_with_rows({TABLE: np.arange(5, dtype=np.int64)}, worker=0)
        c.client.pull_with_rows({TABLE: np.arange(5, 8, dtype=np.int64)}, worker=0)  # 3 more: 3 evicted
        (stats,) = c.client.stats()
        assert stats.tables[0].rows == 5 and stats.tables[0].evicted == 3
        assert tables_section([stats])["tables"][TABLE]["evicted"] == 3


def test_table_rows_of_a_streamed_push_are_charged_to_the_byte_budget():
    """Rows ride in the push header: a streamed push whose rows do not fit the shard's budget for
    pushes in flight is refused (RESOURCE_EXHAUSTED, retried by workers), nothing applied."""
    from asyncps.protos import codec

    ids = np.arange(1, 2001, dtype=np.int64)
    rows = np.ones((len(ids), DIM), np.float32)
    with Cluster(1) as c:
        c.servers[0].servicer.budget._fixed = 8 * rows.nbytes  # room for the header (ids, rows, versions) twice
        header = ps_pb2.PushHeader(worker=0, seq=1, read_version=0,
                                   table_grads=[table_rows.rows_message(TABLE, ids, rows, np.zeros(len(ids)))])
        first = codec.encode_message({}, header.SerializeToString())
        assert c.client._stubs[0].Push(iter([first]), timeout=10).version == 1  # fits: applied
        c.servers[0].servicer.budget._fixed = rows.nbytes  # now it does not
        header.seq = 2
        with pytest.raises(grpc.RpcError) as err:
            c.client._stubs[0].Push(iter([codec.encode_message({}, header.SerializeToString())]), timeout=10)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "no room" in err.value.details()
        assert c.client.stats()[0].version == 1 and c.servers[0].servicer.budget.in_use == 0
