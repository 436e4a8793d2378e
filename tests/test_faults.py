"""Faults on real filesystems (issue 12, section 2): a full disk (a small tmpfs) and files a non-root user
may not read or write (the CLI run as `nobody`). The CLI runs in a subprocess, as a user runs it: one
line on stderr and exit 1, nothing half-written that looks complete, and the same command, rerun once
the fault is fixed, ends with the files of an uninterrupted run."""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from helpers import tree_bytes
from unparrot.verify import verify

SRC = Path(__file__).resolve().parents[1] / "src"
STAGE = ["run", "inspect", "--workers", "1", "--quiet"]  # a per-shard stage writing columns and errors


def _cli(args, pool, user_cmd=()):
    """`unparrot <args[0]> POOL <args[1:]>` in a subprocess (run by the command prefix `user_cmd` when
    given): (exit code, stderr)."""
    argv = [args[0], str(pool), *args[1:]]
    if user_cmd:
        cmd = [*user_cmd, *argv]
        env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(Path(pool).parent)}
    else:
        cmd = [sys.executable, "-m", "unparrot", *argv]
        env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1"}
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    return p.returncode, p.stderr


def _assert_one_line_error(rc, err, *names):
    assert rc == 1, (rc, err)
    assert "Traceback" not in err and err.strip().count("\n") == 0, err
    for name in names:
        assert name in err, err


def _clean_run(synth_pool, tmp_path):
    """The stage's columns and errors from an uninterrupted run on an ordinary folder."""
    clean = shutil.copytree(synth_pool, tmp_path / "clean")
    assert _cli(STAGE, clean)[0] == 0
    return {d: tree_bytes(clean / d / "inspect") for d in ("columns", "errors")}, clean


def _assert_nothing_complete_looking(pool):
    """After a failed run: every problem `verify` names is an unfinished stage (which select refuses),
    never a column file that is there but unreadable or short; temp files are left only for the rerun."""
    problems = [why for _, why in verify(pool).problems]
    assert all("incomplete" in why or "interrupted write" in why for why in problems), problems


def _assert_rerun_equals(pool, want, user_cmd=()):
    rc, err = _cli(STAGE, pool, user_cmd)
    assert rc == 0, err
    assert {d: tree_bytes(pool / d / "inspect") for d in ("columns", "errors")} == want
    assert not list(Path(pool).rglob(".*.tmp")) and verify(pool).ok, verify(pool).line()


