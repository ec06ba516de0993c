"""Building, caching and loading the fused CPU kernel (regoptim.backends.cpu.build): what is loaded is
only what this user built (never a file another user could have planted), a damaged cache entry
is rebuilt, a cached build needs no compiler, a hung compiler times out.

One real build (module fixture, in a subprocess); the other cases use fake compilers (shell
scripts): one that fails and logs its arguments, one that "builds" by copying the real build, one
that hangs. Children run in subprocesses wherever a bad shared object could kill the process.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from regoptim.backends.cpu import build as cb
from regoptim.backends.cpu.private_files import is_private_dir

REAL_CXX = cb._compiler()
needs_cxx = pytest.mark.skipif(REAL_CXX is None, reason="needs a C++ compiler")
posix_only = pytest.mark.skipif(os.name != "posix", reason="uid and mode bits")

_CHILD = """
import os, torch
os.umask(0o002)  # common for users with their own group: the linker's output is then 0775
from regoptim.backends.cpu import kernel as cf
print(cf.available())
p = [torch.randn(100)]
from regoptim.hyper import SgdHyper
cf.fused_prox_sgd_(p, [torch.randn(100)], None, SgdHyper(lr=0.1, l1=0.1),
    is_first_step=True, grad_scale=None, found_inf=None)
assert torch.isfinite(p[0]).all()
print(cf.build_info()["source"], cf.build_count(), sep="|")
"""


@pytest.fixture(autouse=True)
def _no_prebuilt(monkeypatch):
    """These tests are about the JIT build and its cache, not the install-time build."""
    monkeypatch.setenv("REGOPTIM_NO_PREBUILT", "1")


def _private(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def _child(cache: Path, tmp: Path, **env: str) -> tuple[str, str, int]:
    """Run one fused=True step in a fresh process: (available(), source, build_count)."""
    full = dict(os.environ, REGOPTIM_CACHE_DIR=str(cache), TMPDIR=str(_private(tmp)), **env)
    full["REGOPTIM_NO_PREBUILT"] = "1"  # the JIT build and its cache, not the install-time one
    out = subprocess.run(
        [sys.executable, "-c", _CHILD], capture_output=True, text=True, env=full, timeout=300
    )
    assert out.returncode == 0, f"child exited with {out.returncode}:\n{out.stderr}"
    avail, result = out.stdout.strip().splitlines()[-2:]
    source, count = result.split("|")
    return avail, source, int(count)


def _script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def _entry(directory: Path) -> tuple[Path, Path]:
    (so,) = directory.glob("fused_cpu_*.so")
    return so, so.with_suffix(".json")


def _plant(directory: Path, stem: str, data: bytes = b"not a shared object") -> Path:
    """A file with the expected name and a record that matches it (both are public)."""
    so = directory / f"{stem}.so"
    so.write_bytes(data)
    record = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (directory / f"{stem}.json").write_text(json.dumps(record))
    return so


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache directory holding one real build."""
    if REAL_CXX is None:
        pytest.skip("needs a C++ compiler")
    root = tmp_path_factory.mktemp("built")
    cache = root / "cache"
    _, source, count = _child(cache, root / "tmp")
    assert (source, count) == ("compiled", 1)
    return cache


