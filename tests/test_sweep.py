"""`asyncps sweep`: the grid grammar, the tables, resuming, and whole sweeps through the CLI."""
import csv
import math

import pytest

from asyncps.errors import ConfigError
from asyncps.sweep import Setting, baselines, parse_grid, split_values, summary_markdown
from cli_runner import CONFIGS, asyncps, run_ok

LINEAR = CONFIGS / "linear_regression.yaml"


def test_split_values_respects_brackets_and_quotes():
    assert split_values("a,b,c") == ["a", "b", "c"]
    assert split_values("[64],[256,256]") == ["[64]", "[256,256]"]
    assert split_values("{worker: 0, factor: 4},null") == ["{worker: 0, factor: 4}", "null"]
    assert split_values("'x,y',z") == ["'x,y'", "z"]
    assert split_values("0.1") == ["0.1"]


def test_parse_grid_axes_fixed_runner_and_seeds():
    g = parse_grid(["cluster.workers=1,2,4", "train.max_steps=50", "runner=launch", "seed=3,4",
                    "optimizer.name=sgd,momentum"])
    assert g.fixed == ["train.max_steps=50"] and g.runner == "launch" and g.seeds == [3, 4]
    settings = g.settings()
    assert len(settings) == 6
    assert settings[0].name == "cluster.workers=1__optimizer.name=sgd"
    assert settings[1].overrides() == ["cluster.workers=1", "optimizer.name=momentum"]
    assert parse_grid([]).settings() == [Setting("base", ())]


@pytest.mark.parametrize("words, message", [
    (["run_dir=/x"], "run_dir is chosen by the sweep"),
    (["runner=docker"], "runner must be one of"),
    (["seed=a,b"], "seed values must be integers"),
    (["a=1", "a=2"], "a is given twice"),
    (["novalue"], "expected key=value"),
])
def test_parse_grid_errors(words, message):
    with pytest.raises(ConfigError, match=message):
        parse_grid(words)


def _row(setting, seed, steps_to_target, staleness_max, final=0.9, seconds=None):
    return {"setting": setting, "seed": seed, "status": "ok", "target_metric": "accuracy", "target_value": 0.9,
            "steps_to_target": steps_to_target, "seconds_to_target": seconds or steps_to_target,
            "final_accuracy": final, "steps_per_second": 100.0, "staleness_mean": staleness_max / 2,
            "staleness_p99": staleness_max, "staleness_max": staleness_max}


def test_summary_medians_budget_and_ratios_to_the_matching_staleness_zero_setting():
    s = [Setting(f"opt={o}__s={k}", (("opt", o), ("s", str(k)))) for o in ("sgd", "mom") for k in (0, 8)]
    rows = [
        _row(s[0].name, 0, 100, 0), _row(s[0].name, 1, 120, 0),
        _row(s[1].name, 0, 200, 8), _row(s[1].name, 1, 360, 8),
        _row(s[2].name, 0, 50, 0), _row(s[2].name, 1, 60, 0),
        _row(s[3].name, 0, None, 8), _row(s[3].name, 1, None, 8),
    ]
    base = baselines(s, {x.name: [r for r in rows if r["setting"] == x.name] for x in s})
    assert base == {s[0].name: s[0].name, s[1].name: s[0].name, s[2].name: s[2].name, s[3].name: s[2].name}
    md = summary_markdown(s, rows, "t", "cmd")
    line = {row.split(" | ")[0].lstrip("| "): row for row in md.splitlines() if row.startswith("| opt=")}
    assert "| 110 [100–120] |" in line[s[0].name] and "*baseline*" in line[s[0].name]
    assert "| 280 [200–360] |" in line[s[1].name] and "| 2.50x |" in line[s[1].name]  # median of 2.0, 3.0
    assert "> budget" in line[s[3].name]


def _read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_sweep_of_train_runs_writes_tables_and_resumes(tmp_path):
    out = tmp_path / "sw"
    args = ["sweep", LINEAR, "optimizer.learning_rate=0.1,0.05", "train.max_steps=200", "runner=train",
            "--seeds", "2", "--parallel", "2", "--out", out]
    proc = run_ok(*args, timeout=200)
    rows = _read_csv(out / "results.csv")
    assert [(r["optimizer.learning_rate"], r["seed"]) for r in rows] == [("0.1", "0"), ("0.1", "1"), ("0.05", "0"), ("0.05", "1")]
    assert all(r["status"] == "ok" and r["runner"] == "train" and r["staleness_max"] == "0.0" for r in rows)
    assert all(float(r["final_mse"]) < 0.01 for r in rows)
    assert (out / "optimizer.learning_rate=0.1" / "seed1" / "report.json").exists()
    summary = (out / "summary.md").read_text()
    assert summary.count("| optimizer.learning_rate=") == 2 and "steps to target" in summary
    assert "# Sweep of" in proc.stdout
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "pip install asyncps[plot]" in proc.stderr
    else:
        for name in ("metric_vs_steps", "metric_vs_seconds", "staleness_hist", "steps_to_target"):
            assert (out / f"{name}.png").stat().st_size > 1000
    assert "seed=1" in (out / "optimizer.learning_rate=0.1" / "seed1" / "sweep_run.log").read_text().splitlines()[0]

    # resumable: a finished run is skipped, an interrupted one (no report.json) runs again
    (out / "optimizer.learning_rate=0.05" / "seed1" / "report.json").unlink()
    proc = run_ok(*args, timeout=200)
    assert proc.stderr.count("already done") == 3 and proc.stderr.count("done in") == 1
    again = _read_csv(out / "results.csv")
    same = ("setting", "seed", "steps", "final_mse", "steps_to_target")
    assert [[r[k] for k in same] for r in again] == [[r[k] for k in same] for r in rows]  # deterministic


def test_sweep_without_matplotlib_says_how_to_get_plots(tmp_path, monkeypatch, capsys):
    import sys

    from asyncps.cli.sweep import plot

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert plot(tmp_path, [], []) == []
    assert "pip install asyncps[plot]" in capsys.readouterr().err


def test_bad_axis_value_fails_before_any_run(tmp_path):
    proc = asyncps("sweep", LINEAR, "cluster.mode=async,eventual", "--out", tmp_path / "sw")
    assert proc.returncode == 2 and "cluster.mode must be one of" in proc.stderr
    assert not (tmp_path / "sw").exists()


@pytest.mark.slow
def test_sweep_through_launch_has_a_staleness_zero_baseline(tmp_path):
    out = tmp_path / "sw"
    # Long enough (and each step a little slower) that the second worker, whose start-up a busy
    # machine can delay by seconds, joins before the run ends: 200 bare steps once ran on one.
    run_ok("sweep", LINEAR, "runner=train,launch", "train.max_steps=1500", "delay.kind=constant",
           "delay.mean_ms=2", "train.target.value=0.001", "--out", out, timeout=300)
    rows = {r["runner"]: r for r in _read_csv(out / "results.csv")}
    assert rows["train"]["staleness_max"] == "0.0" and float(rows["launch"]["staleness_max"]) > 0
    summary = (out / "summary.md").read_text()
    assert "*baseline*" in summary and not math.isnan(float(rows["launch"]["steps_per_second"]))
