"""Child processes of the demo: start each in its own process group, watch, stop them all.

Each child runs in a new session (its own process group), with its stdout and stderr in a log
file. Ctrl-C in the terminal therefore reaches only the demo, which then stops the children in
order: SIGTERM to each, a shared grace period, SIGKILL to the whole group of any child still
there, and finally SIGKILL to whatever is left in each group (grandchildren such as the
learner's consumer process). On Linux every child also gets SIGTERM if the demo itself dies
abruptly (``PR_SET_PDEATHSIG``), so even ``kill -9`` of the demo leaves no process behind.

Examples
--------
>>> import tempfile
>>> log = Path(tempfile.mkdtemp()) / "true.log"
>>> with Supervisor(stop_timeout_s=5) as supervisor:
...     child = supervisor.start(ChildSpec("true", ("true",), log=log))
...     _ = child.proc.wait(5)
...     [(e.name, e.code) for e in supervisor.poll()]
[('true', 0)]
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO

__all__ = ["Child", "ChildExit", "ChildSpec", "Supervisor", "group_members", "log_tail"]

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_REAP_WAIT_S = 2.0  # how long orphans in a child's group get after SIGTERM


@dataclass(frozen=True)
class ChildSpec:
    """How to run one child: its name, command line, environment and log file."""

    name: str
    argv: tuple[str, ...]
    env: Mapping[str, str] | None = None  # None: the demo's own environment
    log: Path = Path("child.log")
    cwd: Path | None = None


@dataclass(frozen=True)
class ChildExit:
    """A child that ended: its exit code (negative: killed by that signal) and its last lines."""

    name: str
    code: int
    tail: str


@dataclass
class Child:
    """A running (or ended) child process."""

    spec: ChildSpec
    proc: subprocess.Popen[bytes]
    log_file: IO[bytes]
    reported: bool = False  # its exit was returned by poll()
    signalled: list[str] = field(default_factory=list)  # signals the supervisor sent

    @property
    def name(self) -> str:
        """The child's name."""
        return self.spec.name

    @property
    def pid(self) -> int:
        """Its pid, which is also its process group id."""
        return self.proc.pid

    def state(self) -> str:
        """``running``, or ``exit <code>``."""
        code = self.proc.poll()
        return "running" if code is None else f"exit {code}"


def log_tail(path: Path, lines: int = 20, max_bytes: int = 64 * 1024) -> str:
    """The last ``lines`` lines of a log file ('' if it does not exist)."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except FileNotFoundError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes in process group ``pgid`` (Linux: from /proc)."""
    proc = Path("/proc")
    if not proc.is_dir():  # elsewhere: all we can tell is whether the group still exists
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return []
        return [pgid]
    members = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 2 and fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the demo dies (Linux only; a no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


class Supervisor:
    """Starts children, reports the ones that end, and stops them all cleanly.

    Parameters
    ----------
    stop_timeout_s
        Grace period after SIGTERM before SIGKILL, shared by all children.
    clock, sleep
        Injectable for tests.
    """

    def __init__(
        self,
        stop_timeout_s: float = 20.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if stop_timeout_s <= 0:
            raise ValueError(f"stop_timeout_s must be > 0, got {stop_timeout_s}")
        self.stop_timeout_s = stop_timeout_s
        self.clock = clock
        self.sleep = sleep
        self.children: dict[str, Child] = {}

    def start(self, spec: ChildSpec) -> Child:
        """Start a child in its own session, output appended to its log file."""
        if spec.name in self.children:
            raise ValueError(f"a child named {spec.name!r} was already started")
        spec.log.parent.mkdir(parents=True, exist_ok=True)
        log_file = spec.log.open("ab")
        try:
            proc = subprocess.Popen(
                list(spec.argv),
                env=None if spec.env is None else dict(spec.env),
                cwd=spec.cwd,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                # safe here: the demo starts its children before any client thread runs
                preexec_fn=_die_with_parent,
            )
        except OSError:
            log_file.close()
            raise
        child = Child(spec, proc, log_file)
        self.children[spec.name] = child
        logger.info("started %s pid=%d log=%s", spec.name, proc.pid, spec.log)
        return child

    def poll(self) -> list[ChildExit]:
        """Children that ended since the last call, with their exit code and log tail."""
        ended = []
        for child in self.children.values():
            code = child.proc.poll()
            if code is not None and not child.reported:
                child.reported = True
                child.log_file.flush()
                ended.append(ChildExit(child.name, code, log_tail(child.spec.log)))
        return ended

    def states(self) -> dict[str, str]:
        """Name -> ``running`` / ``exit <code>`` of every child."""
        return {name: child.state() for name, child in self.children.items()}

    def stop(self, order: Sequence[str] = ()) -> dict[str, int]:
        """Stop every child: SIGTERM (``order`` first), wait, SIGKILL; return the exit codes."""
        names = [n for n in order if n in self.children]
        names += [n for n in self.children if n not in names]
        for name in names:
            child = self.children[name]
            if child.proc.poll() is None:
                child.signalled.append("SIGTERM")
                with contextlib.suppress(ProcessLookupError):
                    child.proc.send_signal(signal.SIGTERM)
        deadline = self.clock() + self.stop_timeout_s
        for name in names:
            self._wait(self.children[name], deadline)
        for child in self.children.values():
            self._clear_group(child)
            child.log_file.close()
        return {name: int(child.proc.returncode) for name, child in self.children.items()}

    def _wait(self, child: Child, deadline: float) -> None:
        try:
            child.proc.wait(max(0.0, deadline - self.clock()))
            return
        except subprocess.TimeoutExpired:
            pass
        logger.warning(
            "%s pid=%d did not stop within %.0f s: SIGKILL",
            child.name,
            child.pid,
            self.stop_timeout_s,
        )
        child.signalled.append("SIGKILL")
        _signal_group(child.pid, signal.SIGKILL)
        child.proc.wait()

    def _clear_group(self, child: Child) -> None:
        """End what the child left in its group (orphaned grandchildren): SIGTERM, then SIGKILL."""
        if not group_members(child.pid):
            return
        _signal_group(child.pid, signal.SIGTERM)
        deadline = self.clock() + _REAP_WAIT_S
        while group_members(child.pid) and self.clock() < deadline:
            self.sleep(0.05)
        left = group_members(child.pid)
        if left:
            logger.warning("%s left processes %s behind: SIGKILL", child.name, left)
            _signal_group(child.pid, signal.SIGKILL)

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
