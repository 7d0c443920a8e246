"""A real, self-contained Barman test environment on one Debian 12 machine (run as root).

Plain functions, used in-process by the end-to-end tests' fixtures and the benchmark, and from the
command line (`python -m tests.sandbox`, or `scripts/sandbox`) by scripts/demo:

    up(DIR)                        build (or reuse) everything under DIR, write DIR/env; returns its keys
    down(DIR, purge=False)         stop every process started for DIR; purge deletes DIR
    psql(DIR, PORT, SQL)           psql -Atc SQL as postgres on DIR's socket, database labdb
    start_copy(DIR, DATADIR, PORT) start a restored cluster on 127.0.0.1:PORT
    stop_copy(DIR, DATADIR)        stop it

What `up` builds (each non-obvious choice is explained where it is made):
    DIR             root:postgres 1775   postgres (the "remote" user) may create restore targets here
    DIR/log         1777                 every service's log; must be writable by postgres and barman
    DIR/run         postgres             PostgreSQL's unix socket directory
    DIR/pg          PostgreSQL 15 on 127.0.0.1:PGPORT, wal_level replica, database labdb with 100 known rows
    DIR/barman      barman_home (and the unix home of the barman user when the sandbox created it)
    DIR/barman.conf + DIR/barman.d/<server>.conf   streaming backups and WAL (backup_method postgres)
    DIR/sshd        an sshd on 127.0.0.1:SSH_PORT letting the barman user in as postgres, by key only
    DIR/restores    postgres-owned: where tests recover to
    DIR/pids        pid of the `barman cron` loop
    DIR/env         `export KEY='value'` lines describing all of the above

The first `up` records the ports, user and server in DIR/.sandbox; later commands on DIR use the
recorded values, and an explicitly different value is refused rather than half-applied.
Only the standard library: it runs in the project's venv and in Debian's python3 alike.
"""

from __future__ import annotations

import fcntl
import grp
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, ContextManager, Dict, Iterator, List, Mapping, Optional, Sequence, Set, Tuple, Union

PGBIN = Path("/usr/lib/postgresql/15/bin")
SSHD = "/usr/sbin/sshd"
DB = "labdb"
SLOT = "barman"
SEED_ROWS = 100
USER_TAG = "pg-backup-api sandbox"  # GECOS of a barman user the sandbox created
BLOCK_BEGIN = "# >>> pg-backup-api sandbox >>>"
BLOCK_END = "# <<< pg-backup-api sandbox <<<"
# The check value of the seeded rows, and the query that yields it from a cluster.
ROWS_QUERY = "SELECT count(*), md5(string_agg(label, $$,$$ ORDER BY id)) FROM known_rows"
DEFAULTS = {"SANDBOX_PGPORT": "5499", "SANDBOX_SSH_PORT": "2222", "SANDBOX_BARMAN_USER": "barman",
            "SANDBOX_SERVER": "pg", "PGBA_VENV": "/opt/pg-backup-api/venv", "SANDBOX_CRON_INTERVAL": "60"}
# Paths go unquoted into barman.conf, sshd_config and `pg_ctl -o`: allow no odd characters.
PLAIN_PATH = re.compile(r"(/[A-Za-z0-9._+-]+)+")
KV_LINE = re.compile(r"export ([A-Z_][A-Z0-9_]*)='([^']*)'")

PathLike = Union[str, Path]


class SandboxError(Exception):
    """A sandbox command cannot do what it was asked; the message says why."""


_started = time.monotonic()


def say(text: str) -> None:
    """A short progress line on stderr, with the time since the command started."""
    print(f"sandbox: [{time.monotonic() - _started:5.1f}s] {text}", file=sys.stderr, flush=True)


def _restart_clock() -> None:
    global _started
    _started = time.monotonic()


# ------------------------------------------------------------------------------------------------
# Settings and paths
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Layout:
    """DIR and every path derived from it."""

    dir: Path

    @property
    def log(self) -> Path:
        return self.dir / "log"

    @property
    def run(self) -> Path:
        return self.dir / "run"

    @property
    def pgdata(self) -> Path:
        return self.dir / "pg"

    @property
    def barman_home(self) -> Path:
        return self.dir / "barman"

    @property
    def conf(self) -> Path:
        return self.dir / "barman.conf"

    @property
    def confd(self) -> Path:
        return self.dir / "barman.d"

    @property
    def sshd_dir(self) -> Path:
        return self.dir / "sshd"

    @property
    def sshd_config(self) -> Path:
        return self.sshd_dir / "sshd_config"

    @property
    def sshd_pid(self) -> Path:
        return self.sshd_dir / "sshd.pid"

    @property
    def pids(self) -> Path:
        return self.dir / "pids"

    @property
    def cron_pid(self) -> Path:
        return self.pids / "barman-cron-loop.pid"

    @property
    def restores(self) -> Path:
        return self.dir / "restores"

    @property
    def env_file(self) -> Path:
        return self.dir / "env"

    @property
    def marker(self) -> Path:
        return self.dir / ".sandbox"

    @property
    def copies(self) -> Path:
        """Data dirs started by start_copy, for `down`."""
        return self.dir / "copies"


def plain_path(path: PathLike, what: str) -> Path:
    """An absolute, symlink-free path with no character that would need quoting in a config file."""
    resolved = os.path.realpath(os.path.abspath(os.fspath(path)))
    if not PLAIN_PATH.fullmatch(resolved):
        raise SandboxError(f"{what} must be a plain path ([A-Za-z0-9._+-/]), not '{resolved}'")
    return Path(resolved)


def layout(directory: PathLike) -> Layout:
    return Layout(plain_path(directory, "DIR"))