# ---- a full disk ----------------------------------------------------------------------------------
@pytest.fixture
def small_tmpfs():
    """A tmpfs of 32 MiB (remount(kib) resizes it), unmounted afterwards; skipped where mounting is not
    permitted (not root, or no CAP_SYS_ADMIN in a container)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = Path(tempfile.mkdtemp(prefix="unparrot-tmpfs-"))
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if p.returncode != 0:
        mnt.rmdir()
        pytest.skip(f"mount -t tmpfs not permitted here: {p.stderr.strip()}")

    def remount(kib):
        subprocess.run(["mount", "-o", f"remount,size={kib}k", str(mnt)], check=True)

    try:
        yield mnt, remount
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
        mnt.rmdir()


def _kib_used(path):
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize // 1024


def test_a_full_disk_fails_in_one_line_and_the_rerun_completes(synth_pool, tmp_path, small_tmpfs):
    """A pool on a tmpfs with room for a quarter, half, three quarters of the stage's output: the stage
    stops with one line (no space left), exit 1; what is there is an unfinished stage whose files are each
    whole (equal to the uninterrupted run's), no column file that looks complete; after the tmpfs is made
    larger the same command ends with the uninterrupted run's files."""
    mnt, remount = small_tmpfs
    want, _ = _clean_run(synth_pool, tmp_path)
    out_kib = sum(-(-len(b) // 4096) * 4 for files in want.values() for b in files.values())  # in pages
    for quarter in (1, 2, 3):
        remount(32 * 1024)
        shutil.rmtree(mnt / "pool", ignore_errors=True)
        pool = shutil.copytree(synth_pool, mnt / "pool")
        remount(_kib_used(mnt) + out_kib * quarter // 4)
        rc, err = _cli(STAGE, pool)
        _assert_one_line_error(rc, err, "No space left on device")
        _assert_nothing_complete_looking(pool)
        for d, files in want.items():
            got = tree_bytes(pool / d / "inspect")
            assert all(got[f] == files[f] for f in got if not f.endswith(".tmp")), (quarter, d)
        remount(32 * 1024)
        _assert_rerun_equals(pool, want)


# ---- permission denied as a non-root user ----------------------------------------------------------
# the CLI as `nobody`: the system's python3.11 (the venv's own interpreter lives under /root, which nobody
# cannot enter) with the venv's site-packages and this checkout's src put on its path by _BOOT
_BOOT = (
    "import site, sys; site.addsitedir(sys.argv.pop(1)); sys.path.insert(0, sys.argv.pop(1)); "
    "from unparrot.cli import main; sys.argv[0] = 'unparrot'; sys.exit(main())"
)


@pytest.fixture
def nobody():
    """(command prefix running python as nobody, a folder of nobody's); skipped where that cannot be."""
    import sysconfig

    if os.geteuid() != 0:
        pytest.skip("running the CLI as nobody needs root")
    setpriv, py = shutil.which("setpriv"), shutil.which("python3.11", path="/usr/bin:/bin")
    if setpriv is None or py is None:
        pytest.skip("needs setpriv and /usr/bin/python3.11 (the venv's interpreter is not readable by nobody)")
    prefix = [setpriv, "--reuid=nobody", "--regid=nogroup", "--clear-groups", py, "-s", "-c", _BOOT]
    prefix += [sysconfig.get_paths()["purelib"], str(SRC)]
    probe = subprocess.run([*prefix, "--version"], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    if probe.returncode != 0:
        pytest.skip(f"nobody cannot run the venv and this source: {probe.stderr.strip()[-300:]}")
    home = Path(tempfile.mkdtemp(prefix="unparrot-nobody-"))  # not under pytest's root-only tmp folder
    home.chmod(0o755)
    try:
        yield prefix, home
    finally:
        shutil.rmtree(home)


def _chown_nobody(path):
    shutil.chown(path, "nobody", "nogroup")
    for p in Path(path).rglob("*"):
        shutil.chown(p, "nobody", "nogroup")


def test_an_unreadable_shard_as_nobody(synth_pool, tmp_path, nobody):
    """One shard of mode 000, the CLI run as nobody: one line naming the file, exit 1, nothing
    complete-looking written for it; once it is readable the rerun ends with the uninterrupted run's files."""
    prefix, home = nobody
    want, _ = _clean_run(synth_pool, tmp_path)
    pool = shutil.copytree(synth_pool, home / "pool")
    _chown_nobody(pool)
    shard = pool / "shards" / "00001.tar"
    shard.chmod(0o000)
    rc, err = _cli(STAGE, pool, prefix)
    _assert_one_line_error(rc, err, str(shard))
    assert not (pool / "columns" / "inspect" / "00001.parquet").exists()
    _assert_nothing_complete_looking(pool)
    shard.chmod(0o644)
    _assert_rerun_equals(pool, want, prefix)


def test_an_unwritable_pool_folder_as_nobody(synth_pool, tmp_path, nobody):
    """The pool folder is root's (nobody may read, not write): one line naming the folder, exit 1,
    nothing written; once nobody owns it the rerun ends with the uninterrupted run's files."""
    prefix, home = nobody
    want, _ = _clean_run(synth_pool, tmp_path)
    pool = shutil.copytree(synth_pool, home / "pool")
    rc, err = _cli(STAGE, pool, prefix)
    _assert_one_line_error(rc, err, str(pool / "columns"))
    assert not (pool / "columns").exists() and not (pool / "errors").exists()
    _chown_nobody(pool)
    _assert_rerun_equals(pool, want, prefix)
