"""A real single-node Ceph for tests: one monitor and one memstore OSD on 127.0.0.1, cephx
on, pool size 1, everything under a temporary directory (Debian's ceph-mon, ceph-osd and
ceph-common). `with CephCluster() as ceph:` gives a pool and a CSI user's key."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from types import TracebackType

BINARIES = ("ceph-mon", "ceph-osd", "ceph", "ceph-authtool", "monmaptool", "rbd")


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class CephCluster:
    def __init__(self, pool: str = "rbd", user: str = "csi", parent: Path | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="ceph-", dir=parent))
        self.conf = self.dir / "ceph.conf"
        self.pool = pool
        self.user = user
        self.key = ""
        self.monitors = ""
        self._daemons: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> CephCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def ceph(self, *args: str, timeout: float = 60) -> str:
        return self._run("ceph", "-c", str(self.conf), *args, timeout=timeout)

    def rbd(self, *args: str, timeout: float = 60) -> str:
        return self._run("rbd", "-c", str(self.conf), *args, timeout=timeout)

    def start(self) -> None:
        port = _free_port()
        fsid = str(uuid.uuid4())
        self.monitors = f"v2:127.0.0.1:{port}"
        for sub in ("run", "log", "crash", "mon", "osd/ceph-0"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(self._conf(fsid))
        keyring = str(self.dir / "keyring")
        self._run("ceph-authtool", "--create-keyring", keyring, "--gen-key", "-n", "mon.",
                  "--cap", "mon", "allow *")  # fmt: skip
        self._run("ceph-authtool", keyring, "--gen-key", "-n", "client.admin",
                  "--cap", "mon", "allow *", "--cap", "osd", "allow *",
                  "--cap", "mgr", "allow *")  # fmt: skip
        self._run("ceph-authtool", keyring, "--gen-key", "-n", "osd.0",
                  "--cap", "mon", "allow profile osd", "--cap", "osd", "allow *",
                  "--cap", "mgr", "allow profile osd")  # fmt: skip
        monmap = str(self.dir / "monmap")
        self._run("monmaptool", "--create", "--fsid", fsid, "--addv", "a",
                  f"[{self.monitors}]", monmap)  # fmt: skip
        self._run("ceph-mon", "-c", str(self.conf), "--mkfs", "-i", "a", "--monmap", monmap,
                  "--keyring", keyring)  # fmt: skip
        self._daemon("ceph-mon", "-c", str(self.conf), "-f", "-i", "a")
        osd_uuid = str(uuid.uuid4())
        self.ceph("osd", "new", osd_uuid, "0")
        self._run("ceph-osd", "-c", str(self.conf), "-i", "0", "--mkfs", "--osd-uuid", osd_uuid)
        self._daemon("ceph-osd", "-c", str(self.conf), "-f", "-i", "0")
        self.ceph("osd", "pool", "create", self.pool, "8", "8")
        self.rbd("pool", "init", self.pool, timeout=120)
        out = self.ceph("auth", "get-or-create", f"client.{self.user}", "mon", "profile rbd",
                        "osd", f"profile rbd pool={self.pool}", "--format", "json")  # fmt: skip
        self.key = json.loads(out)[0]["key"]

    def stop(self) -> None:
        for proc in reversed(self._daemons):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self._daemons:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._daemons.clear()
        shutil.rmtree(self.dir, ignore_errors=True)

    def pause(self) -> None:
        """An outage: the monitor and the OSD stop answering (SIGSTOP), connections stay."""
        for proc in self._daemons:
            proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        for proc in self._daemons:
            proc.send_signal(signal.SIGCONT)

    def log_tail(self, lines: int = 40) -> str:
        out = []
        for log in sorted((self.dir / "log").glob("*.log")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"== {log.name}\n" + "\n".join(text))
        return "\n".join(out)

    def _conf(self, fsid: str) -> str:
        d = self.dir
        settings = {
            "fsid": fsid,
            "mon host": self.monitors,
            "public addr": "127.0.0.1",
            "cluster addr": "127.0.0.1",
            "auth cluster required": "cephx",
            "auth service required": "cephx",
            "auth client required": "cephx",
            "keyring": f"{d}/keyring",
            "run dir": f"{d}/run",
            "log file": f"{d}/log/$name.log",
            "mon cluster log file": f"{d}/log/cluster.log",
            "crash dir": f"{d}/crash",
            "mon data": f"{d}/mon/$cluster-$id",
            "osd data": f"{d}/osd/$cluster-$id",
            "osd objectstore": "memstore",
            "memstore page set": "true",
            "memstore page size": "4096",
            "memstore device bytes": str(4 << 30),
            "osd pool default size": "1",
            "osd pool default min size": "1",
            "osd pool default pg num": "8",
            "osd pool default pgp num": "8",
            "osd crush chooseleaf type": "0",
            # not the host name, which the lab's guest may not have
            "crush location": "root=default host=ceph-test",
            "mon allow pool size one": "true",
            "mon warn on pool no redundancy": "false",
            "mon data avail warn": "1",
            "mon data avail crit": "0",
            "paxos propose interval": "0.1",
            "paxos min wait": "0.01",
            "mon tick interval": "1",
            # A killed client's watch, and so its exclusive lock, lapses after this many
            # seconds (30 by default): the tests that kill a writer wait it out. Clients ping
            # every 5 s (objecter tick), so a live one keeps its watch.
            "osd client watch timeout": "15",
        }
        return "[global]\n" + "".join(f"{k} = {v}\n" for k, v in settings.items())

    def _daemon(self, *argv: str) -> None:
        log = open(self.dir / "log" / f"{argv[0]}.out", "wb")  # noqa: SIM115 (the daemon's)
        self._daemons.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT))

    def _run(self, *argv: str, timeout: float = 60) -> str:
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(
                f"{' '.join(argv)} did not finish in {timeout:g} s\n{self.log_tail()}"
            ) from None
        if r.returncode != 0:
            raise RuntimeError(
                f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip()}\n{self.log_tail()}"
            )
        return r.stdout
