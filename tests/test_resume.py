"""Resume and checkpoint robustness (issue 12, items 1-5).

1. `--resume DIR` owns the run directory: a copied run resumes in the copy, never in the original.
2. The newest checkpoint that verifies is used, whatever the `checkpoint` pointer file says.
3. A damaged manifest is refused with one line and the previous checkpoint is used.
4. A checkpoint that cannot be written is one logged line and a count, never the end of the run.
5. `--resume` with a config that cannot continue the checkpoint exits 2 naming the keys, before
   anything starts.

Unit tests on chief/checkpoint.py, chief/checkpointer.py and the launcher's prepare_resume;
real shard servers on threads for item 4; one real `asyncps launch` (the copied run, item 1).
"""
from __future__ import annotations

import argparse
import errno
import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from cli_runner import CONFIGS, asyncps, report

from asyncps.chief import checkpoint as ckpt
from asyncps.chief.checkpointer import Checkpointer
from asyncps.cli import launch
from asyncps.config import load_config
from asyncps.errors import UserError
from asyncps.shard_types import Snapshot
from asyncps.ps.optim import make_optimizer
from asyncps.ps.server import ShardServer
from asyncps.runs import MetricsLog
from asyncps.worker.data import load_dataset
from asyncps.worker.models import build_model
from asyncps.ps_client import PSClient
from asyncps.worker.variables import initial_params, placement_for

LINEAR = CONFIGS / "linear_regression.yaml"
FAST = ["cluster.heartbeat_interval=0.5", "cluster.heartbeat_timeout=5", "train.log_every=20", "train.eval_every=200"]


# ----------------------------------------------------------------------------------------------
# A run directory as `asyncps launch` leaves it, made in-process (linear model, real checkpoints)


def linear_cfg(run_dir: Path, *overrides: str):
    return load_config(LINEAR, [f"run_dir={run_dir}", "checkpoint.every_steps=100", *overrides])


