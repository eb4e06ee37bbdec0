"""The privacy ledger of one clinic and dataset (DESIGN §5): an append-only JSON-lines file in the
state folder, one charge per round, every line chained to the previous one by SHA-256.

* A charge is appended and fsynced before anything derived from the round leaves the process, so a
  crash can only over-count, never under-count.
* An edited, reordered, truncated or deleted ledger is detected (hash chain plus a separately written
  head record holding the count and last hash) and refused: it is never reset silently.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from ..errors import BadInput
from ..fsutil import fsync_dir, write_atomic
from .accountant import RoundEvents, epsilon

GENESIS = "0" * 64
DEFAULT_EPSILON = 0.5
LEDGER_FORMAT = 1


class LedgerError(BadInput):
    """A ledger file that is corrupt or was edited: exit 2, nothing spent."""


def _digest(entry: dict) -> str:
    body = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class Charge:
    seq: int
    round_id: str
    events: RoundEvents
    epsilon_after: float
    time_utc: str


class Ledger:
    """``ledger.jsonl`` (the charges) and ``ledger.head.json`` (count and last hash) in ``folder``."""

    def __init__(self, folder: Path, clinic: str, dataset: str, epsilon_total: float | None, delta: float) -> None:
        """``epsilon_total`` is the lifetime budget: fixed by the first charge and recorded in every
        line; a later run may hold itself to less, never to more. None: the recorded one (status)."""
        self.folder = Path(folder)
        self.path = self.folder / "ledger.jsonl"
        self.head_path = self.folder / "ledger.head.json"
        self.clinic, self.dataset = clinic, dataset
        self.delta = float(delta)
        self.charges: list[Charge] = []
        self._last = GENESIS
        self.recorded_total: float | None = None
        self._load()
        if epsilon_total is not None and self.recorded_total is not None and epsilon_total > self.recorded_total:
            raise LedgerError(f"{self.path}: the lifetime budget of dataset {dataset!r} was fixed at epsilon "
                              f"{self.recorded_total:g} by its first round; {epsilon_total:g} would raise it")
        total = epsilon_total if epsilon_total is not None else self.recorded_total
        self.epsilon_total = float(total if total is not None else DEFAULT_EPSILON)

    # ------------------------------------------------------------ reading

    def _load(self) -> None:
        head = self._read_head()
        if not self.path.exists():
            if head is not None and head["count"] > 0:
                raise LedgerError(f"{self.path}: ledger is missing but {self.head_path.name} records {head['count']} charges (deleted?)")
            return
        try:
            lines = self.path.read_bytes().decode("utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise LedgerError(f"{self.path}: ledger is unreadable ({exc})") from exc
        for i, line in enumerate(lines, start=1):
            if not line.strip() and i == len(lines):
                continue
            self._accept(line, i)
        if head is None:
            if len(self.charges) > 1:
                raise LedgerError(f"{self.path}: ledger has no {self.head_path.name} (corrupt or edited state folder)")
            head = {"count": 0, "last_hash": GENESIS}  # a crash between the first line and its head
        if head["count"] != len(self.charges) or head["last_hash"] != self._last:
            # The head is written after the line; one extra fsynced line means a crash in between,
            # which counts (over-counting is safe). Fewer lines than the head says is tampering.
            if head["count"] == len(self.charges) - 1:
                self._write_head()
            else:
                raise LedgerError(
                    f"{self.path}: ledger holds {len(self.charges)} charges but {self.head_path.name} records {head['count']} (truncated or edited)"
                )

    def _read_head(self) -> dict | None:
        if not self.head_path.exists():
            return None
        try:
            head = json.loads(self.head_path.read_text())
            if not (type(head.get("count")) is int and isinstance(head.get("last_hash"), str)):
                raise ValueError("count / last_hash missing")
        except (OSError, ValueError, AttributeError) as exc:
            raise LedgerError(f"{self.head_path}: ledger head is corrupt ({exc})") from exc
        if head.get("clinic") != self.clinic or head.get("dataset") != self.dataset:
            raise LedgerError(f"{self.head_path}: ledger belongs to clinic {head.get('clinic')!r} / dataset {head.get('dataset')!r}")
        return head

    def _accept(self, line: str, line_no: int) -> None:
        where = f"{self.path}: line {line_no}"
        try:
            entry = json.loads(line)
            events = RoundEvents.from_dict(entry["events"])
            ok = (entry["format"] == LEDGER_FORMAT and entry["seq"] == len(self.charges) + 1 and entry["prev"] == self._last
                  and entry["hash"] == _digest(entry) and entry["clinic"] == self.clinic and entry["dataset"] == self.dataset
                  and entry["delta"] == self.delta)
        except (ValueError, KeyError, TypeError) as exc:
            raise LedgerError(f"{where}: ledger entry is corrupt ({exc!r})") from exc
        if not ok:
            raise LedgerError(f"{where}: ledger entry fails its hash chain or does not belong here (edited or corrupt)")
        total = float(entry["epsilon_total"])
        if self.recorded_total is not None and total > self.recorded_total:
            raise LedgerError(f"{where}: ledger entry raises the lifetime budget (edited)")
        self.recorded_total = total if self.recorded_total is None else min(total, self.recorded_total)
        self.charges.append(Charge(entry["seq"], str(entry["round_id"]), events, float(entry["epsilon_after"]), str(entry["time"])))
        self._last = entry["hash"]

    # ------------------------------------------------------------ state

    @property
    def rounds(self) -> list[RoundEvents]:
        return [c.events for c in self.charges]

    def spent(self) -> float:
        """Epsilon of every recorded round composed, recomputed from the events (not trusted from the file)."""
        return epsilon(self.rounds, self.delta)

    def summary(self) -> dict:
        spent = self.spent()
        return {
            "clinic": self.clinic, "dataset": self.dataset, "rounds": len(self.charges), "delta": self.delta,
            "epsilon_total": self.epsilon_total, "epsilon_spent": round(spent, 6),
            "epsilon_left": round(max(0.0, self.epsilon_total - spent), 6), "ledger": str(self.path),
        }

    # ------------------------------------------------------------ writing

    def open_head(self) -> None:
        """Write the head of an empty ledger. Called before the dataset is registered in clinic.json,
        so that a registered dataset without a head means a deleted ledger, never a crash between
        registering and the first charge."""
        if not self.head_path.exists() and not self.charges:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._write_head()

    def charge(self, round_id: str, events: RoundEvents) -> Charge:
        """Append one round's events and fsync (file, then folder) before returning."""
        self.folder.mkdir(parents=True, exist_ok=True)
        after = epsilon([*self.rounds, events], self.delta)
        entry = {
            "format": LEDGER_FORMAT, "seq": len(self.charges) + 1, "prev": self._last, "clinic": self.clinic, "dataset": self.dataset,
            "round_id": round_id, "time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "delta": self.delta,
            "events": events.to_dict(), "epsilon_after": after, "epsilon_total": self.epsilon_total,
        }
        entry["hash"] = _digest(entry)
        line = (json.dumps(entry, sort_keys=True) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(self.folder)
        charge = Charge(entry["seq"], round_id, events, after, entry["time"])
        self.charges.append(charge)
        self._last = entry["hash"]
        self._write_head()
        return charge

    def _write_head(self) -> None:
        head = {"clinic": self.clinic, "dataset": self.dataset, "count": len(self.charges), "last_hash": self._last}
        write_atomic(self.head_path, json.dumps(head, sort_keys=True).encode(), mode=0o600)
