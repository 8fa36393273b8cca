"""`asyncps compose`, `asyncps health`, and the image: rendered files checked always, Docker runs where possible.

Without Docker: the rendered compose file is checked structurally (services, TF_CONFIG,
healthchecks, depends_on, replicas, volumes), the checked-in deploy/docker-compose.yml must equal
a fresh render, and `asyncps health` is run against a gRPC health server started here. Where a
compose tool is installed, `compose config` validates the file too.

With a Docker engine (marked slow; ASYNCPS_DOCKER_TESTS=0 skips them): the image is built by
deploy/build-image.sh (the base image only when missing, from Debian packages with debootstrap:
no registry needed; `apt-get install debootstrap` first, as the README says), then real
containers run: the image's entrypoint, shards becoming healthy and coming back after a crash,
the MNIST cache built once on a shared volume with no network, and a whole cluster training MNIST
while a worker and a shard are killed, over shared memory (`--shm`; the handshakes, also after
both restarts, are checked in the containers' logs). Where they cannot run, they are skipped with one line
(`pytest -ra`, the default here) saying why: no engine, no compose tool, no debootstrap.
"""
from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import time
import uuid
from concurrent import futures
from pathlib import Path

import pytest
import yaml

from asyncps.cli import compose
from asyncps.cli.health import check_health
from asyncps.cli.main import main
from asyncps.cluster import parse_tf_config
from asyncps.config import load_config
from asyncps.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "mnist_softmax.yaml"
CHECKED_IN = REPO / "deploy" / "docker-compose.yml"


def render(overrides: tuple[str, ...] = (), config: Path = DEFAULT_CONFIG) -> dict:
    cfg = load_config(config, overrides)
    return compose.render(cfg, compose.config_source(config, REPO / "deploy"), overrides)


def tf_config(service: dict):
    return parse_tf_config(service["environment"]["TF_CONFIG"], workers_default=-1)


# --- The rendered file, without Docker. ------------------------------------------------------

def test_services_are_one_per_shard_plus_chief_and_a_scaled_worker():
    doc = render(("cluster.ps=3", "cluster.workers=5"))
    assert list(doc["services"]) == ["ps0", "ps1", "ps2", "chief", "worker"]
    assert doc["services"]["worker"]["deploy"] == {"replicas": 5}
    assert set(doc["volumes"]) == {"runs", "cache"}


def test_tf_config_names_services_and_gives_each_shard_its_own_index():
    services = render(("cluster.ps=3",))["services"]
    specs = {name: tf_config(s) for name, s in services.items()}
    for spec in specs.values():
        assert spec.chief == "chief:2222"
        assert spec.ps == ("ps0:2222", "ps1:2222", "ps2:2222")
    shard_indices = [specs[f"ps{i}"].task_index for i in range(3)]
    assert shard_indices == [0, 1, 2]
    assert [(specs[n].task_type, specs[n].task_index) for n in ("chief", "worker")] == [("chief", 0), ("worker", 0)]


def test_servers_have_grpc_healthchecks_and_start_in_order():
    services = render()["services"]
    for name in ("ps0", "ps1", "chief"):
        assert services[name]["healthcheck"]["test"] == ["CMD", "asyncps", "health", "127.0.0.1:2222"]
    assert "healthcheck" not in services["worker"]  # workers serve nothing
    healthy = {"condition": "service_healthy"}
    assert services["chief"]["depends_on"] == {"ps0": healthy, "ps1": healthy}
    assert services["worker"]["depends_on"] == {"ps0": healthy, "ps1": healthy, "chief": healthy}
    assert "depends_on" not in services["ps0"]


def test_restart_policies_volumes_and_pinned_overrides():
    services = render(("optimizer.learning_rate=0.05", "run_dir=/somewhere/else", "cluster.workers=3"))["services"]
    assert [services[n]["restart"] for n in ("ps0", "chief", "worker")] == ["on-failure:3", "no", "on-failure:3"]
    for name, service in services.items():
        role, config_path, *overrides = service["command"]
        assert role == name.rstrip("0123456789") and config_path == compose.CONFIG_MOUNT
        assert overrides == ["optimizer.learning_rate=0.05", "cluster.ps=2", "cluster.workers=3",
                             "run_dir=/runs/else", "data.cache_dir=/cache"]
        assert service["volumes"][:2] == [f"../configs/mnist_softmax.yaml:{compose.CONFIG_MOUNT}:ro", "runs:/runs"]
        assert ("cache:/cache" in service["volumes"]) == (role != "ps")