def read_kv_file(path: Path) -> Dict[str, str]:
    """The `export KEY='value'` lines of *path* (no shell evaluation); {} when it does not exist."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    return {m.group(1): m.group(2) for m in map(KV_LINE.fullmatch, text.splitlines()) if m}


read_env = read_kv_file


def write_kv_file(path: Path, values: Mapping[str, str]) -> None:
    """Atomically write `export KEY='value'` lines."""
    lines = []
    for key, value in values.items():
        # Single-quoted values keep the file readable by a trivial parser: no quote, no newline.
        if "'" in value or "\n" in value:
            raise SandboxError(f"value of {key} contains a quote or newline: {value}")
        lines.append(f"export {key}='{value}'\n")
    write_atomically(path, "".join(lines), 0o644)


def write_atomically(path: Path, text: str, mode: int, owner: Optional[Account] = None) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        if owner is not None:
            os.chown(tmp, owner.uid, owner.gid)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class Settings:
    pg_port: int
    ssh_port: int
    barman_user: str
    server: str
    venv: Path
    cron_interval: int

    def record(self) -> Dict[str, str]:
        return {"PGPORT": str(self.pg_port), "SSH_PORT": str(self.ssh_port), "BARMAN_USER": self.barman_user,
                "BARMAN_SERVER": self.server, "PGBA_VENV": str(self.venv)}


def _pick(box: Layout, name: str, recorded: Optional[str], wanted: Optional[object]) -> str:
    """The recorded value wins; an explicitly different one is refused."""
    wanted_text = None if wanted is None or wanted == "" else str(wanted)
    if recorded:
        if wanted_text is not None and wanted_text != recorded:
            raise SandboxError(f"{box.dir} was built with {name}={recorded}, not {wanted_text} "
                               f"(run 'down {box.dir} --purge' first)")
        return recorded
    return wanted_text if wanted_text is not None else DEFAULTS[name]


def _port(value: str, what: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= 65535:
        raise SandboxError(f"bad {what} port '{value}'")
    return int(value)


def load_settings(box: Layout, pg_port: Optional[int], ssh_port: Optional[int], barman_user: Optional[str],
                  server: Optional[str], venv: Optional[PathLike], cron_interval: Optional[int]) -> Settings:
    """Settings for DIR: recorded in DIR/.sandbox, else the arguments, else the defaults."""
    rec = read_kv_file(box.marker)
    pg = _port(_pick(box, "SANDBOX_PGPORT", rec.get("PGPORT"), pg_port), "PostgreSQL")
    ssh = _port(_pick(box, "SANDBOX_SSH_PORT", rec.get("SSH_PORT"), ssh_port), "ssh")
    user = _pick(box, "SANDBOX_BARMAN_USER", rec.get("BARMAN_USER"), barman_user)
    name = _pick(box, "SANDBOX_SERVER", rec.get("BARMAN_SERVER"), server)
    interval = str(DEFAULTS["SANDBOX_CRON_INTERVAL"] if cron_interval is None else cron_interval)
    if pg == ssh:
        raise SandboxError(f"PostgreSQL and sshd cannot share port {pg}")
    if not re.fullmatch(r"[a-z_][a-z0-9_-]{0,30}", user):
        raise SandboxError(f"bad barman user name '{user}'")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name) or name == "barman":
        raise SandboxError(f"bad Barman server name '{name}'")
    if not interval.isdigit():
        raise SandboxError("SANDBOX_CRON_INTERVAL must be a number of seconds")
    # The venv is not pinned: a rebuilt one elsewhere may take over; by default DIR keeps its own.
    chosen = venv or rec.get("PGBA_VENV") or DEFAULTS["PGBA_VENV"]
    return Settings(pg, ssh, user, name, plain_path(chosen, "PGBA_VENV"), int(interval))


def environment_settings(environ: Mapping[str, str]) -> Dict[str, object]:
    """up()'s keyword arguments from SANDBOX_PGPORT, SANDBOX_SSH_PORT, SANDBOX_BARMAN_USER, SANDBOX_SERVER,
    PGBA_VENV and SANDBOX_CRON_INTERVAL; unset or empty ones are left out."""
    names = {"SANDBOX_PGPORT": "pg_port", "SANDBOX_SSH_PORT": "ssh_port", "SANDBOX_BARMAN_USER": "barman_user",
             "SANDBOX_SERVER": "server", "PGBA_VENV": "venv", "SANDBOX_CRON_INTERVAL": "cron_interval"}
    settings: Dict[str, object] = {}
    for variable, keyword in names.items():
        value = environ.get(variable, "")
        if not value:
            continue
        if keyword in ("pg_port", "ssh_port", "cron_interval"):
            if not value.isdigit():
                raise SandboxError(f"{variable} must be a number, not '{value}'")
            settings[keyword] = int(value)
        else:
            settings[keyword] = value
    return settings


def require_root() -> None:
    if os.geteuid() != 0:
        raise SandboxError("run as root (it creates users and starts sshd)")


def require_tools(settings: Settings) -> None:
    """Fail loudly on anything missing instead of skipping a component."""
    for tool in ("initdb", "pg_ctl", "postgres", "psql", "pg_isready", "pg_basebackup", "pg_receivewal"):
        if not os.access(PGBIN / tool, os.X_OK):
            raise SandboxError(f"{PGBIN / tool} is missing (run scripts/bootstrap: postgresql-15, openssh-server)")
    if not os.access(SSHD, os.X_OK):
        raise SandboxError(f"{SSHD} is missing (run scripts/bootstrap: postgresql-15, openssh-server)")
    for tool in ("ssh", "ssh-keygen", "rsync", "useradd", "usermod", "ps"):
        if shutil.which(tool) is None:
            raise SandboxError(f"'{tool}' is not installed (run scripts/bootstrap)")
    if not os.access(settings.venv / "bin" / "barman", os.X_OK):
        raise SandboxError(f"no barman in {settings.venv} (run scripts/bootstrap, or set PGBA_VENV)")
    if account("postgres") is None:
        raise SandboxError("no postgres user (is postgresql-15 installed?)")


# ------------------------------------------------------------------------------------------------
# Running things as other users
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int
    group: str
    home: Path
    gecos: str
    groups: List[int]


def account(name: str) -> Optional[Account]:
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        return None
    return Account(name, entry.pw_uid, entry.pw_gid, grp.getgrgid(entry.pw_gid).gr_name, Path(entry.pw_dir),
                   entry.pw_gecos, os.getgrouplist(name, entry.pw_gid))


def postgres() -> Account:
    found = account("postgres")
    if found is None:
        raise SandboxError("no postgres user (is postgresql-15 installed?)")
    return found


Output = Union[int, IO[bytes], None]


def spawn(argv: Sequence[PathLike], as_user: Optional[Account] = None, env: Optional[Dict[str, str]] = None,
          stdout: Output = subprocess.DEVNULL, stderr: Output = subprocess.STDOUT,
          timeout: Optional[float] = None) -> subprocess.CompletedProcess:
    """Run *argv* to its end, as *as_user* when given, in a clean environment, stdin from /dev/null.

    The clean environment also means that variables a caller exported (PGHOST, PGPORT, PGDATA,
    BARMAN_CONFIG_FILE..., e.g. after `source DIR/env`) cannot steer our own tools. Every descriptor
    above stderr is closed in the child (the lock on DIR among them): the daemons started here
    (postgres, sshd, receive-wal) would inherit it, and a caller's pipe they hold never reaches EOF.
    """
    kwargs: Dict[str, object] = {}
    if as_user is not None:
        kwargs = {"user": as_user.uid, "group": as_user.gid, "extra_groups": as_user.groups}
        env = env if env is not None else user_env(as_user)
    # Run from a directory every user can enter, or postgres's tools complain about root's cwd.
    return subprocess.run([os.fspath(a) for a in argv], stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                          env=env if env is not None else user_env(None), cwd="/", close_fds=True,
                          timeout=timeout, check=False, **kwargs)


def user_env(user: Optional[Account]) -> Dict[str, str]:
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "LANG": "C.UTF-8"}
    if user is not None:
        env.update(HOME=str(user.home), USER=user.name, LOGNAME=user.name, SHELL="/bin/bash")
    return env


def output_of(argv: Sequence[PathLike], as_user: Optional[Account] = None,
              env: Optional[Dict[str, str]] = None, timeout: Optional[float] = 120) -> str:
    """Stdout of a command that starts nothing in the background; an error with its stderr if it fails."""
    done = spawn(argv, as_user, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)
    if done.returncode != 0:
        raise SandboxError(f"{' '.join(map(str, argv))} failed (rc {done.returncode}): "
                           f"{done.stderr.decode(errors='replace').strip()}")
    return done.stdout.decode(errors="replace").rstrip("\n")


def psql_at(box: Layout, port: int, db: str, sql: str) -> str:
    """One psql -Atc as postgres over DIR's socket."""
    return output_of([PGBIN / "psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", box.run, "-p", str(port),
                      "-d", db, "-Atc", sql], postgres())