@dataclass
class Fresh:
    root: Path
    loaded: list[str]  # what ctypes.CDLL was asked to load


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Fresh:
    """No kernel loaded in this process; the cache in ``root/cache``, the temp dir in
    ``root/tmp``; ``ctypes.CDLL`` records its argument and loads nothing."""
    monkeypatch.setattr(cb, "_lib", None)
    monkeypatch.setattr(cb, "_info", {})
    monkeypatch.setattr(tempfile, "tempdir", str(_private(tmp_path / "tmp")))
    monkeypatch.setenv("REGOPTIM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("REGOPTIM_BUILD_TIMEOUT", raising=False)
    loaded: list[str] = []

    def cdll(path: str, *args: object, **kwargs: object) -> None:
        loaded.append(str(path))
        raise OSError(f"test: not loading {path}")

    monkeypatch.setattr(cb.ctypes, "CDLL", cdll)
    return Fresh(tmp_path, loaded)


@pytest.fixture
def failing_cxx(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """$CXX: a compiler that logs its arguments and fails; returns the log."""
    log = tmp_path / "cxx.log"
    _script(tmp_path / "fail-cxx", f'echo "$@" >> {log}\nexit 1\n')
    monkeypatch.setenv("CXX", str(tmp_path / "fail-cxx"))
    return log


def _outputs(log: Path) -> list[Path]:
    """The directories the fake compiler was asked to write into."""
    dirs = []
    for line in log.read_text().splitlines():
        args = line.split()
        dirs.append(Path(args[args.index("-o") + 1]).parent)
    return dirs


# ---------------------------------------------------------------------------------------------
# 5. never load what another user could have written


@posix_only
def test_planted_file_in_world_writable_dir_is_never_loaded(fresh, failing_cxx, monkeypatch):
    shared = fresh.root / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setenv("REGOPTIM_CACHE_DIR", str(shared))
    for flags in cb._FLAG_SETS:
        _plant(shared, cb._entry_name(flags))
    with pytest.raises(RuntimeError, match="compiling the fused CPU kernel failed"):
        cb.load()
    assert not [p for p in fresh.loaded if Path(p).parent == shared]
    outputs = _outputs(failing_cxx)
    assert outputs and shared not in outputs  # nor compiled into it
    assert outputs[0] == fresh.root / "tmp" / f"regoptim-{os.getuid()}"  # the per-user fallback
    assert (outputs[0].stat().st_mode & 0o777) == 0o700


@posix_only
def test_group_writable_file_is_not_loaded(fresh, failing_cxx):
    cache = _private(fresh.root / "cache")
    planted = [_plant(cache, cb._entry_name(flags)) for flags in cb._FLAG_SETS]
    for so in planted:
        so.chmod(0o664)
    with pytest.raises(RuntimeError, match="compiling the fused CPU kernel failed"):
        cb.load()
    assert not set(fresh.loaded) & {str(p) for p in planted}
    assert _outputs(failing_cxx)[0] == cache  # the directory itself is fine: rebuilt there


@posix_only
def test_symlinked_file_is_not_followed(fresh, failing_cxx):
    cache = _private(fresh.root / "cache")
    elsewhere = _private(fresh.root / "elsewhere")
    for flags in cb._FLAG_SETS:
        stem = cb._entry_name(flags)
        (cache / f"{stem}.so").symlink_to(_plant(elsewhere, stem))
        shutil.copy(elsewhere / f"{stem}.json", cache)
    with pytest.raises(RuntimeError, match="compiling the fused CPU kernel failed"):
        cb.load()
    assert fresh.loaded == []


@posix_only
def test_verified_entry_that_fails_to_load_is_rebuilt(fresh, failing_cxx):
    cache = _private(fresh.root / "cache")
    planted = _plant(cache, cb._entry_name(cb._FLAG_SETS[0]))  # ours, intact, not a library
    with pytest.raises(RuntimeError, match="compiling the fused CPU kernel failed"):
        cb.load()
    assert fresh.loaded == [str(planted)]
    assert set(_outputs(failing_cxx)) == {cache}  # rebuilt in place (with each flag set)


@posix_only
def test_directory_of_another_user_is_not_used(fresh, failing_cxx, monkeypatch):
    cache = _private(fresh.root / "cache")
    planted = [_plant(cache, cb._entry_name(flags)) for flags in cb._FLAG_SETS]
    monkeypatch.setattr(os, "getuid", lambda: 4242)  # everything here now "belongs" to root
    assert cb.available() is None  # a (fake) compiler is on hand
    with pytest.raises(RuntimeError, match="compiling the fused CPU kernel failed"):
        cb.load()
    assert not set(fresh.loaded) & {str(p) for p in planted}
    out = _outputs(failing_cxx)[0]
    # neither the cache nor <tmp>/regoptim-4242 (made by "another user"): a fresh mkdtemp dir
    assert out.parent == fresh.root / "tmp" and out.name.startswith("regoptim-")
    assert out.name != "regoptim-4242"


@posix_only
@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="lchown needs root")
def test_symlink_planted_by_another_user_is_not_followed(fresh, failing_cxx):
    target = _private(fresh.root / "target")
    planted = [_plant(target, cb._entry_name(flags)) for flags in cb._FLAG_SETS]
    link = fresh.root / "cache"
    link.symlink_to(target)
    assert is_private_dir(link)  # a symlink this user made is fine
    os.lchown(link, 4242, 4242)
    assert not is_private_dir(link)
    with pytest.raises(RuntimeError, match="compiling the fused CPU kernel failed"):
        cb.load()
    assert not set(fresh.loaded) & {str(p) for p in planted}
    assert link not in _outputs(failing_cxx)


@posix_only
def test_cache_dir_is_created_private_whatever_the_umask(fresh, failing_cxx, monkeypatch):
    cache = fresh.root / "new" / "cache"
    monkeypatch.setenv("REGOPTIM_CACHE_DIR", str(cache))
    old = os.umask(0)
    try:
        with pytest.raises(RuntimeError):
            cb.load()
    finally:
        os.umask(old)
    assert (cache.stat().st_mode & 0o777) == 0o700


# ---------------------------------------------------------------------------------------------
# 6. a damaged entry is rebuilt, in a fresh process (a SIGBUS fails the test, not pytest)


@needs_cxx
@pytest.mark.parametrize("damage", ["truncate", "flip_byte"])
def test_damaged_cache_entry_is_rebuilt(built, tmp_path, damage):
    cache = tmp_path / "cache"
    shutil.copytree(built, cache)
    good, _ = _entry(built)
    so, record = _entry(cache)
    data = bytearray(so.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0xFF
    so.write_bytes(bytes(data))
    # "builds" by copying the real build (a real compile costs seconds), recreating its output as
    # some linkers do (mode 0664 under the child's umask 002); --version as the real one
    cxx = _script(
        tmp_path / "copy-cxx",
        f'[ "$1" = --version ] && exec {REAL_CXX} --version\n'
        'while [ $# -gt 1 ]; do [ "$1" = -o ] && out="$2"; shift; done\n'
        f'rm -f "$out" && cat {good} > "$out"\n',
    )
    _, source, count = _child(cache, tmp_path / "tmp", CXX=str(cxx))
    assert (source, count) == ("compiled", 1)
    assert so.read_bytes() == good.read_bytes()
    meta = json.loads(record.read_text())
    assert meta["size"] == so.stat().st_size
    assert meta["sha256"] == hashlib.sha256(so.read_bytes()).hexdigest()
    assert _child(cache, tmp_path / "tmp", CXX=str(cxx))[1:] == ("disk cache", 0)


@needs_cxx
def test_build_leaves_a_record_and_no_temp_files(built):
    so, record = _entry(built)
    meta = json.loads(record.read_text())
    assert meta["size"] == so.stat().st_size
    assert meta["sha256"] == hashlib.sha256(so.read_bytes()).hexdigest()
    assert meta["compiler"] == REAL_CXX
    assert sorted(p.name for p in built.iterdir()) == sorted([so.name, record.name])
    assert not so.stat().st_mode & 0o022


# ---------------------------------------------------------------------------------------------
# 7. a cached build needs no compiler; a hung compiler times out


@needs_cxx
def test_cached_build_loads_without_a_compiler(built, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(built, cache)
    empty = _private(tmp_path / "empty-path")
    avail, source, count = _child(cache, tmp_path / "tmp", PATH=str(empty), CXX="/nonexistent")
    assert (avail, source, count) == ("None", "disk cache", 0)


@needs_cxx
def test_without_a_compiler_a_damaged_entry_is_not_available(built, fresh, monkeypatch):
    cache = fresh.root / "cache"
    shutil.copytree(built, cache)
    so, _ = _entry(cache)
    monkeypatch.setenv("PATH", str(_private(fresh.root / "empty-path")))
    monkeypatch.setenv("CXX", "/nonexistent")
    assert cb.available() is None
    so.write_bytes(so.read_bytes()[:-1])
    msg = cb.available()
    assert msg is not None and "C++ compiler" in msg
    with pytest.raises(RuntimeError, match="C\\+\\+ compiler"):
        cb.load()
    assert fresh.loaded == []


@posix_only
def test_hung_compiler_times_out(fresh, monkeypatch):
    log = fresh.root / "cxx.log"
    cxx = _script(fresh.root / "slow-cxx", f'echo "$@" >> {log}\nsleep 20\n')
    monkeypatch.setenv("CXX", str(cxx))
    monkeypatch.setenv("REGOPTIM_BUILD_TIMEOUT", "0.5")
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match=r"within 0\.5 s") as exc:
        cb.load()
    assert time.perf_counter() - t0 < 10.0  # the sleep (a grandchild) was killed too
    assert str(cxx) in str(exc.value) and "REGOPTIM_BUILD_TIMEOUT" in str(exc.value)
    assert len(log.read_text().splitlines()) == 1  # not retried with the other flag sets


@pytest.mark.parametrize("value", ["abc", "0", "-1", "inf", "nan"])
def test_bad_build_timeout_is_a_clear_error(fresh, failing_cxx, monkeypatch, value):
    monkeypatch.setenv("REGOPTIM_BUILD_TIMEOUT", value)
    with pytest.raises(ValueError, match="REGOPTIM_BUILD_TIMEOUT must be a positive number"):
        cb.load()
    assert not failing_cxx.exists()  # checked before anything runs