def test_containers_load_the_same_config_as_the_host():
    """The command line in each service, applied to the mounted file, gives the host's config
    with only the pinned keys changed."""
    overrides = ("optimizer.learning_rate=0.05",)
    host = load_config(DEFAULT_CONFIG, overrides)
    _, _, *args = render(overrides)["services"]["worker"]["command"]
    inside = load_config(DEFAULT_CONFIG, args)
    assert inside.run_dir == "/runs/mnist_softmax" and inside.data.cache_dir == "/cache"
    inside.run_dir, inside.data.cache_dir = host.run_dir, host.data.cache_dir
    assert inside == host


def test_checked_in_compose_file_is_the_current_render():
    cfg = load_config(DEFAULT_CONFIG)
    fresh = compose.render_text(cfg, compose.config_source(DEFAULT_CONFIG, CHECKED_IN.parent))
    assert CHECKED_IN.read_text() == fresh, (
        "deploy/docker-compose.yml is stale: run `asyncps compose configs/mnist_softmax.yaml -o deploy/docker-compose.yml`")


def test_cli_writes_a_file_whose_config_path_is_relative_to_it(tmp_path, capsys):
    out = tmp_path / "sub" / "dc.yml"
    assert main(["compose", str(DEFAULT_CONFIG), "cluster.workers=4", "-o", str(out), "--image", "img:1"]) == 0
    doc = yaml.safe_load(out.read_text())
    source = doc["services"]["ps0"]["volumes"][0].split(":")[0]
    assert (out.parent / source).resolve() == DEFAULT_CONFIG
    assert doc["services"]["worker"]["deploy"]["replicas"] == 4
    assert {s["image"] for s in doc["services"].values()} == {"img:1"}
    assert "run-compose.sh" in capsys.readouterr().err


