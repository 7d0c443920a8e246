"""The code layout README.md shows is the import contract lint-imports enforces."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import List, Set

try:
    import tomllib
except ImportError:  # Python < 3.11
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "pg_backup_api"


def contract_layers() -> List[Set[str]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (layers,) = [c["layers"] for c in config["contracts"] if c["type"] == "layers"]
    return [set(re.split(r"\s*[|:]\s*", layer.strip())) for layer in layers]


def readme_layers(readme: str) -> List[Set[str]]:
    """The modules of each row of the table under "Code layout", in order."""
    table = readme[readme.index("Code layout, top to bottom"):].split("\n\n")[1]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    return [set(re.findall(r"`(?:pg_backup_api/)?(\w+)\.py`", row.split(" | ")[0])) for row in rows]


def test_the_readme_table_lists_the_contracts_layers_in_order():
    assert readme_layers((ROOT / "README.md").read_text()) == contract_layers()


def test_every_module_of_the_package_is_in_a_layer():
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__", "__main__"}
    assert modules == set().union(*contract_layers())


def test_a_table_that_disagrees_with_the_contract_is_seen():
    readme = (ROOT / "README.md").read_text()
    swapped = readme.replace("| `pg_backup_api/store.py` |", "| `pg_backup_api/stored.py` |")
    assert readme_layers(swapped) != contract_layers()
    rows = readme.split("\n")
    first, second = (i for i, row in enumerate(rows) if row.startswith("| `pg_backup_api/doctor.py`")
                     or row.startswith("| `pg_backup_api/service.py`"))
    rows[first], rows[second] = rows[second], rows[first]
    assert readme_layers("\n".join(rows)) != contract_layers()


def test_a_worker_starts_without_importing_barmans_code():
    """Each recovery's worker imports what it needs before barman starts; Barman's own modules (about
    35 ms) only when it must read Barman's configuration (run by hand, config_update, a contended slot)."""
    code = ("import sys; from pg_backup_api import cli, claims, operations, runner; "
            "print(sorted(m for m in sys.modules if m.startswith('barman.')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.stdout.strip() == "['barman.version']"
