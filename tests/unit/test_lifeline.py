"""turnstorm.lifeline with real processes: the child of a parent killed with SIGKILL gets
the kernel's parent-death signal."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

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
