"""``regoptim prune`` and :func:`regoptim.workflow.prune.prune_digits` at tiny sizes (2 epochs).

In 2 epochs the command's default strength (0.05) leaves every neuron in place, so these tests
train with ``group_l1`` 0.2, where rows do go to zero (but not all of them).
"""

from __future__ import annotations

import json

import pytest
import torch

from regoptim import ProxSGD, SlimReport, structured_groups
from regoptim.workflow.cli import main
from regoptim.workflow.prune import PRUNE_DEFAULTS, DigitsMLP, Latency, PruneResult, prune_digits

pytest.importorskip("sklearn")
pytest.importorskip("tqdm")

STRONG = "0.2"  # zeroes some hidden neurons within 2 epochs


@pytest.fixture
def keep_threads():
    """``main`` pins torch to ``--threads`` threads: give the test process its count back."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data():
    from regoptim.workflow.train import load_digits_split

    return load_digits_split()


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _argv(out, *extra: str) -> list[str]:
    return ["prune", "--epochs", "2", "--repeats", "3", "--threads", "1", "--out", str(out), *extra]


def test_prune_command_end_to_end(tmp_path, keep_threads, capsys):
    argv = _argv(tmp_path, "--seed", "3", "--group-l1", STRONG)
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "100%" in captured.err  # the tqdm bar, on stderr
    table = (tmp_path / "prune.txt").read_text()
    assert table.strip() in captured.out
    for row in ("parameters", "test accuracy", "latency, batch 1 ", "latency, batch 360 "):
        assert row in table
    names = {"prune.txt", "prune.json"} | ({"prune_channels.png"} if _has_matplotlib() else set())
    assert {p.name for p in tmp_path.iterdir()} == names
    if _has_matplotlib():
        assert (tmp_path / "prune_channels.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    record = json.loads((tmp_path / "prune.json").read_text())
    assert record["argv"] == argv
    s = record["settings"]
    assert (s["epochs"], s["seed"], s["threads"], s["repeats"]) == (2, 3, 1, 3)
    assert s["group_l1"] == float(STRONG)
    assert record["params_after"] < record["params_before"]
    assert record["test_accuracy_after"] == record["test_accuracy_before"]
    hidden = {r["layer"]: r for r in record["layers"]}
    assert sum(hidden[n]["before"] - hidden[n]["kept"] for n in ("fc1", "fc2")) > 0
    assert hidden["fc3"]["kept"] == hidden["fc3"]["before"] == 10  # the output layer stays
    assert [lat["batch"] for lat in record["latency"]] == [1, 360]
    assert all(lat["before_us"] > 0 and lat["after_us"] > 0 for lat in record["latency"])


def test_no_progress_no_plots_and_default_strength_is_recorded(tmp_path, keep_threads, capsys):
    assert main(_argv(tmp_path, "--no-progress", "--no-plots")) == 0
    assert capsys.readouterr().err == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prune.json", "prune.txt"]
    record = json.loads((tmp_path / "prune.json").read_text())
    assert record["settings"]["group_l1"] == 0.05 and record["settings"]["seed"] == 0
    assert record["params_after"] <= record["params_before"]


def test_earlier_results_are_not_overwritten(tmp_path, keep_threads, capsys):
    earlier = tmp_path / "prune.json"
    earlier.write_text("earlier\n")
    argv = _argv(tmp_path, "--no-progress", "--no-plots")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert str(earlier) in err and "--overwrite" in err
    assert earlier.read_text() == "earlier\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prune.json"]
    (tmp_path / "prune_channels.png").write_bytes(b"")  # an earlier run's plot
    assert main([*argv, "--overwrite"]) == 0
    assert json.loads(earlier.read_text())["settings"]["epochs"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prune.json", "prune.txt"]


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--group-l1", "-0.1"),
        ("--group-l1", "nan"),
        ("--group-l1", "inf"),
        ("--group-l1", "1001"),
        ("--group-l1", "x"),
        ("--repeats", "0"),
        ("--repeats", "100001"),
        ("--epochs", "0"),
        ("--epochs", "100001"),
        ("--threads", "0"),
        ("--threads", "1025"),
        ("--seed", "-1"),
        ("--seed", str(2**32)),
    ],
)
def test_bad_flags_exit_2_with_one_line(flag, value, tmp_path, capsys):
    assert main(["prune", flag, value, "--out", str(tmp_path / "never")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("regoptim prune: error:") and flag in err and value in err
    assert not (tmp_path / "never").exists()


def test_limits_are_accepted():
    from regoptim.workflow.cli import build_parser

    args = build_parser().parse_args(["prune", "--group-l1", "1e3", "--repeats", "100000"])
    assert (args.group_l1, args.repeats) == (1e3, 100000)
    defaults = build_parser().parse_args(["prune"])
    assert defaults.out == "runs/prune"
    for key in ("epochs", "group_l1", "repeats"):  # the command's defaults are the library's
        assert getattr(defaults, key) == PRUNE_DEFAULTS[key], key


def test_prune_digits_returns_a_typed_result_whose_slim_model_predicts_the_same(data):
    torch.set_num_threads(1)
    result = prune_digits(epochs=2, group_l1=float(STRONG), repeats=2, progress=False, data=data)
    assert isinstance(result, PruneResult)
    assert isinstance(result.report, SlimReport)
    assert all(isinstance(lat, Latency) for lat in result.latencies)
    assert [lat.batch for lat in result.latencies] == [1, data.x_test.shape[0]]
    assert not result.model.training and not result.slim_model.training
    with torch.no_grad():
        before = result.model(data.x_test)
        after = result.slim_model(data.x_test)
    torch.testing.assert_close(after, before)
    assert torch.equal(after.argmax(1), before.argmax(1))
    kept = {r.layer: r.after for r in result.report.rows}
    assert result.slim_model.fc1.out_features == kept["fc1"] < 256
    assert result.slim_model.fc2.in_features == kept["fc1"]
    assert result.slim_model.fc2.out_features == kept["fc2"] <= 128
    n_params = sum(p.numel() for p in result.slim_model.parameters())
    assert n_params == result.params_after < result.params_before
    assert result.params_before == sum(p.numel() for p in DigitsMLP().parameters())
    # every removed neuron's row and bias were exactly zero in the trained model
    removed = (result.model.fc1.weight == 0).all(1) & (result.model.fc1.bias == 0)
    assert int(removed.sum()) == 256 - kept["fc1"]


def test_without_group_lasso_nothing_is_removed(data):
    torch.set_num_threads(1)
    result = prune_digits(epochs=1, group_l1=0.0, repeats=1, progress=False, data=data)
    assert [(r.before, r.after) for r in result.report.rows] == [(256, 256), (128, 128), (10, 10)]
    assert result.params_after == result.params_before


def test_group_lasso_keeps_applying_on_the_default_cpu_path():
    """The command trains on the default CPU path, whose per-group plan cache (main) bypasses
    the dispatch after the first step: group lasso must not take the plan (the merge of the
    group branch), so the default path matches the for-loop path step after step."""
    torch.set_num_threads(1)
    x = torch.randn(32, 64)
    y = torch.randint(0, 10, (32,))
    runs = []
    for foreach in (None, False):
        torch.manual_seed(0)
        model = DigitsMLP((16, 8))
        groups = structured_groups(model, x[:2], group_l1=0.05)
        opt = ProxSGD(groups, lr=0.1, momentum=0.9, foreach=foreach)
        for _ in range(4):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        runs.append([p.detach().clone() for p in model.parameters()])
    for default, loop in zip(*runs, strict=True):
        torch.testing.assert_close(default, loop)


def test_a_slim_model_that_changes_predictions_is_an_error(data, monkeypatch):
    import regoptim.workflow.prune

    real_slim = regoptim.workflow.prune.slim

    def wrong_slim(model, example_inputs, *, report):
        small, rep = real_slim(model, example_inputs, report=True)
        with torch.no_grad():
            small.fc3.bias[0] += 1e3  # every input now predicts class 0
        return small, rep

    monkeypatch.setattr(regoptim.workflow.prune, "slim", wrong_slim)
    with pytest.raises(RuntimeError, match="changed .* test predictions"):
        prune_digits(epochs=1, group_l1=0.0, repeats=1, progress=False, data=data)


def test_help_lists_prune(capsys):
    assert main(["--help"]) == 0
    assert "prune" in capsys.readouterr().out
    assert main(["prune", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--group-l1" in out and "--repeats" in out and "--overwrite" in out