def test_cli_prints_to_stdout_and_names_bad_input(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copy(DEFAULT_CONFIG, tmp_path / "run.yaml")
    assert main(["compose", "run.yaml"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["services"]["ps0"]["volumes"][0].startswith("./run.yaml:")
    assert main(["compose", "run.yaml", "cluster.ps=0"]) == 2
    assert "cluster.ps must be at least 1" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="missing.yaml: no such config file"):
        compose.config_source("missing.yaml", tmp_path)


def test_restart_policy_follows_the_configs_per_role_policy():
    services = render(("cluster.restart_policy.max_restarts=5", "cluster.restart_policy.ps=never"))["services"]
    assert [services[n]["restart"] for n in ("ps0", "worker", "chief")] == ["no", "on-failure:5", "no"]
    services = render(("cluster.restart_policy.chief=on_failure", "cluster.restart_policy.max_restarts=0"))["services"]
    assert {s["restart"] for s in services.values()} == {"no"}  # 0 restarts allowed, as in launch


@functools.lru_cache(maxsize=None)
def compose_tool() -> tuple[str, ...] | None:
    """`docker compose` (v2) if the docker CLI has it, else `docker-compose` (v1), else None."""
    if shutil.which("docker") and _ok(["docker", "compose", "version"]):
        return ("docker", "compose")
    if shutil.which("docker-compose") and _ok(["docker-compose", "version"]):
        return ("docker-compose",)
    return None


def _ok(argv: list[str]) -> bool:
    try:
        return subprocess.run(argv, capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def test_compose_tool_accepts_the_checked_in_file():
    tool = compose_tool()
    if tool is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    done = subprocess.run([*tool, "-f", str(CHECKED_IN), "config", "-q"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


# --- `asyncps health` against a real gRPC health server. -------------------------------------

@pytest.fixture
def health_server():
    """A gRPC server with only the health service, NOT_SERVING until the test flips it."""
    import grpc
    from grpc_health.v1 import health, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(0)


def test_health_exit_code_follows_the_serving_status(health_server, capsys):
    from grpc_health.v1 import health_pb2

    address, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert main(["health", address]) == 1
    assert "NOT_SERVING" in capsys.readouterr().err
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert main(["health", address]) == 0
    assert f"{address}: SERVING" in capsys.readouterr().out
    assert check_health(address, service="asyncps.Unknown")[1].startswith("NOT_FOUND")


def test_health_fails_fast_without_a_server_and_names_a_bad_address(capsys):
    from asyncps.cluster import free_port

    start = time.monotonic()
    assert main(["health", f"127.0.0.1:{free_port()}", "--timeout", "2"]) == 1
    assert time.monotonic() - start < 10
    assert "UNAVAILABLE" in capsys.readouterr().err
    assert main(["health", "ps0"]) == 2
    assert "address 'ps0': expected HOST:PORT" in capsys.readouterr().err


# --- Real containers (slow; need a Docker engine and a compose tool). ------------------------

IMAGE = os.environ.get("ASYNCPS_TEST_IMAGE", "asyncps:test")
BASE_IMAGE = "asyncps-base:bookworm"
IMAGE_LIMIT_BYTES = 400 * 10**6
DOCKER_TEST_TIMEOUT_S = 1800  # a first base-image build, the image build and a whole training run


@functools.lru_cache(maxsize=None)
def docker_unavailable() -> str | None:
    """Why the Docker tests cannot run here, or None when they can."""
    if os.environ.get("ASYNCPS_DOCKER_TESTS") == "0":
        return "ASYNCPS_DOCKER_TESTS=0"
    if shutil.which("docker") is None:
        return "no docker CLI on PATH"
    if not _ok(["docker", "info"]):
        return "no Docker engine answers `docker info`"
    if compose_tool() is None:
        return "neither `docker compose` nor `docker-compose` is installed"
    if not _ok(["docker", "image", "inspect", BASE_IMAGE]):
        if shutil.which("debootstrap") is None:
            return (f"base image {BASE_IMAGE} is missing and debootstrap is not installed to build it "
                    "(apt-get install debootstrap)")
        if os.geteuid() != 0:
            return f"base image {BASE_IMAGE} is missing and building it with debootstrap needs root"
    return None


def skip_without_docker() -> None:
    """Skips the calling test where the Docker tests cannot run, with one line saying why. Asked
    when a Docker test is about to run (its image fixture, or its call), never at collection:
    `-m "not slow"` runs no docker command."""
    why = docker_unavailable()
    if why is not None:
        pytest.skip(f"Docker tests skipped: {why}")


def docker_test(test):
    """Slow, allowed the time an image build takes, and skipped (saying why) without Docker."""
    @functools.wraps(test)  # the same signature: pytest still sees the test's fixtures
    def run(*args, **kwargs):
        skip_without_docker()
        return test(*args, **kwargs)

    return pytest.mark.slow(pytest.mark.timeout(DOCKER_TEST_TIMEOUT_S)(run))


def sh(*argv: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return done


_BUILT: set[str] = set()  # images built by this test session


@pytest.fixture(scope="module")
def image() -> str:
    """The image, built from this checkout (base image built only if missing), once per session:
    tests/test_user_model.py imports this fixture, and a module-scoped fixture runs once per
    module that uses it (the second build took 82 s of a 673 s suite)."""
    skip_without_docker()
    if IMAGE not in _BUILT:
        sh(str(REPO / "deploy" / "build-image.sh"), IMAGE, timeout=1200)
        _BUILT.add(IMAGE)
    return IMAGE


class Project:
    """A compose project rendered into a temporary folder, torn down with its volumes."""

    def __init__(self, folder: Path, image: str, overrides: tuple[str, ...] = (), flags: tuple[str, ...] = ()):
        self.name = f"asyncpstest{uuid.uuid4().hex[:8]}"
        self.file = folder / "docker-compose.yml"
        assert main(["compose", str(DEFAULT_CONFIG), *overrides, *flags, "-o", str(self.file), "--image", image]) == 0
        self.tool = [*compose_tool(), "-p", self.name, "-f", str(self.file)]

    def __call__(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        return sh(*self.tool, *args, timeout=timeout, check=check)

    def containers(self, service: str) -> list[str]:
        return self("ps", "-q", service).stdout.split()

    def volume(self, name: str) -> str:
        return f"{self.name}_{name}"

    def wait_healthy(self, service: str, timeout: float = 90) -> str:
        (cid,) = self.containers(service)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sh("docker", "inspect", "-f", "{{.State.Health.Status}}", cid).stdout.strip() == "healthy":
                return cid
            time.sleep(1)
        raise AssertionError(f"{service} not healthy in {timeout} s; logs:\n{self('logs', '--tail', '30', service).stdout}")

    def down(self) -> None:
        self("down", "-v", "--remove-orphans", "-t", "5", check=False)


@pytest.fixture
def project(tmp_path, image):
    created = []

    def make(*overrides: str, flags: tuple[str, ...] = ()) -> Project:
        created.append(Project(tmp_path, image, overrides, flags))
        return created[-1]

    yield make
    for p in created:
        p.down()


def crash(container: str) -> None:
    """Kill every process in the container but its init with SIGKILL: a crash, which the restart
    policy answers (`docker kill` counts as a deliberate stop, which it does not)."""
    sh("docker", "exec", container, "sh", "-c", "kill -KILL -1")


@docker_test
def test_image_is_small_runs_as_non_root_and_selects_the_role(image):
    size = int(sh("docker", "image", "inspect", "-f", "{{.Size}}", image).stdout)
    assert size < IMAGE_LIMIT_BYTES, f"{image} is {size / 1e6:.0f} MB"
    assert "ps" in sh("docker", "run", "--rm", image, "--help").stdout
    ident = sh("docker", "run", "--rm", "--entrypoint", "id", image, "-u").stdout.strip()
    assert ident != "0"
    leftovers = sh("docker", "run", "--rm", "--entrypoint", "sh", image, "-c",
                   "command -v gcc cc || true; ls /root/.cache /home/asyncps/.cache /wheels 2>/dev/null || true").stdout
    assert leftovers.strip() == ""


@docker_test
def test_mnist_cache_is_built_once_on_a_shared_volume_without_network(image):
    volume = f"asyncpstest-cache-{uuid.uuid4().hex[:8]}"
    run = ["docker", "run", "--rm", "--network", "none", "-v", f"{volume}:/cache", image, "data", "mnist"]
    try:
        with futures.ThreadPoolExecutor(3) as pool:
            results = list(pool.map(lambda _: sh(*run, timeout=600, check=False), range(3)))
        for done in results:
            assert done.returncode == 0, done.stderr
            assert "mnist ready: /cache/mnist-" in done.stdout
        listing = sh("docker", "run", "--rm", "-v", f"{volume}:/cache", "--entrypoint", "ls", image, "/cache").stdout.split()
        assert len([f for f in listing if f.endswith(".npz")]) == 1, listing
    finally:
        sh("docker", "volume", "rm", "-f", volume, check=False)


@docker_test
def test_shards_become_healthy_and_come_back_after_a_crash(project):
    p = project()
    p("up", "-d", "ps0", "ps1")
    ps0 = p.wait_healthy("ps0")
    p.wait_healthy("ps1")
    crash(ps0)
    deadline = time.monotonic() + 60
    while int(sh("docker", "inspect", "-f", "{{.RestartCount}}", ps0).stdout) < 1:
        assert time.monotonic() < deadline, "ps0 was not restarted after its process was killed"
        time.sleep(1)
    p.wait_healthy("ps0")


def crash_running(p: Project, service: str, deadline: float) -> str:
    """`crash` a container of `service` that is running (returns its id). One may be restarting
    at that moment (on a loaded machine a worker the chief declared dead exits 1 and comes
    back): then the crash waits for a running one instead of failing on `docker exec`."""
    while True:
        for cid in p.containers(service):
            if sh("docker", "exec", cid, "sh", "-c", "kill -KILL -1", check=False).returncode == 0:
                return cid
        assert time.monotonic() < deadline, (f"no running {service} container to crash:\n"
                                             + p("logs", "--tail", "40", service).stdout)
        time.sleep(1)


def cluster_missing(image: str) -> str | None:
    """What the image lacks to run a whole cluster, or None."""
    probe = sh("docker", "run", "--rm", "--entrypoint", "python3", image, "-c",
               "import asyncps.chief.main, asyncps.worker.main", check=False)
    return None if probe.returncode == 0 else probe.stderr.strip().splitlines()[-1]


RUN_DIR = "/runs/mnist_softmax"
# Long enough to crash containers mid-run and still reach 0.91; checkpoints to restore a shard from.
# Every worker step sleeps 10 ms: two workers make at most 200 steps a second however idle the
# machine, so the run has >= 13 s left after the worker's crash at step 300 for the worker to come
# back and handshake its shared memory again (unpaced, the run ended ~5 s after). The shard's
# crash comes next; no step counts while a shard is down, and the restore rewinds to a checkpoint.
CLUSTER_OVERRIDES = ("train.max_steps=3000", "checkpoint.every_steps=200", "delay.kind=constant", "delay.mean_ms=10")
CRASH_AT_STEP = 300
RUN_DEADLINE_S = 240  # the run takes about a minute on 2 cores


def run_steps(chief: str) -> int:
    """The largest step in the chief's metrics.jsonl so far (0 before the first line)."""
    done = sh("docker", "exec", chief, "cat", f"{RUN_DIR}/metrics.jsonl", check=False)
    steps = [json.loads(line).get("step", 0) for line in done.stdout.splitlines() if line.strip()]
    return max(steps, default=0)


def run_with_crashes(p: Project, image: str, services: tuple[str, ...],
                     then: dict | None = None) -> tuple[dict, dict[str, str]]:
    """Start the project, crash one container of each of `services` once training is under way,
    and return report.json (after checking that the chief exited 0 in time) and the id of the
    container crashed per service. `then[service]`, called just before that service's crash,
    returns a predicate to wait for after it (before the next crash)."""
    p("up", "-d")
    chief = p.wait_healthy("chief", timeout=180)
    deadline = time.monotonic() + RUN_DEADLINE_S
    while run_steps(chief) < CRASH_AT_STEP:
        assert sh("docker", "inspect", "-f", "{{.State.Running}}", chief).stdout.strip() == "true", (
            "the chief exited before the crashes:\n" + p("logs", "--tail", "40").stdout)
        assert time.monotonic() < deadline, "no training progress:\n" + p("logs", "--tail", "40").stdout
        time.sleep(1)
    crashed = {}
    for service in services:
        done = (then or {}).get(service, lambda: None)()
        crashed[service] = crash_running(p, service, deadline)
        while done is not None and not done():
            assert time.monotonic() < deadline, f"nothing after the crash of {service}:\n" + p("logs", "--tail", "40").stdout
            time.sleep(0.5)
    try:
        code = int(sh("docker", "wait", chief, timeout=max(deadline - time.monotonic(), 1)).stdout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the chief was still running {RUN_DEADLINE_S} s after start, crashed: "
                             f"{services}:\n{p('logs', '--tail', '60').stdout}") from None
    assert code == 0, f"the chief exited {code}:\n{p('logs', '--tail', '60').stdout}"
    return json.loads(sh("docker", "run", "--rm", "-v", f"{p.volume('runs')}:/runs", "--entrypoint", "cat",
                         image, f"{RUN_DIR}/report.json").stdout), crashed


@pytest.fixture
def cluster(project, image):
    """A compose project for 2 shards, 2 workers and the chief on MNIST softmax regression."""
    missing = cluster_missing(image)
    if missing:
        pytest.skip(f"the cluster is not runnable in the image yet ({missing})")
    return project(*CLUSTER_OVERRIDES, flags=("--shm",))


def container_log(cid: str) -> str:
    done = sh("docker", "logs", cid)
    return done.stdout + done.stderr


def handshakes(log: str, shard: int) -> list[int]:
    """The worker indices of shard `shard`'s shared-memory handshakes in its log, in order."""
    return [int(w) for w in re.findall(rf"\bps {shard}: worker (\d+) on shared memory", log)]


@docker_test
def test_cluster_trains_mnist_to_target_despite_a_worker_and_a_shard_crash(cluster, image):
    """Mid-run, the processes of one worker and of one shard are killed. `restart: on-failure`
    brings both back: the worker registers again, the shard comes back empty and the chief
    restores it from the latest checkpoint. The chief must still exit 0 with the target reached.

    The project is rendered with `--shm` (one tmpfs at /dev/shm for shards and workers), so the
    default transport, auto, takes shared memory between the containers: every worker handshakes
    with every shard, none falls back to gRPC, the restarted worker handshakes again, and so do
    the workers with the restarted shard."""
    seen = []  # shard 0's handshakes before the worker's crash: only its restart handshakes next

    def worker_handshakes_again():
        ps0 = cluster.containers("ps0")[0]
        seen[:] = handshakes(container_log(ps0), 0)
        return lambda: len(handshakes(container_log(ps0), 0)) > len(seen)

    report, crashed = run_with_crashes(cluster, image, ("worker", "ps1"), then={"worker": worker_handshakes_again})
    assert report["target"]["reached"], report["target"]
    assert "no shared memory" not in cluster("logs", "--no-color", "worker").stdout
    log0, log1 = (container_log(cluster.containers(f"ps{i}")[0]) for i in (0, 1))
    assert set(seen) == {0, 1}, log0[-3000:]  # both workers on shared memory with shard 0 before the crash
    restarted = container_log(crashed["worker"])
    registered = [int(w) for w in re.findall(r"\bworker (\d+): registered", restarted)]
    assert len(registered) >= 2, restarted[-3000:]  # before the crash and after its restart
    assert handshakes(log0, 0)[len(seen)] == registered[-1], log0[-3000:]  # the restarted one handshook first
    before, _, after = log1.rpartition("asyncps ps 1: serving on")  # the restarted shard's process
    assert before and set(handshakes(before, 1)) == {0, 1}, log1[-3000:]
    assert set(handshakes(after, 1)) == {0, 1}, log1[-3000:]
    # the run directory is complete as under `launch`: the chief wrote the resolved config, so
    # replay, eval and inspect can use it
    config = sh("docker", "run", "--rm", "-v", f"{cluster.volume('runs')}:/runs", "--entrypoint", "cat",
                image, f"{RUN_DIR}/config.yaml").stdout
    assert "mnist_softmax" in config and "max_steps: 3000" in config
