"""Running multi-statement SQL scripts (migrations) over asyncpg, which prepares one statement at a time, and the
database functions' definitions, one file per function and revision (migrations/sql/README.md)."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import Connection

from ledger_service.database import PROJECT_ROOT

FUNCTIONS_DIR = PROJECT_ROOT / "migrations" / "sql"


def statements(script: str) -> list[str]:
    """Split a script at lines ending in `;` outside `$$` bodies."""
    found: list[str] = []
    current: list[str] = []
    in_body = False
    for line in script.splitlines():
        if line.count("$$") % 2:
            in_body = not in_body
        current.append(line)
        if not in_body and line.rstrip().endswith(";"):
            found.append("\n".join(current).strip())
            current = []
    if "\n".join(current).strip():
        raise ValueError("the script must end with a complete statement")
    return found


def run_script(connection: Connection, script: str) -> None:
    for statement in statements(script):
        connection.exec_driver_sql(statement)


def function_sql(name: str, revision: str) -> str:
    """The `CREATE OR REPLACE FUNCTION` of `name` as revision `revision` left it."""
    return (FUNCTIONS_DIR / name / f"{revision}.sql").read_text()


def create_functions(connection: Connection, revision: str, names: Iterable[str]) -> None:
    """Define each function as `revision` left it, in the order given (a SQL function's body is checked against the
    functions it calls)."""
    for name in names:
        run_script(connection, function_sql(name, revision))
