"""The ``regoptim`` command (also ``python -m regoptim``).

``regoptim compare``: one MLP on scikit-learn's digits under nine optimizer/regularization
configurations; prints a table and writes plots. ``regoptim path``: sweeps a regularization
strength (strongest first, warm-started), picks it by validation accuracy and scores the test set
once. ``regoptim prune``: group lasso, then slim (:mod:`regoptim.workflow.prune`). Run
``regoptim -h``.

Usage errors (unknown flags, values out of range, an unwritable output directory, earlier results
in ``--out`` without ``--overwrite``) print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

__all__ = ["main"]

DEFAULT_RANGES = {"l1": (1e-5, 3e-2), "weight_decay": (1e-5, 1e-1)}


class UsageError(Exception):
    """Bad input found after parsing: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


MAX_EPOCHS = 100_000
MAX_THREADS = 1024  # torch.set_num_threads(100000) segfaults; 1024 is far past any CPU's use
MAX_SEED = 2**32 - 1  # the range numpy and most tools accept; torch takes it too
MAX_STRENGTHS = 1000  # --grid N and the number of --values
# at lr 0.1 an l1 of 1e3 zeroes every weight and a weight_decay past 20 diverges; ProxSGD's
# threshold lr*l1 must also fit in float32 (1e308 raised inside torch's softshrink)
MAX_STRENGTH = 1e3
MAX_REPEATS = 100_000  # timed forward passes per model and batch size (regoptim prune)


