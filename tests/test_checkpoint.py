"""Checkpoints: files, manifest, checksums, rotation, and restore into 1, 2 or 3 shards."""
import json

import numpy as np
import pytest

from asyncps.chief import checkpoint as ckpt
from asyncps.config import from_dict
from asyncps.shard_types import Snapshot
from asyncps.partition import place
from asyncps.ps.server import ShardServer
from asyncps.ps_client import PSClient

SPECS = {"emb": ((600, 512), "float32"), "w": ((512, 10), "float32"), "b": ((10,), "float32")}  # emb: split


def config(shards: int, optimizer: str = "adam"):
    return from_dict({"cluster": {"ps": shards, "workers": 1, "rpc_timeout": 10.0},
                      "optimizer": {"name": optimizer, "learning_rate": 0.01,
                                    "schedule": {"name": "exponential", "decay_steps": 2, "decay_rate": 0.5}}})


class Cluster:
    """`shards` real shard servers on free ports and a PSClient for them."""

    def __init__(self, shards: int):
        self.cfg = config(shards)
        self.servers = [ShardServer(self.cfg, i, port=0) for i in range(shards)]
        addresses = [f"127.0.0.1:{s.start()}" for s in self.servers]
        self.placement = place(SPECS, shards)
        self.client = PSClient(addresses, self.placement, self.cfg)

    def close(self):
        self.client.close()
        for s in self.servers:
            s.stop(grace=0)


@pytest.fixture
def clusters():
    made = []
    yield lambda n: made.append(Cluster(n)) or made[-1]
    for c in made:
        c.close()


def gradient(rng):
    return {n: rng.standard_normal(shape).astype(dtype) for n, (shape, dtype) in SPECS.items()}


def train(client, pushes: int, first_seq: int = 0, seed: int = 1):
    rng = np.random.default_rng(seed)
    _, versions = client.pull()
    for seq in range(first_seq, first_seq + pushes):
        _, _, versions = client.push_pull(gradient(rng), versions, 0, seq)


def state(client, placement):
    return ckpt.join_snapshots(client.snapshot(), placement)


def assert_same_state(a, b):
    (va, sa, ua), (vb, sb, ub) = a, b
    assert va.keys() == vb.keys() and ua == ub
    for name in va:
        assert va[name].tobytes() == vb[name].tobytes(), name
        assert sa[name].keys() == sb[name].keys() and sa[name]
        for slot in sa[name]:
            assert sa[name][slot].tobytes() == sb[name][slot].tobytes(), (name, slot)


def test_checkpoint_restored_into_1_2_3_shards_is_bit_identical(clusters, tmp_path):
    src = clusters(2)
    rng = np.random.default_rng(0)
    src.client.init({n: rng.standard_normal(shape).astype(dtype) for n, (shape, dtype) in SPECS.items()})
    src.client.register(0)
    train(src.client, 5)
    path = ckpt.write_checkpoint(tmp_path, src.client.snapshot(), src.placement, src.cfg.to_dict())
    saved = ckpt.load(path)
    assert saved.step == 5 and saved.versions == [5, 5]
    assert_same_state(saved.full_state(), state(src.client, src.placement))
    train(src.client, 3, first_seq=5, seed=2)  # the reference continues on the original shards
    expected_after = state(src.client, src.placement)
    for shards in (1, 2, 3):
        dst = clusters(shards)
        versions = dst.client.restore(saved.snapshots_for(dst.placement))
        assert versions == [5] * shards
        assert_same_state(state(dst.client, dst.placement), saved.full_state())
        assert dst.client.register(0) == [(5, 4)] * shards  # clock and last_seq continue
        train(dst.client, 3, first_seq=5, seed=2)  # schedule, slots and update counts continue exactly
        assert_same_state(state(dst.client, dst.placement), expected_after)


def fake_snapshots(step: int, shards: int = 2):
    placement = place(SPECS, shards)
    rng = np.random.default_rng(step)
    values = {n: rng.standard_normal(shape).astype(dtype) for n, (shape, dtype) in SPECS.items()}
    parts = placement.split(values)
    snaps = [Snapshot(version=step, values={k: np.ascontiguousarray(v) for k, v in p.items()},
                      slots={k: {"m": np.ones_like(v)} for k, v in p.items()}, updates={k: step for k in p},
                      last_seq={0: step - 1}, clocks={0: step}, optimizer="momentum") for p in parts]
    return snaps, placement


def write(folder, step):
    snaps, placement = fake_snapshots(step)
    return ckpt.write_checkpoint(folder, snaps, placement, {"name": "t"})


def test_layout_manifest_last_and_pointer(tmp_path):
    path = write(tmp_path, 1500)
    assert path.name == "ckpt-000001500"
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "shard-00000-of-00002.npz", "shard-00001-of-00002.npz"]
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["step"] == 1500 and manifest["versions"] == [1500, 1500]
    assert set(manifest["files"]) == {"shard-00000-of-00002.npz", "shard-00001-of-00002.npz"}
    assert all(len(f["sha256"]) == 64 for f in manifest["files"].values())
    assert manifest["placement"]["num_shards"] == 2 and manifest["config"] == {"name": "t"}
    with np.load(path / "shard-00000-of-00002.npz", allow_pickle=False) as z:
        assert any(k.startswith("slot/") and k.endswith("/m") for k in z.files)
    assert (tmp_path / "checkpoint").read_text().startswith('model_checkpoint_path: "ckpt-000001500"')


def test_corrupted_file_is_refused_and_the_previous_checkpoint_used(tmp_path):
    write(tmp_path, 100)
    newest = write(tmp_path, 200)
    shard = newest / "shard-00001-of-00002.npz"
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated
    warnings = []
    found = ckpt.latest_valid(tmp_path, warn=warnings.append)
    assert found.step == 100
    assert len(warnings) == 1 and "sha256 does not match" in warnings[0] and "shard-00001-of-00002.npz" in warnings[0]
    with pytest.raises(ckpt.CheckpointError, match="corrupted or truncated"):
        ckpt.resolve(newest, tmp_path)


def test_incomplete_checkpoints_are_ignored_and_cleaned_up_and_only_the_last_k_kept(tmp_path):
    for step in (10, 20, 30, 40):
        write(tmp_path, step)
    partial = tmp_path / "ckpt-000000050"
    partial.mkdir()
    (partial / "shard-00000-of-00002.npz").write_bytes(b"half")
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)][-1] == "ckpt-000000040"
    assert ckpt.latest_valid(tmp_path).step == 40
    removed = ckpt.cleanup(tmp_path, keep=2)
    assert sorted(p.name for p in removed) == ["ckpt-000000010", "ckpt-000000020", "ckpt-000000050"]
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["ckpt-000000030", "ckpt-000000040"]
    assert "ckpt-000000010" not in (tmp_path / "checkpoint").read_text()


def test_restore_into_a_model_with_other_variables_is_refused(tmp_path):
    saved = ckpt.load(write(tmp_path, 7))
    other = place({**SPECS, "extra": ((3,), "float32")}, 3)
    with pytest.raises(ckpt.CheckpointError, match="variables differ"):
        saved.snapshots_for(other)
