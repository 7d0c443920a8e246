"""What the running Barman can do: its version, and each feature the service uses that a Barman of the
supported range may lack, with the first version that has it.

Imports only `barman` itself (its version, no configuration or catalogue code), so the worker can use it
too. Features of Barman's Python API are probed by attribute (barman_adapter passes the probes); those
of its command line are known by version, as Barman's argument parser is not importable cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Tuple

import barman

from pg_backup_api.core.errors import Unprocessable

Version = Tuple[int, ...]

# The oldest Barman CI proves (Debian 12's), and the first major release it does not.
MINIMUM: Version = (3, 4)
BEYOND: Version = (4,)


def parse_version(text: str) -> Version:
    """`3.10.1` as (3, 10, 1); a suffix such as `a1` or `.dev0` ends the number."""
    found = []
    for part in text.split(".")[:3]:
        digits = ""
        for char in part:
            if not char.isdigit():
                break
            digits += char
        if not digits:
            break
        found.append(int(digits))
        if len(digits) < len(part):
            break
    return tuple(found)


def shown(version: Version) -> str:
    return ".".join(map(str, version))


@dataclass(frozen=True)
class Feature:
    """Something the service offers that needs a Barman of at least *minimum*."""

    key: str
    what: str  # as an error message names it: "backup_id 'auto'"
    minimum: Version
    # The Barman Python API attribute whose presence proves it ("" when only the version can tell).
    probe: str = ""


FEATURES: Tuple[Feature, ...] = (
    Feature("config_switch", "type 'config_switch' (configuration models)", (3, 10), "barman.config.ModelConfig"),
    Feature("config_update", "type 'config_update' (Barman's configuration change queue)", (3, 10),
            "barman.config.ConfigChangesQueue"),
    Feature("named_wait", "field 'name' with 'wait_for_wals' (Barman 3.4 does not save the name with --wait)",
            (3, 5)),
    Feature("incremental", "field 'incremental' (barman backup --incremental)", (3, 11)),
    Feature("restore_command", "the `barman restore` command (`recover` before)", (3, 12)),
    Feature("auto", "backup_id 'auto'", (3, 13), "barman.server.Server.get_closest_backup_id_from_target_time"),
    Feature("staging_wal_directory", "field 'staging_wal_directory' (barman restore --staging-wal-directory)",
            (3, 13)),
    Feature("empty_destination", "the refusal of a destination that is not empty", (3, 15)),
    Feature("delta_restore", "delta restore into a destination that is not empty (recovery_options)", (3, 17)),
)
BY_KEY: Dict[str, Feature] = {f.key: f for f in FEATURES}
# What a request asks for, by operation type and the fields it sets (none: the type itself): the feature it needs.
REQUEST_FEATURES: Dict[Tuple[str, Tuple[str, ...]], str] = {
    ("recovery", ("staging_wal_directory",)): "staging_wal_directory",
    ("backup", ("name", "wait_for_wals")): "named_wait",
    ("backup", ("incremental",)): "incremental",
    ("config_switch", ()): "config_switch",
    ("config_update", ()): "config_update",
}
# Features the service offers through the API (the others only change how it drives Barman).
OFFERED = ("named_wait", "config_switch", "config_update", "incremental", "auto", "staging_wal_directory")


class NeedsNewerBarman(Unprocessable):
    """A request needs a feature the running Barman lacks."""

    def __init__(self, feature: Feature, version_text: str) -> None:
        super().__init__(f"{feature.what} needs Barman >= {shown(feature.minimum)}; this host has {version_text}")
        self.feature = feature


class UnsupportedBarman(RuntimeError):
    """The running Barman is outside the range the service supports."""


@dataclass(frozen=True)
class BarmanFeatures:
    """The features of one Barman: from its version, overridden by attribute probes where there are some."""

    version_text: str
    probed: Mapping[str, bool]

    @property
    def version(self) -> Version:
        return parse_version(self.version_text)

    def has(self, key: str) -> bool:
        feature = BY_KEY[key]
        if key in self.probed:
            return self.probed[key]
        return self.version >= feature.minimum

    def require(self, key: str) -> None:
        """Raise NeedsNewerBarman (422) if this Barman lacks feature *key*."""
        if not self.has(key):
            raise NeedsNewerBarman(BY_KEY[key], self.version_text)

    def require_for_request(self, op_type: str, fields: Mapping[str, object]) -> None:
        """Refuse (422) a request that asks for something this Barman lacks, before anything runs."""
        for (kind, needed), key in REQUEST_FEATURES.items():
            if kind == op_type and all(fields.get(f) not in (None, False, "") for f in needed):
                self.require(key)

    def refusal(self, key: str) -> Optional[str]:
        """Why a request for feature *key* is refused here (the 422's message), or None if this Barman has it."""
        return None if self.has(key) else NeedsNewerBarman(BY_KEY[key], self.version_text).message

    def refusals(self) -> Tuple[Tuple[str, str], ...]:
        """(feature, refusal) of every feature this Barman lacks, offered or not."""
        return tuple((f.key, self.refusal(f.key) or "") for f in FEATURES if not self.has(f.key))

    def lacking(self) -> Tuple[Feature, ...]:
        """The features the service offers that this Barman lacks."""
        return tuple(BY_KEY[k] for k in OFFERED if not self.has(k))

    def summary(self) -> Dict[str, object]:
        """For diagnostics: the version, and what it lacks with the version each needs."""
        return {"version": self.version_text,
                "lacks": [{"feature": f.key, "what": f.what, "needs": shown(f.minimum)} for f in self.lacking()]}


def from_version(version_text: str, probed: Optional[Mapping[str, bool]] = None) -> BarmanFeatures:
    return BarmanFeatures(version_text, dict(probed or {}))


def running() -> BarmanFeatures:
    """The installed Barman's features, known from its version alone (what the worker needs)."""
    return from_version(barman.__version__)


def check_supported(version_text: Optional[str] = None) -> None:
    """Raise UnsupportedBarman, with one line saying so, for a Barman (default: the installed one) outside
    the supported range."""
    version_text = version_text or barman.__version__
    version = parse_version(version_text)
    if not MINIMUM <= version < BEYOND:
        raise UnsupportedBarman(f"pg-backup-api needs Barman >= {shown(MINIMUM)}, < {shown(BEYOND)}; "
                                f"this host has Barman {version_text}")