def _int_in(lo: int, hi: int) -> Callable[[str], int]:
    """An argparse type: an integer in ``[lo, hi]``; argparse names the flag in its message."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"expected an integer in [{lo}, {hi}], got {text!r}")
        return value

    return parse


def _strength(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value <= MAX_STRENGTH:  # also rejects NaN
        raise argparse.ArgumentTypeError(
            f"expected a strength in [0, {MAX_STRENGTH:g}], got {text!r}"
        )
    return value


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("regoptim")
    except Exception:  # not installed (running from a checkout)
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="regoptim",
        description="Regularization in practice: compare optimizers and tune strengths on "
        "scikit-learn's handwritten digits (offline, CPU, about a minute).",
    )
    parser.add_argument("--version", action="version", version=f"regoptim {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="{compare,path,prune}", required=True)

    def common(p: argparse.ArgumentParser, out: str, epochs: int) -> None:
        p.add_argument(
            "--epochs",
            type=_int_in(1, MAX_EPOCHS),
            default=epochs,
            help=f"default {epochs}, at most {MAX_EPOCHS}",
        )
        p.add_argument(
            "--seed",
            type=_int_in(0, MAX_SEED),
            default=0,
            help=f"init and batch-order seed in [0, {MAX_SEED}] (default 0)",
        )
        p.add_argument("--out", default=out, metavar="DIR", help=f"output directory ({out})")
        p.add_argument(
            "--overwrite",
            action="store_true",
            help="replace the results of an earlier run in DIR (refused without it)",
        )
        p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
        p.add_argument("--no-plots", action="store_true", help="write no PNGs")
        p.add_argument(
            "--threads",
            type=_int_in(1, MAX_THREADS),
            default=1,
            help="torch CPU threads (default 1: fastest for this small model, and the results "
            f"then do not depend on the machine's core count; at most {MAX_THREADS})",
        )

    compare = sub.add_parser(
        "compare",
        help="one MLP, nine optimizer/regularization set-ups, one table",
        description="Train a 64-256-10 MLP on the digits under SGD, SGD + coupled "
        "weight_decay, ProxSGD decoupled decay, SGD + L1 in the loss, ProxSGD l1, ProxSGD "
        "group lasso, AdamW, ProxAdamW l1 and ProxAdamW group lasso (same init, same batches; "
        "group lasso on the hidden neurons); print test accuracy, exact-zero fraction, zero "
        "neurons and mean optimizer-step time; write weights.png, sparsity.png and "
        "compare.json to DIR.",
    )
    common(compare, "runs/compare", 60)

    path = sub.add_parser(
        "path",
        help="sweep a strength, pick it by validation accuracy",
        description="Train ProxSGD along the strengths, strongest first, each from the "
        "previous solution (warm starts; --cold: each from the initialization), on the train "
        "split; report validation accuracy, sparsity, the prox-gradient residual on the train "
        "split and the training time of each, name the best by validation accuracy and report "
        "its test accuracy once; write path.png and path.json to DIR.",
    )
    path.add_argument(
        "--reg",
        choices=("l1", "weight_decay"),
        default="l1",
        help="proximal l1 (default) or coupled L2 weight_decay",
    )
    values = path.add_mutually_exclusive_group()
    values.add_argument(
        "--values",
        type=_strength,
        nargs="+",
        metavar="V",
        help=f"explicit strengths in [0, {MAX_STRENGTH:g}]",
    )
    values.add_argument(
        "--grid",
        type=_int_in(1, MAX_STRENGTHS),
        metavar="N",
        help=f"number of strengths to try (default 7, at most {MAX_STRENGTHS})",
    )
    path.add_argument(
        "--search",
        choices=("grid", "random"),
        default="grid",
        help="log-spaced grid (default) or log-uniform random samples over --range",
    )
    path.add_argument(
        "--range",
        type=_strength,
        nargs=2,
        metavar=("LO", "HI"),
        help="strength range for --grid/--search (default 1e-5 3e-2 for l1, 1e-5 1e-1 for "
        "weight_decay)",
    )
    path.add_argument(
        "--cold",
        action="store_true",
        help="start every strength from the initialization (default: warm starts, each "
        "strength from the previous, stronger one's solution)",
    )
    common(path, "runs/path", 60)

    prune = sub.add_parser(
        "prune",
        help="group lasso on the hidden neurons, then slim: a smaller, faster model",
        description="Train a 64-256-128-10 MLP with ProxSGD and row group lasso on its hidden "
        "layers, remove the neurons that are exactly zero (regoptim.slim; predictions checked "
        "unchanged), report parameters, test accuracy and CPU latency before and after; write "
        "prune.txt, prune.json and prune_channels.png to DIR.",
    )
    prune.add_argument(
        "--group-l1",
        type=_strength,
        default=0.05,
        metavar="V",
        help=f"group lasso strength in [0, {MAX_STRENGTH:g}] (default 0.05)",
    )
    prune.add_argument(
        "--repeats",
        type=_int_in(1, MAX_REPEATS),
        default=500,
        help=f"timed forward passes per model and batch size (default 500, at most {MAX_REPEATS})",
    )
    common(prune, "runs/prune", 30)
    return parser


#: every file each command writes to --out (the PNGs unless --no-plots)
OUTPUTS = {
    "compare": ("compare.txt", "compare.json", "weights.png", "sparsity.png"),
    "path": ("path.txt", "path.json", "path.png"),
    "prune": ("prune.txt", "prune.json", "prune_channels.png"),
}


def _check_no_earlier_results(args: argparse.Namespace) -> None:
    """Refuse to replace an earlier run's results unless ``--overwrite`` says so."""
    if args.overwrite:
        return
    for name in OUTPUTS[args.command]:
        earlier = Path(args.out) / name
        if earlier.exists():
            raise UsageError(
                f"--out: {str(earlier)!r} holds earlier results; pass --overwrite to replace them"
            )


def _report_written(command: str, out: Path, written: list[Path]) -> None:
    """Print what was written; drop an earlier run's files this run did not replace (its PNGs
    after ``--overwrite --no-plots``), so that DIR never mixes two runs."""
    for name in OUTPUTS[command]:
        if out / name not in written:
            (out / name).unlink(missing_ok=True)
    print("wrote " + ", ".join(str(p) for p in written))


def _prepare_out(out: str) -> Path:
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise UsageError(f"--out: cannot write to {out!r}: {reason}") from None
    return path


