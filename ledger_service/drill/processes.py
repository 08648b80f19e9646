"""The drill's processes: where they live (one fixed folder, so a crashed run's leftovers can be found), how they
are started (each in a session of its own, as the unprivileged user PostgreSQL needs) and how they are ended:
every process whose working directory or command line is inside that folder, whatever became of its parent."""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

BASE = Path(tempfile.gettempdir()) / "ledger-drill"
"""Everything a run creates: data directories, configurations, logs. Removed at the start of the next run."""

LOCK = Path(tempfile.gettempdir()) / "ledger-drill.lock"


class DrillError(Exception):
    """The drill cannot go on; the message is one line for the operator."""


@dataclass(frozen=True)
class RunAs:
    """Who the cluster's processes run as: PostgreSQL refuses root, so root runs them as `postgres`."""

    uid: int
    gid: int
    name: str

    @classmethod
    def choose(cls) -> RunAs:
        if os.geteuid() != 0:
            return cls(os.getuid(), os.getgid(), pwd.getpwuid(os.getuid()).pw_name)
        try:
            entry = pwd.getpwnam("postgres")
        except KeyError:
            raise DrillError("running as root, but there is no `postgres` user to run PostgreSQL as") from None
        if shutil.which("setpriv") is None:
            raise DrillError("running as root, but setpriv (util-linux) is missing to drop to the postgres user")
        return cls(entry.pw_uid, entry.pw_gid, entry.pw_name)

    def command(self, argv: Sequence[str]) -> list[str]:
        if os.geteuid() != 0:
            return list(argv)
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--init-groups", "--", *argv]

    def own(self, path: Path) -> None:
        if os.geteuid() == 0:
            os.chown(path, self.uid, self.gid)


@contextmanager
def exclusive_run() -> Iterator[None]:
    """One drill at a time on this machine: a second would sweep the first one's processes."""
    with LOCK.open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DrillError(f"another drill is running (it holds {LOCK})") from None
        yield


def spawn(argv: Sequence[str], *, cwd: Path, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """A child in a session of its own (its process group can be signalled whole), output appended to `log`."""
    handle: IO[bytes] = log.open("ab")
    try:
        return subprocess.Popen(  # noqa: S603 - the drill's own commands, built from fixed parts
            list(argv), cwd=cwd, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, start_new_session=True,
        )  # fmt: skip
    finally:
        handle.close()


def ours() -> list[int]:
    """Every process working in BASE or naming it on its command line (PostgreSQL backends work in their data
    directory, so they are found although their titles are rewritten)."""
    found = []
    base = str(BASE)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cwd == base or cwd.startswith(base + "/") or base + "/" in cmdline:
            found.append(int(entry.name))
    return found


def signal_quietly(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def postmaster_pid(data_dir: Path) -> int | None:
    """The postmaster's pid from its postmaster.pid, if it is running."""
    try:
        found = int((data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None
    try:
        os.kill(found, 0)
    except ProcessLookupError:
        return None
    return found


def sweep(data_dirs: Sequence[Path] = (), then: Callable[[], None] | None = None) -> list[str]:
    """End every process of a run (this one's or a crashed one's): PostgreSQL servers first with an immediate
    shutdown (SIGQUIT: the postmaster ends its children and frees its shared memory), then SIGKILL for the rest.
    `then` runs after the servers are down (the etcd members' own stop). Returns the command lines of the processes
    that were left to kill."""
    for pid in ours():
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "patroni" in command:
            signal_quietly(pid, signal.SIGKILL)  # first, so that nobody restarts a server
    dirs = list(data_dirs) or [path.parent for path in BASE.glob("*/data/postmaster.pid")]
    for data_dir in dirs:
        postmaster = postmaster_pid(data_dir)
        if postmaster is not None:
            signal_quietly(postmaster, signal.SIGQUIT)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(postmaster_pid(d) for d in dirs):
        time.sleep(0.1)
    if then is not None:
        then()
    left = ours()
    names = [command_line(pid) for pid in left]
    for pid in left:
        signal_quietly(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and ours():
        time.sleep(0.1)
    for data_dir in dirs:
        remove_orphaned_shared_memory(data_dir)
    return [name for name in names if name]


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()[:80]
    except OSError:
        return ""


def remove_orphaned_shared_memory(data_dir: Path) -> None:
    """A postmaster killed with SIGKILL and never started again leaves its small System V segment behind. The
    segment's id is on line 7 of its postmaster.pid; it is removed only when nobody is attached to it."""
    try:
        shmid = (data_dir / "postmaster.pid").read_text().split("\n")[6].split()[1]
        table = Path("/proc/sysvipc/shm").read_text().splitlines()
    except (OSError, IndexError):
        return
    for row in table[1:]:
        fields = row.split()  # key shmid perms size cpid lpid nattch ...
        if fields[1] == shmid and fields[6] == "0":
            subprocess.run(["ipcrm", "-m", shmid], check=False, capture_output=True)  # noqa: S603,S607


def fresh_base(run_as: RunAs) -> Path:
    """BASE, emptied of a previous run (its processes ended first)."""
    if BASE.exists():
        sweep()
        shutil.rmtree(BASE)
    BASE.mkdir(mode=0o755)
    run_as.own(BASE)
    return BASE


def own_dir(path: Path, run_as: RunAs) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    run_as.own(path)
    return path


def free_ports(count: int) -> list[int]:
    """`count` distinct loopback ports free right now."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()
