"""What the HTTP layer asks of the service: create, list, look up and cancel operations.

Every read of an operation first reconciles it with the process table, so an operation
whose worker died without recording an end is reported FAILED (state `lost`) at once,
and its output file makes that verdict permanent.
"""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from pg_backup_api.barman_io import adapter as barman_adapter
from pg_backup_api.core.errors import (
    ApiError,
    CancelFailed,
    Conflict,
    CorruptState,
    NoSuchModel,
    NotFound,
    Unprocessable,
)
from pg_backup_api.core.model import (
    ADMIN_TYPES,
    INSTANCE_TYPES,
    SERVER_TYPES,
    OperationType,
    State,
    describe,
    now_utc,
    parse_time,
    state_of,
    status_of,
)
from pg_backup_api.rules import effects, ssh_command
from pg_backup_api.rules.requests import job_document, parse_request
from pg_backup_api.rules.settings import Settings
from pg_backup_api.service import auth, discovery, paging
from pg_backup_api.store import claims
from pg_backup_api.store.index import Listing
from pg_backup_api.store.jobs import (
    OperationStore,
    Record,
    check_job,
    corrupt,
    storage_error,
)
from pg_backup_api.worker import processes, runner, ssh_master, target_probe

log = logging.getLogger(__name__)

# The problem of an operation whose job file cannot be read (the listing says so: "state": "corrupt").
CORRUPT_JOB = {"state": State.CORRUPT.value, "reason": "its job file cannot be read"}


@dataclass(frozen=True)
class Listed:
    """A store's operations once those without an end were reconciled: what lists, filters and /metrics count."""

    listing: Listing
    pending: List[str]  # ids without an output file, oldest first
    # The problem (corrupt, cancel_failed) of each operation that has one, as its status shows it: with
    # operations.state_of, the state of a listed operation is the one its GET answers.
    problems: Dict[str, Dict[str, str]]


Spawn = Callable[[OperationType, str, str, OperationStore, str], None]
# A worker records itself within a fraction of a second of being spawned; one that has not
# after this long never started (the spawn failed after the job file was written).
WORKER_START_GRACE = timedelta(seconds=60)
PROGRESS_TAIL_BYTES = 16 * 1024


