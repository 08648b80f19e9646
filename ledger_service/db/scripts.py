"""Running multi-statement SQL scripts (migrations) over asyncpg, which prepares one statement at a time."""

from __future__ import annotations

from sqlalchemy import Connection


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
