"""Versioned, idempotent schema migrations: `migrations/NNNN_name.sql`, applied in order, recorded once.

The same DDL runs on chDB and on a ClickHouse server. A migration that was applied is never edited: its
checksum is recorded, and a changed file fails loudly instead of silently diverging between installations.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources

from clickhouse_connect.driver.client import Client

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
# Checksums an earlier release recorded for a file edited since in its comments only (its statements are the same):
# databases migrated then must still upgrade. 0016 got a comment after its release (3b671b0), 0025 a reworded one
# a commit after it was added (5c3a37f). Never list a file whose statements changed.
_RELEASED_CHECKSUMS: dict[int, frozenset[str]] = {
    16: frozenset({"69d027d751f2936bad708d07601aa09704462b8d8f3fe423f89869b12b64a624"}),
    25: frozenset({"f1eabe6a1e92978145719c3aaea8ddb439eb1b49216c1f9c87b1b44e387a51dc"}),
}


class MigrationError(RuntimeError):
    """A recorded migration's file changed, or a statement failed."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()

    def statements(self) -> list[str]:
        """Statements separated by `;` at a line end (comments stripped)."""
        lines = [line for line in self.sql.splitlines() if not line.strip().startswith("--")]
        return [s.strip() for s in re.split(r";\s*$", "\n".join(lines), flags=re.MULTILINE) if s.strip()]


def available_migrations() -> list[Migration]:
    folder = resources.files("infra.clickhouse") / "migrations"
    found = []
    for entry in folder.iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), match.group(2), entry.read_text()))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"two migrations share a version: {versions}")
    return found


def _ensure_ledger(client: Client, database: str) -> None:
    client.command(f"CREATE DATABASE IF NOT EXISTS `{database}`")
    client.command(
        f"CREATE TABLE IF NOT EXISTS `{database}`.schema_migrations "
        "(version UInt32, name String, checksum String, applied_at DateTime64(3, 'UTC')) "
        "ENGINE = ReplacingMergeTree ORDER BY version"
    )


def applied_migrations(client: Client, database: str) -> dict[int, tuple[str, str]]:
    _ensure_ledger(client, database)
    rows = client.query(f"SELECT version, name, checksum FROM `{database}`.schema_migrations FINAL").result_rows
    return {int(v): (n, c) for v, n, c in rows}


def unknown_migrations(client: Client, database: str) -> list[str]:
    """`NNNN_name` of each migration recorded in `database` that this release does not have: a newer release
    applied it (the code running now was rolled back), or the database is another product's."""
    known = {m.version for m in available_migrations()}
    recorded = applied_migrations(client, database)
    return [f"{version:04d}_{name}" for version, (name, _checksum) in sorted(recorded.items()) if version not in known]


def migrate(client: Client, database: str) -> list[Migration]:
    """Apply every pending migration to `database`; returns those applied now."""
    try:
        done = applied_migrations(client, database)
    except Exception as exc:  # a user without the grants, a read-only one: a one-line error, not a traceback
        raise MigrationError(f"cannot read or create the migration ledger `{database}`.schema_migrations: "
                             f"{exc}") from exc
    applied = []
    for migration in available_migrations():
        if migration.version in done:
            recorded = done[migration.version][1]
            if recorded != migration.checksum and recorded not in _RELEASED_CHECKSUMS.get(migration.version, ()):
                raise MigrationError(
                    f"migration {migration.version:04d}_{migration.name} changed after it was applied; "
                    "add a new migration instead of editing an applied one"
                )
            continue
        for statement in migration.statements():
            try:
                _run_in(client, database, statement)
            except Exception as exc:
                # DDL is not transactional: the statements before this one stay applied, and each is idempotent.
                raise MigrationError(
                    f"migration {migration.version:04d}_{migration.name} failed: {exc} (nothing after it was applied; "
                    "mend the cause and run `ocpi-pipeline migrate` again, which runs this migration again from "
                    "its first statement)") from exc
        try:
            client.insert(f"`{database}`.schema_migrations",
                          [[migration.version, migration.name, migration.checksum, datetime.now(UTC)]],
                          column_names=["version", "name", "checksum", "applied_at"])
        except Exception as exc:
            raise MigrationError(f"migration {migration.version:04d}_{migration.name} was applied but could not be "
                                 f"recorded in `{database}`.schema_migrations: {exc}") from exc
        applied.append(migration)
    return applied


def _run_in(client: Client, database: str, statement: str) -> None:
    """Run DDL with `database` as the current one (the .sql files use unqualified names)."""
    previous = client.database
    client.database = database
    try:
        client.command(statement)
    finally:
        client.database = previous
