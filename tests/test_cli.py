"""The ``regoptim`` command end to end (subprocess, tiny sizes) and its bad-input exits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from regoptim.workflow.cli import _strengths, build_parser, main

pytest.importorskip("sklearn")

METHODS = [
    "SGD",
    "SGD + weight_decay",
    "ProxSGD decoupled",
    "SGD + L1 in loss",
    "ProxSGD l1",
    "ProxSGD group_l1",
    "AdamW",
    "ProxAdamW l1",
    "ProxAdamW group_l1",
]
GROUP_ROWS = ["ProxSGD group_l1", "ProxAdamW group_l1"]


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "regoptim", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.slow
def test_compare_end_to_end(tmp_path):
    out = tmp_path / "cmp"
    res = _run("compare", "--epochs", "1", "--out", str(out))
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("method"))
    for name, line in zip(METHODS, lines[header + 2 : header + 2 + len(METHODS)], strict=True):
        assert line.startswith(name)
    assert "test acc" in lines[header] and "exact zeros" in lines[header]
    assert "zero neurons" in lines[header]
    assert "[" in res.stderr and "100%" in res.stderr  # the progress bar
    data = json.loads((out / "compare.json").read_text())
    assert [r["name"] for r in data["rows"]] == METHODS
    rows = {r["name"]: r for r in data["rows"]}
    assert rows["SGD"]["zero_fraction"] == 0.0
    assert rows["ProxSGD l1"]["zero_fraction"] > 0.0  # exact zeros after one epoch already
    assert rows["SGD + L1 in loss"]["zero_fraction"] == 0.0
    for name, row in rows.items():  # hidden neurons: row and bias of fc1, one group each
        if name in GROUP_ROWS:
            assert row["groups"] == 256 and 0 <= row["zero_groups"] <= 256
            (group,) = row["sparsity"]["groups"]
            assert group["params"] == ["fc1.weight", "fc1.bias"]
            assert group["zero_groups"] == row["zero_groups"]
        else:
            assert row["groups"] is None and row["zero_groups"] is None
    assert all(0.0 < r["test_accuracy"] <= 1.0 and r["mean_step_us"] > 0 for r in data["rows"])
    if _has_matplotlib():
        for png in ("weights.png", "sparsity.png"):
            assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def keep_threads():
    """``main`` pins torch to ``--threads`` threads: give the test process its count back."""
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_compare_is_deterministic(tmp_path, keep_threads, capsys):
    runs = []
    for _ in range(2):
        argv = ["compare", "--epochs", "1", "--no-plots", "--no-progress", "--out", str(tmp_path)]
        assert main([*argv, "--overwrite"]) == 0
        runs.append(json.loads((tmp_path / "compare.json").read_text()))
    assert capsys.readouterr().err == ""
    for r1, r2 in zip(runs[0]["rows"], runs[1]["rows"], strict=True):
        assert r1["test_accuracy"] == r2["test_accuracy"]
        assert r1["sparsity"] == r2["sparsity"]
        assert r1["final_loss"] == r2["final_loss"]


def test_compare_group_lasso_rows_count_zero_neurons(keep_threads):
    """The group-lasso rows: ``zero neurons`` counts the hidden neurons whose weight row and bias
    are exactly 0 (``sparsity(..., optimizer=).groups``); a strength that zeroes every neuron in
    one epoch leaves fc1 all zero, and the other rows show no count."""
    import torch

    from regoptim.workflow.compare import compare, compare_methods
    from regoptim.workflow.train import load_digits_split

    torch.set_num_threads(1)
    hp = {"group_l1": 0.5, "adam_group_l1": 0.5}  # strong: every neuron goes within one epoch
    methods = [m for m in compare_methods(hp) if m.name in ("SGD", *GROUP_ROWS)]
    result = compare(epochs=1, progress=False, methods=methods, data=load_digits_split(), hp=hp)
    plain, *grouped = result.rows
    assert plain.zero_groups is None and plain.sparsity.groups == ()
    for row in grouped:
        assert row.zero_groups == (256, 256)
        assert not result.final_weights[row.name]["fc1.weight"].any()
        assert row.sparsity.fraction == 256 * 64 / (256 * 64 + 10 * 256)  # over the weights
    lines = result.table().splitlines()
    assert lines[0].endswith("zero neurons  step (us)")
    assert [line.split()[-2] for line in lines[2:]] == ["-", "256/256", "256/256"]
    data = result.to_dict()["rows"]
    assert [(r["zero_groups"], r["groups"]) for r in data] == [(None, None), *[(256, 256)] * 2]


@pytest.mark.slow
def test_path_end_to_end(tmp_path):
    res = _run("path", "--epochs", "1", "--values", "0", "1e-3", "3e-2", "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr
    assert "best l1=" in res.stdout and "test accuracy" in res.stdout
    assert "warm-started, strongest first" in res.stdout
    assert "residual" in res.stdout and "time (s)" in res.stdout
    assert "100%" in res.stderr and "3/3" in res.stderr  # tqdm's bar: 3 strengths x 1 epoch
    data = json.loads((tmp_path / "path.json").read_text())
    assert [p["strength"] for p in data["points"]] == [3e-2, 1e-3, 0.0]  # strongest first
    best = max(data["points"], key=lambda p: (p["val_accuracy"], p["strength"]))
    assert data["best"] == best
    assert data["settings"]["warm_start"] is True
    assert data["points"][0]["zero_fraction"] > data["points"][1]["zero_fraction"]
    assert all(p["residual"] > 0 and p["seconds"] > 0 for p in data["points"])
    if _has_matplotlib():
        assert (tmp_path / "path.png").read_bytes()[:4] == b"\x89PNG"


def test_path_random_weight_decay(tmp_path, keep_threads, capsys):
    argv = [
        "path",
        "--reg",
        "weight_decay",
        "--search",
        "random",
        "--grid",
        "2",
        "--epochs",
        "1",
        "--no-plots",
        "--no-progress",
        "--out",
        str(tmp_path),
    ]
    assert main(argv) == 0
    assert "best weight_decay=" in capsys.readouterr().out
    data = json.loads((tmp_path / "path.json").read_text())
    assert data["reg"] == "weight_decay" and len(data["points"]) == 2
    assert all(1e-5 <= p["strength"] <= 1e-1 for p in data["points"])
    assert not (tmp_path / "path.png").exists()


def _args(*argv: str):
    return build_parser().parse_args(["path", *argv])


def test_strength_lists():
    assert _strengths(_args("--values", "1e-3", "0", "1e-3")) == [0.0, 1e-3]
    grid = _strengths(_args("--grid", "3", "--range", "1e-4", "1e-2"))
    assert grid == pytest.approx([1e-4, 1e-3, 1e-2])
    assert len(_strengths(_args())) == 7
    r1 = _strengths(_args("--search", "random", "--grid", "5", "--seed", "3"))
    assert r1 == _strengths(_args("--search", "random", "--grid", "5", "--seed", "3"))
    assert r1 == sorted(r1) and all(1e-5 <= v <= 3e-2 for v in r1)


@pytest.mark.parametrize(
    "argv",
    [
        ["compare", "--epochs", "0"],
        ["compare", "--epochs", "x"],
        ["compare", "--bogus"],
        ["frobnicate"],
        [],
        ["path", "--reg", "l3"],
        ["path", "--values", "-1e-3"],
        ["path", "--values", "nan"],
        ["path", "--search", "exhaustive"],
        ["path", "--values", "1e-3", "--grid", "3"],
        ["path", "--values", "1e-3", "--search", "random"],
        ["path", "--range", "1e-2", "1e-3"],
        ["path", "--range", "0", "1e-3"],
    ],
)
def test_bad_input_exits_2_with_one_line(argv, capsys, tmp_path):
    assert main([*argv, "--out", str(tmp_path / "never")] if argv else argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "error:" in err and "Traceback" not in err
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize(
    ("argv", "flag", "value"),
    [
        (["compare", "--threads", "100000"], "--threads", "100000"),
        (["compare", "--threads", "0"], "--threads", "0"),
        (["path", "--threads", "1025"], "--threads", "1025"),
        (["compare", "--seed", str(2**70)], "--seed", str(2**70)),
        (["compare", "--seed", str(2**32)], "--seed", str(2**32)),
        (["path", "--seed", "-1"], "--seed", "-1"),
        (["compare", "--epochs", "100001"], "--epochs", "100001"),
        (["path", "--epochs", "0"], "--epochs", "0"),
        (["path", "--grid", str(10**12), "--search", "random"], "--grid", str(10**12)),
        (["path", "--grid", "1001"], "--grid", "1001"),
        (["path", "--grid", "0"], "--grid", "0"),
        (["path", "--values", *["1e-3"] * 1001], "--values", "1001"),
        (["path", "--values", "inf"], "--values", "inf"),
        (["path", "--range", "1e-5", "inf"], "--range", "inf"),
        (["path", "--range", "-1", "1"], "--range", "-1"),
        (["path", "--values", "1e308"], "--values", "1e308"),
        (["path", "--reg", "weight_decay", "--range", "1e-5", "1e4"], "--range", "1e4"),
    ],
)
def test_numeric_flags_are_bounded(argv, flag, value, capsys, tmp_path):
    assert main([*argv, "--out", str(tmp_path / "never")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert flag in err and value in err and "Traceback" not in err
    assert not (tmp_path / "never").exists()


def test_limits_are_accepted(capsys):
    args = build_parser().parse_args(
        ["path", "--threads", "1024", "--seed", str(2**32 - 1), "--epochs", "100000"]
    )
    assert (args.threads, args.seed, args.epochs) == (1024, 2**32 - 1, 100000)
    assert len(_strengths(_args("--grid", "1000"))) == 1000
    assert len(_strengths(_args("--values", *[str(i) for i in range(1000)]))) == 1000
    assert _strengths(_args("--values", "0", "1e3")) == [0.0, 1e3]


@pytest.mark.parametrize(
    ("command", "written"), [("compare", "compare.json"), ("path", "path.json")]
)
def test_earlier_results_are_not_overwritten(command, written, capsys, tmp_path, keep_threads):
    earlier = tmp_path / written
    earlier.write_text("earlier\n")
    argv = [command, "--epochs", "1", "--no-plots", "--no-progress", "--out", str(tmp_path)]
    if command == "path":
        argv += ["--values", "1e-3"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert str(earlier) in err and "--overwrite" in err
    assert earlier.read_text() == "earlier\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [written]
    assert main([*argv, "--overwrite"]) == 0
    assert json.loads(earlier.read_text())["settings"]["epochs"] == 1


def test_a_stale_plot_alone_is_an_earlier_result(capsys, tmp_path, keep_threads):
    (tmp_path / "path.png").write_bytes(b"")
    argv = ["path", "--values", "1e-3", "--epochs", "1", "--no-plots", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path)]) == 2
    assert "path.png" in capsys.readouterr().err
    (tmp_path / "unrelated.png").write_bytes(b"")
    assert main([*argv, "--out", str(tmp_path), "--overwrite"]) == 0
    # the earlier run's plot goes with its results; other files stay
    assert sorted(p.name for p in tmp_path.iterdir()) == ["path.json", "path.txt", "unrelated.png"]


@pytest.mark.slow
def test_readme_first_command_on_a_fresh_clone(tmp_path):
    """README's set-up ends with ``regoptim compare --out runs/compare``: no runs/ there yet."""
    res = subprocess.run(
        [sys.executable, "-m", "regoptim", "compare", "--out", "runs/compare", "--epochs", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "runs" / "compare" / "compare.json").exists()


def test_unwritable_out_exits_2(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    for out in (blocker, blocker / "sub", Path(os.devnull) / "x"):
        assert main(["compare", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("regoptim compare: error: --out: cannot write to")
        assert len(err.strip().splitlines()) == 1


def test_bad_input_through_subprocess(tmp_path):
    res = _run("path", "--values", "-1", "--out", str(tmp_path))
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "Traceback" not in res.stderr


def test_help_and_version(capsys):
    assert main(["--help"]) == 0
    assert "compare" in capsys.readouterr().out
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("regoptim ")


# 2 threads on a busy 2-core machine made compare 30 s instead of 5 s: path tests --threads
@pytest.mark.parametrize(("command", "threads"), [("compare", 1), ("path", 2)])
def test_json_records_the_flags_given(command, threads, tmp_path, keep_threads):
    argv = [command, "--epochs", "1", "--seed", "3", "--threads", str(threads), "--no-plots"]
    if command == "path":
        argv += ["--values", "1e-3", "--cold"]
    assert main([*argv, "--no-progress", "--out", str(tmp_path)]) == 0
    settings = json.loads((tmp_path / f"{command}.json").read_text())["settings"]
    assert (settings["epochs"], settings["seed"], settings["threads"]) == (1, 3, threads)
    assert settings.get("warm_start", False) is False


def test_cold_path_points_are_independent_runs_and_warm_ones_are_not(keep_threads):
    """``--cold``: each strength trains as if alone (same init, same batches); warm: from the
    previous, stronger solution, so the second point differs."""
    import torch

    from regoptim.workflow.paths import digits_path
    from regoptim.workflow.train import load_digits_split

    torch.set_num_threads(1)  # what the command runs with (2 were 5x slower on 2 busy cores)
    data = load_digits_split()

    def run(strengths, warm_start):
        result = digits_path(strengths, epochs=1, warm_start=warm_start, progress=False, data=data)
        return [p.to_dict() for p in result.points]

    alone = run([1e-3], warm_start=True)[0]
    cold = run([3e-2, 1e-3], warm_start=False)
    warm = run([3e-2, 1e-3], warm_start=True)
    assert cold[0] == {**warm[0], "seconds": cold[0]["seconds"]}
    for key in ("train_accuracy", "val_accuracy", "zero_fraction", "residual"):
        assert cold[1][key] == alone[key]
    assert warm[1]["zero_fraction"] != cold[1]["zero_fraction"]
    assert warm[1]["residual"] != cold[1]["residual"]
