"""SQLAlchemy Core descriptions of the tables the queries touch.

The schema itself (constraints, indexes, triggers) is owned by the alembic migrations; these objects only let
queries be built and typed. Columns the database fills in (ids, txid, timestamps) are read back, never sent.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Integer,
    LargeBinary,
    MetaData,
    Numeric,
    Table,
    Text,
)
from sqlalchemy.dialects.postgresql import JSONB

metadata = MetaData()

entries = Table(
    "entries",
    metadata,
    Column("id", BigInteger, primary_key=True),
    Column("kind", Text, nullable=False),
    Column("request_id", Text),
    Column("user_id", BigInteger),
    Column("token_id", BigInteger),
    Column("channel_id", BigInteger),
    Column("reference", Text),
    Column("fingerprint", LargeBinary),
    Column("reverses", BigInteger),
    Column("charged", BigInteger),
    Column("details", JSONB, nullable=False),
    Column("hash", LargeBinary, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

postings = Table(
    "postings",
    metadata,
    Column("entry_id", BigInteger, primary_key=True),
    Column("ledger", Text, primary_key=True),
    Column("account", Text, primary_key=True),
    Column("amount", BigInteger, nullable=False),
)

tokens = Table(
    "tokens",
    metadata,
    Column("token_id", BigInteger, primary_key=True),
    Column("user_id", BigInteger, nullable=False),
    Column("unlimited", Boolean, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

model_prices = Table(
    "model_prices",
    metadata,
    Column("model", Text, primary_key=True),
    Column("model_ratio", Numeric, nullable=False),
    Column("completion_ratio", Numeric, nullable=False),
    Column("model_price", Numeric),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

group_ratios = Table(
    "group_ratios",
    metadata,
    Column("group_name", Text, primary_key=True),
    Column("group_ratio", Numeric, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", BigInteger, primary_key=True),
    Column("name", Text, nullable=False),
    Column("role", Text, nullable=False),
    Column("key_hash", LargeBinary, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("revoked_at", DateTime(timezone=True)),
)

snapshot_runs = Table(
    "snapshot_runs",
    metadata,
    Column("id", BigInteger, primary_key=True),
    Column("taken_at", DateTime(timezone=True), nullable=False),
    Column("accounts_changed", Integer, nullable=False),
    Column("subjects_changed", Integer, nullable=False),
)
