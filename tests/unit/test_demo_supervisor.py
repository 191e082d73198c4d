"""The supervisor's start / report / stop logic, with dummy children (sleep, sh)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from demo.supervisor import ChildSpec, Supervisor, group_members, log_tail


def alive(pid: int) -> bool:
    """Whether ``pid`` runs and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def wait_for(condition: object, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if callable(condition) and condition():
            return True
        time.sleep(0.05)
    return False


def spec(tmp_path: Path, name: str, script: str) -> ChildSpec:
    return ChildSpec(name, ("sh", "-c", script), log=tmp_path / f"{name}.log")


def test_stop_terminates_every_child_and_reports_exit_codes(tmp_path: Path) -> None:
    supervisor = Supervisor(stop_timeout_s=5)
    a = supervisor.start(spec(tmp_path, "a", "exec sleep 60"))
    b = supervisor.start(spec(tmp_path, "b", "exec sleep 60"))
    assert supervisor.states() == {"a": "running", "b": "running"}
    assert supervisor.poll() == []
    started = time.monotonic()
    codes = supervisor.stop(order=["b"])
    assert time.monotonic() - started < 4  # SIGTERM sufficed, no grace period waited out
    assert codes == {"a": -signal.SIGTERM, "b": -signal.SIGTERM}
    assert not alive(a.pid) and not alive(b.pid)
    assert a.signalled == ["SIGTERM"] and b.signalled == ["SIGTERM"]


def test_a_child_ignoring_sigterm_is_killed_after_the_grace_period(tmp_path: Path) -> None:
    supervisor = Supervisor(stop_timeout_s=1.0)
    stubborn = supervisor.start(spec(tmp_path, "stubborn", "trap '' TERM; echo ready; sleep 60"))
    assert wait_for(lambda: "ready" in log_tail(stubborn.spec.log))
    started = time.monotonic()
    codes = supervisor.stop()
    assert 0.9 <= time.monotonic() - started < 5
    assert codes == {"stubborn": -signal.SIGKILL}
    assert stubborn.signalled == ["SIGTERM", "SIGKILL"]
    assert group_members(stubborn.pid) == []  # its sleep went with the group


def test_poll_reports_a_dead_child_once_with_its_log_tail(tmp_path: Path) -> None:
    supervisor = Supervisor(stop_timeout_s=5)
    script = "for i in $(seq 1 30); do echo line $i; done; echo 'fatal: bad config' >&2; exit 7"
    child = supervisor.start(spec(tmp_path, "learn", script))
    supervisor.start(spec(tmp_path, "other", "exec sleep 60"))
    child.proc.wait(10)
    ended = supervisor.poll()
    assert [(e.name, e.code) for e in ended] == [("learn", 7)]
    lines = ended[0].tail.splitlines()
    assert len(lines) == 20 and lines[-1] == "fatal: bad config" and lines[0] == "line 12"
    assert supervisor.poll() == []  # reported once
    assert supervisor.states() == {"learn": "exit 7", "other": "running"}
    assert supervisor.stop() == {"learn": 7, "other": -signal.SIGTERM}


def test_stop_clears_grandchildren_left_in_the_group(tmp_path: Path) -> None:
    supervisor = Supervisor(stop_timeout_s=5)
    # the shell exits on SIGTERM at once, leaving a background sleep (its child) behind
    parent = supervisor.start(spec(tmp_path, "parent", "sleep 60 & echo $! ; wait"))
    assert wait_for(lambda: log_tail(parent.spec.log).strip().isdigit())
    grandchild = int(log_tail(parent.spec.log).strip())
    assert alive(grandchild) and grandchild in group_members(parent.pid)
    supervisor.stop()
    assert wait_for(lambda: not alive(grandchild), 5)
    assert group_members(parent.pid) == []


def test_children_die_with_a_killed_supervisor(tmp_path: Path) -> None:
    """Even SIGKILL of the demo leaves nothing behind (PR_SET_PDEATHSIG)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux only")
    program = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from demo.supervisor import ChildSpec, Supervisor
        supervisor = Supervisor()
        log = Path({str(tmp_path / "s.log")!r})
        child = supervisor.start(ChildSpec("sleep", ("sleep", "60"), log=log))
        print(child.pid, flush=True)
        time.sleep(60)
        """
    )
    demo = subprocess.Popen(
        [sys.executable, "-c", program], stdout=subprocess.PIPE, cwd=Path(__file__).parents[2]
    )
    assert demo.stdout is not None
    child_pid = int(demo.stdout.readline())
    assert alive(child_pid)
    os.kill(demo.pid, signal.SIGKILL)
    demo.wait(10)
    demo.stdout.close()
    assert wait_for(lambda: not alive(child_pid), 5)


def test_supervisor_rejects_duplicate_names_and_bad_timeouts(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="stop_timeout_s"):
        Supervisor(stop_timeout_s=0)
    with Supervisor(stop_timeout_s=5) as supervisor:
        supervisor.start(spec(tmp_path, "x", "exec sleep 60"))
        with pytest.raises(ValueError, match="already started"):
            supervisor.start(spec(tmp_path, "x", "exec sleep 60"))
    assert supervisor.states() == {"x": f"exit {-signal.SIGTERM}"}
