"""What the server does, without HTTP: enroll, authenticate, receive an update, publish versions.

Every refusal is a :class:`Refusal` with an HTTP status and a reason; nothing is stored before every
check has passed (the sealed blob is written, then one transaction records the update).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import secrets
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import func, insert, select, update
from sqlalchemy.exc import IntegrityError

from edge_runtime.bundle import load_bundle, sign_manifest
from edge_runtime.errors import BadInput
from edge_runtime.finetune.head import params_from_bytes
from edge_runtime.finetune.plan import FinetunePlan, trainable_subset
from edge_runtime.keys import key_id
from edge_runtime.sync import protocol
from edge_runtime.sync import update as codec
from edge_runtime.sync.hpke import SealError
from federation.aggregation import Strategy, build_strategy

from . import db
from .blobs import BlobStore
from .home import Config, Home

log = logging.getLogger(__name__)
HEADS_CACHED = 4


class Refusal(Exception):
    def __init__(self, status: int, reason: str, *, logged: bool = False) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason
        self.logged = logged  # already written to the log as its one line (a disconnect, a slow body)


@dataclass
class Revoked:
    clinic: str
    at: float
    dropped: dict[int, list[str]]  # round id -> ids of the updates taken out of it


@dataclass(frozen=True)
class StoredBlob:
    """A file already in the blob store (a large one, written there as it was made)."""
    sha256: str
    size: int


@dataclass
class Accepted:
    status: str  # "stored" | "already have it"
    update_id: str
    round: int
    staleness: int


def raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def configured_strategy(config: Config, head: dict[str, np.ndarray], state: dict[str, np.ndarray] | None = None,
                        federation: str = "head") -> Strategy:
    """The strategy ``config`` names for a round on ``head`` (see Server.strategy_for): one home for the
    server and the federation simulation."""
    size = sum(int(v.size) for v in head.values())
    rules = config.rules(federation)
    strategy = build_strategy(rules.strategy, config.strategy_settings(max_clip=config.update_clip_rms * math.sqrt(size),
                                                                       federation=federation))
    try:
        strategy.load_state_dict(state or {})
    except BadInput as exc:  # e.g. written by another version of the rule: go on without it, say so
        log.warning("strategy state saved with the base version does not load (%s); starting afresh", exc)
    return strategy


class Server:
    def __init__(self, home: Home, db_url: str | None = None) -> None:
        self.home = home
        self.config: Config = home.config()
        self.engine = db.make_engine(home.db_url(db_url))
        db.create_all(self.engine)
        self.blobs = BlobStore(home.blobs)
        self.signing_key = home.signing_key()
        self.public_key = self.signing_key.public_key()
        self.key_id = key_id(self.public_key)
        self.hpke = home.hpke()
        self.hpke_public = self.hpke.public()
        self._heads: dict[int, dict[str, np.ndarray]] = {}
        self.bounds = codec.Bounds(max_n=self.config.max_n, min_noise_multiplier=self.config.min_noise_multiplier,
                                   max_abs=self.config.max_update_abs)

    def strategy_for(self, head: dict[str, np.ndarray], state: dict[str, np.ndarray] | None = None,
                     federation: str = "head") -> Strategy:
        """A fresh strategy for a round on ``head``, as config.json says (checked at start by
        Config.check), with the fixed clip ceiling C_max = update_clip_rms x sqrt(parameters), an RMS
        change per parameter that no update can raise; ``state`` is what the strategy kept when it
        made the round's base version (rounds.saved_state)."""
        return configured_strategy(self.config, head, state, federation)

    # ------------------------------------------------------------ enrollment

    def issue_token(self, clinic: str, tier: str = "clinic") -> str:
        """A one-time token enrolling ``clinic`` in ``tier`` (clinic: head updates; hospital: teacher
        updates). The token names the tier for the client; the server's record of it is what counts."""
        if not protocol.NAME_RE.match(clinic):
            raise BadInput(f"clinic name {clinic!r} must be 1-64 letters, digits, '.', '_' or '-'")
        if tier not in db.TIERS:
            raise BadInput(f"unknown tier {tier!r} (known: {', '.join(db.TIERS)})")
        secret = secrets.token_urlsafe(32)
        t = db.now()
        with self.engine.begin() as conn:
            conn.execute(insert(db.tokens).values(secret_hash=protocol.token_hash(secret), clinic=clinic, created_at=t,
                                                  expires_at=t + self.config.token_hours * 3600, tier=tier))
        return protocol.make_token(clinic, secret, self.key_id, tier)

    def server_identity(self) -> dict:
        hpke_pub = self.hpke_public.to_dict()
        return {
            "server_key": base64.b64encode(raw_public(self.public_key)).decode(), "server_key_id": self.key_id,
            "hpke_public": hpke_pub,
            "hpke_signature": base64.b64encode(self.signing_key.sign(self.hpke_public.canonical())).decode(),
        }

    def enroll(self, headers, method: str, path: str, body: bytes, token: str, public_key_b64: str) -> dict:
        try:
            clinic, secret, fpr = protocol.parse_token(token)[:3]
            pub = Ed25519PublicKey.from_public_bytes(base64.b64decode(public_key_b64, validate=True))
        except (BadInput, ValueError) as exc:
            raise Refusal(400, f"enrollment refused: {exc}") from exc
        if fpr != self.key_id:
            raise Refusal(401, "enrollment refused: the token names another server key")
        try:  # proof of possession of the clinic key, fresh
            signer, nonce, ts = protocol.check_request(headers, method, path, body, pub, max_skew=self.config.max_skew_s)
        except protocol.AuthError as exc:
            raise Refusal(401, f"enrollment refused: {exc}") from exc
        if signer != clinic:
            raise Refusal(401, "enrollment refused: the request is signed for another clinic than the token's")
        t = db.now()
        with self.engine.begin() as conn:
            n = conn.execute(update(db.tokens).where(db.tokens.c.secret_hash == protocol.token_hash(secret),
                                                     db.tokens.c.clinic == clinic, db.tokens.c.used_at.is_(None),
                                                     db.tokens.c.expires_at > t).values(used_at=t)).rowcount
            if n != 1:
                raise Refusal(401, "enrollment refused: unknown, expired or already used token")
            tier = conn.execute(select(db.tokens.c.tier).where(db.tokens.c.secret_hash == protocol.token_hash(secret))).scalar_one()
            row = conn.execute(select(db.clinics).where(db.clinics.c.name == clinic)).first()
            if row is not None and row.revoked_at is not None:
                raise Refusal(403, f"enrollment refused: clinic {clinic!r} is revoked")
            if row is not None and row.tier != tier:  # a name keeps its tier: its past updates are of that kind
                raise Refusal(409, f"enrollment refused: {clinic!r} is enrolled as a {row.tier}, the token is for a {tier}")
            values = {"public_key": raw_public(pub).hex(), "enrolled_at": t, "tier": tier}
            if row is None:
                conn.execute(insert(db.clinics).values(name=clinic, **values))
            else:  # re-enrollment with a fresh token: a new clinic key replaces the old one
                conn.execute(update(db.clinics).where(db.clinics.c.name == clinic).values(**values))
            self._remember_nonce(conn, clinic, nonce, ts)
        return {"clinic": clinic, "tier": tier, **self.server_identity()}

    def revoke(self, clinic: str, *, by: str = "operator") -> Revoked | None:
        """Revoke a clinic and, in the same transaction, take its updates out of every round not yet
        aggregated (open, or being aggregated: that aggregation re-checks before it publishes and
        starts over, server.rounds), each recorded in dropped_updates. None: no such unrevoked clinic."""
        t = db.now()
        u, r = db.updates.c, db.rounds.c
        pending = ("open", "aggregating")
        with self.engine.begin() as conn:
            if conn.execute(update(db.clinics).where(db.clinics.c.name == clinic, db.clinics.c.revoked_at.is_(None))
                            .values(revoked_at=t)).rowcount != 1:
                return None
            dropped: dict[int, list[str]] = {}
            rows = conn.execute(select(db.updates).join(db.rounds, u.round == r.id)
                                .where(u.clinic == clinic, r.state.in_(pending)).order_by(u.round)).all()
            for row in rows:
                # Writing the round row first locks it: the aggregation's final transaction, which
                # writes it too, then runs wholly before (we skip: closed) or after (it sees the drop)
                if conn.execute(update(db.rounds).where(r.id == row.round, r.state.in_(pending))
                                .values(n_updates=r.n_updates - 1)).rowcount != 1:
                    continue  # aggregated meanwhile (PostgreSQL re-reads the row): it counted, nothing to undo
                conn.execute(db.updates.delete().where(u.update_id == row.update_id))
                conn.execute(insert(db.dropped_updates).values(
                    update_id=row.update_id, clinic=clinic, round=row.round, blob_sha256=row.blob_sha256,
                    received_at=row.received_at, reason="clinic revoked", dropped_by=by[:128], dropped_at=t))
                dropped.setdefault(row.round, []).append(row.update_id)
        return Revoked(clinic, t, dropped)

    # ------------------------------------------------------------ signed requests

    def precheck(self, headers) -> str:
        """What is refused before a body is read (the signature covers the body's hash, so it is
        verified after, in authenticate): the signature headers present, well-formed and fresh, the
        clinic enrolled and not revoked. Returns the clinic's name."""
        try:
            clinic = protocol.check_request_headers(headers, max_skew=self.config.max_skew_s)[0]
        except protocol.AuthError as exc:
            raise Refusal(401, str(exc)) from exc
        with self.engine.connect() as conn:
            row = conn.execute(select(db.clinics.c.revoked_at).where(db.clinics.c.name == clinic)).first()
        if row is None:
            raise Refusal(401, f"unknown clinic {clinic!r} (enroll first)")
        if row.revoked_at is not None:
            raise Refusal(403, f"clinic {clinic!r} is revoked")
        return clinic

    def authenticate(self, headers, method: str, path: str, body: bytes, tier: str | None = None) -> tuple[str, Ed25519PublicKey]:
        """The signer of a request (signature, freshness, nonce, not revoked); with ``tier``, refused
        (403) unless the signer is enrolled in that tier: a clinic cannot send teacher updates, nor a
        hospital head updates."""
        clinic = headers.get(protocol.H_CLINIC)
        if not clinic:
            raise Refusal(401, "request is not signed (no X-DWFL-Clinic header)")
        with self.engine.connect() as conn:
            row = conn.execute(select(db.clinics).where(db.clinics.c.name == clinic)).first()
        if row is None:
            raise Refusal(401, f"unknown clinic {clinic[:64]!r} (enroll first)")
        pub = Ed25519PublicKey.from_public_bytes(bytes.fromhex(row.public_key))
        try:
            _, nonce, ts = protocol.check_request(headers, method, path, body, pub, max_skew=self.config.max_skew_s)
        except protocol.AuthError as exc:
            raise Refusal(401, str(exc)) from exc
        if row.revoked_at is not None:
            raise Refusal(403, f"clinic {clinic!r} is revoked")
        with self.engine.begin() as conn:
            self._remember_nonce(conn, clinic, nonce, ts)
        if tier is not None and row.tier != tier:
            raise Refusal(403, f"{clinic!r} is enrolled as a {row.tier}; this is for {tier}s")
        return clinic, pub

    def tier_of(self, clinic: str) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(select(db.clinics.c.tier).where(db.clinics.c.name == clinic)).scalar()

    def _remember_nonce(self, conn, clinic: str, nonce: str, ts: int) -> None:
        try:
            with conn.begin_nested():
                conn.execute(insert(db.nonces).values(clinic=clinic, nonce=nonce, ts=ts))
        except IntegrityError:
            raise Refusal(401, "reused nonce (replayed request)") from None

    def forget_old_nonces(self) -> int:
        cutoff = int(db.now()) - 2 * self.config.max_skew_s
        with self.engine.begin() as conn:
            return conn.execute(db.nonces.delete().where(db.nonces.c.ts < cutoff)).rowcount

    # ------------------------------------------------------------ versions and rounds

    def latest_version(self, conn=None, federation: str = "head") -> dict | None:
        def q(c):
            row = c.execute(select(db.versions).where(db.versions.c.federation == federation)
                            .order_by(db.versions.c.version.desc()).limit(1)).first()
            return dict(row._mapping) if row else None
        if conn is not None:
            return q(conn)
        with self.engine.connect() as c:
            return q(c)

    def version_row(self, version: int):
        with self.engine.connect() as conn:
            row = conn.execute(select(db.versions).where(db.versions.c.version == version)).first()
        if row is None:
            raise Refusal(404, f"no model version {version}")
        return row

    def manifest(self, version: int) -> dict:
        return json.loads(self.blobs.get(self.version_row(version).manifest_sha256))

    def head_params(self, version: int) -> dict[str, np.ndarray]:
        if version not in self._heads:
            m = self.manifest(version)
            data = self.blobs.get(m["files"][m["head"]["weights"]]["sha256"])
            self._heads[version] = params_from_bytes(data, f"version {version} head weights")
            while len(self._heads) > HEADS_CACHED:  # a long-running server holds a few versions, not all
                self._heads.pop(min(self._heads), None)
        return self._heads[version]

    def trainable_head(self, version: int) -> tuple[FinetunePlan, dict[str, np.ndarray]]:
        """The fine-tuning plan a version carries and its head's parameters that the plan trains."""
        plan = FinetunePlan.of_manifest(self.manifest(version), f"version {version}")
        return plan, trainable_subset(self.head_params(version), plan)

    def current_round(self, conn=None, federation: str = "head") -> dict | None:
        def q(c):
            row = c.execute(select(db.rounds).where(db.rounds.c.federation == federation)
                            .order_by(db.rounds.c.id.desc()).limit(1)).first()
            return dict(row._mapping) if row else None
        if conn is not None:
            return q(conn)
        with self.engine.connect() as c:
            return q(c)

    def status(self, federation: str = "head") -> dict:
        v, r = self.latest_version(federation=federation), self.current_round(federation=federation)
        if v is None:
            how = "edge-server publish BUNDLE" if federation == "head" else "edge-server publish-teacher FOLDER"
            raise Refusal(404, f"no {federation} model published yet ({how})")
        out = {"federation": federation, "version": v["version"], "model_version": v["model_version"],
               "round": None if r is None else {k: r[k] for k in ("id", "base_version", "state", "deadline", "min_clients", "n_updates")}}
        if r is not None:  # the round's place in its federation (1, 2, ...): ids are shared by both federations
            with self.engine.connect() as conn:
                out["round"]["number"] = conn.execute(select(func.count()).select_from(db.rounds).where(
                    db.rounds.c.federation == federation, db.rounds.c.id <= r["id"])).scalar_one()
        return out

    def publish_manifest(self, body: dict, files: dict[str, bytes | StoredBlob], round_id: int | None, conn,
                         federation: str = "head") -> int:
        """Store files as blobs (a StoredBlob: already one) and a manifest signed by the server key as
        the next version (one sequence over both federations)."""
        listing = {}
        for name, data in sorted(files.items()):
            listing[name] = ({"sha256": data.sha256, "size": data.size} if isinstance(data, StoredBlob)
                             else {"sha256": self.blobs.put(data), "size": len(data)})
        db.lock_ids(conn)
        version = (conn.execute(select(func.max(db.versions.c.version))).scalar() or 0) + 1
        manifest = sign_manifest({**body, "files": listing, "server_version": version}, self.signing_key)
        data = json.dumps(manifest, indent=2, sort_keys=True).encode()
        sha = self.blobs.put(data)
        conn.execute(insert(db.versions).values(version=version, model_version=manifest["model_version"], manifest_sha256=sha,
                                                round=round_id, created_at=db.now(), federation=federation))
        return version

    @staticmethod
    def staleness(conn, federation: str, sent_round: int, current: int) -> int:
        """Rounds of ``federation`` opened after ``sent_round`` up to ``current``: ids are one sequence
        over both federations, so the other federation's rounds in between do not count."""
        r = db.rounds.c
        return conn.execute(select(func.count()).select_from(db.rounds).where(
            r.federation == federation, r.id > sent_round, r.id <= current)).scalar_one()

    def open_round(self, conn, base_version: int, federation: str = "head") -> int:
        db.lock_ids(conn)
        rid = (conn.execute(select(func.max(db.rounds.c.id))).scalar() or 0) + 1
        rules = self.config.rules(federation)
        t = db.now()
        conn.execute(insert(db.rounds).values(id=rid, base_version=base_version, state="open", opened_at=t,
                                              deadline=t + rules.round_seconds, min_clients=rules.min_clients,
                                              n_updates=0, federation=federation))
        return rid

    def publish_bundle(self, bundle_dir: Path, trusted_key: Ed25519PublicKey) -> tuple[int, int]:
        """The starting global model: verify it with the exporter's key, re-sign with the server key,
        close any open round and open a new one on it."""
        bundle = load_bundle(bundle_dir, trusted_key)
        if "weights" not in bundle.manifest.get("head", {}):
            raise BadInput(f"{bundle_dir}: bundle has no head weights (head.npz) to federate")
        FinetunePlan.of_manifest(bundle.manifest, str(bundle_dir))  # a plan clinics could not follow is refused here
        body = {k: v for k, v in bundle.manifest.items() if k not in ("signature", "files")}
        files = {name: bundle.path(name).read_bytes() for name in bundle.manifest["files"]}
        with self.engine.begin() as conn:
            version = self.publish_manifest(body, files, None, conn)
            conn.execute(update(db.rounds).where(db.rounds.c.state == "open", db.rounds.c.federation == "head").values(state="closed", closed_at=db.now(),
                                                                                    report={"superseded_by": version}))
            rid = self.open_round(conn, version)
        return version, rid

    # ------------------------------------------------------------ updates

    def receive_update(self, clinic: str, clinic_key: Ed25519PublicKey, env: protocol.Envelope) -> Accepted:
        if env.clinic != clinic:
            raise Refusal(403, "envelope names another clinic than the request's signer")
        try:
            env.check(clinic_key)
            sealed = env.sealed_bytes()
        except protocol.AuthError as exc:
            raise Refusal(401, str(exc)) from exc
        except (BadInput, ValueError) as exc:
            raise Refusal(422, f"malformed envelope: {exc}") from exc
        with self.engine.connect() as conn:
            dup = conn.execute(select(db.updates).where(db.updates.c.update_id == env.update_id)).first()
            cur = self.current_round(conn)
            sent = conn.execute(select(db.rounds).where(db.rounds.c.id == env.round)).first()
        if dup is not None:
            if dup.clinic != clinic:
                raise Refusal(409, "update id already used by another clinic")
            return Accepted("already have it", env.update_id, dup.round, dup.staleness)
        if sent is None or cur is None or sent.federation != "head":
            raise Refusal(404, f"unknown round {env.round} (of the head federation)")
        if sent.base_version != env.base_version:
            raise Refusal(409, f"round {env.round} is based on version {sent.base_version}, not {env.base_version}")
        if cur["state"] != "open":
            raise Refusal(503, f"round {cur['id']} is being aggregated; retry shortly")
        with self.engine.connect() as conn:
            staleness = self.staleness(conn, "head", env.round, cur["id"])
        if staleness > self.config.max_staleness:
            raise Refusal(409, f"update for round {env.round} is too stale ({staleness} rounds > {self.config.max_staleness})")
        with self.engine.connect() as conn:
            if conn.execute(select(db.updates.c.update_id).where(db.updates.c.clinic == clinic, db.updates.c.round == cur["id"])).first():
                raise Refusal(409, f"clinic {clinic!r} already sent an update for round {cur['id']}")
        try:
            plain = codec.open_envelope(env, self.hpke)
        except SealError as exc:
            raise Refusal(422, str(exc)) from exc
        summary = self.check_update(plain, env)
        sha = self.blobs.put(sealed)  # content-addressed: a blob without a row is harmless
        try:
            with self.engine.begin() as conn:
                n = conn.execute(update(db.rounds).where(db.rounds.c.id == cur["id"], db.rounds.c.state == "open")
                                 .values(n_updates=db.rounds.c.n_updates + 1)).rowcount
                if n != 1:
                    raise Refusal(503, f"round {cur['id']} closed meanwhile; retry shortly")
                # Revoked after this request was authenticated? The round row is locked now, as revoke
                # locks it before dropping updates: whichever commits second sees the other.
                if conn.execute(select(db.clinics.c.revoked_at).where(db.clinics.c.name == clinic)).scalar_one() is not None:
                    raise Refusal(403, f"clinic {clinic!r} is revoked")
                conn.execute(insert(db.updates).values(
                    update_id=env.update_id, clinic=clinic, round=cur["id"], sent_round=env.round, staleness=staleness,
                    kem=env.kem, blob_sha256=sha, meta=summary.to_dict(), received_at=db.now()))
        except IntegrityError:
            with self.engine.connect() as conn:
                dup = conn.execute(select(db.updates).where(db.updates.c.update_id == env.update_id)).first()
            if dup is not None and dup.clinic == clinic:
                return Accepted("already have it", env.update_id, dup.round, dup.staleness)
            raise Refusal(409, f"clinic {clinic!r} already sent an update for round {cur['id']}") from None
        log.info("stored update %s (staleness %d)", env.update_id, staleness, extra={"clinic": clinic, "round": cur["id"]})
        return Accepted("stored", env.update_id, cur["id"], staleness)

    def check_update(self, plain: bytes, env: protocol.Envelope) -> codec.Summary:
        """Decode and validate the opened update against the head it was trained on: names, shapes,
        finite values, metadata, the federation's bounds on what a clinic may claim; the summary aggregation needs (norm included), computed once here."""
        reference = self.trainable_head(env.base_version)[1]  # nothing outside the plan may change
        try:
            summary = codec.validate(codec.decode(plain, codec.size_limit(reference)), reference, env.update_id,
                                     bounds=self.bounds)
        except codec.UpdateError as exc:
            raise Refusal(422, str(exc)) from None
        return replace(summary, sha256_plain=hashlib.sha256(plain).hexdigest())

    def stored_delta(self, *, blob_sha256: str, clinic: str, sent_round: int, sent_base: int, update_id: str,
                     kem: str) -> dict[str, np.ndarray]:
        """Open a stored update (the sealed blob as received) once more, for aggregation. The AEAD
        authenticates the plaintext: it is the update validated on arrival, or it does not open."""
        plain = codec.unseal(self.blobs.get(blob_sha256), self.hpke, clinic=clinic, round_id=sent_round,
                             base_version=sent_base, update_id=update_id, kem=kem)
        return {k: np.asarray(v, dtype=np.float32) for k, v in codec.decode(plain).delta.items()}

    def rounds_report(self) -> list[dict]:
        with self.engine.connect() as conn:
            rs = [dict(r._mapping) for r in conn.execute(select(db.rounds).order_by(db.rounds.c.id))]
            for r in rs:
                r["arrivals"] = [{"clinic": u.clinic, "update_id": u.update_id, "staleness": u.staleness, "n": u.meta.get("n"),
                                  "received_at": u.received_at}
                                 for u in conn.execute(select(db.updates).where(db.updates.c.round == r["id"]).order_by(db.updates.c.received_at))]
                d = db.dropped_updates.c
                r["dropped"] = [{"update_id": x.update_id, "clinic": x.clinic, "reason": x.reason, "dropped_by": x.dropped_by,
                                 "dropped_at": x.dropped_at}
                                for x in conn.execute(select(db.dropped_updates).where(d.round == r["id"]).order_by(d.dropped_at, d.update_id))]
        return rs
