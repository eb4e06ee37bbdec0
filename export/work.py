"""The export's work folder (OUT/work): what each pipeline stage wrote, and the record that says so.

Each stage writes its outputs atomically (a hidden temporary sibling, fsynced and renamed into
place) and then, last, ``WORK/<stage>.json``: the config and seed, the stage's options, the SHA-256
of every file it read and wrote, and the facts later stages and the report need. A stage first
checks every earlier stage's record: present, made with the same config and seed, its files
unchanged on disk, and made from the files the records before it describe (no stale link in the
chain). Torch-free: only the stages themselves need torch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path

from edge_runtime.errors import BadInput
from edge_runtime.fsutil import fsync_tree, replace_dir, sha256_file, sweep_temps, temp_path, write_atomic

# Stage -> the `edge-export` command that runs it, in pipeline order.
COMMANDS = {"teacher": "train-teacher", "distill": "distill", "export": "export", "quantize": "quantize", "bundle": "bundle"}
STAGES = tuple(COMMANDS)
RECORD_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class Identity:
    """What makes two runs the same work: the named config, its exact content, and the seed."""

    config: str
    config_sha256: str
    seed: int

    @classmethod
    def of(cls, cfg, seed: int) -> "Identity":
        # A config edited in code (or `with_train`) keeps its name: its content tells them apart.
        text = json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=str)
        return cls(cfg.name, hashlib.sha256(text.encode()).hexdigest(), int(seed))

    def describe(self) -> str:
        return f"--config {self.config} --seed {self.seed}"


class Work:
    """One work folder, seen by runs of one identity."""

    def __init__(self, root: Path, identity: Identity) -> None:
        self.root, self.identity = Path(root), identity

    def path(self, relative: str) -> Path:
        return self.root / relative

    def record_path(self, stage: str) -> Path:
        return self.root / f"{stage}.json"

    def _command(self, stage: str) -> str:
        return f"`edge-export {COMMANDS[stage]} --work {self.root}`"

    def check_folder(self) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise BadInput(f"{self.root}: exists and is not a directory")

    def read_record(self, stage: str) -> dict:
        path = self.record_path(stage)
        try:
            record = json.loads(path.read_text())
            if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
                raise ValueError("not a stage record")
            if not all(isinstance(record.get(k), dict) for k in ("identity", "inputs", "outputs")):
                raise ValueError("identity, inputs or outputs missing")
        except FileNotFoundError:
            raise BadInput(f"{path} is missing: run {self._command(stage)} first (it makes it)") from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise BadInput(f"{path}: unreadable stage record ({exc}); run {self._command(stage)} again") from exc
        return record

    def require(self, stage: str) -> dict[str, dict]:
        """Every earlier stage's record, checked (see the module docstring); a BadInput naming the
        file at fault and the stage that makes it otherwise. Cheap next to any stage's work."""
        self.check_folder()
        records = {}
        for earlier in STAGES[: STAGES.index(stage)]:
            record = self.read_record(earlier)
            try:
                made_by = Identity(**record["identity"])
            except TypeError as exc:
                raise BadInput(f"{self.record_path(earlier)}: unreadable stage record ({exc}); run {self._command(earlier)} again") from exc
            if made_by != self.identity:
                other = ("another version of --config " + made_by.config) if made_by.describe() == self.identity.describe() \
                    else made_by.describe()
                raise BadInput(f"{self.record_path(earlier)}: this work folder was made with {other}, not "
                               f"{self.identity.describe()}: use another --work, or start it again with `edge-export train-teacher`")
            for name, digest in record["outputs"].items():
                path = self.path(name)
                if not path.is_file():
                    raise BadInput(f"{path} is missing: run {self._command(earlier)} (it makes it)")
                if sha256_file(path) != digest:
                    raise BadInput(f"{path} changed since {COMMANDS[earlier]} wrote it: run {self._command(earlier)} again")
            records[earlier] = record
        for later, record in records.items():
            for earlier, before in records.items():
                stale = [n for n, d in record["inputs"].items() if n in before["outputs"] and before["outputs"][n] != d]
                if stale:
                    raise BadInput(f"{self.record_path(later)} was made from an older {self.path(stale[0])}: run "
                                   f"{self._command(later)} again")
        return records

    def begin(self, stage: str) -> None:
        """Before a stage writes: its old record goes first, so a crash midway leaves no record that
        vouches for half-replaced outputs, and so do the later stages' (they describe what this run
        replaces: the next one asks for them to be run again); leftovers of crashed runs are swept."""
        self.root.mkdir(parents=True, exist_ok=True)
        sweep_temps(self.root)
        for own_or_later in STAGES[STAGES.index(stage):]:
            self.record_path(own_or_later).unlink(missing_ok=True)

    def commit(self, stage: str, *, options: dict, inputs: Iterable[str], outputs: Iterable[str], facts: dict,
               seconds: float) -> dict:
        """Write the stage's record (atomically, last): what later stages check against."""
        record = {
            "format": RECORD_FORMAT,
            "stage": stage,
            "command": COMMANDS[stage],
            "identity": dataclasses.asdict(self.identity),
            "options": options,
            "inputs": {name: sha256_file(self.path(name)) for name in sorted(inputs)},
            "outputs": {name: sha256_file(self.path(name)) for name in sorted(outputs)},
            "facts": facts,
            "seconds": round(seconds, 2),
            "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        write_atomic(self.record_path(stage), (json.dumps(record, indent=2) + "\n").encode())
        return record

    def files_under(self, folder: str) -> list[str]:
        """Work-relative names of every file under ``folder`` (a stage's outputs)."""
        base = self.path(folder)
        return sorted(str(p.relative_to(self.root)) for p in base.rglob("*") if p.is_file())

    def staging(self, folder: str) -> Path:
        """A fresh hidden sibling of ``folder`` to write a stage's outputs into before the rename."""
        tmp = temp_path(self.path(folder))
        tmp.mkdir(parents=True)
        return tmp


class Staged:
    """``with Staged(work, "onnx") as tmp: ...`` writes into ``tmp``; on success the folder is fsynced
    and renamed over ``WORK/onnx``, on failure it is removed (the old outputs stay)."""

    def __init__(self, work: Work, folder: str) -> None:
        self.work, self.folder = work, folder

    def __enter__(self) -> Path:
        self.tmp = self.work.staging(self.folder)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        fsync_tree(self.tmp)
        replace_dir(self.tmp, self.work.path(self.folder))
