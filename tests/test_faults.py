"""Faults on real filesystems (issue 12, section 2): a full disk (a small tmpfs) and files the CLI may not
read or write (file permissions, enforced for root too by dropping its override capabilities). The CLI
runs in a subprocess, as a user runs it: one line on stderr and exit 1, nothing half-written that looks
complete, and the same command, rerun once the fault is fixed, ends with the files of an uninterrupted
run."""

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
    """`unparrot <args[0]> POOL <args[1:]>` in a subprocess (under the command prefix `user_cmd`, e.g.
    setpriv): (exit code, stderr)."""
    cmd = [*user_cmd, sys.executable, "-m", "unparrot", args[0], str(pool), *args[1:]]
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


# ---- permission denied ----------------------------------------------------------------------------
# A user's own file of mode 000, or own folder of mode 555, is refused by the kernel. Root is not refused (it
# holds CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH), so as root the CLI runs under `setpriv` with those two
# capabilities dropped from its bounding set: the same permission checks as for any user, and, unlike
# switching to `nobody`, it still reaches the venv and a checkout under a root-only folder (mktemp -d, /root).


@pytest.fixture
def permissions_apply():
    """The command prefix under which file permissions apply to the CLI; skipped where that cannot be."""
    if os.geteuid() != 0:
        return ()
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("as root, needs setpriv (util-linux) to drop CAP_DAC_OVERRIDE for the CLI")
    prefix = (setpriv, "--bounding-set=-dac_override,-dac_read_search")
    with tempfile.TemporaryDirectory() as d:
        probe = Path(d) / "probe"
        probe.write_text("x")
        probe.chmod(0o000)
        p = subprocess.run([*prefix, sys.executable, "-c", f"open({str(probe)!r})"], capture_output=True)
    if p.returncode == 0 or b"PermissionError" not in p.stderr:
        pytest.skip(f"dropping CAP_DAC_OVERRIDE did not make permissions apply here: {p.stderr[-200:]!r}")
    return prefix


def test_an_unreadable_shard(synth_pool, tmp_path, permissions_apply):
    """One shard of mode 000: one line naming the file, exit 1, nothing complete-looking written for it;
    once it is readable the rerun ends with the uninterrupted run's files."""
    want, _ = _clean_run(synth_pool, tmp_path)
    pool = shutil.copytree(synth_pool, tmp_path / "pool")
    shard = pool / "shards" / "00001.tar"
    shard.chmod(0o000)
    try:
        rc, err = _cli(STAGE, pool, permissions_apply)
        _assert_one_line_error(rc, err, str(shard))
        assert not (pool / "columns" / "inspect" / "00001.parquet").exists()
        _assert_nothing_complete_looking(pool)
    finally:
        shard.chmod(0o644)
    _assert_rerun_equals(pool, want, permissions_apply)


def test_an_unwritable_pool_folder(synth_pool, tmp_path, permissions_apply):
    """The pool folder of mode 555 (readable, not writable): one line naming the folder, exit 1, nothing
    written; once it is writable the rerun ends with the uninterrupted run's files."""
    want, _ = _clean_run(synth_pool, tmp_path)
    pool = shutil.copytree(synth_pool, tmp_path / "pool")
    pool.chmod(0o555)
    try:
        rc, err = _cli(STAGE, pool, permissions_apply)
        _assert_one_line_error(rc, err, str(pool / "columns"))
        assert not (pool / "columns").exists() and not (pool / "errors").exists()
    finally:
        pool.chmod(0o755)
    _assert_rerun_equals(pool, want, permissions_apply)