def _strengths(args: argparse.Namespace) -> list[float]:
    if args.values is not None:
        if args.search == "random" or args.range is not None:
            raise UsageError("--values cannot be combined with --search random or --range")
        if len(args.values) > MAX_STRENGTHS:
            raise UsageError(f"--values: at most {MAX_STRENGTHS} strengths, got {len(args.values)}")
        return sorted(set(args.values))
    lo, hi = args.range if args.range is not None else DEFAULT_RANGES[args.reg]
    if not 0 < lo < hi:
        raise UsageError(f"--range: need 0 < LO < HI, got {lo:g} {hi:g}")
    n = 7 if args.grid is None else args.grid
    if args.search == "grid":
        if n == 1:
            return [math.sqrt(lo * hi)]
        step = (math.log(hi) - math.log(lo)) / (n - 1)
        return [math.exp(math.log(lo) + i * step) for i in range(n)]
    import torch

    u = torch.rand(n, generator=torch.Generator().manual_seed(args.seed), dtype=torch.float64)
    return sorted(float(lo * (hi / lo) ** x) for x in u)


def _plots_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(
            "regoptim: matplotlib is not installed, plots skipped (pip install 'regoptim[plots]')",
            file=sys.stderr,
        )
        return False
    return True


def _run_compare(args: argparse.Namespace, out: Path) -> None:
    from .compare import run_command

    plots = not args.no_plots and _plots_available()
    _report_written("compare", out, run_command(args, out, plots=plots))


def _run_path(args: argparse.Namespace, out: Path) -> None:
    from .paths import digits_path

    strengths = _strengths(args)
    start = "cold" if args.cold else "warm"
    print(
        f"ProxSGD {args.reg} path over {len(strengths)} strengths ({args.search}), strongest "
        f"first, {start} starts, {args.epochs} epochs each, seed {args.seed}, "
        f"{args.threads} thread(s); train/val/test 60/20/20",
        flush=True,
    )
    result = digits_path(
        strengths,
        reg=args.reg,
        epochs=args.epochs,
        seed=args.seed,
        warm_start=not args.cold,
        progress=not args.no_progress,
    )
    table = result.table()
    print(table)
    print(result.summary())
    (out / "path.txt").write_text(table + "\n" + result.summary() + "\n")
    (out / "path.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    written = [out / "path.txt", out / "path.json"]
    if not args.no_plots and _plots_available():
        from .plots import plot_regularization_path

        pts = result.points
        fig = plot_regularization_path(
            [p.strength for p in pts],
            {
                "train": [p.train_accuracy for p in pts],
                "validation": [p.val_accuracy for p in pts],
            },
            [p.sparsity.fraction for p in pts],
            best=result.best.strength,
            xlabel=args.reg,
            path=out / "path.png",
            title=f"ProxSGD {args.reg} path on digits ({start} starts)",
        )
        fig.clear()
        written.append(out / "path.png")
    _report_written("path", out, written)


def _run_prune(args: argparse.Namespace, out: Path, argv: list[str]) -> None:
    from .prune import run_command

    plots = not args.no_plots and _plots_available()
    _report_written("prune", out, run_command(args, out, argv=argv, plots=plots))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0, 1 on a missing dependency, 2 on bad
    input, 130 on Ctrl-C)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # usage errors (2), --help and --version (0)
        return exc.code if isinstance(exc.code, int) else 2
    prog = f"regoptim {args.command}"
    try:
        if args.command == "path":
            _strengths(args)  # validate before touching the file system
        _check_no_earlier_results(args)
        out = _prepare_out(args.out)
        import torch

        torch.set_num_threads(args.threads)
        if args.command == "compare":
            _run_compare(args, out)
        elif args.command == "path":
            _run_path(args, out)
        else:
            _run_prune(args, out, list(sys.argv[1:] if argv is None else argv))
    except UsageError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `regoptim compare | head`
        return 0
    return 0
