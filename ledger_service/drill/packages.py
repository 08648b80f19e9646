"""What the drill runs, from Debian's archive: Patroni, etcd and PostgreSQL 15. Installed with apt-get when missing
(as .ci/run installs MariaDB), or refused with one line saying why."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ledger_service.drill.processes import DrillError

PG_BIN = Path("/usr/lib/postgresql/15/bin")

PACKAGES = {  # Debian package -> a file it installs
    "patroni": Path("/usr/bin/patroni"),
    "etcd-server": Path("/usr/bin/etcd"),
    "etcd-client": Path("/usr/bin/etcdctl"),
    "postgresql-15": PG_BIN / "postgres",
}


@dataclass(frozen=True)
class Binaries:
    patroni: Path
    etcd: Path
    pg_bin: Path


def missing() -> list[str]:
    return [package for package, path in PACKAGES.items() if not path.exists()]


def ensure_installed() -> Binaries:
    """The binaries, installing the missing packages first when this process may (root, with apt-get)."""
    absent = missing()
    if absent:
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            raise DrillError(f"missing Debian packages {' '.join(absent)}, and only root with apt-get can install them")
        _apt_install(absent)
        absent = missing()
        if absent:
            raise DrillError(f"apt-get did not install {' '.join(absent)}")
    return Binaries(PACKAGES["patroni"], PACKAGES["etcd-server"], PG_BIN)


def _apt_install(packages: list[str]) -> None:
    """apt-get install, refreshing the package lists only when the first attempt fails (.ci/run's apt_install)."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]

    def run(command: list[str]) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(command, check=False, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # noqa: S603

    if run(install).returncode == 0:
        return
    run(["apt-get", "update", "-q"])
    result = run(install)
    if result.returncode != 0:
        last = result.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise DrillError(f"apt-get install {' '.join(packages)} failed: {last[0]}")