class Service:
    def __init__(self, settings: Settings, spawn: Spawn = runner.spawn_worker,
                 probe: Optional[target_probe.Probe] = None) -> None:
        self.settings = settings
        self.config_source = barman_adapter.ConfigSource(settings.barman_conf)
        self._spawn = spawn
        # How a recovery's paths are looked at on its target (over ssh unless replaced, as tests do).
        self._probe = probe
        # Operations a read or the start-up could not reconcile (each is logged with its file).
        self.reconcile_errors = 0
        self._stores: Dict[Path, OperationStore] = {}
        self._stores_lock = threading.Lock()
        self.tokens = auth.TokenFile(settings.tokens_file)
        self.proxy_secret = auth.ProxySecret(settings.proxy_secret_file)
        self.claims = claims.Claims(lambda: self.config_source.get().barman_home / "jobs", self.lookup)
        self.discovery = discovery.Discovery(settings, self.config_source, self.claims)

    def _store(self, server: Optional[str]) -> OperationStore:
        config = self.config_source.get()
        root = config.barman_home
        if server is not None:
            config.server(server)
            root = root / server
        with self._stores_lock:
            store = self._stores.get(root)
            if store is None:
                store = self._stores[root] = OperationStore(root, server)
            return store

    # -- reads ---------------------------------------------------------------------------

    def lookup(self, server: Optional[str], op_id: str) -> Record:
        """The operation as reconciled now (what the claims ask of a holder); NotFound once gone."""
        store = self._store(server)
        return self._reconciled(store, store.get(op_id))

    def _reconciled(self, store: OperationStore, record: Record) -> Record:
        """*record*, turned FAILED/lost first if its worker is gone without recording an end.

        The fast path (the worker lives, or may still start) takes no lock; a verdict is taken
        only under the operation's lock, after reading its files again, so a worker deciding to
        start barman at that moment either sees the verdict or is seen to have recorded itself.
        """
        if record.output is not None or record.problem is not None:
            return record
        try:
            if self._lost_reason(store, record) is None:
                return self._cancel_failure_of(store, record)
            with store.operation_lock(record.op_id):
                record = store.get(record.op_id)
                if record.output is not None or record.problem is not None:
                    return record
                reason = self._lost_reason(store, record)
                if reason is None:
                    return record
                state = State.LOST
                if store.cancel_requested(record.op_id):
                    state, reason = State.CANCELED, f"canceled on request; {reason}"
                log.warning("operation %s is %s: %s", record.op_id, state.value, reason)
                runner.finish(store, record.op_id, record.job, None, store.read_progress(record.op_id),
                              state, reason)
            # An ssh master killed with its worker (SIGKILL) leaves its socket behind.
            ssh_master.sweep(self.config_source.get().barman_home)
        except CorruptState as exc:
            log.error("operation %s is corrupt: %s", record.op_id, exc.message)
            return replace(record, problem=corrupt(exc))
        return store.get(record.op_id)

    def _lost_reason(self, store: OperationStore, record: Record) -> Optional[str]:
        """Why the operation is lost, or None while its worker runs or may still start."""
        ident = worker_identity(store, record.op_id)
        if ident is not None:
            if processes.is_alive(ident):
                return None
            marker = runner.operation_marker(store.server, record.op_id)
            if store.cancel_failure(record.op_id) is not None and processes.group_members(ident.pid, marker):
                return None  # what survived SIGKILL still runs: it keeps the claim
            # What it started may still run: stop it rather than let it write on unwatched.
            processes.signal_members(ident.pid, marker, signal.SIGTERM)
            return f"the worker (pid {ident.pid}) ended without recording a result"
        # Without a start time "not started yet" would last for ever: CorruptState (store.get refuses
        # such a job file already; this covers a record made elsewhere).
        check_job(store.job_path(record.op_id), record.job)
        started = parse_time(record.job.get("start_time"))
        if started is None or now_utc() - started < WORKER_START_GRACE:
            return None
        return f"the worker did not start within {WORKER_START_GRACE.seconds} s"

    @staticmethod
    def _cancel_failure_of(store: OperationStore, record: Record) -> Record:
        failure = store.cancel_failure(record.op_id)
        if failure is None:
            return record
        return replace(record, problem={"state": State.CANCEL_FAILED.value, "reason": str(failure.get("reason"))})

    def reconcile_all(self) -> int:
        """At start-up: settle operations whose workers died while the service was down.

        Each server and each operation on its own: one that cannot be settled is logged with its
        file and counted, and the others are settled still. Returns how many could not be.
        """
        errors = 0
        config = self.config_source.get()
        for server in [None, *config.server_names]:
            try:
                store = self._store(server)
                unfinished = store.unfinished()
            except Exception:
                log.exception("cannot list the operations of %s", server or "the instance")
                errors += 1
                continue
            for op_id in unfinished:
                errors += self._reconcile_one(store, op_id)[1]
        ssh_master.sweep(config.barman_home)
        self.reconcile_errors += errors
        if errors:
            log.error("%d server(s) or operation(s) could not be reconciled at start-up (see above)", errors)
        return errors

    def _reconcile_one(self, store: OperationStore, op_id: str) -> Tuple[Optional[Record], int]:
        """Reconcile one operation: the record (None once removed, or when that failed) and 1 if that
        failed (logged with its file), else 0."""
        try:
            record = self._reconciled(store, store.get(op_id))
        except NotFound:
            return None, 0  # removed (pruned) meanwhile
        except Exception:
            log.exception("cannot reconcile operation %s (%s)", op_id, store.job_path(op_id))
            return None, 1
        if record.problem is not None and record.problem["state"] == State.CORRUPT.value:
            log.error("operation %s: %s", op_id, record.problem["reason"])
        return record, 0

    def list_operations(self, server: Optional[str], query: Optional[Mapping[str, Any]] = None
                        ) -> Dict[str, Any]:
        filters = paging.parse_filters(query) if query else None
        store = self._store(server)
        listed = self.listed(server)
        operations = listed.listing.operations()
        if filters is None:
            return {"operations": operations}
        return paging.paged(store, operations, filters, listed.problems)

    def operations_json(self, server: Optional[str]) -> bytes:
        """The unfiltered listing as JSON, `{"operations": [...]}`: encoded once per change of jobs/."""
        return self.listed(server).listing.body()

    def listed(self, server: Optional[str]) -> Listed:
        """The operations of *server* (None: the instance's) after those without an end were reconciled."""
        store = self._store(server)
        snapshot = store.index.snapshot()
        problems = {op_id: CORRUPT_JOB for op_id in snapshot.listing.corrupt}
        settled = False
        for op_id in snapshot.pending:
            record, failed = self._reconcile_one(store, op_id)
            self.reconcile_errors += failed
            if record is not None and record.problem is not None:
                problems[op_id] = record.problem
            settled = settled or (record is not None and record.output is not None)
        if settled:  # some ended (declared lost) meanwhile: they are no longer pending
            snapshot = store.index.snapshot()
        return Listed(snapshot.listing, snapshot.pending, problems)

    def get_operation(self, server: Optional[str], op_id: str) -> Dict[str, Any]:
        store = self._store(server)
        record = self._reconciled(store, store.get(op_id))
        progress = store.read_progress(op_id, PROGRESS_TAIL_BYTES) if record.output is None else ""
        return describe(record, progress)

    def operation_output(self, server: Optional[str], op_id: str) -> str:
        store = self._store(server)
        record = self._reconciled(store, store.get(op_id))
        if record.output is not None and isinstance(record.output.get("output"), str):
            return record.output["output"]
        return store.read_progress(op_id)

    # -- changes -------------------------------------------------------------------------

    def audit_log_path(self) -> Optional[Path]:
        if self.settings.audit_log:
            return Path(self.settings.audit_log)
        try:
            return self.config_source.get().barman_home / "pg-backup-api-audit.log"
        except ApiError:
            return None

    def create_operation(self, server: Optional[str], body: Any, requester: Optional[str] = None,
                         token: Optional[auth.Token] = None) -> str:
        store = self._store(server)
        op_type, fields = parse_request(body, SERVER_TYPES if server else INSTANCE_TYPES)
        if token is not None and op_type.value in ADMIN_TYPES and not auth.allows(token.scope, "admin"):
            # Checked on the parsed type, so the older `operation_type` dialect cannot dodge it.
            raise auth.Forbidden(f"token '{token.name}' has scope '{token.scope}'; {op_type.value} needs 'admin'")
        if requester:
            fields["requested_by"] = requester
        config = self.config_source.get()
        barman_adapter.check_request(op_type.value, fields)  # 422 for what this host's Barman lacks
        if op_type is OperationType.RECOVERY:
            # The schema checked the syntax; this server's ssh policy is checked here, before anything else.
            command = ssh_command.parse(fields["remote_ssh_command"], self.settings.ssh_options_for(server))
            backup = barman_adapter.resolve_backup(config.server(server), fields["backup_id"],
                                                   fields.get("target_time"), fields.get("target_lsn"))
            # The job keeps the command as sent; the claim and the policy use where ssh says it goes,
            # and the claim and the host's slots the address it connects to, however it is spelt.
            target = ssh_command.resolve(command)
            address = ssh_command.connect_address(target)
            self._check_policy(server, target)
            # Every path the recovery writes or wipes passes the path rules before anything else is
            # checked of them (a tablespace name the backup lacks is refused next, whatever its path).
            found = effects.effects_of(op_type, fields, effects.RecoveryTarget(
                target.host, dict(backup.tablespace_locations),
                barman_adapter.remote_staging_path(config.server(server), backup)))
            self._check_effects(config, server, found)
            barman_adapter.check_recovery_against_backup(fields, backup)
            fields["resolved_backup_id"] = backup.backup_id
            fields["target_address"] = address
            # Last, as it costs an ssh round trip: the same rules where the paths really lead on the target.
            fields["resolved_destination_directory"] = self._check_on_target(config, server, command, found)
            # One recovery at a time into a given directory of a given host.
            host = ssh_command.endpoint(address, target.port)
            where, real = fields["destination_directory"], fields["resolved_destination_directory"]
            claim_key = f"recovery\0{host}\0{real}"
            shown = where if real == where else f"{where} ({real} on the target host)"
            busy = f"a recovery into {shown} on {host} is already running"
        elif op_type is OperationType.BACKUP:
            if fields.get("incremental"):
                fields["incremental"] = barman_adapter.resolve_backup(
                    config.server(server), fields["incremental"]).backup_id
            claim_key, busy = f"backup\0{server}", f"a backup of server '{server}' is already running"
        elif op_type is OperationType.CONFIG_SWITCH:
            if fields.get("model_name") and fields["model_name"] not in config.model_names:
                raise NoSuchModel(fields["model_name"], config.model_names)
            barman_adapter.prove_config_switch(config, server, fields.get("model_name"))
            claim_key, busy = f"config\0{server}", f"a configuration change of server '{server}' is running"
        else:
            claim_key, busy = claims.CONFIG_UPDATE_KEY, "a config_update is already running"
        if op_type is not OperationType.RECOVERY:
            self._check_effects(config, server, effects.effects_of(op_type, fields))
        # Checked, proven, stored and claimed under one hold of the claims' lock.
        with self.claims.locked():
            self.claims.refuse_if_held(claim_key, busy)
            if op_type is OperationType.RECOVERY:
                # Counted where the slots are taken, under the same lock: a burst of POSTs cannot overshoot.
                self.claims.refuse_if_queue_full(fields["target_address"], self.settings.max_recoveries_per_host,
                                                 self.settings.max_queued_per_host, self.settings.max_queued)
            if op_type is OperationType.CONFIG_UPDATE:
                # Proven under the claim, so no other config_update runs between this proof and
                # the real edit. The job stores the values as Barman will write them (strings).
                fields["changes"] = barman_adapter.prove_config_changes(config, fields["changes"])
            op_id = self._store_and_spawn(store, op_type, server, fields, claim_key, busy)
        log.info("operation %s (%s) accepted for %s", op_id, op_type.value, server or "the instance")
        return op_id

    def _check_policy(self, server: str, target: ssh_command.SshTarget) -> None:
        """The optional per-server allowlist of hosts of the service's configuration."""
        policy = self.settings.policy(server)
        # The host ssh resolves (HostName from ~/.ssh/config or -o) is where the data goes: that is checked.
        if policy.allowed_hosts and target.host not in {ssh_command.canonical_host(h) for h in policy.allowed_hosts}:
            alias = ssh_command.canonical_host(target.alias)
            resolved = f" (ssh resolves it to '{target.host}')" if alias != target.host else ""
            raise Unprocessable(
                f"field 'remote_ssh_command': host '{target.alias}'{resolved} is not an allowed recovery target of "
                f"server '{server}' (allowed: {', '.join(policy.allowed_hosts)})")

    def _path_rules(self, config: barman_adapter.BarmanConfig, server: Optional[str]) -> effects.PathRules:
        """Barman's home, the server's binaries and its allowed_destinations, read from the configuration
        the rest of the request was checked against."""
        return effects.PathRules(
            server or "", str(config.barman_home),
            barman_adapter.pg_binaries(config.server(server)) if server else (),
            self.settings.policy(server).allowed_destinations if server else ())

    def _check_effects(self, config: barman_adapter.BarmanConfig, server: Optional[str],
                       found: List[effects.Effect]) -> None:
        effects.check_effects(found, self._path_rules(config, server))

    def _check_on_target(self, config: barman_adapter.BarmanConfig, server: str,
                         command: ssh_command.SshCommand, found: List[effects.Effect]) -> str:
        """Ask the target (one ssh round trip) what is at each path and where it leads, check that too;
        the destination's real path."""
        paths = list(dict.fromkeys(effect.path for effect in found))
        seen = (self._probe or target_probe.probe)(command.argv, paths)
        resolved = effects.check_on_target(found, seen, self._path_rules(config, server))
        return next(e.path for e in resolved if e.field == "destination_directory")

    def _store_and_spawn(self, store: OperationStore, op_type: OperationType, server: Optional[str],
                         fields: Dict[str, Any], claim_key: str, busy: str) -> str:
        start = now_utc()
        op_id = store.create(job_document(op_type, fields, start), start)
        try:
            # Claimed before the worker starts: its start-up would compete with this write.
            self.claims.acquire(claim_key, server, op_id, busy)
        except OSError as exc:
            # Not claimed, so never started: forget the job rather than leave one that reads as running.
            store.remove(op_id)
            raise storage_error(exc, "cannot write the operation's claim") from exc
        if op_type is OperationType.RECOVERY:
            self._enqueue(server, op_id, fields["target_address"])
        try:
            self._spawn(op_type, server or "", op_id, store, self.settings.barman_conf)
        except Exception as exc:
            # The job file exists already: record the failure so it never reads IN_PROGRESS.
            log.exception("operation %s: cannot start its worker", op_id)
            try:
                runner.finish(store, op_id, store.get(op_id).job, None, "", State.FAILED,
                              f"cannot start the worker: {exc}")
            except OSError:
                store.remove(op_id)  # nothing can be recorded either: the operation never existed
                if isinstance(exc, OSError):
                    raise storage_error(exc, "cannot start the worker") from exc
            raise ApiError(f"operation {op_id} was stored but its worker could not start: {exc}") from exc
        return op_id

    def _enqueue(self, server: Optional[str], op_id: str, host: str) -> None:
        """Put the recovery in its host's queue before its worker starts, so the next POST counts it; if
        that fails, the worker queues itself."""
        try:
            self.claims.enqueue(host, server, op_id)
        except ApiError as exc:
            log.warning("operation %s: its slot on %s is left to its worker: %s", op_id, host, exc.message)

    def cancel_operation(self, server: Optional[str], op_id: str, token: Optional[auth.Token] = None
                         ) -> Dict[str, Any]:
        """Stop a running operation and everything it started; 409 once it has ended."""
        store = self._store(server)
        record = self._reconciled(store, store.get(op_id))
        op_type = record.job.get("operation_type")
        if token is not None and op_type in ADMIN_TYPES and not auth.allows(token.scope, "admin"):
            # Stopping an operation takes the scope that starting it took.
            raise auth.Forbidden(f"token '{token.name}' has scope '{token.scope}'; canceling {op_type} "
                                 "needs 'admin'")
        if record.output is not None:
            raise Conflict(f"operation '{op_id}' has already ended (state {state_of(record).value})")
        if record.problem is not None and record.problem["state"] == State.CORRUPT.value:
            raise Conflict(f"operation '{op_id}' cannot be canceled: {record.problem['reason']}")
        with store.operation_lock(op_id):
            # Under the lock the worker takes to start barman: it starts before this or sees the request.
            ended = store.read_output(op_id)
            if ended is not None:
                raise Conflict(f"operation '{op_id}' has already ended "
                               f"(state {state_of(Record(op_id, {}, ended)).value})")
            store.request_cancel(op_id, {"requested_at": now_utc().isoformat()})
            ident = worker_identity(store, op_id)
            if ident is None:  # no worker yet: once it starts, it sees the end and starts nothing
                runner.finish(store, op_id, record.job, None, store.read_progress(op_id), State.CANCELED,
                              "canceled on request")
                return describe(store.get(op_id))
        marker = runner.operation_marker(server, op_id)
        # The worker is in its group: once the group is empty, the worker has recorded its end or never will.
        if not processes.stop_group(ident.pid, marker, self.settings.cancel_grace):
            survivors = processes.group_members(ident.pid, marker)
            reason = (f"processes {', '.join(map(str, survivors))} of operation '{op_id}' survived SIGKILL "
                      f"(uninterruptible, probably waiting on I/O); it stays claimed until they are gone: "
                      f"cancel again later")
            log.error("%s", reason)
            store.record_cancel_failed(op_id, {"reason": reason, "pids": survivors, "at": now_utc().isoformat()})
            raise CancelFailed(reason)
        if store.read_output(op_id) is None:  # the worker was killed before it could record its end
            runner.finish(store, op_id, record.job, None, store.read_progress(op_id), State.CANCELED,
                          "canceled on request")
        return describe(store.get(op_id))

    def prune(self, older_than: timedelta, dry_run: bool, server: Optional[str] = None
              ) -> List[Dict[str, Any]]:
        """Remove the files of operations that ended more than *older_than* ago; never running ones."""
        config = self.config_source.get()
        servers: List[Optional[str]] = [server] if server else [None, *config.server_names]
        cutoff = now_utc() - older_than
        removed = []
        for name in servers:
            store = self._store(name)
            for op in store.list():
                try:
                    output = store.read_output(op["id"])
                except CorruptState:
                    continue  # never pruned: `pg-backup-api doctor` shows it to an operator
                ended = parse_time(output.get("end_time")) if output else None
                if ended is None or ended >= cutoff:
                    continue
                if not dry_run:
                    store.remove(op["id"])
                removed.append({"server": name, "operation_id": op["id"], "type": op["type"],
                                "end_time": output.get("end_time"),
                                "status": status_of(Record(op["id"], {}, output)).value})
        return removed


def worker_identity(store: OperationStore, op_id: str) -> Optional[processes.ProcessIdentity]:
    """Who the operation's worker is, None before it has recorded itself; CorruptState if unreadable."""
    worker = store.read_worker(op_id)
    if worker is None:
        return None
    try:
        return processes.ProcessIdentity.from_json(worker)
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptState(str(store.worker_path(op_id)), f"not a worker identity ({exc!r})") from None
