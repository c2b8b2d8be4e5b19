"""The backup modules import each other in one direction only.

backup.py is the API and imports the parts; a part imports only the parts
below it. An import the other way would make a cycle that works or fails by
the order of imports.
"""

import ast
import pathlib

import pytest

import backup

SRC = pathlib.Path(__file__).parents[2] / "src"
# Lowest first: each may import only those before it.
LAYERS = ["backup_store", "synapse_layout", "backup_container", "backup_chain", "backup_restore"]


def _project_imports(module: str) -> set[str]:
    """Return the src modules that a module imports."""
    tree = ast.parse((SRC / f"{module}.py").read_text())
    local = {path.stem for path in SRC.glob("*.py")}
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
    return found & local


@pytest.mark.parametrize("module", LAYERS)
def test_a_part_imports_only_the_parts_below_it(module: str):
    """backup_store imports none; backup_restore may import all the other parts."""
    below = set(LAYERS[: LAYERS.index(module)])
    assert _project_imports(module) <= below


def test_backup_exports_the_seed_api():
    """The seed's names are backup's, wherever they are defined."""
    seed = {
        "AWS_COMMAND",
        "BACKUP_FILE_PATTERNS",
        "LOCAL_DIR_PATTERN",
        "S3_MAX_CONCURRENT_REQUESTS",
        "MEDIA_DIR",
        "PASSPHRASE_FILE",
        "BASH_COMMAND",
        "get_paths_to_backup",
        "build_backup_command",
        "calculate_size",
        "prepare_container",
        "create_backup",
        "get_environment",
        "BackupError",
        "S3Client",
        "S3Error",
        "S3Parameters",
    }
    assert seed <= set(backup.__all__)
    assert all(hasattr(backup, name) for name in backup.__all__)