def barman_env(settings: Settings, box: Layout, user: Account) -> Dict[str, str]:
    """The clean environment barman runs in: its venv first, then PostgreSQL's tools."""
    return {"HOME": str(user.home), "USER": user.name, "LOGNAME": user.name, "SHELL": "/bin/bash",
            "LANG": "C.UTF-8", "PATH": f"{settings.venv}/bin:{PGBIN}:/usr/local/bin:/usr/bin:/bin",
            "BARMAN_CONFIG_FILE": str(box.conf)}


def tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def fail_with_log(log: Path, message: str) -> SandboxError:
    return SandboxError(f"{message} (log: {log})\n{tail(log, 20)}")


def run_logged(box: Layout, argv: Sequence[PathLike], as_user: Optional[Account] = None,
               env: Optional[Dict[str, str]] = None, timeout: Optional[float] = None) -> str:
    """Run *argv* with its output appended to log/sandbox.log; on failure the error shows its tail."""
    # Output goes to a file, never a pipe: a background child (receive-wal) must not hold our
    # stdout open, or reading it would never end.
    out = box.dir / ".last-output"
    with open(out, "wb") as f:
        rc = spawn(argv, as_user, env, stdout=f, timeout=timeout).returncode
    text = out.read_text(errors="replace")
    command = " ".join(map(str, argv))
    with open(box.log / "sandbox.log", "a") as log:
        log.write(f"### {command} (rc {rc})\n{text}")
    if rc != 0:
        last = "\n".join(text.splitlines()[-25:])
        raise SandboxError(f"command failed (rc {rc}): {command}\n{last}")
    return text


@contextmanager
def flocked(path: Path, timeout: float, what: str) -> Iterator[None]:
    """An exclusive flock on *path*; Python's descriptors are not inherited, so no daemon keeps it."""
    with open(path, "a") as handle:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise SandboxError(f"{what} holds {path}") from None
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def lock_dir(box: Layout) -> ContextManager[None]:
    """Serialise up/down on one DIR."""
    return flocked(box.dir / ".lock", 600, "another sandbox command")


def install_dir(path: Path, uid: int, gid: int, mode: int) -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, uid, gid)
    os.chmod(path, mode)


