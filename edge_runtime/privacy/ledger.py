"""The privacy ledger of one clinic and dataset (DESIGN §5): an append-only JSON-lines file in the
state folder, one charge per round, every line chained to the previous one by SHA-256.

* A charge is appended and fsynced before anything derived from the round leaves the process, so a
  crash can only over-count, never under-count.
* An edited, reordered, truncated or deleted ledger is detected (hash chain plus a separately written
  head record holding the count and last hash) and refused: it is never reset silently.
* The ledger is authoritative for its own parameters: delta, the lifetime budget, the accountant and
  the dp-accounting version are recorded in every line (lines written before they were recorded
  read as the RDP accountant, version unknown). A caller asking for another delta or budget is
  refused with one line; one asking for nothing gets the recorded ones.
* A line is appended whole or not at all: short writes are retried, a failed append (disk full) is
  cut back to the previous size. A torn last line (the process died inside the append, so the head
  record never counted it and nothing of its round was released) is dropped on the next read, so a
  crash or a full disk never locks the clinic out; a line the head record counts is never dropped.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from ..errors import BadInput, Refused
from ..fsutil import exclusive_lock, fsync_dir, write_atomic
from .accountant import RoundEvents, epsilon

GENESIS = "0" * 64
DEFAULT_EPSILON = 0.5
DEFAULT_DELTA = 1e-5
LEDGER_FORMAT = 1
ACCOUNTANT = "rdp"  # dp_accounting.rdp.RdpAccountant, add-or-remove-one neighbours (accountant.epsilon)
HEAD_FILE = "ledger.head.json"
LOCK_FILE = "ledger.lock"


class LedgerError(BadInput):
    """A ledger file that is corrupt or was edited: exit 2, nothing spent."""


class LedgerMismatch(Refused):
    """A caller asked for a delta or budget other than the ledger's own: exit 1, nothing spent."""


