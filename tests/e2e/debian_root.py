"""Fresh Debian 12 roots for the end-to-end tests that prove the package and the demo on a clean system.

A root is debootstrap's `minbase` of bookworm, from the Debian mirror this machine's apt uses; the
packages a test needs on top come from that mirror too, with apt inside the root. Only the minbase
is cached: a tarball per day and mirror (debootstrap checks the mirror's signed Release file when it
makes one), so a second run the same day skips the minute debootstrap takes and a fresh machine
(CI) pays it once.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

from .conftest import unavailable, wait_for
from .test_systemd import Machine, systemd_leader

SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_SECURITY = "http://deb.debian.org/debian-security"
CACHE = Path(os.environ.get("PGBA_DEBIAN_ROOT_CACHE", "/var/cache/pg-backup-api-tests"))
# What runs inside a root sees none of the test's environment (the venv's PATH, pip's settings).
CLEAN_ENV = ["env", "-i", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8",
             "DEBIAN_FRONTEND=noninteractive", "HOME=/root"]
NSPAWN = ["systemd-nspawn", "--quiet", "--register=no", "--keep-unit"]


def need_tools() -> None:
    for program in ("debootstrap", "systemd-nspawn", "nsenter", "curl"):
        if shutil.which(program) is None and not Path("/usr/sbin", program).exists():
            unavailable(f"{program} is missing (scripts/bootstrap installs it)")
    if os.geteuid() != 0:
        unavailable("building and booting a Debian root needs root")


def _apt_sources() -> List[Tuple[str, List[str]]]:
    """(URI, suites) of every Debian entry of this machine's apt sources, deb822 and one-line."""
    found: List[Tuple[str, List[str]]] = []
    lists = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*.list"))]
    for path in lists:
        for line in path.read_text().splitlines() if path.is_file() else []:
            words = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()
            if len(words) >= 3 and words[0] == "deb":
                found.append((words[1], [words[2]]))
    for path in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        for stanza in re.split(r"\n\s*\n", path.read_text()):
            fields = dict(re.findall(r"^([A-Za-z-]+):\s*(.*)$", stanza, re.M))
            if "deb" in fields.get("Types", "").split() and fields.get("Enabled", "yes") != "no":
                found.extend((uri, fields.get("Suites", "").split()) for uri in fields.get("URIs", "").split())
    return found


def pip_trust() -> Tuple[List[str], List[str]]:
    """(nspawn options, environment) that give pip in a root the certificate authorities pip trusts
    here: where this machine's network re-signs TLS, the root's pip would otherwise refuse PyPI."""
    for name in ("PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"):
        bundle = os.environ.get(name, "")
        if bundle and Path(bundle).is_file():
            return [f"--bind-ro={bundle}:/etc/pip-ca-bundle.crt"], ["PIP_CERT=/etc/pip-ca-bundle.crt"]
    return [], []


def mirrors() -> Tuple[str, str]:
    """The Debian mirror and the security mirror this machine's apt uses (Debian's own by default)."""
    sources = _apt_sources()
    main = next((uri for uri, suites in sources if SUITE in suites), DEFAULT_MIRROR)
    security = next((uri for uri, suites in sources if f"{SUITE}-security" in suites), DEFAULT_SECURITY)
    return main.rstrip("/"), security.rstrip("/")


def minbase_tarball() -> Path:
    """Today's cached minbase of bookworm for this mirror, made by debootstrap when missing."""
    mirror, _ = mirrors()
    key = hashlib.sha256(mirror.encode()).hexdigest()[:12]
    tarball = CACHE / f"{SUITE}-minbase-{datetime.date.today().isoformat()}-{key}.tar"
    if tarball.exists():
        return tarball
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as work:
        target = Path(work) / "root"
        made = subprocess.run(["debootstrap", "--variant=minbase", SUITE, str(target), mirror],
                              capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=900,
                              env={**os.environ, "PATH": f"/usr/sbin:/sbin:{os.environ.get('PATH', '')}"})
        if made.returncode != 0:
            raise AssertionError(f"debootstrap failed:\n{made.stdout[-3000:]}\n{made.stderr[-3000:]}")
        partial = Path(work) / "minbase.tar"
        subprocess.run(["tar", "-C", str(target), "--numeric-owner", "-cf", str(partial), "."], check=True)
        os.replace(partial, tarball)  # whole or absent: a run stopped midway leaves no half tarball
    for old in CACHE.glob(f"{SUITE}-minbase-*.tar"):
        if old != tarball:
            old.unlink()
    return tarball


