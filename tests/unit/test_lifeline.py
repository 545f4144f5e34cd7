"""turnstorm.lifeline with real processes: a parent killed with SIGKILL leaves nothing of
what it tracked, its children get the kernel's parent-death signal, and nothing else is
touched."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

from turnstorm.lifeline import read_tracked

PARENT = textwrap.dedent("""
    import subprocess, sys, tempfile, time
    from turnstorm import lifeline

    lifeline.arm()
    directory = tempfile.mkdtemp(dir=sys.argv[1])
    lifeline.track("dir", directory)
    # like a relay: a session of its own, its directory on its command line
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                              directory + "/turnserver.conf"], start_new_session=True)
    done = tempfile.mkdtemp(dir=sys.argv[1])
    lifeline.track("dir", done)
    lifeline.untrack(done)
    print(directory, done, child.pid, lifeline._guard.process.pid, flush=True)
    if sys.argv[2] == "orderly":
        child.kill()
        child.wait()
        lifeline.untrack(directory)
        lifeline.disarm()
        print("disarmed", flush=True)
    time.sleep(60)
""")


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            return handle.read().rpartition(")")[2].split()[0] == "Z"
    except OSError:
        return True


def wait_until(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_the_guard_undoes_what_a_killed_parent_left(tmp_path: Path) -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path), "killed"],
                              stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    directory, done, child, guard = parent.stdout.readline().split()
    # a process that names the directory but is no child of the parent: not the guard's
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                                  directory + "/turnserver.log"])
    try:
        assert os.path.isdir(directory) and os.path.isdir(done)
        parent.send_signal(signal.SIGKILL)
        parent.wait(5)
        assert wait_until(lambda: gone(int(child)) and not os.path.exists(directory))
        assert wait_until(lambda: gone(int(guard)))
        assert bystander.poll() is None
        assert os.path.isdir(done)  # untracked: not the guard's to remove
    finally:
        bystander.kill()
        bystander.wait()
        if not gone(int(child)):
            os.kill(int(child), signal.SIGKILL)


def test_an_orderly_parent_leaves_the_guard_nothing(tmp_path: Path) -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path), "orderly"],
                              stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    try:
        directory, _, _, guard = parent.stdout.readline().split()
        assert parent.stdout.readline() == "disarmed\n"
        assert gone(int(guard))  # disarm waited for it
        assert os.path.isdir(directory)  # untracked: the parent's to remove, not the guard's
    finally:
        parent.kill()
        parent.wait()


CHILD = textwrap.dedent("""
    import signal, subprocess, sys, time
    if sys.argv[1] == "child":
        from turnstorm.lifeline import bind_to_parent
        parent = bind_to_parent()
        def stop(signum, frame):
            print("SIGTERM", parent.gone, flush=True)
            sys.exit(0)
        signal.signal(signal.SIGTERM, stop)
        print("armed", flush=True)
        time.sleep(60)
    else:
        child = subprocess.Popen([sys.executable, "-c", sys.argv[2], "child", ""])
        time.sleep(60)
""")


def test_a_child_gets_sigterm_when_its_parent_is_killed() -> None:
    parent = subprocess.Popen([sys.executable, "-c", CHILD, "parent", CHILD],
                              stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    assert parent.stdout.readline() == "armed\n"
    parent.send_signal(signal.SIGKILL)
    parent.wait(5)
    assert parent.stdout.readline() == "SIGTERM True\n"  # and the watch sees a new parent


def test_a_line_cut_short_by_the_parents_death_is_left_out() -> None:
    lines = ['["track", "dir", "/tmp/a"]\n', '["track", "cgroup", "/sys/fs/cgroup/b"]\n',
             '["untrack", "/tmp/a"]\n', '["track", "dir", "/tm']
    assert read_tracked(lines) == {"/sys/fs/cgroup/b": "cgroup"}


def test_the_echo_peer_takes_the_signal_repeated() -> None:
    """A dying parent with threads signals its child once per thread it hands it over
    from: the echo peer stops on the first SIGTERM and ignores the rest."""
    for _ in range(10):  # the signals land anywhere, the first line included
        echo = subprocess.Popen([sys.executable, "-m", "turnstorm.loadgen.echo"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert echo.stdout is not None
        assert echo.stdout.readline().startswith("echo listening on ")
        for _ in range(3):
            echo.send_signal(signal.SIGTERM)
        out, err = echo.communicate(timeout=10)
        assert (echo.returncode, err) == (0, "")
        assert out.startswith("echoed 0 datagrams")
