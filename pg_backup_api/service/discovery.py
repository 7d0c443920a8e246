"""Discovery, read-only and synchronous: Barman's servers, their status, backups and checks,
`barman diagnose`, and the report of Barman's queue of configuration changes.

The slow reads (check, status, show-backup, diagnose) run one at a time (single_flight): in a process, callers
share the run in progress; across processes, the second is answered 429.
"""

from __future__ import annotations

from typing import Any, Dict, List

from pg_backup_api.barman_io import adapter as barman_adapter
from pg_backup_api.rules import schema
from pg_backup_api.rules.settings import Settings
from pg_backup_api.store import claims
from pg_backup_api.store.single_flight import SingleFlight

# Locks of the slow reads that run one at a time, under <barman_home>/jobs/.
READS_DIR = ".reads"
READ_RETRY_AFTER = 5


class Discovery:
    def __init__(self, settings: Settings, config_source: barman_adapter.ConfigSource,
                 operation_claims: claims.Claims) -> None:
        self.settings = settings
        self.config_source = config_source
        self.claims = operation_claims
        self._reads = SingleFlight(lambda: self.config_source.get().barman_home / "jobs" / READS_DIR,
                                   READ_RETRY_AFTER)

    def diagnose(self) -> Dict[str, Any]:
        path = self.config_source.get().path
        return self._reads.run("diagnose", "barman diagnose",
                               lambda: barman_adapter.diagnose(path, self.settings.check_timeout))

    def barman(self) -> Dict[str, Any]:
        """The running Barman's version and the features of the API it lacks (with the version each needs)."""
        return barman_adapter.features().summary()

    def openapi_document(self) -> Dict[str, Any]:
        """/openapi.json as this host serves it: what its Barman lacks is marked so."""
        features = barman_adapter.features()
        return schema.host_document(features.version_text, features.refusals())

    def list_servers(self) -> List[Dict[str, Any]]:
        config = self.config_source.get()
        return [barman_adapter.server_summary(config, name) for name in config.server_names]

    def config_changes_queue(self) -> Dict[str, Any]:
        """Barman's queue of configuration changes; `stuck` when changes wait and no config_update runs."""
        config = self.config_source.get()
        running = self.claims.holder(claims.CONFIG_UPDATE_KEY) is not None
        return barman_adapter.config_changes_queue(config, running)

    def server_status(self, server: str) -> Dict[str, Any]:
        config = self.config_source.get()
        summary = barman_adapter.server_summary(config, server)
        status = self._reads.run(f"status\0{server}", f"barman status of server '{server}'", lambda: (
            barman_adapter.barman_json(config.path, "status", "--", server, timeout=self.settings.check_timeout)))
        return {**summary, "status": status.get(server, {})}

    def list_backups(self, server: str) -> List[Dict[str, Any]]:
        return barman_adapter.list_backups(self.config_source.get().server(server))

    def show_backup(self, server: str, requested: str) -> Dict[str, Any]:
        config = self.config_source.get()
        backup_id = barman_adapter.find_backup(config.server(server), requested)
        shown = self._reads.run(f"show-backup\0{server}\0{backup_id}", f"barman show-backup of backup '{backup_id}'",
                                lambda: barman_adapter.barman_json(config.path, "show-backup", "--", server, backup_id,
                                                                   timeout=self.settings.check_timeout))
        return shown.get(server, shown)

    def check_server(self, server: str) -> Dict[str, Any]:
        config = self.config_source.get()
        config.server(server)
        result = self._reads.run(f"check\0{server}", f"barman check of server '{server}'", lambda: (
            barman_adapter.barman_json(config.path, "check", "--", server, timeout=self.settings.check_timeout)
        )).get(server, {})
        checks = [{"name": name, "status": item.get("status"), "hint": item.get("hint", "")}
                  for name, item in result.items()]
        return {"server": server, "ok": all(c["status"] == "OK" for c in checks), "checks": checks}