class Root:
    """A Debian 12 root directory: commands run in it with systemd-nspawn (not booted) or, once
    booted, through nsenter into its systemd."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.machine: Optional[Machine] = None
        self._proc: Optional[subprocess.Popen] = None

    def run(self, *argv: str, timeout: float = 900) -> subprocess.CompletedProcess:
        """argv inside the root: through systemd-nspawn before the boot, in the booted system after."""
        if self.machine is not None:
            return self.machine.run(*CLEAN_ENV, *argv, timeout=timeout)
        return subprocess.run([*NSPAWN, f"--directory={self.path}", "--pipe", "--", *CLEAN_ENV, *argv],
                              capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=timeout)

    def check(self, *argv: str, timeout: float = 900) -> str:
        done = self.run(*argv, timeout=timeout)
        assert done.returncode == 0, f"{argv} exited {done.returncode}:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
        return done.stdout

    def write(self, path: str, text: str, mode: int = 0o644) -> None:
        target = self.path / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        target.chmod(mode)

    def apt_sources(self) -> None:
        """The root's apt reads the same mirrors as this machine's: the release, its updates, security."""
        mirror, security = mirrors()
        self.write("/etc/apt/sources.list", f"deb {mirror} {SUITE} {SUITE}-updates main\n"
                                            f"deb {security} {SUITE}-security main\n")

    @contextmanager
    def no_service_starts(self) -> Iterator[None]:
        """Packages installed before the boot must not start their daemons in the nspawn of apt."""
        self.write("/usr/sbin/policy-rc.d", "#!/bin/sh\nexit 101\n", 0o755)
        try:
            yield
        finally:
            (self.path / "usr/sbin/policy-rc.d").unlink()

    def boot(self) -> Machine:
        """systemd as PID 1 of the root, on a network of its own (loopback only: its PostgreSQL, sshd
        and the service use their usual ports without meeting this machine's)."""
        log = self.path.parent / f"{self.path.name}-nspawn.log"
        argv = [*NSPAWN, f"--directory={self.path}", "--private-network", "--boot", "--", "systemd.firstboot=off"]
        with open(log, "wb") as out:
            self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True)
        proc = self._proc
        leader = wait_for(lambda: proc.poll() is None and systemd_leader(proc.pid), timeout=30,
                          what=f"systemd-nspawn boots the root's systemd ({log})")
        self.machine = Machine(proc, leader, log, 7480)
        machine = self.machine
        # `degraded`: some of the container's own units fail (no udev): not ours.
        wait_for(lambda: machine.systemctl("is-system-running").stdout.strip() in ("running", "degraded"),
                 timeout=120, interval=0.5, what="the root's systemd reaches its default target")
        return machine

    def http(self, method: str, path: str, body: Optional[str] = None, port: int = 7480) -> Tuple[int, str]:
        """(status, body) of a request to the root's loopback, made from its network namespace."""
        assert self.machine is not None, "the root is not booted"
        argv = ["nsenter", "-t", str(self.machine.leader), "-n", "curl", "-sS", "-m", "60", "-X", method,
                "-w", "\n%{http_code}", f"http://127.0.0.1:{port}{path}"]
        if body is not None:
            argv += ["-H", "Content-Type: application/json", "--data-binary", body]
        done = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=90)
        text, _, code = done.stdout.rpartition("\n")
        return (int(code) if code.isdigit() else 0), text or done.stderr

    def shutdown(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)  # nspawn asks the root's systemd to power off
            try:
                self._proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self.machine = None


@contextmanager
def fresh_root(parent: Path, name: str) -> Iterator[Root]:
    """A new root from the cached minbase, with apt pointed at this machine's mirrors; removed after."""
    need_tools()
    tarball = minbase_tarball()
    path = parent / name
    path.mkdir()
    root = Root(path)
    try:
        subprocess.run(["tar", "-C", str(path), "--numeric-owner", "-xpf", str(tarball)], check=True)
        root.apt_sources()
        yield root
    finally:
        root.shutdown()
        shutil.rmtree(path, ignore_errors=True)
