"""Bring your own model and data (issue 17): examples/my_model through `asyncps launch` and the
Python API, the Model contract, import paths in the YAML and their one-line errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml

import asyncps
from asyncps.config import ModelConfig, from_dict, load_config
from asyncps.errors import ConfigError, UserError

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
CONFIG = EXAMPLES / "my_model" / "config.yaml"
SHORT = ["train.max_steps=200", "train.eval_every=100", "train.log_every=50"]
CHANCE = 1 / 3  # three spiral arms


def cli(*args, cwd, pythonpath: str | None = str(EXAMPLES), timeout: float = 300) -> subprocess.CompletedProcess:
    """`asyncps ARGS` as a user runs it: the console script's module, PYTHONPATH set (or not)."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return subprocess.run([sys.executable, "-c", "import sys; from asyncps.cli.main import main; sys.exit(main())",
                           *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)


@pytest.fixture
def examples_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.setenv("PYTHONPATH", str(EXAMPLES))  # for the processes asyncps.launch starts


# ------------------------------------------------------------------------------- the example


@pytest.mark.slow
def test_example_runs_through_asyncps_launch_with_pythonpath(tmp_path):
    run_dir = tmp_path / "run"
    # from another directory: only PYTHONPATH finds my_model (as in a user's project)
    proc = cli("launch", CONFIG, f"run_dir={run_dir}", *SHORT, "checkpoint.every_steps=200", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((run_dir / "report.json").read_text())
    assert report["steps"] == 200
    assert report["final"]["accuracy"] > CHANCE + 0.2, report["final"]  # it learned (no timing asserted)
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["model"] == {"name": "my_model.model:ResidualMLP", "width": 64, "blocks": 2}
    assert saved["data"]["name"] == "my_model.data:spirals" and saved["data"]["n_train"] == 3000
    assert "final:" in proc.stdout and "run_dir:" in proc.stdout
    # the other roles resolve the same import paths from the run's config.yaml
    replay = cli("replay", run_dir, cwd=tmp_path)
    assert replay.returncode == 0 and "bit-identical" in replay.stdout, replay.stderr[-2000:]
    scored = cli("eval", run_dir, "--json", cwd=tmp_path)
    assert scored.returncode == 0, scored.stderr[-2000:]
    assert "accuracy" in scored.stdout


def test_example_without_pythonpath_is_one_line_exit_2(tmp_path):
    proc = cli("launch", CONFIG, f"run_dir={tmp_path / 'run'}", cwd=tmp_path, pythonpath=None)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no module named 'my_model'" in lines[0] and "PYTHONPATH" in lines[0], proc.stderr
    assert not (tmp_path / "run" / "ps0.log").exists()  # nothing was started


def test_example_runs_through_the_python_api(tmp_path, examples_on_path):
    report = asyncps.train(str(CONFIG), run_dir=str(tmp_path / "run"),
                           train={"max_steps": 200, "eval_every": 100}, **{"train.log_every": 50})
    assert report["kind"] == "single_process" and report["steps"] == 200
    assert report["final"]["accuracy"] > CHANCE + 0.2
    assert report["config"]["model"]["width"] == 64
    assert json.loads((tmp_path / "run" / "report.json").read_text())["final"] == report["final"]


@pytest.fixture(scope="module")
def api_launch_and_resume(tmp_path_factory):
    """One `asyncps.launch` of the example (1 worker, 1 block, 100 steps, checkpoints every 50)
    and its resume to 150 steps: (first report, resumed report, run_dir). One scenario for the two
    tests below, which each used to launch it (a launch is seconds of process start-up)."""
    run_dir = str(tmp_path_factory.mktemp("api") / "run")
    short = {"run_dir": run_dir, "cluster": {"workers": 1}, "checkpoint": {"every_steps": 50}, "model.blocks": 1}
    with pytest.MonkeyPatch.context() as mp:  # examples_on_path, for the module's scope
        mp.syspath_prepend(str(EXAMPLES))
        mp.setenv("PYTHONPATH", str(EXAMPLES))
        first = asyncps.launch(CONFIG, **short, **{"train.max_steps": 100, "train.eval_every": 50})
        again = asyncps.launch(CONFIG, resume=True, **short, **{"train.max_steps": 150, "train.eval_every": 50})
    return first, again, run_dir


@pytest.mark.slow
def test_python_api_launch_returns_the_report(api_launch_and_resume):
    report, _, _ = api_launch_and_resume
    assert report["steps"] == 100 and report["final"]["accuracy"] > CHANCE
    assert report["config"]["model"]["blocks"] == 1


@pytest.mark.slow
def test_python_api_launch_resumes_a_run(api_launch_and_resume):
    first, again, run_dir = api_launch_and_resume
    assert first["steps"] == 100
    assert again["steps"] == 150 and again["run_dir"] == run_dir
    with pytest.raises(ConfigError, match="resume=True needs run_dir="):
        asyncps.launch(CONFIG, resume=True)


def test_python_api_launch_raises_on_a_process_that_fails(tmp_path, examples_on_path):
    with pytest.raises(asyncps.LaunchError) as info:  # ValueError in ResidualMLP.__init__, in every role
        asyncps.launch(CONFIG, run_dir=str(tmp_path / "run"), **{"model.width": -1, "train.max_steps": 10})
    assert info.value.exit_code == 2 and "width, blocks and expansion must be positive" in str(info.value)


def test_residual_mlp_keeps_the_model_contract(examples_on_path):
    from my_model.data import spirals
    from my_model.model import ResidualMLP, layer_norm

    from asyncps.autodiff import check_grads
    from asyncps.models import check_model

    data = spirals(n_train=64, n_test=16, seed=3)
    model = ResidualMLP(ModelConfig(), data.meta, width=8, blocks=2)
    out = check_model(model, data.x_train, data.y_train)
    assert out["params"] > 0 and set(out["metrics"]) == {"loss", "accuracy"}
    rng = np.random.default_rng(0)
    h, gain, bias = rng.standard_normal((5, 8)), rng.standard_normal(8), rng.standard_normal(8)
    check_grads(lambda h, g, b: layer_norm({"n.gain": g, "n.bias": b}, "n", h), h, gain, bias, name="layer_norm")
    y = layer_norm({"n.gain": np.ones(8), "n.bias": np.zeros(8)}, "n", h).value
    np.testing.assert_allclose(y.mean(axis=1), 0, atol=1e-9)
    np.testing.assert_allclose(y.std(axis=1), 1, atol=1e-4)


def test_the_example_also_trains_from_an_npz_it_writes(tmp_path, examples_on_path):
    from my_model.data import save_npz

    save_npz(str(tmp_path / "spirals.npz"), n_train=600, n_test=200)
    cfg = yaml.safe_load(CONFIG.read_text())
    cfg["data"] = {"name": "npz", "path": str(tmp_path / "spirals.npz")}
    report = asyncps.train(cfg, run_dir=str(tmp_path / "run"), **{"train.max_steps": 100, "train.eval_every": 0})
    assert report["steps"] == 100 and report["final"]["accuracy"] > CHANCE


# ------------------------------------------------------------------------- import paths: errors


@pytest.fixture
def userpkg(tmp_path, monkeypatch):
    """A package `userpkg_<n>` in tmp_path, on sys.path; write(module, source) adds a module."""
    name = f"userpkg_{abs(hash(str(tmp_path))) % 10**8}"
    root = tmp_path / name
    root.mkdir()
    (root / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(module: str, source: str) -> str:
        (root / f"{module}.py").write_text(textwrap.dedent(source))
        return f"{name}.{module}"

    yield write
    for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[mod]


GOOD = """
    import numpy as np
    from asyncps.models import Model, dense, dense_params
    from asyncps.data import Dataset

    class Net(Model):
        def __init__(self, cfg, meta, width, scale=1.0):
            super().__init__(cfg, meta)
            self.width = width

        def init_params(self, rng):
            return dense_params("out", rng, self.input_shape[0], self.num_classes, relu=False)

        def logits(self, params, x, training=False, rng=None):
            return dense(params, "out", x)

    class NotAModel:
        pass

    def load(n=50, seed=0):
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((n, 2))
        return Dataset.from_arrays(x, (x[:, 0] > 0).astype(int), x[:10], (x[:10, 0] > 0).astype(int))

    def not_a_dataset():
        return [1, 2, 3]

    def bad_arrays():
        return Dataset.from_arrays(np.zeros((3, 2)), np.zeros(2, dtype=int), np.zeros((1, 2)), np.zeros(1, dtype=int))

    def raises(n=1):
        return {}["missing"]

    VALUE = 3
"""


def build(model: dict, data: dict | None = None):
    from asyncps.worker.data import load_dataset
    from asyncps.worker.models import build_model

    cfg = from_dict({"model": model, "data": data or {"name": "linear"}})
    dataset = load_dataset(cfg.data, seed=cfg.seed)
    return build_model(cfg.model, dataset.meta), dataset


def one_line_error(fn, kind=UserError) -> str:
    with pytest.raises(kind) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message and len(message) < 500, message
    return message


def test_a_user_model_and_loader_build_with_their_options(userpkg):
    mod = userpkg("m", GOOD)
    model, data = build({"name": f"{mod}:Net", "width": 7, "scale": 2.0}, {"name": f"{mod}:load", "n": 30})
    assert model.width == 7 and len(data.x_train) == 30 and data.meta.num_classes == 2
    params = model.init_params(np.random.default_rng(0))
    assert sorted(params) == ["out.bias", "out.kernel"]
    assert set(model.evaluate(params, data.x_test, data.y_test)) == {"loss", "accuracy"}


def test_a_loader_gets_the_runs_seed_unless_the_config_sets_one(userpkg):
    from asyncps.worker.data import load_dataset

    mod = userpkg("m", GOOD)
    a = load_dataset(from_dict({"data": {"name": f"{mod}:load"}}).data, seed=1)
    b = load_dataset(from_dict({"data": {"name": f"{mod}:load"}}).data, seed=2)
    c = load_dataset(from_dict({"data": {"name": f"{mod}:load", "seed": 1}}).data, seed=2)
    assert not np.array_equal(a.x_train, b.x_train) and np.array_equal(a.x_train, c.x_train)


@pytest.mark.parametrize("model, data, expected", [
    ({"name": "nosuchpkg_xyz.models:Net"}, None, "model.name nosuchpkg_xyz.models:Net: no module named 'nosuchpkg_xyz'"),
    ({"name": "{mod}:Missing", "width": 1}, None, "has no attribute 'Missing'"),
    ({"name": "{mod}:NotAModel"}, None, "NotAModel is not a subclass of asyncps.models.Model"),
    ({"name": "{mod}:VALUE"}, None, "a int, not a Model subclass or a function returning a Model"),
    ({"name": "{mod}:Net"}, None, "missing parameter model.width"),
    ({"name": "{mod}:Net", "width": 2, "depth": 3}, None, "model.depth is not one of its parameters"),
    ({"name": "mlp"}, {"name": "{mod}:not_a_dataset"}, "returned list, not an asyncps.data.Dataset"),
    ({"name": "mlp"}, {"name": "{mod}:bad_arrays"}, "y_train must hold one label per example (3)"),
    ({"name": "mlp"}, {"name": "{mod}:raises"}, "KeyError: 'missing' ("),
    ({"name": "mlp"}, {"name": "{mod}:load", "rows": 3}, "data.rows is not one of its parameters"),
])
def test_import_path_errors_are_one_line(userpkg, model, data, expected):
    mod = userpkg("m", GOOD)
    fill = lambda d: None if d is None else {k: v.format(mod=mod) if isinstance(v, str) else v for k, v in d.items()}
    message = one_line_error(lambda: build(fill(model), fill(data)))
    assert expected in message, message


def test_errors_in_the_users_module_name_its_file_and_line(userpkg):
    broken = userpkg("broken", "import numpy\n\ndef f(:\n    pass\n")
    message = one_line_error(lambda: build({"name": f"{broken}:Net"}))
    assert "SyntaxError" in message and "broken.py:3" in message
    needs = userpkg("needs", "import not_installed_dependency_xyz\n")
    message = one_line_error(lambda: build({"name": f"{needs}:Net"}))
    assert "importing" in message and "No module named 'not_installed_dependency_xyz'" in message
    raising = userpkg("raising", GOOD)
    message = one_line_error(lambda: build({"name": "mlp"}, {"name": f"{raising}:raises"}))
    assert "raising.py:" in message


def test_config_accepts_import_paths_and_keeps_built_ins_strict():
    cfg = from_dict({"model": {"name": "pkg.mod:Net", "width": 3, "layers": [1, 2], "act": "relu"}})
    assert cfg.model.options == {"width": 3, "layers": [1, 2], "act": "relu"}
    assert cfg.to_dict()["model"] == {"name": "pkg.mod:Net", "width": 3, "layers": [1, 2], "act": "relu"}
    assert from_dict(cfg.to_dict()) == cfg  # what launch writes is what every role reads
    assert "options" not in from_dict({}).to_dict()["model"]  # built-ins are written as before
    for raw, expected in [
        ({"model": {"name": "resnet"}}, "model.name must be one of linear, softmax, mlp, cnn, charlm, ctr, ctr_lr, ctr_deep or an import path"),
        ({"model": {"name": "mlp", "width": 3}}, "unknown key model.width"),
        ({"model": {"name": "mlp", "options": {"width": 3}}}, "model.options is only for a name that is an import path"),
        ({"data": {"name": "pkg:load", "n": float("inf")}}, "data.n must be a finite number"),
        ({"data": {"name": "pkg:load", "n": object()}}, "data.n must be null, true/false, a number"),
        ({"data": {"name": "pkg:"}}, "data.name must be one of mnist"),
    ]:
        assert expected in one_line_error(lambda: from_dict(raw), ConfigError)


def test_import_path_options_come_from_overrides_too(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {name: 'pkg.mod:Net', width: 3}\n")
    cfg = load_config(path, ["model.width=5", "model.act=tanh"])
    assert cfg.model.options == {"width": 5, "act": "tanh"}
    api = asyncps.api.load(path, **{"model.width": 6}, model={"depth": 2})
    assert api.model.options == {"width": 6, "depth": 2}


def test_cli_bad_model_name_is_one_line_exit_2_before_anything_starts(tmp_path):
    for command in ("train", "launch"):
        proc = cli(command, CONFIG, f"run_dir={tmp_path / command}", "model.name=my_model.model:Nope", cwd=REPO)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "my_model.model has no attribute 'Nope'" in lines[0], proc.stderr
    proc = cli("launch", CONFIG, "--dry-run", "model.depth=3", cwd=REPO)
    assert proc.returncode == 2 and "model.depth is not one of its parameters" in proc.stderr


# ----------------------------------------------------------------------------- the Python API


def test_api_errors_raise_user_errors_instead_of_exiting(tmp_path):
    with pytest.raises(ConfigError, match="train.max_steps must be at least 1"):
        asyncps.train({"model": {"name": "linear"}, "data": {"name": "linear"}}, **{"train.max_steps": 0})
    with pytest.raises(ConfigError, match="cannot read config file"):
        asyncps.train(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="must be a YAML path, a dict or a Config"):
        asyncps.launch(42)


def test_api_train_accepts_a_config_object_and_nested_overrides(tmp_path):
    cfg = asyncps.api.load({"model": {"name": "linear"}, "data": {"name": "linear", "num_train": 200}})
    report = asyncps.train(cfg, run_dir=str(tmp_path / "run"), optimizer={"learning_rate": 0.5},
                           train={"max_steps": 300, "batch_size": 20, "eval_every": 0})
    assert report["config"]["optimizer"]["learning_rate"] == 0.5
    assert abs(report["variables"]["linear.w"][0] - 2.0) < 0.05  # y = 2x
    assert (tmp_path / "run" / "config.yaml").exists() and (tmp_path / "run" / "metrics.jsonl").exists()


def test_import_asyncps_stays_cheap():
    code = "import sys, asyncps; print(sorted(m.split('.')[0] for m in sys.modules if m.split('.')[0] in " \
           "('numpy', 'grpc', 'yaml', 'google')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert callable(asyncps.train) and callable(asyncps.launch)


# ----------------------------------------------------------------------- under docker-compose


def test_compose_mounts_the_users_code_on_pythonpath(tmp_path, capsys):
    from asyncps.cli.main import main

    out = tmp_path / "docker-compose.yml"
    assert main(["compose", str(CONFIG), "--pythonpath", str(EXAMPLES), "-o", str(out)]) == 0
    services = yaml.safe_load(out.read_text())["services"]
    for name in ("chief", "worker"):
        assert services[name]["environment"]["PYTHONPATH"] == "/opt/asyncps/code/0"
        mount = next(v for v in services[name]["volumes"] if v.endswith(":/opt/asyncps/code/0:ro"))
        assert (out.parent / mount.split(":")[0]).resolve() == EXAMPLES
        assert not any(a.startswith("data.cache_dir=") for a in services[name]["command"])  # not the loader's
    assert "PYTHONPATH" not in services["ps0"]["environment"]  # shards never run model code
    assert main(["compose", str(CONFIG)]) == 0
    assert "--pythonpath DIR mounts it" in capsys.readouterr().err
    assert main(["compose", str(CONFIG), "--pythonpath", str(tmp_path / "nope")]) == 2


try:  # the Docker helpers and the image fixture of tests/test_compose.py (built from this checkout)
    from test_compose import compose_tool, docker_test, image, sh  # noqa: F401
except ImportError:  # pragma: no cover
    docker_test = pytest.mark.skip(reason="tests/test_compose.py's Docker helpers are not importable")


@pytest.fixture
def user_image(request):
    """ASYNCPS_PREBUILT_IMAGE (an image already holding this checkout), else test_compose's build."""
    return os.environ.get("ASYNCPS_PREBUILT_IMAGE") or request.getfixturevalue("image")


@docker_test
def test_the_example_runs_under_compose_with_pythonpath(tmp_path, user_image):
    import uuid

    project = f"asyncpsuser{uuid.uuid4().hex[:8]}"
    code = tmp_path / "code"
    code.mkdir()
    import shutil

    shutil.copytree(EXAMPLES / "my_model", code / "my_model", ignore=shutil.ignore_patterns("__pycache__"))
    for path in [code, *code.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)  # readable by the image's unprivileged user
    out = tmp_path / "docker-compose.yml"
    from asyncps.cli.main import main

    assert main(["compose", str(CONFIG), "--pythonpath", str(code), "--image", user_image, "-o", str(out),
                 "train.max_steps=200", "train.eval_every=100"]) == 0
    try:
        done = sh(str(REPO / "deploy" / "run-compose.sh"), "-p", project, str(out), timeout=600, check=False)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
        text = sh("docker", "run", "--rm", "-v", f"{project}_runs:/runs", "--entrypoint", "cat", user_image,
                  "/runs/my_model/report.json").stdout
        report = json.loads(text)
        assert report["steps"] == 200 and report["final"]["accuracy"] > CHANCE
        assert report["config"]["model"]["name"] == "my_model.model:ResidualMLP"
    finally:
        sh(*compose_tool(), "-p", project, "-f", str(out), "down", "-v", "--remove-orphans", "-t", "5", check=False)
