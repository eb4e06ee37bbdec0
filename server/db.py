"""Server storage through SQLAlchemy Core: SQLite (WAL) by default, PostgreSQL by URL.

Tables: clinics (enrolled identities, each of one tier: ``clinic`` or ``hospital``), tokens (one-time
enrollment, naming the tier), nonces (replay guard), versions (published manifests), rounds, updates
(unique update_id; unique (clinic, round)), dropped_updates (taken out of a round before its
aggregation: the clinic was revoked), uploads (a hospital's chunked teacher update being received).

Two federations share the tables (DESIGN §10): ``head`` (the clinics' head) and ``teacher`` (the
hospitals' whole teacher); versions and rounds carry their federation, their ids are one sequence
over both, so an update names its round unambiguously. A round is aggregated by the
one process whose ``UPDATE rounds SET state='aggregating' ... WHERE state='open'`` (or whose lease on
a stale claim) changed the row: an atomic claim on both databases.
"""

from __future__ import annotations

import time

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.engine import Engine

metadata = MetaData()

clinics = Table(
    "clinics", metadata,
    Column("name", String(64), primary_key=True),
    Column("public_key", String(64), nullable=False),  # raw Ed25519, hex
    Column("enrolled_at", Float, nullable=False),
    Column("revoked_at", Float, nullable=True),
    Column("tier", String(16), nullable=False, server_default="clinic"),  # clinic | hospital (TIERS)
)