@functools.cache
def accountant_version() -> str:
    try:
        return metadata.version("dp-accounting")
    except metadata.PackageNotFoundError:
        return "unknown"


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

    def __init__(self, folder: Path, clinic: str, dataset: str, *, epsilon_total: float | None = None,
                 delta: float | None = None) -> None:
        """Read and verify the ledger. ``epsilon_total`` / ``delta``: what the caller asks for; None
        takes the recorded value (DEFAULT_EPSILON / DEFAULT_DELTA for a ledger without charges). A
        value other than the recorded one is refused (LedgerMismatch)."""
        self.folder = Path(folder)
        self.path = self.folder / "ledger.jsonl"
        self.head_path = self.folder / HEAD_FILE
        self.clinic, self.dataset = clinic, dataset
        self.charges: list[Charge] = []
        self._last = GENESIS
        self._size = 0  # bytes of whole, accepted lines: where the next line goes
        self.recorded_total: float | None = None
        self.recorded_delta: float | None = None
        self.recorded_accountant: str | None = None
        self.recorded_version: str | None = None
        self._load()
        self.epsilon_total = self._settle("the lifetime budget epsilon", "--epsilon", epsilon_total, self.recorded_total, DEFAULT_EPSILON)
        self.delta = self._settle("delta", "--delta", delta, self.recorded_delta, DEFAULT_DELTA)

    @staticmethod
    def has_head(folder: Path) -> bool:
        return (Path(folder) / HEAD_FILE).exists()

    def _settle(self, what: str, option: str, asked: float | None, recorded: float | None, default: float) -> float:
        if asked is None:
            return float(recorded if recorded is not None else default)
        if recorded is not None and not math.isclose(float(asked), recorded, rel_tol=1e-9, abs_tol=0.0):
            raise LedgerMismatch(f"{self.path}: {what} of dataset {self.dataset!r} was fixed at {recorded:g} by its first round "
                                 f"and is kept in its ledger; {float(asked):g} was asked for (leave {option} out to use the ledger's)")
        return float(recorded if recorded is not None else asked)  # the recorded one, never a near-equal copy

    # ------------------------------------------------------------ reading

    def _load(self) -> None:
        head = self._read_head()
        if not self.path.exists():
            if head is not None and head["count"] > 0:
                raise LedgerError(f"{self.path}: ledger is missing but {self.head_path.name} records {head['count']} charges (deleted?)")
            return
        try:
            data = self.path.read_bytes()
            whole = data[:data.rfind(b"\n") + 1]  # every line the ledger writes ends with a newline
            lines = whole.decode("utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise LedgerError(f"{self.path}: ledger is unreadable ({exc})") from exc
        for i, line in enumerate(lines, start=1):
            self._accept(line, i)
        self._size = len(whole)
        if head is None:
            if len(self.charges) > 1:
                raise LedgerError(f"{self.path}: ledger has no {self.head_path.name} (corrupt or edited state folder)")
            head = {"count": 0, "last_hash": GENESIS}  # a crash between the first line and its head
        # Bytes after the last newline are a torn line (its charge() never returned, nothing of that
        # round left the process) or another run's append still being written: ignored here, cut
        # only by charge() under the ledger lock, where the two can be told apart.
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
                  and entry["hash"] == _digest(entry) and entry["clinic"] == self.clinic and entry["dataset"] == self.dataset)
            delta, total = float(entry["delta"]), float(entry["epsilon_total"])
            accountant = str(entry.get("accountant", ACCOUNTANT))  # lines written before it was recorded: RDP
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise LedgerError(f"{where}: ledger entry is corrupt ({exc!r})") from exc
        if not ok:
            raise LedgerError(f"{where}: ledger entry fails its hash chain or does not belong here (edited or corrupt)")
        if self.recorded_delta is not None and delta != self.recorded_delta:
            raise LedgerError(f"{where}: ledger entry changes the ledger's delta (edited)")
        if self.recorded_total is not None and total > self.recorded_total:
            raise LedgerError(f"{where}: ledger entry raises the lifetime budget (edited)")
        if accountant != ACCOUNTANT:
            raise LedgerError(f"{where}: ledger was accounted with {accountant!r}; this runtime has the {ACCOUNTANT!r} accountant only")
        self.recorded_delta = delta
        self.recorded_total = total if self.recorded_total is None else min(total, self.recorded_total)
        self.recorded_accountant = accountant
        self.recorded_version = entry.get("dp_accounting", self.recorded_version)
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
            "accountant": self.recorded_accountant or ACCOUNTANT, "dp_accounting": self.recorded_version or accountant_version(),
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
        """Append one round's events, whole, and fsync (file, then folder) before returning. On any
        failure (disk full) the file is cut back to its previous size and the error raised."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(self.folder / LOCK_FILE):  # one charge at a time, across processes
            return self._charge_locked(round_id, events)

    def _charge_locked(self, round_id: str, events: RoundEvents) -> Charge:
        after = epsilon([*self.rounds, events], self.delta)
        entry = {
            "format": LEDGER_FORMAT, "seq": len(self.charges) + 1, "prev": self._last, "clinic": self.clinic, "dataset": self.dataset,
            "round_id": round_id, "time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "delta": self.delta,
            "events": events.to_dict(), "epsilon_after": after, "epsilon_total": self.epsilon_total,
            "accountant": ACCOUNTANT, "dp_accounting": accountant_version(),
        }
        entry["hash"] = _digest(entry)
        line = (json.dumps(entry, sort_keys=True) + "\n").encode()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            self._cut_torn_tail(fd)
            try:
                _write_all(fd, line)
                os.fsync(fd)
            except OSError as exc:
                _truncate_quietly(fd, self._size)
                raise OSError(exc.errno, exc.strerror, str(self.path)) from exc  # name the file (disk full)
            except BaseException:
                _truncate_quietly(fd, self._size)
                raise
        finally:
            os.close(fd)
        self._size += len(line)
        fsync_dir(self.folder)
        charge = Charge(entry["seq"], round_id, events, after, entry["time"])
        self.charges.append(charge)
        self._last = entry["hash"]
        self.recorded_delta, self.recorded_total = self.delta, min(self.epsilon_total, self.recorded_total or self.epsilon_total)
        self._write_head()
        return charge

    def _cut_torn_tail(self, fd: int) -> None:
        """Bytes past the last accepted line: a torn line (cut off) or another run's charge (refused)."""
        size = os.fstat(fd).st_size
        if size == self._size:
            return
        extra = os.pread(fd, size - self._size, self._size) if size > self._size else b"\n"
        if b"\n" in extra:
            raise LedgerError(f"{self.path}: ledger changed while this run used it (another run at the same time?); nothing trained")
        os.ftruncate(fd, self._size)

    def _write_head(self) -> None:
        head = {"clinic": self.clinic, "dataset": self.dataset, "count": len(self.charges), "last_hash": self._last}
        write_atomic(self.head_path, json.dumps(head, sort_keys=True).encode(), mode=0o600)


def _write_all(fd: int, data: bytes) -> None:
    """os.write may write less than asked (a disk filling up): write the rest; a full disk raises."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _truncate_quietly(fd: int, size: int) -> None:
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    except OSError:
        pass  # the torn line is dropped by the next read, which the head record lets it do
