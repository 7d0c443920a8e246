"""The code layout README.md shows is the import contract lint-imports enforces."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Set

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


def readme_rows(readme: str) -> List[str]:
    """The first cell of each row of the table under "Code layout", in order."""
    table = readme[readme.index("Code layout, top to bottom"):].split("\n\n")[1]
    return [line.split(" | ")[0] for line in table.splitlines() if line.startswith("| `")]


def readme_layers(readme: str) -> List[Set[str]]:
    """The layers of each row: its top-level modules and its folders."""
    tops = [re.sub(r"/`: (`\w+\.py`(, )?)+", "/`", row) for row in readme_rows(readme)]
    return [set(re.findall(r"`(?:pg_backup_api/)?(\w+)(?:\.py`|/`)", row)) for row in tops]


def readme_folder_modules(readme: str) -> Dict[str, Set[str]]:
    """The modules the table names in each folder."""
    listed: Dict[str, Set[str]] = {}
    for row in readme_rows(readme):
        for folder, modules in re.findall(r"`(?:pg_backup_api/)?(\w+)/`: ((?:`\w+\.py`(?:, )?)+)", row):
            listed[folder] = set(re.findall(r"`(\w+)\.py`", modules))
    return listed


def test_the_readme_table_lists_the_contracts_layers_in_order():
    assert readme_layers((ROOT / "README.md").read_text()) == contract_layers()


def test_every_module_and_folder_of_the_package_is_in_a_layer():
    names = {p.stem for p in PACKAGE.glob("*.py")} | {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert names - {"__init__", "__main__"} == set().union(*contract_layers())


def test_the_readme_table_names_every_module_of_each_folder():
    folders = {p.parent.name: {m.stem for m in p.parent.glob("*.py")} - {"__init__"}
               for p in PACKAGE.glob("*/__init__.py")}
    assert readme_folder_modules((ROOT / "README.md").read_text()) == folders


def test_a_table_that_disagrees_with_the_contract_is_seen():
    readme = (ROOT / "README.md").read_text()
    swapped = readme.replace("| `pg_backup_api/core/`", "| `pg_backup_api/kernel/`")
    assert readme_layers(swapped) != contract_layers()
    rows = readme.split("\n")
    first, second = (i for i, row in enumerate(rows) if row.startswith("| `pg_backup_api/service/`")
                     or row.startswith("| `pg_backup_api/worker/`"))
    rows[first], rows[second] = rows[second], rows[first]
    assert readme_layers("\n".join(rows)) != contract_layers()
    assert readme_folder_modules(readme.replace("`jobs.py`, ", "")) != readme_folder_modules(readme)


def test_a_worker_starts_without_importing_barmans_code():
    """Each recovery's worker imports what it needs before barman starts; Barman's own modules (about
    35 ms) only when it must read Barman's configuration (run by hand, config_update, a contended slot)."""
    code = ("import sys; from pg_backup_api import cli; from pg_backup_api.store import claims; "
            "from pg_backup_api.worker import runner; "
            "print(sorted(m for m in sys.modules if m.startswith('barman.')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.stdout.strip() == "['barman.version']"