tokens = Table(
    "tokens", metadata,
    Column("secret_hash", String(64), primary_key=True),
    Column("clinic", String(64), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
    Column("used_at", Float, nullable=True),
    Column("tier", String(16), nullable=False, server_default="clinic"),
)

nonces = Table(
    "nonces", metadata,
    Column("clinic", String(64), primary_key=True),
    Column("nonce", String(64), primary_key=True),
    Column("ts", BigInteger, nullable=False),
)

versions = Table(
    "versions", metadata,
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("model_version", String(128), nullable=False),
    Column("manifest_sha256", String(64), nullable=False),  # blob of the signed manifest.json
    Column("round", Integer, nullable=True),  # the round whose aggregation made it (None: published)
    Column("created_at", Float, nullable=False),
    Column("federation", String(16), nullable=False, server_default="head"),  # head | teacher (FEDERATIONS)
)

rounds = Table(
    "rounds", metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("base_version", Integer, ForeignKey("versions.version"), nullable=False),
    Column("state", String(16), nullable=False),  # open | aggregating | closed | failed (report["error"])
    Column("opened_at", Float, nullable=False),
    Column("deadline", Float, nullable=False),
    Column("min_clients", Integer, nullable=False),
    Column("n_updates", Integer, nullable=False, default=0),
    Column("claimed_by", String(64), nullable=True),
    Column("claimed_at", Float, nullable=True),
    Column("closed_at", Float, nullable=True),
    Column("result_version", Integer, nullable=True),
    Column("report", JSON, nullable=True),
    Column("federation", String(16), nullable=False, server_default="head"),
)

updates = Table(
    "updates", metadata,
    Column("update_id", String(128), primary_key=True),
    Column("clinic", String(64), ForeignKey("clinics.name"), nullable=False),
    Column("round", Integer, ForeignKey("rounds.id"), nullable=False),  # the round it counts in
    Column("sent_round", Integer, nullable=False),  # the round the clinic trained for
    Column("staleness", Integer, nullable=False),
    Column("kem", String(32), nullable=False),
    Column("blob_sha256", String(64), nullable=False),  # the sealed bytes, as received
    Column("meta", JSON, nullable=False),
    Column("received_at", Float, nullable=False),
    UniqueConstraint("clinic", "round", name="one_update_per_clinic_and_round"),
)

# Updates taken out of a round before it was aggregated (today: their clinic was revoked), kept for
# the record: `edge-server rounds` lists them under the round they no longer count in
dropped_updates = Table(
    "dropped_updates", metadata,
    Column("update_id", String(128), primary_key=True),
    Column("clinic", String(64), nullable=False),
    Column("round", Integer, ForeignKey("rounds.id"), nullable=False),
    Column("blob_sha256", String(64), nullable=False),
    Column("received_at", Float, nullable=False),
    Column("reason", String(200), nullable=False),
    Column("dropped_by", String(128), nullable=False),  # the operator (user@host) who revoked
    Column("dropped_at", Float, nullable=False),
)


# A hospital's teacher update while its chunks arrive (DESIGN §10): what it declared when it began,
# and how much the server has acknowledged (received_chunks, received_bytes: the part file beyond
# received_bytes, left by a crash between the write and this row's update, is cut off). On completion
# the part file becomes a blob and an updates row; the upload row stays as the record ("complete").
uploads = Table(
    "uploads", metadata,
    Column("upload_id", String(128), primary_key=True),  # = the update id
    Column("clinic", String(64), ForeignKey("clinics.name"), nullable=False),
    Column("round", Integer, ForeignKey("rounds.id"), nullable=False),  # the round it was trained for
    Column("base_version", Integer, nullable=False),
    Column("kem", String(32), nullable=False),
    Column("stream_key", JSON, nullable=False),  # federation.sealed_stream.StreamKey.to_dict()
    Column("meta", JSON, nullable=False),  # n, val_loss, modality_fraction, noise_multiplier
    Column("total_size", BigInteger, nullable=False),  # declared ciphertext bytes
    Column("chunk_size", Integer, nullable=False),
    Column("received_chunks", Integer, nullable=False, default=0),
    Column("received_bytes", BigInteger, nullable=False, default=0),
    Column("state", String(16), nullable=False),  # receiving | completing (claimed by one completion) | complete
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
)

TIERS = ("clinic", "hospital")
FEDERATIONS = {"head": "clinic", "teacher": "hospital"}  # federation -> the tier that trains it

# Columns added after a table first shipped: create_all makes new tables but never alters old ones,
# so upgrade() adds these where missing (the one migration this schema has needed; with more, Alembic).
ADDED_COLUMNS = {("clinics", "tier"): "'clinic'", ("tokens", "tier"): "'clinic'", ("versions", "federation"): "'head'",
                 ("rounds", "federation"): "'head'"}


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):  # noqa: ANN001
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin(conn):  # noqa: ANN001 - our write transactions write first (UPDATE/INSERT), so a
            conn.exec_driver_sql("BEGIN")  # deferred BEGIN never has to upgrade a read lock under contention

        # pysqlite's own transaction handling must be off for the BEGIN above to be ours
        @event.listens_for(engine, "connect", insert=True)
        def _autocommit(dbapi_conn, _record):  # noqa: ANN001
            dbapi_conn.isolation_level = None

        return engine
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def create_all(engine: Engine) -> None:
    metadata.create_all(engine)
    upgrade(engine)


def lock_ids(conn) -> None:
    """Serialise the transactions that allocate version and round ids (max + 1): two processes
    aggregating the two federations at once would otherwise take the same id on PostgreSQL (READ
    COMMITTED). The advisory lock is held to the end of the transaction; SQLite's one writer
    serialises these transactions already."""
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql("SELECT pg_advisory_xact_lock(1685024869)")


def upgrade(engine: Engine) -> None:
    """Add the columns of ADDED_COLUMNS that a database made by an older release lacks (with their
    defaults, which is what every existing row was: a clinic, in the head federation)."""
    from sqlalchemy import inspect, text

    from sqlalchemy.exc import DBAPIError

    for (table, column), default in ADDED_COLUMNS.items():
        with engine.connect() as conn:
            if column in {c["name"] for c in inspect(conn).get_columns(table)}:
                continue
        try:
            with engine.begin() as conn:
                conn.execute(text(f"ALTER TABLE {table} ADD COLUMN {column} VARCHAR(16) NOT NULL DEFAULT {default}"))
        except DBAPIError:  # a second server starting at the same moment added it first
            with engine.connect() as conn:
                if column not in {c["name"] for c in inspect(conn).get_columns(table)}:
                    raise


def now() -> float:
    return time.time()
