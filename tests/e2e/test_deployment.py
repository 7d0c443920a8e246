"""Deployment as operators run it: the systemd unit, gunicorn with packaging/gunicorn.conf.py, Apache with
client certificates (apache/pg-backup-api.conf), each checked on the real stack.

There is no systemd running as PID 1 here, so the unit's confinement is reproduced by hand, from the unit
file itself: a mount namespace with a private /tmp, everything read-only but ReadWritePaths= and the
CacheDirectory=, its UMask=, NoNewPrivileges= and Environment=, the user switched without a PAM session.
Its KillMode=process is what the restart test does: SIGTERM to gunicorn's master alone, then what systemd
does on a stop, the private /tmp emptied, while a recovery is running.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import pytest
import requests

from pg_backup_api.worker import processes

from .conftest import (
    ROOT,
    VENV,
    Apache,
    alive,
    children,
    free_port,
    make_certificates,
    need,
    proxy_secret,
    render,
    unavailable,
    wait_for,
)

pytestmark = pytest.mark.e2e

UNIT = ROOT / "packaging" / "pg-backup-api.service"
GUNICORN_CONF = ROOT / "packaging" / "gunicorn.conf.py"
VHOST_HTTP = ROOT / "apache" / "pg-backup-api-http.conf"
GUNICORN = VENV / "bin" / "gunicorn"
APP = "pg_backup_api.app:application"
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # a system unit's PATH


def unit_service_section() -> Dict[str, List[str]]:
    """The [Service] settings of the shipped unit; a key given several times keeps every value."""
    settings: Dict[str, List[str]] = {}
    section = None
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        elif section == "Service" and line and not line.startswith(("#", ";")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def chown_to(path: Path, sandbox) -> Path:
    shutil.chown(path, sandbox["BARMAN_USER"], sandbox["BARMAN_USER"])
    return path


# ------------------------------------------------------------------------------------------------
# gunicorn, as the unit runs it
# ------------------------------------------------------------------------------------------------

class Confinement:
    """The unit's sandboxing, rebuilt with unshare + mount for one start of the service.

    `paths` maps each path the unit names (ReadWritePaths=, the CacheDirectory=, /var/log/barman ...) to
    the sandbox's directories that stand for it. `keep` lists directories under /tmp that must stay
    visible through the private /tmp (the sandbox and the barman user's home live there; on a real host
    they are /var/lib/barman).
    """

    def __init__(self, root: Path, paths: Dict[str, List[Path]], keep: List[Path]) -> None:
        self.unit = unit_service_section()
        assert self.unit["ProtectSystem"] == ["strict"], "the emulation below reproduces ProtectSystem=strict"
        assert self.unit["PrivateTmp"] == ["yes"]
        self.paths = paths
        self.keep = sorted({p for p in keep if str(p).startswith(("/tmp/", "/var/tmp/"))}, key=lambda p: len(p.parts))
        self.private_tmp = Path(tempfile.mkdtemp(prefix="private-tmp-", dir=root))
        self.private_tmp.chmod(0o1777)

    def map(self, unit_path: str) -> List[Path]:
        if unit_path not in self.paths:
            raise AssertionError(f"the unit names {unit_path}: tell this test which sandbox path stands for it")
        return self.paths[unit_path]

    def writable(self) -> List[Path]:
        paths = [p for value in self.unit.get("ReadWritePaths", []) for p in value.split()]
        mapped = [m for p in paths for m in self.map(p.lstrip("-"))]
        mapped += [m for d in self.unit.get("CacheDirectory", []) for m in self.map(f"/var/cache/{d}")]
        return mapped

    def environment(self) -> Dict[str, str]:
        env = {}
        for value in self.unit.get("Environment", []):
            key, _, val = value.partition("=")
            env[key] = str(self.map(val)[0]) if val.startswith("/var/") else val
        return env

    def argv(self, user: str, env: Dict[str, str], command: List[str]) -> List[str]:
        script = """
            set -euo pipefail
            keep=(); rw=(); fds=()
            while [ "$1" != --rw ]; do keep+=("$1"); shift; done; shift
            while [ "$1" != -- ]; do rw+=("$1"); shift; done; shift
            # Keep the sandbox reachable through the private /tmp: open it before /tmp is covered.
            for d in "${keep[@]}"; do exec {fd}<"$d"; fds+=("$fd"); done
            mount --bind "$PRIVATE_TMP" /var/tmp
            mount --bind "$PRIVATE_TMP" /tmp
            for i in "${!keep[@]}"; do
                mkdir -p "${keep[$i]}"
                mount --no-canonicalize --bind "/proc/self/fd/${fds[$i]}" "${keep[$i]}"
            done
            # ProtectSystem=strict: every mount read-only but /tmp and the API file systems ...
            awk '{print $5}' /proc/self/mountinfo | sort -u | while read -r m; do
                case $m in /tmp|/var/tmp|/proc|/proc/*|/sys|/sys/*|/dev|/dev/*) continue ;; esac
                mount -o remount,bind,ro "$m"
            done
            # ... then ReadWritePaths= and the CacheDirectory= writable again.
            for p in "${rw[@]}"; do mount --bind "$p" "$p"; mount -o remount,bind,rw "$p"; done
            # systemd starts a unit in / : the caller's directory may be hidden by the private /tmp.
            cd /
            exec "$@"
        """
        unit = self.unit
        nnp = ["--no-new-privs"] if unit.get("NoNewPrivileges") == ["yes"] else []
        umask = unit.get("UMask", ["0022"])[0]
        inner = ["setpriv", *nnp, "--reuid", user, "--regid", user, "--init-groups",
                 "env", "-i", *[f"{k}={v}" for k, v in env.items()],
                 "sh", "-c", f'umask {umask} && exec "$@"', "sh", *command]
        return ["unshare", "--mount", "--propagation", "private", "env", f"PRIVATE_TMP={self.private_tmp}",
                "bash", "-c", script, "confine", *map(str, self.keep), "--rw", *map(str, self.writable()),
                "--", *inner]

    def clean_private_tmp(self) -> None:
        """What systemd does to the private /tmp when the service stops (our mount points excepted)."""
        top_kept = {p.relative_to("/tmp").parts[0] for p in self.keep if str(p).startswith("/tmp/")}
        for entry in self.private_tmp.iterdir():
            if entry.name not in top_kept:
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()


class Gunicorn:
    """gunicorn with packaging/gunicorn.conf.py on a free port; `pid` is its master's."""

    def __init__(self, root: Path, log_dir: Path, ready_path: str = "/status") -> None:
        self.root = root
        self.log_dir = log_dir
        self.ready_path = ready_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: Optional[subprocess.Popen] = None
        self.pid = 0
        self.confinement: Optional[Confinement] = None
        self.stderr = root / f"gunicorn-{self.port}.stderr"
        self.stderr_offset = 0

    def env(self, sandbox, path: str) -> Dict[str, str]:
        """What systemd gives a User= service, plus the settings the unit's EnvironmentFile= would."""
        return {"PATH": path, "HOME": sandbox["BARMAN_UNIX_HOME"], "USER": sandbox["BARMAN_USER"],
                "LOGNAME": sandbox["BARMAN_USER"], "LANG": "C.UTF-8",
                "PG_BACKUP_API_BARMAN_CONF": sandbox["BARMAN_CONF"],
                "PG_BACKUP_API_BIND": f"127.0.0.1:{self.port}", "PG_BACKUP_API_LOG_DIR": str(self.log_dir),
                "PG_BACKUP_API_PROXY_SECRET_FILE": str(proxy_secret(sandbox)["file"])}

    def command(self, *extra: str, app: str = APP, conf: Path = GUNICORN_CONF) -> List[str]:
        return [str(GUNICORN), "-c", str(conf), *extra, app]

    def start_confined(self, sandbox, paths: Dict[str, List[Path]]) -> "Gunicorn":
        """As the unit runs it; each start is a new invocation of the unit, with a new private /tmp."""
        self.confinement = Confinement(self.root, paths, [sandbox.directory, Path(sandbox["BARMAN_UNIX_HOME"])])
        env = {**self.env(sandbox, SYSTEMD_PATH), **self.confinement.environment()}
        # Installed where the service can see it, as /etc/pg-backup-api/gunicorn.conf.py would be: this
        # checkout may sit under /tmp, which the unit's private /tmp hides.
        conf = sandbox.directory / "gunicorn.conf.py"
        shutil.copy(GUNICORN_CONF, conf)
        return self.start(self.confinement.argv(sandbox["BARMAN_USER"], env, self.command(conf=conf)))

    def start_runuser(self, sandbox) -> "Gunicorn":
        env = self.env(sandbox, f"{VENV}/bin:/usr/bin:/bin")
        argv = ["runuser", "-u", sandbox["BARMAN_USER"], "--", "env", "-i",
                *[f"{k}={v}" for k, v in env.items()], *self.command()]
        return self.start(argv, master_is_child=True)

    def start(self, argv: List[str], master_is_child: bool = False) -> "Gunicorn":
        self.stderr_offset = self.stderr.stat().st_size if self.stderr.exists() else 0
        with open(self.stderr, "ab") as err:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.pid = self.proc.pid
        try:
            if master_is_child:  # runuser forks and waits for the command
                self.pid = wait_for(lambda: next(iter(children(self.proc.pid)), None), timeout=10,
                                    what="runuser starts gunicorn")
            wait_for(self.answers, timeout=30, interval=0.1, what=f"gunicorn answers on {self.url}")
        except BaseException:
            self.stop()
            raise AssertionError(f"gunicorn did not start:\n{self.output()}") from None
        return self

    def answers(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise AssertionError(f"gunicorn exited:\n{self.output()}")
        try:
            return requests.get(self.url + self.ready_path, timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def output(self) -> str:
        """What the latest start of gunicorn wrote to its stderr."""
        with open(self.stderr, "rb") as f:
            f.seek(self.stderr_offset)
            return f.read().decode(errors="replace")

    def workers(self) -> List[int]:
        return children(self.pid)

    def stop(self) -> bool:
        """SIGTERM to the master alone, as KillMode=process does; SIGKILL to it and its workers if it hangs.

        True when the master exited on the SIGTERM alone.
        """
        if self.proc is None:
            return True
        workers = self.workers()
        clean = True
        if alive(self.pid):
            os.kill(self.pid, signal.SIGTERM)
            try:
                wait_for(lambda: not alive(self.pid), timeout=45, interval=0.1, what="gunicorn's master exits")
            except AssertionError:
                clean = False
                for pid in [self.pid, *workers]:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        return clean


def post_recovery(base_url: str, sandbox, destination: str, bwlimit: Optional[int] = None,
                  **kw) -> requests.Response:
    body = {"type": "recovery", "backup_id": "latest", "destination_directory": destination,
            "remote_ssh_command": sandbox["SSH_COMMAND"]}
    if bwlimit is not None:
        body["bwlimit"] = bwlimit
    return requests.post(f"{base_url}/servers/{sandbox['BARMAN_SERVER']}/operations", json=body, timeout=60, **kw)


def wait_until_ended(base_url: str, sandbox, op_id: str, timeout: float = 300, **kw) -> dict:
    url = f"{base_url}/servers/{sandbox['BARMAN_SERVER']}/operations/{op_id}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = requests.get(url, timeout=30, **kw).json()
        if status["status"] != "IN_PROGRESS":
            return status
        time.sleep(0.5)
    raise AssertionError(f"operation {op_id} still IN_PROGRESS after {timeout} s")


def assert_rows_restored(sandbox, destination: str) -> None:
    with sandbox.copy(destination) as port:
        assert sandbox.psql(port, sandbox["ROWS_QUERY"]) == sandbox["ROWS_CHECK"]


def worker_of(sandbox, op_id: str) -> int:
    record = Path(sandbox["BARMAN_HOME"]) / sandbox["BARMAN_SERVER"] / "jobs" / ".workers" / f"{op_id}.worker"
    wait_for(record.exists, what=f"{record} is written")
    return json.loads(record.read_text())["pid"]


def copying(worker_pid: int) -> bool:
    """barman has started copying over ssh: an rsync or ssh process in the worker's group."""
    names = []
    for pid in processes.group_members(worker_pid):
        try:
            names.append(Path(f"/proc/{pid}/comm").read_text().strip())
        except OSError:
            pass
    return any(name in ("rsync", "ssh") for name in names)


def assert_json_error(response: requests.Response, status: int) -> None:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].split(";")[0] == "application/json"
    assert isinstance(response.json()["error"], str)


# ------------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def work() -> Iterator[Path]:
    """A directory www-data and the barman user can traverse (Apache serves the error bodies from it)."""
    path = Path(tempfile.mkdtemp(prefix="pgba-deploy-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def unit_paths(sandbox) -> Dict[str, List[Path]]:
    """The sandbox's stand-ins for the paths the unit names."""
    logs = sandbox.directory / "deploy-logs"
    cache = sandbox.directory / "deploy-cache"
    for path in (logs, cache):
        path.mkdir(exist_ok=True)
        chown_to(path, sandbox)
    cache.chmod(0o750)
    return {
        "/var/lib/barman": sorted({Path(sandbox["BARMAN_HOME"]), Path(sandbox["BARMAN_UNIX_HOME"])}),
        "/var/log/barman": [logs, Path(sandbox["LOG_DIR"])],
        "/var/cache/pg-backup-api": [cache],
    }


@pytest.fixture(scope="module")
def api(sandbox, work, unit_paths) -> Iterator[Gunicorn]:
    """The service as the unit runs it; a test may restart it."""
    need("unshare", "setpriv", "bash")
    if not GUNICORN.exists():
        unavailable(f"{GUNICORN} is missing")
    service = Gunicorn(work, unit_paths["/var/log/barman"][0])
    try:
        yield service.start_confined(sandbox, unit_paths)
    finally:
        service.stop()


@pytest.fixture(scope="module")
def echo(sandbox, work) -> Iterator[Gunicorn]:
    """gunicorn with the shipped configuration serving an app that answers with the headers it was given."""
    app_dir = work / "echo"
    app_dir.mkdir()
    (app_dir / "echo_app.py").write_text(
        "import json\n\n\n"
        "def application(environ, start_response):\n"
        "    headers = {k: v for k, v in environ.items() if k.startswith('HTTP_')}\n"
        "    start_response('200 OK', [('Content-Type', 'application/json')])\n"
        "    return [json.dumps(headers).encode()]\n")
    server = Gunicorn(work, work / "no-such-dir", ready_path="/")
    env = server.env(sandbox, f"{VENV}/bin:/usr/bin:/bin")
    try:
        yield server.start(["env", "-i", *[f"{k}={v}" for k, v in env.items()],
                            *server.command("--chdir", str(app_dir), app="echo_app:application")])
    finally:
        server.stop()


@pytest.fixture(scope="module")
def tls(work) -> Dict[str, Any]:
    """A server certificate for 127.0.0.1, a client CA with a client, and a client of a CA Apache does not trust."""
    return make_certificates(work / "tls")


@pytest.fixture(scope="module")
def apache(sandbox, work, tls, api, echo) -> Iterator[Dict[str, str]]:
    """The shipped vhosts in front of: the service, the echo app, a port nothing listens on. Base URLs."""
    server = Apache(work)
    errors = server.error_documents()
    urls, ports = {}, []
    backends = {"api": api.port, "echo": echo.port, "down": free_port()}
    for name, backend in backends.items():
        port = free_port()
        server.https_site(f"https-{name}", port, backend, tls, proxy_secret(sandbox)["include"])
        urls[f"https-{name}"] = f"https://127.0.0.1:{port}"
        ports.append(port)
    for name in ("api", "echo"):
        port = free_port()
        server.site(f"http-{name}", render(VHOST_HTTP, {
            "127.0.0.1:8080": f"127.0.0.1:{port}",
            "http://127.0.0.1:7480/": f"http://127.0.0.1:{backends[name]}/",
            "/usr/share/pg-backup-api/apache-errors": str(errors),
        }))
        urls[f"http-{name}"] = f"http://127.0.0.1:{port}"
        ports.append(port)
    try:
        server.start(ports)
        yield urls
    finally:
        server.stop()


# ------------------------------------------------------------------------------------------------
# the unit
# ------------------------------------------------------------------------------------------------

def test_the_unit_passes_systemd_analyze_verify(sandbox, tmp_path):
    need("systemd-analyze")
    user = sandbox["BARMAN_USER"]
    unit = tmp_path / "pg-backup-api.service"
    unit.write_text(render(UNIT, {
        "ExecStart=/opt/pg-backup-api/venv/bin/gunicorn ": f"ExecStart={GUNICORN} ",
        "User=barman\n": f"User={user}\n",
        "Group=barman\n": f"Group={user}\n",
    }))
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, cwd=tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "Unknown key" not in output
    assert [line for line in output.splitlines() if str(unit) in line] == []
    settings = unit_service_section()
    assert settings["KillMode"] == ["process"]
    assert settings["User"] == settings["Group"] == ["barman"]


# ------------------------------------------------------------------------------------------------
# gunicorn
# ------------------------------------------------------------------------------------------------

def test_gunicorn_confined_as_the_unit_says_serves_and_recovers(sandbox, api):
    assert requests.get(f"{api.url}/status", timeout=10).json() == "OK"
    destination = sandbox.restore_dir("gunicorn-confined")
    response = post_recovery(api.url, sandbox, destination)
    assert response.status_code == 202, response.text
    op_id = response.json()["operation_id"]
    status = wait_until_ended(api.url, sandbox, op_id)
    assert status["status"] == "DONE", status.get("output")
    assert_rows_restored(sandbox, destination)

    access, error = api.log_dir / "pg-backup-api-access.log", api.log_dir / "pg-backup-api.log"
    assert f"POST /servers/{sandbox['BARMAN_SERVER']}/operations" in access.read_text()
    log = error.read_text()
    assert "Booting worker" in log  # gunicorn's own lines ...
    assert op_id in log  # ... and the application's, from its stderr (capture_output)
    for path in (access, error):  # created by the barman user under the unit's UMask=0027
        assert oct(path.stat().st_mode & 0o777) == oct(0o640)
        assert path.owner() == sandbox["BARMAN_USER"]


def descendants(pid: int) -> List[int]:
    found, todo = [], [pid]
    while todo:
        kids = children(todo.pop())
        found += kids
        todo += kids
    return found


def inotify_watches(pid: int) -> List[int]:
    """The inodes *pid*'s inotify instances watch (`inotify wd:.. ino:<hex>` lines of its fdinfo)."""
    inodes = []
    for info in Path(f"/proc/{pid}/fdinfo").glob("*"):
        try:
            text = info.read_text()
        except OSError:  # the fd closed meanwhile
            continue
        inodes += [int(w.split("ino:")[1].split()[0], 16) for w in text.splitlines() if w.startswith("inotify wd:")]
    return inodes


def test_each_new_operation_is_in_the_very_next_list_whichever_worker_answers(sandbox, api):
    """jobs/ is followed through inotify in the gunicorn workers: no list misses a job another process wrote."""
    server = sandbox["BARMAN_SERVER"]
    jobs = Path(sandbox["BARMAN_HOME"]) / server / "jobs"
    list_url = f"{api.url}/servers/{server}/operations"

    def listed() -> List[str]:
        return [o["id"] for o in requests.get(list_url, timeout=30).json()["operations"]]

    posted = []
    for n in range(6):
        response = post_recovery(api.url, sandbox, sandbox.restore_dir(f"listed-at-once-{n}"))
        assert response.status_code == 202, response.text
        posted.append(response.json()["operation_id"])
        for _ in range(8):  # 2 workers x 16 threads: these land on both
            assert posted[-1] in listed()
    watching = [pid for pid in descendants(api.pid) if os.stat(jobs).st_ino in inotify_watches(pid)]
    assert watching, "no gunicorn worker watches jobs/"
    for op_id in posted:
        assert wait_until_ended(api.url, sandbox, op_id)["status"] == "DONE"
    # An operator moving an ended operation's files aside, and back: each seen by the next list.
    aside = jobs.parent / "set-aside"
    aside.mkdir(exist_ok=True)
    moved = jobs / f"{posted[0]}.json"
    moved.rename(aside / moved.name)
    try:
        assert all(posted[0] not in listed() for _ in range(8))
    finally:
        (aside / moved.name).rename(moved)
    assert all(posted[0] in listed() for _ in range(8))
    assert requests.get(f"{list_url}/{posted[0]}", timeout=30).json()["status"] == "DONE"


@pytest.mark.parametrize("case", ["missing directory", "directory of root", "read-only log file"])
def test_gunicorn_logs_to_stderr_when_it_cannot_write_its_log_files(sandbox, work, case):
    log_dir = work / f"logs-{case.replace(' ', '-')}"
    if case != "missing directory":
        log_dir.mkdir(mode=0o755)
    if case == "read-only log file":
        chown_to(log_dir, sandbox)
        for name in ("pg-backup-api.log", "pg-backup-api-access.log"):
            (log_dir / name).write_text("")  # root's, 0644: the barman user cannot append
    server = Gunicorn(work, log_dir).start_runuser(sandbox)
    try:
        assert requests.get(f"{server.url}/status", timeout=10).json() == "OK"
        output = wait_for(lambda: "GET /status" in server.output() and server.output(), timeout=10,
                          what="the access line reaches stderr")
    finally:
        server.stop()
    assert f"cannot write {log_dir}/pg-backup-api.log" in output
    assert f"cannot write {log_dir}/pg-backup-api-access.log" in output
    assert "Booting worker" in output
    if case == "read-only log file":
        assert all((log_dir / name).read_text() == "" for name in ("pg-backup-api.log", "pg-backup-api-access.log"))


# ------------------------------------------------------------------------------------------------
# Apache
# ------------------------------------------------------------------------------------------------

def test_a_client_with_a_certificate_of_the_client_ca_reaches_the_service(apache, tls):
    response = requests.get(f"{apache['https-api']}/status", cert=tls["patroni"], verify=tls["verify"], timeout=30)
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json"
    assert response.json() == "OK"
    missing = requests.get(f"{apache['https-api']}/no/such/endpoint", cert=tls["patroni"], verify=tls["verify"],
                           timeout=30)
    assert_json_error(missing, 404)  # the service's own error comes through untouched


@pytest.mark.parametrize("client", ["no certificate", "certificate of another CA"])
def test_apache_refuses_a_client_without_a_certificate_of_the_client_ca(apache, tls, api, client):
    probe = uuid.uuid4().hex
    cert = None if client == "no certificate" else tls["stranger"]
    try:
        response = requests.get(f"{apache['https-api']}/status?probe={probe}", cert=cert, verify=tls["verify"],
                                timeout=30)
    except requests.exceptions.ConnectionError:
        pass  # refused during or right after the TLS handshake
    else:
        assert response.status_code == 403, response.text
    assert probe not in (api.log_dir / "pg-backup-api-access.log").read_text()


def test_the_service_sees_the_verified_subject_and_never_one_a_client_sent(sandbox, apache, tls):
    forged = {"X-Client-Cert-Subject": "CN=admin", "X-Client-Cert_Subject": "CN=admin",
              "X_Client_Cert_Subject": "CN=admin", "X-Pg-Backup-Api-Proxy-Secret": "guessed",
              "X-Pg-Backup-Api-Proxy_Secret": "guessed"}
    seen = requests.get(f"{apache['https-echo']}/", headers=forged, cert=tls["patroni"], verify=tls["verify"],
                        timeout=30).json()
    assert seen["HTTP_X_CLIENT_CERT_SUBJECT"] == "CN=patroni,O=pg-backup-api tests"
    assert seen["HTTP_X_FORWARDED_PROTO"] == "https"
    # The vhost vouches with the secret `pg-backup-api proxy-secret` made, whatever the client sent.
    assert seen["HTTP_X_PG_BACKUP_API_PROXY_SECRET"] == proxy_secret(sandbox)["file"].read_text().strip()
    seen = requests.get(f"{apache['http-echo']}/", headers=forged, timeout=30).json()
    assert "HTTP_X_CLIENT_CERT_SUBJECT" not in seen  # the plain-HTTP variant verifies no one
    assert "HTTP_X_PG_BACKUP_API_PROXY_SECRET" not in seen  # and vouches for no one


def test_a_recovery_through_apache_records_the_verified_subject_and_gunicorn_refuses_a_local_forgery(
        sandbox, apache, tls, api):
    server = sandbox["BARMAN_SERVER"]
    auth = {"cert": tls["patroni"], "verify": tls["verify"]}
    forged = {"X-Client-Cert-Subject": "CN=admin"}
    # Destinations that hold a file: Barman refuses them, so each recovery ends at once, touching nothing.
    body = {"type": "recovery", "backup_id": "latest", "remote_ssh_command": sandbox["SSH_COMMAND"]}
    through = requests.post(f"{apache['https-api']}/servers/{server}/operations", headers=forged, timeout=60,
                            json={**body, "destination_directory": str(sandbox.holding_files("subject-apache"))},
                            **auth)
    assert through.status_code == 202, through.text
    local = requests.post(f"{api.url}/servers/{server}/operations", headers=forged, timeout=60,
                          json={**body, "destination_directory": str(sandbox.holding_files("subject-local"))})
    assert local.status_code == 202, local.text
    for response, expected in [(through, "cert:CN=patroni,O=pg-backup-api tests"), (local, None)]:
        op_id = response.json()["operation_id"]
        assert wait_until_ended(api.url, sandbox, op_id).get("requested_by") == expected


def test_apache_answers_json_when_the_service_is_down(apache, tls):
    response = requests.get(f"{apache['https-down']}/status", cert=tls["patroni"], verify=tls["verify"], timeout=30)
    assert_json_error(response, 503)
    # The error bodies are only served as such, never on a direct request.
    direct = requests.get(f"{apache['https-api']}/_proxy_errors/503.json", cert=tls["patroni"],
                          verify=tls["verify"], timeout=30)
    assert_json_error(direct, 403)


def test_the_plain_http_variant_proxies_on_loopback(apache):
    assert requests.get(f"{apache['http-api']}/status", timeout=30).json() == "OK"


def test_a_recovery_through_apache_survives_a_restart_of_gunicorn(sandbox, apache, tls, api, unit_paths):
    base, auth = apache["https-api"], {"cert": tls["patroni"], "verify": tls["verify"]}
    server = sandbox["BARMAN_SERVER"]
    destination = sandbox.restore_dir("gunicorn-restart")
    # Slowed down (KB/s): over one multiplexed ssh connection the copy would end before the restart.
    response = post_recovery(base, sandbox, destination, bwlimit=3000, **auth)
    assert response.status_code == 202, response.text
    op_id = response.json()["operation_id"]
    assert response.headers["Location"].endswith(f"/servers/{server}/operations/{op_id}")
    assert not response.headers["Location"].startswith("http:")
    worker = worker_of(sandbox, op_id)
    wait_for(lambda: copying(worker), what="barman copies over ssh")
    # barman keeps files of the restore in a temporary directory until its end: in the unit's TMPDIR,
    # not in the private /tmp that systemd deletes on a stop (there, the recovery would fail).
    tmpdir = unit_paths["/var/cache/pg-backup-api"][0]
    wait_for(lambda: list(tmpdir.glob("barman_recovery-*")), what=f"barman's temporary directory in {tmpdir}")

    gunicorn_workers = api.workers()
    assert len(gunicorn_workers) == 2
    assert api.stop(), "gunicorn's master did not exit on SIGTERM"  # systemctl restart, first half
    assert not any(alive(pid) for pid in gunicorn_workers), "gunicorn's master left workers behind"
    assert alive(worker), "the recovery did not survive the stop"
    api.confinement.clean_private_tmp()  # what systemd does to the stopped invocation's /tmp
    assert_json_error(requests.get(f"{base}/servers/{server}/operations/{op_id}", timeout=30, **auth), 503)

    api.start_confined(sandbox, unit_paths)  # second half: a new invocation
    status = wait_until_ended(base, sandbox, op_id, **auth)
    assert status["status"] == "DONE", status.get("output")
    assert_rows_restored(sandbox, destination)
