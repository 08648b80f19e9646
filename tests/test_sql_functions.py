"""migrations/sql holds the one current text of every database function: at head, each function is exactly the
newest file of it (body byte for byte, the rest as PostgreSQL prints it), no function is without a file, and no file
changes once recorded.

The migrations read the files, so a database migrated for the tests has whatever a file says now: an edited file
would pass the comparison at head, while every database migrated before the edit keeps the old text. SHA256SUMS is
what catches such an edit. The downgrades' restoring of older files is checked in test_migrations.
"""

from __future__ import annotations

import hashlib
from typing import Any

import asyncpg

from ledger_service.db.scripts import FUNCTIONS_DIR, statements
from tests.support import MIGRATIONS, function_definitions, functions_against_files


def test_each_file_creates_or_replaces_its_function() -> None:
    """One `CREATE OR REPLACE FUNCTION` of the folder's function per file (applied by upgrades and downgrades
    alike), in a file named after the revision that applies it."""
    revisions = {script.revision for script in MIGRATIONS.walk_revisions()}
    files = sorted(FUNCTIONS_DIR.glob("*/*"))
    assert files
    for path in files:
        assert path.suffix == ".sql", path
        assert path.stem in revisions, f"{path}: not named after a revision"
        found = statements(path.read_text())
        assert len(found) == 1, f"{path}: {len(found)} statements"
        code = "\n".join(line for line in found[0].splitlines() if not line.startswith("--"))
        assert code.startswith(f"CREATE OR REPLACE FUNCTION {path.parent.name}("), path


def test_files_are_as_recorded() -> None:
    """A changed hash means a function changed in place: copy the newest file to a new revision instead."""
    recorded = {}
    for line in (FUNCTIONS_DIR / "SHA256SUMS").read_text().splitlines():
        digest, path = line.split("  ", 1)
        recorded[path] = digest
    actual = {
        str(path.relative_to(FUNCTIONS_DIR)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in FUNCTIONS_DIR.glob("*/*.sql")
    }
    assert actual == recorded


async def test_every_function_has_a_folder(raw: asyncpg.Connection[Any]) -> None:
    folders = {path.name for path in FUNCTIONS_DIR.iterdir() if path.is_dir()}
    assert set(await function_definitions(raw)) - folders == set()


async def test_functions_at_head_are_their_newest_files(raw: asyncpg.Connection[Any]) -> None:
    """Fails for a new file that no migration applies, or a migration that applies another revision's file."""
    assert await raw.fetchval("SELECT version_num FROM alembic_version") == MIGRATIONS.get_current_head()
    diff = await functions_against_files(raw)
    assert not diff, diff
