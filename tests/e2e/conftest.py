"""The real stack for end-to-end tests: PostgreSQL, Barman, sshd (tests/sandbox) and the service.

With CI=true nothing here may skip: a missing component fails the run.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import pytest
import requests

from tests import sandbox as stack
from tests.conftest import wait_for as poll

ROOT = Path(__file__).resolve().parents[2]
VHOST = ROOT / "apache" / "pg-backup-api.conf"
ERROR_DOCS = ROOT / "apache" / "errors"
VENV = Path(os.environ.get("PGBA_VENV", "/opt/pg-backup-api/venv"))
IN_CI = os.environ.get("CI", "").lower() == "true"
TARGET_USER = "postgres"  # the sandbox's SSH_COMMAND logs in as this user


def unavailable(reason: str) -> None:
    """Skip on a developer machine that lacks the stack; fail in CI, where it must be there."""
    if IN_CI:
        pytest.fail(f"end-to-end stack unavailable in CI: {reason}", pytrace=False)
    pytest.skip(f"end-to-end stack unavailable: {reason} (run scripts/bootstrap as root)")


# The real stack is slower than a unit test's stand-ins: a minute by default.
wait_for = partial(poll, timeout=60.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


read_env = stack.read_env


@dataclass
class Sandbox:
    directory: Path
    env: Dict[str, str]

    def __getitem__(self, key: str) -> str:
        return self.env[key]

    def psql(self, port: int, sql: str) -> str:
        return stack.psql(self.directory, port, sql).strip()

    def start_copy(self, datadir: str) -> int:
        port = free_port()
        stack.start_copy(self.directory, datadir, port)
        return port

    def stop_copy(self, datadir: str) -> None:
        try:
            stack.stop_copy(self.directory, datadir)
        except stack.SandboxError:
            pass  # a copy still running is stopped by the session's `down` at the latest

    @contextmanager
    def copy(self, datadir: str) -> Iterator[int]:
        """A restored cluster started for the duration of the block; its port."""
        port = self.start_copy(datadir)
        try:
            yield port
        finally:
            self.stop_copy(datadir)

    def restore_dir(self, name: str) -> str:
        return f"{self['RESTORE_PARENT']}/{name}"

    def as_target_user(self, *argv: str) -> None:
        """Run *argv* on the target host as its ssh user (the sandbox's target is this machine)."""
        subprocess.run(["runuser", "-u", TARGET_USER, "--", *argv], check=True, stdin=subprocess.DEVNULL,
                       capture_output=True, timeout=60)

    def holding_files(self, name: str, files: Optional[Dict[str, bytes]] = None) -> Path:
        """A directory of RESTORE_PARENT, made by the target's ssh user, holding *files* (one by default).

        As a destination, Barman refuses it at once: the quickest recovery that ends FAILED with
        Barman's reason, now that a host the service cannot reach is refused at POST time.
        """
        directory = Path(self.restore_dir(name))
        self.as_target_user("mkdir", "-p", str(directory))
        for file_name, data in (files or {"somebody-elses.data": b"precious\n"}).items():
            self.as_target_user("mkdir", "-p", str((directory / file_name).parent))
            subprocess.run(["runuser", "-u", TARGET_USER, "--", "tee", str(directory / file_name)], input=data,
                           stdout=subprocess.DEVNULL, check=True, timeout=60)
        return directory


def sandbox_up(prefix: str, parent: Optional[str] = None, **settings: Any) -> Sandbox:
    """A new sandbox on free ports in a new temporary directory (in *parent*, default the system's
    temporary directory); the caller calls sandbox_down."""
    directory = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        # SANDBOX_BARMAN_USER, SANDBOX_SERVER and SANDBOX_CRON_INTERVAL still apply; the ports are free ones.
        env = stack.up(directory, **{**stack.environment_settings(os.environ), "pg_port": free_port(),
                                     "ssh_port": free_port(), "venv": VENV, **settings})
    except stack.SandboxError as error:
        sandbox_down(directory)
        pytest.fail(f"the sandbox did not come up: {error}", pytrace=False)
    return Sandbox(directory, env)


def sandbox_down(directory: Path) -> None:
    if (directory / ".sandbox").exists():
        stack.down(directory, purge=True)
    else:  # up failed before it recorded anything: nothing runs for it
        shutil.rmtree(directory, ignore_errors=True)


def barman(sandbox: Sandbox, *args: str) -> subprocess.CompletedProcess:
    """The `barman` command as the Barman user, with the service's configuration file."""
    return subprocess.run(["runuser", "-u", sandbox["BARMAN_USER"], "--", "env", f"HOME={sandbox['BARMAN_HOME']}",
                           str(VENV / "bin" / "barman"), "-c", sandbox["BARMAN_CONF"], *args],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="session")
def sandbox() -> Iterator[Sandbox]:
    if os.geteuid() != 0:
        unavailable("the sandbox creates users and runs services: run the tests as root")
    for needed in [VENV / "bin" / "barman", VENV / "bin" / "pg-backup-api"]:
        if not needed.exists():
            unavailable(f"{needed} is missing")
    box = sandbox_up("pgba-e2e-")
    try:
        yield box
    finally:
        sandbox_down(box.directory)


def proxy_secret(sandbox: Sandbox) -> Dict[str, Path]:
    """The proxy's secret for this sandbox, made once, as an operator makes it: the installed
    `pg-backup-api proxy-secret`, as root; `file` is the services' proxy_secret_file, `include` the vhost's."""
    folder = sandbox.directory / "proxy-secret"
    made = {"file": folder / "secret", "include": folder / "apache.conf"}
    if not made["include"].exists():
        group = grp.getgrgid(pwd.getpwnam(sandbox["BARMAN_USER"]).pw_gid).gr_name
        done = subprocess.run([str(VENV / "bin" / "pg-backup-api"), "proxy-secret", "--apache-include",
                               str(made["include"]), "--group", group],
                              env={**os.environ, "PG_BACKUP_API_PROXY_SECRET_FILE": str(made["file"])},
                              capture_output=True, text=True, stdin=subprocess.DEVNULL)
        assert done.returncode == 0, done.stdout + done.stderr
    return made


class Service:
    """pg-backup-api run as the Barman user, the way it runs in production."""

    def __init__(self, sandbox: Sandbox, extra_env: Optional[Dict[str, str]] = None, venv: Path = VENV) -> None:
        self.sandbox = sandbox
        self.extra_env = extra_env or {}
        self.venv = venv
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = sandbox.directory / "log" / f"service-{self.port}.log"
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> "Service":
        user = self.sandbox["BARMAN_USER"]
        argv = ["runuser", "-u", user, "--", "env", f"PG_BACKUP_API_BARMAN_CONF={self.sandbox['BARMAN_CONF']}",
                f"PATH={self.venv}/bin:/usr/bin:/bin", f"HOME={self.sandbox['BARMAN_HOME']}",
                f"PG_BACKUP_API_PROXY_SECRET_FILE={proxy_secret(self.sandbox)['file']}",
                *(f"{k}={v}" for k, v in self.extra_env.items()),
                str(self.venv / "bin" / "pg-backup-api"), "serve", "--port", str(self.port)]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{self.url}/status", timeout=1).json() == "OK":
                    return self
            except requests.RequestException:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"the service did not start:\n{self.log.read_text()}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=30)

    def get(self, path: str, **kw) -> requests.Response:
        return requests.get(self.url + path, timeout=30, **kw)

    def post(self, path: str, **kw) -> requests.Response:
        return requests.post(self.url + path, timeout=30, **kw)

    def wait_until_ended(self, server: str, op_id: str, timeout: float = 300,
                         headers: Optional[Dict[str, str]] = None) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.get(f"/servers/{server}/operations/{op_id}", headers=headers).json()
            if status["status"] != "IN_PROGRESS":
                return status
            time.sleep(0.5)
        raise AssertionError(f"operation {op_id} still IN_PROGRESS after {timeout} s")


@pytest.fixture(scope="session")
def service(sandbox: Sandbox) -> Iterator[Service]:
    svc = Service(sandbox).start()
    yield svc
    svc.stop()


# ------------------------------------------------------------------------------------------------
# processes, Apache and certificates (shared by the deployment and the page's tests)
# ------------------------------------------------------------------------------------------------

def need(*programs: str) -> None:
    for program in programs:
        if shutil.which(program) is None:
            unavailable(f"{program} is not installed")


def alive(pid: int) -> bool:
    """Running, not a zombie waiting for init to reap it (/proc still lists zombies)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def children(pid: int) -> List[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


class Apache:
    """A second apache2 instance in its own APACHE_CONFDIR; /etc/apache2 stays untouched."""

    def __init__(self, root: Path) -> None:
        need("apache2ctl", "a2enmod", "a2ensite")
        if not Path("/etc/apache2/apache2.conf").exists():
            unavailable("Debian's apache2 is not installed")
        self.root = root
        self.confdir = root / "apache2"
        self.log_dir = root / "apache2-log"
        self.env = {**os.environ, "APACHE_CONFDIR": str(self.confdir)}
        shutil.copytree("/etc/apache2", self.confdir, symlinks=True)
        for d in ("run", "lock"):
            (self.confdir / d).mkdir(exist_ok=True)
        self.log_dir.mkdir()
        (self.confdir / "envvars").write_text(
            "unset HOME\nexport APACHE_RUN_USER=www-data APACHE_RUN_GROUP=www-data\n"
            f"export APACHE_PID_FILE={self.confdir}/run/apache2.pid APACHE_RUN_DIR={self.confdir}/run\n"
            f"export APACHE_LOCK_DIR={self.confdir}/lock APACHE_LOG_DIR={self.log_dir} LANG=C\n")
        (self.confdir / "ports.conf").write_text("")
        (self.confdir / "conf-available" / "test-servername.conf").write_text("ServerName localhost\n")
        self.run("a2enmod", "ssl", "proxy", "proxy_http", "headers")
        self.run("a2enconf", "test-servername")
        self.run("a2dissite", "000-default")

    def run(self, *argv: str) -> str:
        done = subprocess.run(argv, env=self.env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        assert done.returncode == 0, f"{' '.join(argv)}: {done.stdout}{done.stderr}"
        return done.stdout + done.stderr

    def site(self, name: str, text: str, https_port: Optional[int] = None) -> None:
        (self.confdir / "sites-available" / f"{name}.conf").write_text(text)
        if https_port:  # the shipped vhost relies on Debian's "Listen 443" in ports.conf
            with open(self.confdir / "ports.conf", "a") as ports:
                ports.write(f"Listen 127.0.0.1:{https_port} https\n")
        self.run("a2ensite", name)

    def error_documents(self) -> Path:
        """The shipped JSON error bodies, where www-data can read them."""
        errors = self.root / "apache-errors"
        if not errors.exists():
            shutil.copytree(ERROR_DOCS, errors)
            for path in [errors, *errors.iterdir()]:
                path.chmod(0o755 if path.is_dir() else 0o644)
        return errors

    def https_site(self, name: str, port: int, backend: int, tls: Dict[str, Any], proxy_include: Path) -> str:
        """The shipped HTTPS vhost (client certificates required) on *port* in front of *backend*, vouching
        with the secret of *proxy_include* (see proxy_secret); its URL."""
        self.site(name, render(VHOST, {
            "<VirtualHost *:443>": f"<VirtualHost 127.0.0.1:{port}>",
            "/etc/apache2/pg-backup-api/server.crt": tls["server_crt"],
            "/etc/apache2/pg-backup-api/server.key": tls["server_key"],
            "/etc/apache2/pg-backup-api/client-ca.crt": tls["client_ca"],
            "/etc/apache2/pg-backup-api/proxy-secret.conf": str(proxy_include),
            "http://127.0.0.1:7480/": f"http://127.0.0.1:{backend}/",
            "/usr/share/pg-backup-api/apache-errors": str(self.error_documents()),
        }), https_port=port)
        return f"https://127.0.0.1:{port}"

    def start(self, ports: List[int]) -> None:
        assert "Syntax OK" in self.run("apache2ctl", "configtest")
        self.run("apache2ctl", "start")
        for port in ports:
            wait_for(lambda port=port: listening(port), timeout=10, what=f"apache2 listens on {port}")

    def stop(self) -> None:
        pidfile = self.confdir / "run" / "apache2.pid"
        pid = int(pidfile.read_text()) if pidfile.exists() else 0
        subprocess.run(["apache2ctl", "stop"], env=self.env, capture_output=True, stdin=subprocess.DEVNULL)
        if pid:
            wait_for(lambda: not alive(pid), timeout=30, what="apache2 stops")


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def render(template: Path, replacements: Dict[str, str]) -> str:
    """The shipped file with this machine's ports and paths: every value replaced must be there."""
    text = template.read_text()
    for old, new in replacements.items():
        assert old in text, f"{template.name} no longer contains {old!r}: update this test"
        text = text.replace(old, new)
    return text


def openssl(*args: str) -> None:
    done = subprocess.run(["openssl", *args], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr


def make_certificates(d: Path) -> Dict[str, Any]:
    """A server certificate for 127.0.0.1, a client CA with a client, and a client of a CA Apache does not trust."""
    need("openssl")
    d.mkdir()
    ext = d / "ext.cnf"
    ext.write_text("[server]\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
                   "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n"
                   "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
                   "[client]\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=clientAuth\n"
                   "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n")

    def ca(name: str, subject: str) -> None:
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", subject,
                "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.crt"))

    def leaf(name: str, subject: str, issuer: str, kind: str) -> None:
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", subject,
                "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.csr"))
        openssl("x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / f"{issuer}.crt"),
                "-CAkey", str(d / f"{issuer}.key"), "-CAcreateserial", "-days", "2",
                "-extfile", str(ext), "-extensions", kind, "-out", str(d / f"{name}.crt"))

    ca("server-ca", "/CN=pg-backup-api test server CA")
    ca("client-ca", "/CN=pg-backup-api test client CA")
    ca("other-ca", "/CN=pg-backup-api test unknown CA")
    leaf("server", "/CN=localhost", "server-ca", "server")
    leaf("patroni", "/O=pg-backup-api tests/CN=patroni", "client-ca", "client")
    leaf("stranger", "/O=pg-backup-api tests/CN=patroni", "other-ca", "client")
    return {"verify": str(d / "server-ca.crt"), "client_ca": str(d / "client-ca.crt"),
            "server_crt": str(d / "server.crt"), "server_key": str(d / "server.key"),
            "patroni": (str(d / "patroni.crt"), str(d / "patroni.key")),
            "stranger": (str(d / "stranger.crt"), str(d / "stranger.key"))}


@dataclass
class Front:
    """The shipped HTTPS vhost in front of the session's service; requests' cert and verify for a client."""

    url: str
    tls: Dict[str, Any]

    @property
    def auth(self) -> Dict[str, Any]:
        return {"cert": self.tls["patroni"], "verify": self.tls["verify"]}


@pytest.fixture(scope="session")
def apache_front(service: Service) -> Iterator[Front]:
    """Apache with apache/pg-backup-api.conf (client certificates required) proxying to `service`."""
    work = Path(tempfile.mkdtemp(prefix="pgba-front-"))
    work.chmod(0o755)  # www-data reads the error bodies from here
    try:
        tls = make_certificates(work / "tls")
        server = Apache(work)
        port = free_port()
        url = server.https_site("front", port, service.port, tls, proxy_secret(service.sandbox)["include"])
        server.start([port])
        try:
            yield Front(url, tls)
        finally:
            server.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