def alive_with(pid_file: Path, comm: Optional[str], needle: str) -> Optional[int]:
    """The pid in *pid_file* if that process is alive and its command line names *needle*."""
    try:
        pid = int(pid_file.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        if comm is not None and Path(f"/proc/{pid}/comm").read_text().strip() != comm:
            return None
    except (OSError, ValueError):
        return None
    return pid if needle in cmdline else None


# ------------------------------------------------------------------------------------------------
# up
# ------------------------------------------------------------------------------------------------

def prepare_layout(box: Layout, settings: Settings) -> None:
    pg = postgres()
    write_kv_file(box.marker, settings.record())
    # postgres, connecting over ssh, must be able to mkdir restore targets in DIR.
    os.chown(box.dir, 0, pg.gid)
    os.chmod(box.dir, 0o1775)
    for d in (box.log, box.run, box.restores, box.pids, box.sshd_dir / "authorized_keys", box.confd):
        d.mkdir(parents=True, exist_ok=True)
    os.chmod(box.log, 0o1777)  # postgres's and barman's logs both live here
    for d in (box.run, box.restores):
        os.chown(d, pg.uid, pg.gid)
    for d in (box.run, box.restores, box.pids, box.sshd_dir, box.sshd_dir / "authorized_keys", box.confd):
        os.chmod(d, 0o755)
    box.copies.touch()

    sock = box.run / f".s.PGSQL.{settings.pg_port}"
    if len(str(sock)) > 107:
        raise SandboxError(f"socket path {sock} is longer than 107 bytes: use a shorter DIR")
    # pytest's /tmp/pytest-of-root is 0700, for example: postgres could not reach anything below it.
    if spawn(["test", "-x", box.dir, "-a", "-w", box.restores, "-a", "-w", box.log], pg).returncode != 0:
        raise SandboxError(f"user postgres cannot reach {box.dir} (a parent directory is not searchable by others?)")


def put_block(path: Path, owner: Account, text: str) -> None:
    """Put *text* between our markers at the top of *path*, replacing the old block."""
    kept: List[str] = []
    inside = False
    if path.exists():
        for line in path.read_text().splitlines(keepends=True):
            if line.rstrip("\n") == BLOCK_BEGIN:
                inside = True
            if not inside:
                kept.append(line)
            if inside and line.rstrip("\n") == BLOCK_END:
                inside = False
    write_atomically(path, f"{BLOCK_BEGIN}\n{text}\n{BLOCK_END}\n" + "".join(kept), 0o644, owner)


def ensure_barman_user(box: Layout, settings: Settings) -> Account:
    name = settings.barman_user
    if account(name) is None:
        try:
            grp.getgrnam(name)
            group_opt = ["--gid", name]
        except KeyError:
            group_opt = ["--user-group"]
        run_logged(box, ["useradd", "--system", *group_opt, "--home-dir", box.barman_home, "--no-create-home",
                         "--shell", "/bin/bash", "--comment", USER_TAG, name])
        say(f"created system user {name} (home {box.barman_home})")
    user = account(name)
    assert user is not None
    if user.home != box.barman_home:
        if user.gecos == USER_TAG and not user.home.is_dir():
            # Ours, and its sandbox was purged: move the home here rather than resurrect a dead path.
            run_logged(box, ["usermod", "--home", box.barman_home, name])
            say(f"moved the home of {name} from purged {user.home} to {box.barman_home}")
            user = account(name)
            assert user is not None
        else:
            # barman_home stays under DIR; only ssh cares about the unix home (~/.ssh).
            say(f"user {name} already has home {user.home}: ssh key and known_hosts go there")
    install_dir(box.barman_home, user.uid, user.gid, 0o750)
    if not user.home.is_dir():
        install_dir(user.home, user.uid, user.gid, 0o750)
    install_dir(user.home / ".ssh", user.uid, user.gid, 0o700)

    env = barman_env(settings, box, user)
    key = user.home / ".ssh" / "id_ed25519"
    if not key.exists():
        output_of(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{name}@{USER_TAG}", "-f", key], user, env)
    elif not Path(f"{key}.pub").exists():
        public = output_of(["ssh-keygen", "-y", "-f", key], user, env)
        write_atomically(Path(f"{key}.pub"), public + "\n", 0o644, user)

    # Login shells (`su - barman`) find the venv's barman and PostgreSQL's tools, and the home's
    # own sandbox config. A home shared with another sandbox keeps that sandbox's block.
    own_home = user.home == box.barman_home
    text = f'export PATH="{settings.venv}/bin:{PGBIN}:$PATH"'
    if own_home:
        text += f'\nexport BARMAN_CONFIG_FILE="{box.conf}"'
    for profile in (user.home / ".profile", user.home / ".bashrc"):
        if own_home or not (profile.exists() and BLOCK_BEGIN in profile.read_text().splitlines()):
            put_block(profile, user, text)

    # A venv built from a Python under /root (pyenv) cannot be executed by the barman user.
    if spawn([settings.venv / "bin" / "python", "-c", "import barman, psycopg2"], user, env).returncode != 0:
        raise SandboxError(f"user {name} cannot run barman from {settings.venv} "
                           "(venv made from a private Python? see bootstrap)")
    return user


def pg_running(datadir: Path) -> bool:
    """Is a postmaster running on *datadir*?"""
    return spawn([PGBIN / "pg_ctl", "-D", datadir, "status"], postgres()).returncode == 0


def setup_postgres(box: Layout, settings: Settings) -> None:
    pg = postgres()
    if not (box.pgdata / "PG_VERSION").is_file() or (box.pgdata / "PG_VERSION").stat().st_size == 0:
        if box.pgdata.is_dir() and any(box.pgdata.iterdir()):
            raise SandboxError(f"{box.pgdata} is not empty but holds no cluster: remove it or purge the sandbox")
        install_dir(box.pgdata, pg.uid, pg.gid, 0o700)
        run_logged(box, [PGBIN / "initdb", "-D", box.pgdata, "-U", "postgres", "-E", "UTF8", "--no-locale",
                         "-A", "peer", "--auth-host=scram-sha-256"], pg)
        # initdb -A peer already allows `local replication all peer`: barman streams over the socket.
        with open(box.pgdata / "postgresql.conf", "a") as conf:
            conf.write(f"\n# --- pg-backup-api sandbox ---\nlisten_addresses = '127.0.0.1'\n"
                       f"port = {settings.pg_port}\nunix_socket_directories = '{box.run}'\n"
                       "wal_level = replica\nmax_wal_senders = 10\nmax_replication_slots = 10\n")
        say(f"initdb done: {box.pgdata}")
    if not pg_running(box.pgdata):
        with open(box.log / "sandbox.log", "ab") as log:
            started = spawn([PGBIN / "pg_ctl", "-D", box.pgdata, "-l", box.log / "pg.log", "-w", "-t", "60",
                             "start"], pg, stdout=log)
        if started.returncode != 0:
            raise fail_with_log(box.log / "pg.log", f"PostgreSQL did not start on port {settings.pg_port}")
    if spawn([PGBIN / "pg_isready", "-q", "-h", box.run, "-p", str(settings.pg_port), "-t", "10"], pg).returncode:
        raise SandboxError(f"the cluster in {box.pgdata} runs, but not on port {settings.pg_port} "
                           "(built with another port?)")
    say(f"PostgreSQL 15 up on 127.0.0.1:{settings.pg_port} (socket {box.run})")


def seed_database(box: Layout, settings: Settings) -> str:
    """Create labdb and its known rows once; the check value a recovery of the seed must reproduce."""
    port = settings.pg_port
    if not psql_at(box, port, "postgres", f"SELECT 1 FROM pg_database WHERE datname = '{DB}'"):
        psql_at(box, port, "postgres", f"CREATE DATABASE {DB}")
    # Seed only when the table is created: a re-run must not undo what a test did to the rows.
    if psql_at(box, port, DB, "SELECT to_regclass('public.known_rows') IS NULL") == "t":
        psql_at(box, port, DB, f"""BEGIN;
            CREATE TABLE known_rows (id int PRIMARY KEY, label text NOT NULL,
                                     created_at timestamptz DEFAULT now());
            INSERT INTO known_rows (id, label) SELECT g, 'row-' || g FROM generate_series(1, {SEED_ROWS}) g;
            COMMIT;""")
        say(f"seeded {DB}.known_rows with {SEED_ROWS} rows")
    # Barman connects as a same-named role over the socket: peer auth, no password anywhere.
    user = settings.barman_user
    if not psql_at(box, port, "postgres", f"SELECT 1 FROM pg_roles WHERE rolname = '{user}'"):
        psql_at(box, port, "postgres", f'CREATE ROLE "{user}" LOGIN SUPERUSER')
    # Computed from the definition, not the table.
    return psql_at(box, port, "postgres", f"""SELECT count(*), md5(string_agg('row-' || g, ',' ORDER BY g))
                                              FROM generate_series(1, {SEED_ROWS}) g""")


def write_barman_config(box: Layout, settings: Settings, user: Account) -> None:
    write_atomically(box.conf, f"""; written by the pg-backup-api sandbox (tests/sandbox)
[barman]
barman_user = {user.name}
barman_home = {box.barman_home}
configuration_files_directory = {box.confd}
log_file = {box.log}/barman.log
log_level = INFO
compression = gzip
immediate_checkpoint = true
; barman 3.19 creates this for every server, by default as /tmp/barman/cloud-staging: owned by the
; first barman user, it would make every other user's barman fail. Keep it in the sandbox.
cloud_staging_directory = {box.barman_home}/cloud-staging
""", 0o644)
    write_atomically(box.confd / f"{settings.server}.conf", f"""; written by the pg-backup-api sandbox (tests/sandbox)
[{settings.server}]
description = "pg-backup-api sandbox: PostgreSQL 15 on 127.0.0.1:{settings.pg_port}"
conninfo = host={box.run} port={settings.pg_port} user={user.name} dbname=postgres
streaming_conninfo = host={box.run} port={settings.pg_port} user={user.name}
backup_method = postgres
streaming_archiver = on
slot_name = {SLOT}
path_prefix = {PGBIN}
""", 0o644)
    barman_log = box.log / "barman.log"
    barman_log.touch()
    os.chown(barman_log, user.uid, user.gid)
    if spawn(["test", "-r", box.conf, "-a", "-w", barman_log, "-a", "-w", box.barman_home], user).returncode:
        raise SandboxError(f"user {user.name} cannot read {box.conf} or write its log/home")


def sshd_pid(box: Layout) -> Optional[int]:
    """The pid of DIR's sshd listener if it is alive."""
    return alive_with(box.sshd_pid, "sshd", str(box.sshd_config))


def setup_sshd(box: Layout, settings: Settings, user: Account) -> None:
    # /run/sshd is sshd's privilege-separation dir; it is gone after a reboot.
    install_dir(Path("/run/sshd"), 0, 0, 0o755)
    host_key = box.sshd_dir / "ssh_host_ed25519_key"
    if not host_key.exists():
        output_of(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{USER_TAG} host key", "-f", host_key])
    authorized = box.sshd_dir / "authorized_keys" / "postgres"
    write_atomically(authorized, (user.home / ".ssh" / "id_ed25519.pub").read_text(), 0o644)
    # UsePAM yes: Debian's postgres account is locked ('!'), which sshd refuses without PAM.
    # StrictModes no: DIR may sit below world-writable /tmp.
    box.sshd_config.write_text(f"""# written by the pg-backup-api sandbox (tests/sandbox)
Port {settings.ssh_port}
ListenAddress 127.0.0.1
HostKey {host_key}
PidFile {box.sshd_pid}
AuthorizedKeysFile {box.sshd_dir}/authorized_keys/%u
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin no
AllowUsers postgres
UsePAM yes
StrictModes no
X11Forwarding no
AllowTcpForwarding no
LogLevel VERBOSE
""")
    output_of([SSHD, "-t", "-f", box.sshd_config])
    sshd_log = box.log / "sshd.log"
    if sshd_pid(box) is None:
        box.sshd_pid.unlink(missing_ok=True)
        if spawn([SSHD, "-f", box.sshd_config, "-E", sshd_log]).returncode != 0:
            raise fail_with_log(sshd_log, f"sshd did not start on 127.0.0.1:{settings.ssh_port}")
        for _ in range(50):
            if sshd_pid(box) is not None:
                break
            time.sleep(0.1)
        else:
            raise fail_with_log(sshd_log, "sshd wrote no pid file")

    # Record the host key ourselves: barman and the API pass SSH_COMMAND as it is, with no -o
    # options, so the key must already be known. Drop a stale entry left by an older sandbox.
    host = "127.0.0.1" if settings.ssh_port == 22 else f"[127.0.0.1]:{settings.ssh_port}"
    entry = f"{host} {' '.join(Path(f'{host_key}.pub').read_text().split()[:2])}"
    known_hosts = user.home / ".ssh" / "known_hosts"

    def known() -> bool:
        return known_hosts.exists() and entry in known_hosts.read_text().splitlines()

    if not known():
        # Several sandboxes may share this user's known_hosts: edit it under a lock.
        with flocked(user.home / ".ssh" / ".sandbox.lock", 60, f"another sandbox editing {known_hosts}"):
            if not known():
                if known_hosts.exists():
                    # "not found" is not an error here, only cleanup of a replaced host key.
                    spawn(["ssh-keygen", "-R", host, "-f", known_hosts], user)
                with open(known_hosts, "a") as f:
                    f.write(entry + "\n")
                os.chown(known_hosts, user.uid, user.gid)
                os.chmod(known_hosts, 0o644)
    # The exact form barman will run; no BatchMode, no host key options.
    with open(box.log / "sandbox.log", "ab") as log:
        try:
            rc = spawn(["ssh", "-p", str(settings.ssh_port), "postgres@127.0.0.1", "true"], user,
                       {"HOME": str(user.home), "PATH": "/usr/bin:/bin"}, stdout=log, timeout=30).returncode
        except subprocess.TimeoutExpired:
            rc = -1
    if rc != 0:
        raise fail_with_log(sshd_log, f"ssh -p {settings.ssh_port} postgres@127.0.0.1 fails for user {user.name}")
    say(f"sshd up on 127.0.0.1:{settings.ssh_port}: {user.name} -> postgres by key")


def slot_active(box: Layout, settings: Settings) -> str:
    """t or f, or "" when the slot does not exist."""
    return psql_at(box, settings.pg_port, "postgres",
                   f"SELECT active FROM pg_replication_slots WHERE slot_name = '{SLOT}'")


def barman_cmd(settings: Settings, box: Layout, *args: str) -> List[str]:
    return [str(settings.venv / "bin" / "barman"), "-c", str(box.conf), *args]


def start_wal_streaming(box: Layout, settings: Settings, user: Account) -> None:
    env = barman_env(settings, box, user)
    if not slot_active(box, settings):
        run_logged(box, barman_cmd(settings, box, "receive-wal", "--create-slot", settings.server), user, env)
    if slot_active(box, settings) != "t":
        # `barman cron` starts `barman receive-wal` (pg_receivewal --slot) in the background.
        run_logged(box, barman_cmd(settings, box, "cron"), user, env)
        for _ in range(150):
            if slot_active(box, settings) == "t":
                break
            time.sleep(0.2)
        else:
            raise fail_with_log(box.log / "barman.log", "receive-wal did not start streaming")
    say(f"WAL streaming into barman (slot {SLOT} active)")


def cron_loop_pid(box: Layout) -> Optional[int]:
    """The pid of DIR's cron loop if it is alive."""
    return alive_with(box.cron_pid, None, str(box.conf))


# The loop's own code, run by the venv's python as the barman user; its arguments name DIR's config,
# which is how `down` and cron_loop_pid recognise it.
CRON_LOOP = """import subprocess, sys, time
interval, barman, conf = float(sys.argv[2]), sys.argv[3], sys.argv[4]
while True:
    time.sleep(interval)
    subprocess.run([barman, "-c", conf, "cron"], stdin=subprocess.DEVNULL)
"""


def start_cron_loop(box: Layout, settings: Settings, user: Account) -> None:
    # There is no cron daemon here. The loop keeps receive-wal alive and moves streamed WAL into
    # the archive, as a real Barman host's cron would. It runs in its own session so `down`
    # can kill its whole process group; it is started directly as the barman user (no root parent).
    if settings.cron_interval <= 0 or cron_loop_pid(box) is not None:
        return
    with open(box.log / "barman-cron-loop.log", "ab") as log:
        loop = subprocess.Popen(
            [str(settings.venv / "bin" / "python"), "-c", CRON_LOOP, "barman-cron-loop", str(settings.cron_interval),
             str(settings.venv / "bin" / "barman"), str(box.conf)],
            user=user.uid, group=user.gid, extra_groups=user.groups, env=barman_env(settings, box, user), cwd="/",
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, close_fds=True, start_new_session=True)
    box.cron_pid.write_text(f"{loop.pid}\n")
    time.sleep(0.2)
    if cron_loop_pid(box) is None or loop.poll() is not None:
        raise SandboxError(f"the barman cron loop died at once (see {box.log}/barman-cron-loop.log)")
    say(f"barman cron loop running every {settings.cron_interval}s (pid {loop.pid})")


def done_backups(box: Layout, settings: Settings, user: Account) -> List[str]:
    """Ids of DONE backups, oldest first."""
    listed = output_of(barman_cmd(settings, box, "-f", "json", "list-backups", settings.server), user,
                       barman_env(settings, box, user))
    rows = json.loads(listed).get(settings.server, [])
    return sorted(r["backup_id"] for r in rows if r.get("status") == "DONE")


@contextmanager
def wal_ticks(box: Layout, settings: Settings) -> Iterator[None]:
    """A tiny transaction committed every second while the block runs.

    After a WAL switch on an idle cluster, pg_receivewal closes the segment (and barman can archive
    it) only when the next WAL record arrives: the background writer's comes every ~15 s, so waits
    of 0.5 to 20 s. A commit per second ends the wait in about a second. A thread: it cannot
    outlive us, even when the block fails.
    """
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(1):
            try:
                psql_at(box, settings.pg_port, "postgres", "SELECT txid_current()")
            except SandboxError:
                return

    ticker = threading.Thread(target=tick, name="sandbox-wal-ticks", daemon=True)
    ticker.start()
    try:
        yield
    finally:
        stop.set()
        ticker.join()


def ensure_backup(box: Layout, settings: Settings, user: Account) -> str:
    previous = read_kv_file(box.env_file).get("BACKUP_ID", "")
    ids = done_backups(box, settings, user)
    if previous and previous in ids:
        backup_id = previous
    elif ids:
        backup_id = ids[-1]
    else:
        env = barman_env(settings, box, user)
        # Barman takes no first backup before a WAL has reached the archive.
        with wal_ticks(box, settings):
            run_logged(box, barman_cmd(settings, box, "switch-wal", "--force", "--archive", "--archive-timeout",
                                       "60", settings.server), user, env)
        say("a WAL segment reached the archive")
        # --wait: without it the backup stays WAITING_FOR_WALS until the next cron.
        run_logged(box, barman_cmd(settings, box, "backup", "--wait", "--wait-timeout", "300", settings.server),
                   user, env)
        ids = done_backups(box, settings, user)
        if not ids:
            raise SandboxError("barman backup finished but list-backups shows no DONE backup")
        backup_id = ids[-1]
    say(f"backup {backup_id} is DONE")
    return backup_id


def up(directory: PathLike, *, pg_port: Optional[int] = None, ssh_port: Optional[int] = None,
       barman_user: Optional[str] = None, server: Optional[str] = None, venv: Optional[PathLike] = None,
       cron_interval: Optional[int] = None) -> Dict[str, str]:
    """Build (or reuse) the sandbox in *directory*; the keys written to DIR/env."""
    _restart_clock()
    require_root()
    box = layout(directory)
    settings = load_settings(box, pg_port, ssh_port, barman_user, server, venv, cron_interval)
    require_tools(settings)
    say(f"building sandbox in {box.dir}")
    if box.dir.is_dir() and not box.marker.exists() and any(box.dir.iterdir()):
        raise SandboxError(f"{box.dir} exists, is not empty and is not a sandbox: refusing to chown it "
                           "(use a new directory)")
    box.dir.mkdir(parents=True, exist_ok=True)
    with lock_dir(box):
        # Read again under the lock: another `up` may have recorded DIR's settings meanwhile.
        settings = load_settings(box, pg_port, ssh_port, barman_user, server, venv, cron_interval)
        prepare_layout(box, settings)
        user = ensure_barman_user(box, settings)
        setup_postgres(box, settings)
        rows_check = seed_database(box, settings)
        write_barman_config(box, settings, user)
        setup_sshd(box, settings, user)
        start_wal_streaming(box, settings, user)
        start_cron_loop(box, settings, user)
        backup_id = ensure_backup(box, settings, user)
        run_logged(box, barman_cmd(settings, box, "check", settings.server), user, barman_env(settings, box, user))
        env = {"SANDBOX_DIR": str(box.dir), "PGBA_VENV": str(settings.venv), "PGBIN": str(PGBIN),
               "PGDATA": str(box.pgdata), "PGHOST": str(box.run), "PGPORT": str(settings.pg_port),
               "SSH_PORT": str(settings.ssh_port), "BARMAN_USER": user.name, "BARMAN_HOME": str(box.barman_home),
               "BARMAN_UNIX_HOME": str(user.home), "BARMAN_CONF": str(box.conf), "BARMAN_SERVER": settings.server,
               "BARMAN_BIN": str(settings.venv / "bin" / "barman"),
               "SSH_COMMAND": f"ssh -p {settings.ssh_port} postgres@127.0.0.1", "DB": DB, "ROWS_QUERY": ROWS_QUERY,
               "ROWS_CHECK": rows_check, "RESTORE_PARENT": str(box.restores), "LOG_DIR": str(box.log),
               "BACKUP_ID": backup_id}
        write_kv_file(box.env_file, env)
    say(f"ready: barman check OK; source {box.env_file}")
    return env


# ------------------------------------------------------------------------------------------------
# down
# ------------------------------------------------------------------------------------------------

def under(path: str, box: Layout) -> bool:
    return path == str(box.dir) or path.startswith(f"{box.dir}/")


def ancestors() -> Set[int]:
    """This process and its ancestors: never ours to kill."""
    found, pid = set(), os.getpid()
    while pid > 1:
        found.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
    return found


def processes() -> Iterator[Tuple[int, int, str]]:
    """(pid, uid, command line) of every live user-space process; kernel threads and zombies have no command line."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            uid = os.stat(entry.path).st_uid
            cmdline = Path(entry.path, "cmdline").read_bytes()
        except OSError:
            continue
        if cmdline:
            yield int(entry.name), uid, cmdline.replace(b"\0", b" ").decode(errors="replace")


def cwd_of(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return ""


def sandbox_pids(box: Layout, barman_uid: Optional[int]) -> List[int]:
    """Pids that belong to DIR: postgres's or the barman user's processes whose command line names DIR
    or whose cwd is under it, and sshd listeners on DIR's config."""
    uids = {postgres().uid} | ({barman_uid} if barman_uid is not None else set())
    skip = ancestors()
    found = []
    for pid, uid, cmd in processes():
        if pid in skip:
            continue
        if uid in uids:
            cwd = cwd_of(pid)
            if f"{box.dir}/" in cmd or (cwd and under(cwd, box)):
                found.append(pid)
        elif uid == 0 and "sshd" in cmd and f" {box.sshd_config}" in cmd:
            found.append(pid)
    return found


def stop_cron_loop(box: Layout) -> None:
    pid = cron_loop_pid(box)
    if pid is not None:
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        say(f"stopped the barman cron loop (process group {pid})")
    box.cron_pid.unlink(missing_ok=True)


def stop_receive_wal(box: Layout, settings: Settings, user: Account) -> None:
    # The orderly way first; whatever survives is caught by the sweep.
    with open(box.log / "sandbox.log", "ab") as log:
        stopped = spawn(barman_cmd(settings, box, "receive-wal", "--stop", settings.server), user,
                        barman_env(settings, box, user), stdout=log)
    if stopped.returncode == 0:
        say("asked barman receive-wal to stop")


def children_of(parent: int) -> List[int]:
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if int(Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()[1]) == parent:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return found


def signal_all(pids: Sequence[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def stop_sshd(box: Layout) -> None:
    pid = sshd_pid(box)
    if pid is not None:
        # Its children are live ssh sessions (e.g. a recovery in flight) of this sandbox only.
        signal_all([*children_of(pid), pid], signal.SIGTERM)
        say(f"stopped sshd (pid {pid})")


def cluster_dirs(box: Layout) -> List[Path]:
    """Data dirs of clusters that may run for DIR."""
    dirs = [box.pgdata]
    if box.copies.exists():
        dirs += [Path(line) for line in box.copies.read_text().splitlines() if line]
    device = box.dir.stat().st_dev
    for root, subdirs, files in os.walk(box.dir):
        # Like find -xdev: stay on DIR's filesystem.
        subdirs[:] = [d for d in subdirs if os.lstat(os.path.join(root, d)).st_dev == device]
        if "postmaster.pid" in files:
            dirs.append(Path(root))
    # A postmaster and its backends run with their data dir as cwd.
    pg_uid = postgres().uid
    for pid, uid, _ in processes():
        cwd = cwd_of(pid) if uid == pg_uid else ""
        if cwd and under(cwd, box) and Path(cwd, "PG_VERSION").is_file():
            dirs.append(Path(cwd))
    return sorted(set(dirs))


def stop_cluster(datadir: Path) -> None:
    """Fast shutdown, immediate if that hangs."""
    if not (datadir / "PG_VERSION").is_file() or not pg_running(datadir):
        return
    pg = postgres()
    for mode in ("fast", "immediate"):
        if spawn([PGBIN / "pg_ctl", "-D", datadir, "-m", mode, "-w", "-t", "30", "stop"], pg).returncode == 0:
            break
    if pg_running(datadir):
        raise SandboxError(f"could not stop the cluster in {datadir}")
    say(f"stopped PostgreSQL in {datadir}")


def show_processes(pids: Sequence[int]) -> None:
    subprocess.run(["ps", "-o", "pid,user,args", "-p", ",".join(map(str, pids))], stdin=subprocess.DEVNULL,
                   stdout=sys.stderr, stderr=subprocess.DEVNULL, check=False)


def sweep(box: Layout, barman_uid: Optional[int]) -> None:
    """TERM, then KILL, whatever still belongs to DIR; fail if anything survives."""
    pids = sandbox_pids(box, barman_uid)
    if not pids:
        return
    say(f"terminating leftover processes: {' '.join(map(str, pids))}")
    show_processes(pids)
    for sig, rounds in ((signal.SIGTERM, 50), (signal.SIGKILL, 30)):
        signal_all(pids, sig)
        for _ in range(rounds):
            pids = sandbox_pids(box, barman_uid)
            if not pids:
                return
            time.sleep(0.1)
    show_processes(pids)
    raise SandboxError(f"processes of {box.dir} survived SIGKILL")


def down(directory: PathLike, *, purge: bool = False, barman_user: Optional[str] = None,
         server: Optional[str] = None, venv: Optional[PathLike] = None) -> None:
    """Stop every process started for *directory* (and only those); with *purge*, delete it."""
    _restart_clock()
    require_root()
    box = layout(directory)
    if str(box.dir) == "/":
        raise SandboxError("refusing DIR=/")
    if not box.dir.is_dir():
        say(f"{box.dir} does not exist: nothing to stop")
        return
    rec = read_kv_file(box.marker)
    settings = Settings(0, 0, rec.get("BARMAN_USER") or barman_user or DEFAULTS["SANDBOX_BARMAN_USER"],
                        rec.get("BARMAN_SERVER") or server or DEFAULTS["SANDBOX_SERVER"],
                        Path(rec.get("PGBA_VENV") or venv or DEFAULTS["PGBA_VENV"]), 0)
    user = account(settings.barman_user)
    with lock_dir(box) if box.marker.exists() else _nothing():
        stop_cron_loop(box)
        if user is not None and box.conf.exists() and os.access(settings.venv / "bin" / "barman", os.X_OK):
            stop_receive_wal(box, settings, user)
        stop_sshd(box)
        for datadir in cluster_dirs(box):
            stop_cluster(datadir)
        sweep(box, user.uid if user is not None else None)
        say(f"nothing of {box.dir} is running")
        if purge and not box.marker.exists():
            raise SandboxError(f"{box.dir} has no .sandbox marker: not deleting it")
    if purge:
        shutil.rmtree(box.dir)
        say(f"deleted {box.dir}")


@contextmanager
def _nothing() -> Iterator[None]:
    yield


# ------------------------------------------------------------------------------------------------
# psql, start_copy, stop_copy
# ------------------------------------------------------------------------------------------------

def psql(directory: PathLike, port: Union[int, str], sql: str) -> str:
    """psql -Atc *sql* as postgres on DIR's socket, database labdb."""
    require_root()
    return psql_at(layout(directory), _port(str(port), "PostgreSQL"), DB, sql)


def copy_log(box: Layout, datadir: Path, port: int) -> Path:
    name = re.sub(r"[^A-Za-z0-9._-]", "_", datadir.name)
    return box.log / f"copy-{name}-{port}.log"


def start_copy(directory: PathLike, datadir: PathLike, port: Union[int, str]) -> None:
    """Start the restored cluster in *datadir* on 127.0.0.1:*port*."""
    _restart_clock()
    require_root()
    box = layout(directory)
    data = plain_path(datadir, "DATADIR")
    number = _port(str(port), "PostgreSQL")
    if not (data / "PG_VERSION").is_file():
        raise SandboxError(f"{data} holds no PostgreSQL cluster (did the recovery finish?)")
    recorded = box.copies.read_text().splitlines() if box.copies.exists() else []
    if str(data) not in recorded:
        with open(box.copies, "a") as copies:
            copies.write(f"{data}\n")
    log = copy_log(box, data, number)
    pg = postgres()
    if not pg_running(data):
        # A recovered cluster keeps the source's port and socket dir: override both.
        if spawn([PGBIN / "pg_ctl", "-D", data, "-l", log, "-w", "-t", "120", "-o",
                  f"-p {number} -k {box.run} -c listen_addresses=127.0.0.1", "start"], pg).returncode != 0:
            raise fail_with_log(log, f"the cluster in {data} did not start on port {number}")
    if spawn([PGBIN / "pg_isready", "-q", "-h", box.run, "-p", str(number), "-t", "30"], pg).returncode != 0:
        raise SandboxError(f"the cluster in {data} runs, but does not answer on port {number}")
    say(f"copy {data} up on 127.0.0.1:{number}")


def stop_copy(directory: PathLike, datadir: PathLike) -> None:
    """Stop the cluster start_copy started in *datadir*."""
    _restart_clock()
    require_root()
    box = layout(directory)
    data = Path(os.path.realpath(os.path.abspath(os.fspath(datadir))))
    if (data / "PG_VERSION").is_file() and pg_running(data):
        stop_cluster(data)
    else:
        say(f"no cluster running in {data}")
    if box.copies.exists():
        kept = [line for line in box.copies.read_text().splitlines() if line != str(data)]
        write_atomically(box.copies, "".join(f"{line}\n" for line in kept), 0o644)