def linear_snapshots(cfg, step: int):
    """Shard snapshots of the linear model at `step` (w = 1.5: halfway to the target 2)."""
    data = load_dataset(cfg.data, context=cfg.model.context, seed=cfg.seed)
    params = initial_params(cfg, build_model(cfg.model, data.meta))
    params = {n: np.full_like(v, 1.5 if n.endswith(".w") else 0.0) for n, v in params.items()}
    placement = placement_for(params, cfg.cluster.ps)
    slot_names = make_optimizer(cfg.optimizer).slot_names
    snaps = [Snapshot(version=step, values=dict(part),
                      slots={n: {s: np.zeros_like(v) for s in slot_names} for n, v in part.items()},
                      updates={n: step for n in part}, last_seq={0: step // 2 - 1, 1: step // 2 - 1},
                      clocks={0: step // 2, 1: step // 2}, optimizer=cfg.optimizer.name)
             for part in placement.split(params)]
    return snaps, placement


def make_run(run_dir: Path, *overrides: str, steps=(100, 200), folder: str = "ckpts") -> Path:
    """config.yaml (run_dir absolute, as the launcher writes it; checkpoint.dir absolute too unless
    `folder` is "checkpoints", the default), metrics.jsonl with one worker failure and no `final`
    (the chief died), and checkpoints at `steps`."""
    run_dir = run_dir.resolve()
    run_dir.mkdir(parents=True)
    custom = [f"checkpoint.dir={run_dir / folder}"] if folder != "checkpoints" else []
    cfg = linear_cfg(run_dir, *custom, *overrides)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    rows = [{"kind": "start", "step": 0, "time": 0.0},
            {"kind": "failure", "step": 150, "time": 1.0, "role": "worker", "index": 1, "at_step": 150,
             "restored_step": 150, "steps_lost": 0, "wall_time": 1.0}]
    for step in steps:
        snaps, placement = linear_snapshots(cfg, step)
        ckpt.write_checkpoint(run_dir / folder, snaps, placement, cfg.to_dict(), {"seconds": step / 100, "pause_ms": 1.0})
        rows.append({"kind": "checkpoint", "step": step, "time": step / 100})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run_dir


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def resume_args(config: Path, *resume_and_overrides: str) -> tuple[argparse.Namespace, object]:
    """What `asyncps launch CONFIG --resume ...` gives prepare_resume (argparse puts everything
    after --resume into args.resume)."""
    args = argparse.Namespace(config=str(config), overrides=[], resume=list(resume_and_overrides), dry_run=False)
    launch.take_misplaced_override(args)
    cfg = load_config(args.config, args.overrides)
    launch.prepare_resume(cfg, args.resume)
    return args, cfg


# ----------------------------------------------------------------------------------------------
# 1. --resume DIR owns the run directory


def test_resume_of_a_copied_run_writes_into_the_copy(tmp_path):
    run_a = make_run(tmp_path / "A")
    run_b = tmp_path / "B"
    shutil.copytree(run_a, run_b, symlinks=True)
    _, cfg = resume_args(run_b / "config.yaml", str(run_b), "train.max_steps=6000")
    assert Path(cfg.run_dir) == run_b.resolve()
    assert Path(cfg.checkpoint.dir) == run_b.resolve() / "ckpts"  # re-rooted: it pointed inside A
    assert Path(cfg.checkpoint.resume).is_relative_to(run_b.resolve()) and cfg.train.max_steps == 6000
    # a ckpt-* folder or the checkpoints folder of the copy: the same run directory
    _, cfg = resume_args(run_b / "config.yaml", str(run_b / "ckpts" / "ckpt-000000100"))
    assert Path(cfg.run_dir) == run_b.resolve() and Path(cfg.checkpoint.resume).name == "ckpt-000000100"
    _, cfg = resume_args(LINEAR, str(run_b / "ckpts"))  # the original YAML: no run_dir, no checkpoint.dir
    assert Path(cfg.run_dir) == run_b.resolve()
    # --resume run_dir=B with B's config.yaml (run_dir and checkpoint.dir naming A)
    _, cfg = resume_args(run_b / "config.yaml", f"run_dir={run_b}")
    assert Path(cfg.run_dir) == run_b.resolve() and Path(cfg.checkpoint.dir) == run_b.resolve() / "ckpts"


def test_resume_dir_and_another_run_dir_is_refused(tmp_path):
    run_a = make_run(tmp_path / "A")
    with pytest.raises(UserError, match="run_dir"):
        resume_args(LINEAR, str(run_a), f"run_dir={tmp_path / 'elsewhere'}")
    _, cfg = resume_args(LINEAR, str(run_a), f"run_dir={run_a}")  # the same directory: fine
    assert Path(cfg.run_dir) == run_a


@pytest.mark.slow
def test_launch_resume_of_a_copy_leaves_the_original_untouched(tmp_path):
    """End to end: `cp -a A B; asyncps launch B/config.yaml --resume B train.max_steps=...`."""
    run_a = make_run(tmp_path / "A", folder="checkpoints")
    run_b = tmp_path / "B"
    shutil.copytree(run_a, run_b, symlinks=True)
    before = tree_digest(run_a)
    proc = asyncps("launch", run_b / "config.yaml", "--resume", run_b, "train.max_steps=400", *FAST, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert tree_digest(run_a) == before, "the original run was written to"
    r = report(run_b)
    assert r["resumed_from"] == 200 and r["steps"] >= 400
    roles = [f["role"] for f in r["failures"]]
    assert roles == ["worker", "chief"], r["failures"]  # the copy's history came along, then the dead chief
    written = [p.name for p in ckpt.list_checkpoints(run_b / "checkpoints")]
    assert written[-1] >= "ckpt-000000400", written
    assert yaml.safe_load((run_b / "config.yaml").read_text())["run_dir"] == str(run_b.resolve())


# ----------------------------------------------------------------------------------------------
# 2. The pointer is a hint


def fake(folder: Path, step: int) -> Path:
    cfg = linear_cfg(folder.parent)
    snaps, placement = linear_snapshots(cfg, step)
    return ckpt.write_checkpoint(folder, snaps, placement, cfg.to_dict())


def test_a_stale_pointer_does_not_beat_a_newer_valid_checkpoint(tmp_path):
    folder = tmp_path / "checkpoints"
    fake(folder, 938)
    fake(folder, 1597)
    (folder / "checkpoint").write_text('model_checkpoint_path: "ckpt-000000938"\n')  # crash before the pointer
    warnings = []
    assert ckpt.latest_valid(folder, warn=warnings.append).step == 1597 and not warnings
    assert ckpt.resolve("latest", folder).step == 1597
    assert ckpt.resolve(tmp_path, tmp_path / "unused").step == 1597  # a run folder
    (folder / "checkpoint").unlink()
    assert ckpt.resolve(folder, folder).step == 1597


# ----------------------------------------------------------------------------------------------
# 3. Damaged manifests


def _empty_list(m):
    return []


def _no_sha256(m):
    for meta in m["files"].values():
        del meta["sha256"]
    return m


def _sha254(m):
    for meta in m["files"].values():
        meta["sha254"] = meta.pop("sha256")
    return m


def _version_bit(m):
    m["shards"][0]["version"] ^= 1
    return m


def _versions_bit(m):
    m["versions"][0] ^= 4
    return m


def _step_bit(m):
    m["step"] ^= 2
    return m


def _config_bit(m):
    m["config"]["optimizer"]["learning_rate"] = 0.1000001
    return m


def _no_placement(m):
    del m["placement"]
    return m


def _string(m):
    return "manifest"


DAMAGES = [_empty_list, _no_sha256, _sha254, _version_bit, _versions_bit, _step_bit, _config_bit, _no_placement, _string]


@pytest.mark.parametrize("damage", DAMAGES, ids=lambda f: f.__name__.strip("_"))
def test_a_damaged_manifest_is_refused_and_the_previous_checkpoint_used(tmp_path, damage):
    fake(tmp_path, 100)
    newest = fake(tmp_path, 200)
    manifest = newest / "manifest.json"
    manifest.write_text(json.dumps(damage(json.loads(manifest.read_text())), indent=2))
    warnings = []
    found = ckpt.latest_valid(tmp_path, warn=warnings.append)
    assert found is not None and found.step == 100
    assert len(warnings) == 1 and "\n" not in warnings[0] and "manifest" in warnings[0], warnings
    assert "trying the previous one" in warnings[0]
    with pytest.raises(ckpt.CheckpointError, match="manifest"):
        ckpt.resolve(newest, tmp_path)


def test_a_flipped_bit_anywhere_in_the_manifest_is_detected(tmp_path):
    fake(tmp_path, 100)
    path = fake(tmp_path, 200) / "manifest.json"
    good = path.read_bytes()
    rng = np.random.default_rng(0)
    for pos in rng.choice(len(good), size=40, replace=False):
        bad = bytearray(good)
        bad[pos] ^= 1 << int(rng.integers(8))
        try:
            if json.loads(bytes(bad)) == json.loads(good):
                continue  # the same content (whitespace for whitespace, 1e-07 for 1E-07): harmless
        except ValueError:
            pass
        path.write_bytes(bytes(bad))
        assert ckpt.latest_valid(tmp_path, warn=lambda m: None).step == 100, (pos, bytes(bad[pos - 20:pos + 20]))
    path.write_bytes(good)
    assert ckpt.latest_valid(tmp_path).step == 200


def test_a_manifest_of_the_first_format_still_loads(tmp_path):
    path = fake(tmp_path, 300)
    m = json.loads((path / "manifest.json").read_text())
    m.pop(ckpt.MANIFEST_DIGEST)
    m["format"] = 1
    (path / "manifest.json").write_text(json.dumps(m, indent=2))
    loaded = ckpt.load(path)
    assert loaded.step == 300 and loaded.full_state()[0]["linear.w"][0, 0] == 1.5


# ----------------------------------------------------------------------------------------------
# 4. A checkpoint that cannot be written


class Shards:
    """Real shard servers on threads (linear model) and a PSClient for them."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.servers = [ShardServer(cfg, i, port=0) for i in range(cfg.cluster.ps)]
        self.client_addresses = [f"127.0.0.1:{s.start()}" for s in self.servers]
        snaps, self.placement = linear_snapshots(cfg, 0)
        self.client = PSClient(self.client_addresses, self.placement, cfg)
        self.client.init(self.placement.join([s.values for s in snaps]))
        self.client.register(0)
        self.seq = 0

    def push(self, n: int = 1):
        _, versions = self.client.pull()
        for _ in range(n):
            grads = {"linear.w": np.ones((1, 1), np.float32), "linear.b": np.ones((1,), np.float32)}
            _, _, versions = self.client.push_pull(grads, versions, 0, self.seq)
            self.seq += 1
        return versions

    def close(self):
        self.client.close()
        for s in self.servers:
            s.stop(grace=0)


@pytest.fixture
def shards(tmp_path):
    made = []

    def start(*overrides):
        made.append(Shards(linear_cfg(tmp_path, "cluster.ps=2", "cluster.rpc_timeout=5", "checkpoint.keep=2", *overrides)))
        return made[-1]

    yield start
    for s in made:
        s.close()


def enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_checkpoint_that_cannot_be_written_is_logged_counted_and_retried(tmp_path, shards, monkeypatch, caplog):
    cluster = shards()
    log = MetricsLog(tmp_path / "metrics.jsonl")
    saver = Checkpointer(cluster.cfg, tmp_path, cluster.client, cluster.placement, log)
    cluster.push(3)
    good = saver.save(1.0)
    assert good["kind"] == "checkpoint" and good["step"] == 3
    cluster.push(2)
    with monkeypatch.context() as m:
        m.setattr(ckpt, "atomic_save_npz", enospc)
        row = saver.save(2.0)  # periodic: must not raise
        assert row["kind"] == "checkpoint_failed" and "No space left" in row["error"]
        assert "\n" not in row["message"] and "ckpt-000000003" in row["message"]  # what `launch` shows
        final = saver.save(3.0, already_paused=False)
        assert final["kind"] == "checkpoint_failed"
    out = [r.getMessage() for r in caplog.records if "checkpoint" in r.getMessage()]
    assert len(out) == 2 and all("No space left on device" in line for line in out), out
    assert cluster.push(1) == [6, 6]  # the shards were resumed: a push goes through
    assert not saver.due(6) and saver.due(100)  # retried at the next interval, not at every poll
    assert ckpt.latest_valid(saver.folder).step == 3  # the last good checkpoint stands
    assert sorted(p.name for p in saver.folder.iterdir()) == ["checkpoint", "ckpt-000000003"]  # no leftovers
    summary = saver.summary()
    assert summary["written"] == 1 and summary["failed"] == 2 and "No space left" in summary["last_error"]
    assert saver.save(4.0)["kind"] == "checkpoint" and saver.summary()["written"] == 2
    log.close()


def test_a_failed_rewrite_of_the_same_step_keeps_the_checkpoint_of_that_step(tmp_path, shards, monkeypatch):
    """The final checkpoint is often at the step of the last periodic one: it replaces it only
    once it is complete."""
    cluster = shards()
    saver = Checkpointer(cluster.cfg, tmp_path, cluster.client, cluster.placement, MetricsLog(tmp_path / "m.jsonl"))
    cluster.push(2)
    saver.save(1.0)
    calls = []

    def second_file_fails(path, arrays):
        calls.append(path)
        if len(calls) == 2:
            enospc()
        return real(path, arrays)

    real = ckpt.atomic_save_npz
    monkeypatch.setattr(ckpt, "atomic_save_npz", second_file_fails)
    cluster.client.pause()
    assert saver.save(2.0, already_paused=True)["kind"] == "checkpoint_failed"
    cluster.client.resume()
    assert ckpt.latest_valid(saver.folder).step == 2
    assert [p.name for p in saver.folder.iterdir() if p.name.startswith(".")] == []


def test_shards_are_resumed_when_the_snapshot_fails_midway(tmp_path):
    calls = []

    class Client:
        def pause(self):
            calls.append("pause")
            raise OSError("pause failed on shard 1")  # shard 0 may be paused already

        def resume(self):
            calls.append("resume")

        def snapshot(self):
            calls.append("snapshot")

    cfg = linear_cfg(tmp_path)
    saver = Checkpointer(cfg, tmp_path, Client(), None, MetricsLog(tmp_path / "m.jsonl"))
    with pytest.raises(OSError):
        saver.save(1.0)
    assert calls == ["pause", "resume"] and saver.summary()["failed"] == 1


def test_the_chief_trains_on_and_reports_when_no_checkpoint_can_be_written(tmp_path, monkeypatch):
    """The chief in-process with a real shard on a thread: every write fails with ENOSPC; the
    periodic checkpoint and the final one are counted and the run ends normally."""
    import threading

    from asyncps.chief.main import ChiefRun
    from asyncps.cluster import ClusterSpec

    run_dir = tmp_path / "run"
    cfg = linear_cfg(run_dir, "cluster.ps=1", "cluster.workers=1", "train.max_steps=6", "checkpoint.every_steps=2",
                     "cluster.rpc_timeout=5", "train.eval_every=0", "cluster.start_barrier=false")
    server = ShardServer(cfg, 0, port=0)
    address = f"127.0.0.1:{server.start()}"
    monkeypatch.setattr(ckpt, "atomic_save_npz", enospc)
    run = ChiefRun(cfg, ClusterSpec(chief="127.0.0.1:0", ps=(address,), workers=1))
    client = None
    try:
        run.start()
        client = PSClient([address], run.placement, cfg)
        client.register(0)
        _, versions = client.pull()
        grads = {"linear.w": np.ones((1, 1), np.float32), "linear.b": np.ones((1,), np.float32)}
        for seq in range(3):
            _, _, versions = client.push_pull(grads, versions, 0, seq)
        trainer = threading.Thread(target=run.train, daemon=True)
        trainer.start()
        metrics = run_dir / "metrics.jsonl"
        deadline = time.monotonic() + 60
        while '"checkpoint_failed"' not in metrics.read_text():  # the periodic one at step >= 2
            assert trainer.is_alive() and time.monotonic() < deadline, metrics.read_text()[-2000:]
            time.sleep(0.02)
        for seq in range(3, 6):
            _, _, versions = client.push_pull(grads, versions, 0, seq)
        trainer.join(60)
        assert not trainer.is_alive()
        run.finish()
    finally:
        if client is not None:
            client.close()
        run.close()
        server.stop(grace=0)
    r = report(run_dir)
    assert r["steps"] == 6
    c = r["checkpoints"]
    assert c["written"] == 0 and c["failed"] == 2 and "No space left on device" in c["last_error"], c
    assert not any(p.name.startswith(".ckpt") for p in (run_dir / "checkpoints").glob("*"))


# ----------------------------------------------------------------------------------------------
# 5. --resume with a config that cannot continue the checkpoint


def launch_main(*argv: str) -> int:
    from asyncps.cli.main import main

    return main(["launch", *map(str, argv)])


def test_resume_with_another_optimizer_exits_2_naming_the_keys_before_anything_starts(tmp_path, capsys):
    run = make_run(tmp_path / "adam", "optimizer.name=adam")
    assert launch_main(LINEAR, "--resume", run) == 2  # the YAML says sgd
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "optimizer.name" in err[0] and "'adam'" in err[0] and "'sgd'" in err[0], err
    assert not (run / "chief.log").exists() and not (run / "pids.json").exists()


@pytest.mark.parametrize("overrides, keys", [
    (["model.name=softmax"], ["model.name"]),
    (["train.frozen=[linear.b]"], ["train.frozen"]),
    (["cluster.mode=sync"], ["cluster.mode"]),
    (["cluster.workers=1"], ["cluster.workers"]),  # the checkpoint has counters of worker 1
    (["optimizer.name=rmsprop"], ["optimizer.name"]),
])
def test_keys_that_must_match(tmp_path, overrides, keys):
    run = make_run(tmp_path / "run")
    with pytest.raises(UserError) as info:
        resume_args(run / "config.yaml", str(run), *overrides)
    message = str(info.value)
    assert "\n" not in message and all(k in message for k in keys), message


def test_slot_defining_hyperparameters_must_match(tmp_path):
    run = make_run(tmp_path / "run", "optimizer.name=rmsprop", "optimizer.rmsprop_momentum=0.9")
    with pytest.raises(UserError, match="optimizer.rmsprop_momentum"):
        resume_args(run / "config.yaml", str(run), "optimizer.rmsprop_momentum=0")
    resume_args(run / "config.yaml", str(run), "optimizer.rmsprop_momentum=0.5")  # still has the slot


def test_keys_that_may_change(tmp_path):
    run = make_run(tmp_path / "run")
    _, cfg = resume_args(run / "config.yaml", str(run), "train.max_steps=9000", "train.max_seconds=60",
                         "train.eval_every=7", "train.log_every=3", "optimizer.learning_rate=0.01",
                         "cluster.workers=4", "cluster.ps=3", "cluster.restart_policy.chief=on_failure",
                         "telemetry.every_seconds=1", "train.batch_size=8", "checkpoint.every_steps=50")
    assert cfg.train.max_steps == 9000 and cfg.cluster.ps == 3


def test_resume_of_a_user_model_compares_all_its_options():
    from asyncps.chief.checkpoint import config_mismatches

    saved = {"config": {"model": {"name": "my_model.model:ResidualMLP", "width": 64, "blocks": 2}}}
    same = {"model": {"name": "my_model.model:ResidualMLP", "width": 64, "blocks": 2}}
    wider = {"model": {"name": "my_model.model:ResidualMLP", "width": 128, "blocks": 2}}
    assert config_mismatches(saved, same) == []
    (problem,) = config_mismatches(saved, wider)
    assert problem.startswith("model.width 64 -> 128")


def test_resume_from_an_older_checkpoint_sets_the_newer_ones_aside(tmp_path):
    """Left in place, the abandoned timeline's newer checkpoints would be 'latest' for a restarted
    chief or a shard repair, and pruning would delete the checkpoint resumed from first."""
    run = make_run(tmp_path / "A", steps=(100, 200, 300))
    _, cfg = resume_args(run / "config.yaml", str(run / "ckpts" / "ckpt-000000100"))
    assert len(ckpt.list_checkpoints(run / "ckpts")) == 3  # prepare_resume (and --dry-run) move nothing
    launch.set_aside_newer(ckpt.resolve(cfg.checkpoint.resume, run / "ckpts"), run / "ckpts")
    assert [p.name for p in ckpt.list_checkpoints(run / "ckpts")] == ["ckpt-000000100"]
    (aside,) = (run / "ckpts").glob("abandoned-*")
    assert sorted(p.name for p in aside.iterdir()) == ["ckpt-000000200", "ckpt-000000300"]  # moved, not deleted
    assert ckpt.latest_valid(run / "ckpts").step == 100


def test_a_relative_checkpoint_dir_of_a_copied_run_is_rerooted(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_a = make_run(tmp_path / "A", "checkpoint.dir=A/ckpts", folder="ckpts")
    config = yaml.safe_load((run_a / "config.yaml").read_text())
    config["checkpoint"]["dir"] = "A/ckpts"  # as a user would write it, relative to the cwd
    (run_a / "config.yaml").write_text(yaml.safe_dump(config))
    shutil.copytree(run_a, tmp_path / "B")
    _, cfg = resume_args(tmp_path / "B" / "config.yaml", "B")
    assert Path(cfg.checkpoint.dir) == (tmp_path / "B" / "ckpts").resolve()


def test_a_deeply_nested_manifest_is_refused_not_a_crash(tmp_path):
    run = make_run(tmp_path / "A", steps=(100, 200))
    (run / "ckpts" / "ckpt-000000200" / ckpt.MANIFEST).write_text("[" * 100_000 + "]" * 100_000)
    assert ckpt.latest_valid(run / "ckpts").step == 100


@pytest.mark.parametrize("left", [("old",), ("tmp", "old")])
def test_a_crash_while_replacing_a_checkpoint_loses_nothing(tmp_path, left):
    """Between the two renames of a same-step replacement: no ckpt-<step>, a complete `.tmp` and
    the `.old`. The newest complete one is put back before leftovers are cleaned."""
    run = make_run(tmp_path / "A", steps=(100, 200))
    folder = run / "ckpts"
    final = folder / "ckpt-000000200"
    if "tmp" in left:
        shutil.copytree(final, folder / ".ckpt-000000200.tmp-4242")
    final.rename(folder / ".ckpt-000000200.old-4242")
    ckpt.cleanup(folder, keep=1)
    assert [p.name for p in ckpt.list_checkpoints(folder)] == ["ckpt-000000200"]
    assert ckpt.latest_valid(folder).step == 200 and not list(folder.glob(".ckpt-*"))
