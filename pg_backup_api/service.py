"""What the HTTP layer asks of the service: create, list and look up operations."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from pg_backup_api import barman_adapter, runner
from pg_backup_api.errors import ApiError, InvalidRequest
from pg_backup_api.operations import (
    INSTANCE_TYPES,
    SERVER_TYPES,
    OperationType,
    describe,
    job_document,
    now_utc,
    parse_request,
    timestamp,
)
from pg_backup_api.settings import Settings
from pg_backup_api.store import OperationStore

log = logging.getLogger(__name__)

Spawn = Callable[[OperationType, str, str, OperationStore, str], None]
SUPPORTED_TYPES = (OperationType.RECOVERY,)


class Service:
    def __init__(self, settings: Settings, spawn: Spawn = runner.spawn_worker) -> None:
        self.settings = settings
        self.config_source = barman_adapter.ConfigSource(settings.barman_conf)
        self._spawn = spawn
        self._stores: Dict[Path, OperationStore] = {}
        self._stores_lock = threading.Lock()

    def _store(self, server: Optional[str]) -> OperationStore:
        config = self.config_source.get()
        root = config.barman_home
        if server is not None:
            config.server(server)
            root = root / server
        with self._stores_lock:
            store = self._stores.get(root)
            if store is None:
                store = self._stores[root] = OperationStore(root)
            return store

    def list_operations(self, server: Optional[str]) -> List[Dict[str, str]]:
        return self._store(server).list()

    def get_operation(self, server: Optional[str], op_id: str) -> Dict[str, Any]:
        return describe(self._store(server).get(op_id))

    def create_operation(self, server: Optional[str], body: Any) -> str:
        store = self._store(server)
        op_type, fields = parse_request(body, SERVER_TYPES if server else INSTANCE_TYPES)
        if op_type not in SUPPORTED_TYPES:
            raise InvalidRequest(f"operation type '{op_type.value}' is not supported yet")
        if op_type is OperationType.RECOVERY:
            server_config = self.config_source.get().server(server)
            fields["resolved_backup_id"] = barman_adapter.resolve_backup(
                server_config, fields["backup_id"]).backup_id
        start = now_utc()
        op_id = store.create(job_document(op_type, fields, start), start)
        try:
            self._spawn(op_type, server or "", op_id, store, self.settings.barman_conf)
        except Exception as exc:
            # The job file exists already: record the failure so it never reads IN_PROGRESS.
            log.exception("operation %s: cannot start its worker", op_id)
            store.finish(op_id, {**store.get(op_id).job, "success": False, "exit_code": None,
                                 "end_time": timestamp(now_utc()),
                                 "output": f"pg-backup-api: cannot start the worker: {exc}\n"})
            raise ApiError(f"operation {op_id} was stored but its worker could not start: {exc}") from exc
        log.info("operation %s (%s) accepted for %s", op_id, op_type.value, server or "the instance")
        return op_id

    def diagnose(self) -> Dict[str, Any]:
        return barman_adapter.diagnose(self.config_source.get().path)
