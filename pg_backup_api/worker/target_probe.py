"""What a recovery's paths are on its target host: one ssh round trip, before Barman touches them.

The operation's own validated ssh command runs SCRIPT (POSIX sh, sent on its standard input) with
the paths as arguments. For each path it reports what is there (nothing; an empty directory; a
directory that holds something; one it cannot list; anything else) and its real path: every
symbolic link followed, component by component from the left, the part that does not exist yet
kept as it is, as GNU's `realpath -m` and Python's `os.path.realpath` say (written with `test -L` and
`readlink`, which every Unix has).
"""

from __future__ import annotations

import posixpath
import random
import shlex
import subprocess
import time
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

from pg_backup_api.core.errors import ApiError, Unprocessable
from pg_backup_api.rules import effects
from pg_backup_api.worker import ssh_master

FIELD = "remote_ssh_command"
# Put first: ssh keeps the first value of an option, so the client's command cannot lengthen them.
CONNECT_TIMEOUT = 10
TIMEOUT = 20.0  # seconds the whole round trip may take
MARK = b"pg-backup-api-probe 1\0"

# Paths arrive as arguments ("$@"), never inside the script's text. Each answer is two NUL-terminated
# fields (a path may hold any other byte): the kind, then the real path followed by "x", so that a
# trailing newline survives the command substitution, or nothing when it cannot be resolved (more
# than 40 links on the way, as the kernel's limit: a loop). `..` goes up from what is already
# resolved, which holds no link any more, so it is the parent the kernel would take.
SCRIPT = r"""
LC_ALL=C
export LC_ALL
real() {
	todo=$1
	done=
	hops=0
	while [ -n "$todo" ]; do
		todo=${todo#/}
		case $todo in
		*/*)
			c=${todo%%/*}
			todo=/${todo#*/}
			;;
		*)
			c=$todo
			todo=
			;;
		esac
		case $c in
		'' | .) continue ;;
		..)
			done=${done%/*}
			continue
			;;
		esac
		if [ -L "$done/$c" ]; then
			hops=$((hops + 1))
			[ "$hops" -le 40 ] || return 1
			t=$(readlink "$done/$c" && echo x) || return 1
			t=${t%?x}
			case $t in /*) done= ;; esac
			todo=/$t$todo
		else
			done=$done/$c
		fi
	done
	printf '%s' "$done"
}
kind() {
	if [ -d "$1" ]; then
		if l=$(ls -Aq "$1" 2>/dev/null); then
			if [ -z "$l" ]; then echo empty; else echo filled; fi
		else
			echo unreadable
		fi
	elif [ -e "$1" ] || [ -L "$1" ]; then
		echo other
	else
		echo absent
	fi
}
printf 'pg-backup-api-probe 1\0'
for p do
	k=$(kind "$p")
	r=$(real "$p" && echo x)
	printf '%s\0%s\0' "$k" "$r"
done
"""

# (ssh command tokens, paths) -> what the target says of each path; Unprocessable when it cannot be asked.
Probe = Callable[[Sequence[str], Sequence[str]], Dict[str, effects.OnTarget]]


def _refuse(host: str, why: str) -> Unprocessable:
    return Unprocessable(f"field '{FIELD}': cannot look at the recovery's paths on the target host {host}: {why}")


def probe_argv(ssh_argv: Sequence[str], paths: Sequence[str]) -> list:
    """The client's ssh command, never waiting for a password or for long, running the script on *paths*."""
    remote = " ".join(["sh", "-s", "--", *(shlex.quote(p) for p in paths)])
    return [ssh_argv[0], "-o", "BatchMode=yes", "-o", f"ConnectTimeout={CONNECT_TIMEOUT}", *ssh_argv[1:], remote]


def probe(ssh_argv: Sequence[str], paths: Sequence[str]) -> Dict[str, effects.OnTarget]:
    """Ask the target host about *paths* over *ssh_argv* (tokens of a validated ssh command)."""
    host = ssh_argv[-1]
    deadline = time.monotonic() + TIMEOUT
    # A burst of POSTs to one host meets sshd's MaxStartups as a burst of recoveries does: the same retries.
    for delay in (*ssh_master.RETRY_DELAYS, None):
        try:
            done = subprocess.run(probe_argv(ssh_argv, paths), input=SCRIPT.encode(), capture_output=True,
                                  timeout=max(1.0, deadline - time.monotonic()), shell=False)
        except subprocess.TimeoutExpired:
            raise _refuse(host, f"no answer within {TIMEOUT:g} s") from None
        except OSError as exc:
            raise _refuse(host, f"cannot run {ssh_argv[0]}: {exc.strerror or exc}") from None
        if done.returncode == 0:
            return parse(done.stdout, paths, host)
        said = " ".join(done.stderr.decode("utf-8", "replace").split())[:300]
        pause = delay * random.uniform(0.5, 1.5) if delay is not None else 0.0
        if (done.returncode != 255 or delay is None or not ssh_master.RETRYABLE.search(said)
                or time.monotonic() + pause > deadline):
            break
        time.sleep(pause)
    who = "ssh" if done.returncode == 255 else "the check on the target host"
    raise _refuse(host, f"{who} exited with code {done.returncode}" + (f": {said}" if said else ""))


def parse(answer: bytes, paths: Sequence[str], host: str = "") -> Dict[str, effects.OnTarget]:
    """The script's answer about *paths*; Unprocessable when it is not one."""
    start = answer.find(MARK)
    if start < 0:
        raise _refuse(host, "its answer does not come from the check (no sh there?)")
    fields = answer[start + len(MARK):].split(b"\0")
    if len(fields) != 2 * len(paths) + 1 or fields[-1] != b"":
        raise _refuse(host, f"its answer is cut short or malformed ({len(fields) - 1} fields for {len(paths)} paths)")
    found: Dict[str, effects.OnTarget] = {}
    for i, path in enumerate(paths):
        kind, real = fields[2 * i].decode("ascii", "replace"), fields[2 * i + 1]
        if kind not in effects.KINDS or (real and not real.endswith(b"x")):
            raise _refuse(host, f"its answer about {path} is malformed")
        found[path] = effects.OnTarget(kind, _normalised(real[:-1].decode("utf-8", "replace")) if real else None)
    return found


def _normalised(real: str) -> Optional[str]:
    """One spelling of the physical path the script printed (it leaves '//' and '..' of what does not exist)."""
    if real == "":
        return "/"
    if not real.startswith("/"):
        return None
    # Components that do not exist yet are created as plain directories: '..' then goes up textually.
    return "/" + posixpath.normpath(real).lstrip("/")


def recheck_staging(job: Mapping[str, Any], ask: Optional[Probe] = None) -> Optional[str]:
    """Just before Barman starts: why the recovery's staging_wal_directory must not be used now, or None.

    Run over the ssh command Barman will use (through the worker's master when it is up). Accepted
    when empty or absent, it may have been filled while the recovery waited for its turn.
    """
    path = job.get("staging_wal_directory")
    command = job.get(FIELD)
    if not isinstance(path, str) or not isinstance(command, str):
        return None
    effect = effects.Effect("", path, effects.STAGE, "staging_wal_directory")
    try:
        seen = (ask or probe)(command.split(), [path])[path]
    except ApiError as exc:
        return f"cannot check staging_wal_directory {path} on the target host: {exc.message}"
    return effects.staging_refusal(effect, seen)
