"""The server's folder: configuration, key files (private ones mode 0600), blobs, SQLite database.

    HOME/config.json               db URL, round rules, limits
    HOME/keys/server_ed25519.pem   signs bundles (and enrollment answers); .pub next to it
    HOME/keys/hpke.json            HPKE private key (ML-KEM-768 seed + X25519), receives updates
    HOME/blobs/                    content-addressed: sealed updates, bundle files, manifests
    HOME/server.db                 SQLite (WAL), unless config or --db names PostgreSQL
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from edge_runtime.errors import BadInput
from edge_runtime.fsutil import write_atomic
from edge_runtime.keys import (
    generate_key,
    load_private_key,
    save_private_key,
    save_public_key,
)
from edge_runtime.sync.hpke import HpkePrivate
from federation.aggregation import DEFAULT_STRATEGY, build_strategy, settings_of

from .db import FEDERATIONS

HOME_ENV = "EDGE_SERVER_HOME"


def default_home() -> Path:
    return Path(os.environ.get(HOME_ENV) or "~/.dwfl-server").expanduser()


# What config.json may choose (DESIGN §4). Only rules whose per-clinic influence bound holds
# (one clinic moves the head by at most server_lr x max_client_weight x C_max): the server optimizers
# (fedavgm, fedadam, fedyogi) break it (momentum piles rounds up; Adam rescales every coordinate), and
# fedprox's mu would not reach the clinics (their DP fine-tuning has no proximal term): not offered.
SERVER_STRATEGIES = ("dwfl_mw", "dwfl", "dwfl_pow", "fedavg", "qfedavg")
SERVER_OPTIONS: dict[str, tuple[float, float] | type] = {
    "server_lr": (1e-6, 1.0), "clip_factor": (0.5, 10.0),  # 0 would switch the adaptive clip off
    "eta": (0.0, 10.0), "smoothing": (0.0, 1.0), "floor": (0.0, 1.0), "cap": (1.0, 10.0), "q": (0.0, 10.0),
    "memory": (0.0, 0.99), "temperature": (0.01, 100.0), "lipschitz": (1e-6, 1e6), "dynamic": str, "inverse_variance": bool,
}
OWNED = {"beta": "beta", "max_weight": "max_client_weight", "max_clip": "update_clip_rms"}  # set by their own keys


@dataclass
class Config:
    db_url: str = ""  # empty: sqlite:///HOME/server.db
    min_clients: int = 3
    round_seconds: float = 24 * 3600.0  # deadline of a round after it opens
    max_staleness: int = 2  # rounds; older updates are refused
    max_body_bytes: int = 16 * 2**20
    token_hours: float = 72.0
    lease_seconds: float = 600.0  # a claim on an aggregation older than this is taken over
    max_skew_s: int = 300
    beta: float = 0.3  # the dynamic share's weight, for the strategies that take one
    strategy: str = DEFAULT_STRATEGY  # federation.aggregation.STRATEGIES (DESIGN §4)
    strategy_options: dict = field(default_factory=dict)  # its other settings, e.g. {"eta": 1.0} for dwfl_mw
    # what one clinic may claim and move (issue 14: one enrolled clinic could poison the model)
    max_n: int = 200_000  # cases one update may claim: the default cache's 166 504 (dim 256) + the noise's room
    min_noise_multiplier: float = 0.5  # DP-SGD sigma an update must claim: accountant.SIGMA_MIN, the least a plan picks
    max_update_abs: float = 100.0  # |delta| of one head parameter (Adam moves one by about lr per step)
    update_clip_rms: float = 1.0  # fixed ceiling on the aggregation clip bound: C_max = this x sqrt(head parameters)
    max_client_weight: float = 0.5  # cap on one clinic's weight in a round (n is noisy and claimed)
    max_param_abs: float = 1000.0  # the aggregated head is refused (round failed) beyond this |parameter|
    # bodies are read before their signature can be checked (it covers them): bound what that holds
    body_reads: int = 4  # concurrent reads of bodies over 64 KiB
    body_wait_s: float = 10.0  # a read waits this long for one of those, then gets 503 (the client retries)
    body_min_rate: float = 16384.0  # bytes/s a body must arrive at, after body_grace_s; else 408
    body_grace_s: float = 30.0
    max_connections: int = 256  # beyond: 503 (uvicorn's limit_concurrency)
    # the teacher federation (hospitals, DESIGN §10): its own round rules and rule; updates in chunks
    teacher_min_clients: int = 3
    teacher_round_seconds: float = 7 * 24 * 3600.0
    teacher_max_staleness: int = 1
    teacher_strategy: str = DEFAULT_STRATEGY
    teacher_strategy_options: dict = field(default_factory=dict)
    teacher_chunk_bytes: int = 8 * 2**20  # one chunk per request: at most max_body_bytes
    teacher_max_bytes: int = 2**30  # no declared teacher update above this (the `full` teacher's is ~165 MB)

    @classmethod
    def from_dict(cls, doc: dict, where: str = "configuration") -> "Config":
        """Unknown keys are refused: a misspelt setting silently ignored runs the server with the default."""
        if not isinstance(doc, dict):
            raise BadInput(f"{where}: configuration is not a JSON object")
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(doc) - set(names))
        if unknown:
            raise BadInput(f"{where}: unknown configuration key(s) {', '.join(map(repr, unknown))} (known: {', '.join(names)})")
        for f in fields(cls):  # each value of its default's type: a string where a number goes fails here, not per request
            default = f.default_factory() if f.default is MISSING else f.default
            if f.name in doc and not _same_kind(doc[f.name], default):
                raise BadInput(f"{where}: {f.name} = {doc[f.name]!r} must be {type(default).__name__} like its default {default!r}")
        config = cls(**doc)
        config.check(where)
        return config

    def check(self, where: str = "configuration") -> None:
        """The federation's bounds in range (one-line BadInput naming the key); the other settings are
        checked where they are used."""
        ranges = {  # key: (low, high, low excluded)
            "max_n": (1, 10**9, False), "min_noise_multiplier": (0.0, 1e6, False), "max_update_abs": (0.0, 1e38, True),
            "update_clip_rms": (0.0, 1e38, True), "max_client_weight": (0.0, 1.0, True), "max_param_abs": (0.0, 1e38, True),
            "min_clients": (1, 10**6, False), "teacher_min_clients": (1, 10**6, False), "max_staleness": (0, 1000, False),
            "teacher_max_staleness": (0, 1000, False), "round_seconds": (0.0, 1e9, True), "teacher_round_seconds": (0.0, 1e9, True),
            "teacher_chunk_bytes": (2**16, self.max_body_bytes, False), "teacher_max_bytes": (2**16, 2**40, False),
        }
        for key, (low, high, open_low) in ranges.items():
            value = getattr(self, key)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and \
                (value > low if open_low else value >= low) and value <= high
            if not ok or (isinstance(getattr(type(self), key, None), int) and not isinstance(value, int)):
                raise BadInput(f"{where}: {key} = {value!r} is out of range {'(' if open_low else '['}{low:g}, {high:g}]")
        for federation in FEDERATIONS:
            self._check_strategy(where, federation)

    def rules(self, federation: str) -> Rules:
        """The round rules and aggregation rule of one federation (``head`` or ``teacher``)."""
        if federation not in FEDERATIONS:
            raise BadInput(f"unknown federation {federation!r} (known: {', '.join(FEDERATIONS)})")
        prefix = "" if federation == "head" else "teacher_"
        return Rules(federation, *(getattr(self, prefix + k) for k in ("min_clients", "round_seconds", "max_staleness",
                                                                      "strategy", "strategy_options")))

    def _check_strategy(self, where: str, federation: str) -> None:
        """Only rules whose per-clinic influence bound holds (DESIGN §4), only settings in SERVER_OPTIONS,
        each in range; then the strategy is built once, so nothing else is refused later."""
        rules = self.rules(federation)
        key = "strategy" if federation == "head" else "teacher_strategy"
        if rules.strategy not in SERVER_STRATEGIES:
            raise BadInput(f"{where}: {key} = {rules.strategy!r} is not one the server offers ({', '.join(SERVER_STRATEGIES)})")
        opt = "strategy_options" if federation == "head" else "teacher_strategy_options"
        for key, value in rules.strategy_options.items():
            if key in OWNED:
                raise BadInput(f"{where}: {opt}.{key} is set by the key {OWNED[key]!r}, not here")
            if key not in SERVER_OPTIONS:
                raise BadInput(f"{where}: {opt}.{key} is not settable on the server (settable: {', '.join(SERVER_OPTIONS)})")
            kind = SERVER_OPTIONS[key]
            if isinstance(kind, type):
                ok = type(value) is kind
            else:
                low, high = kind
                ok = isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high
            if not ok:
                raise BadInput(f"{where}: {opt}.{key} = {value!r} must be "
                               + (kind.__name__ if isinstance(kind, type) else f"a number in [{kind[0]:g}, {kind[1]:g}]"))
        try:
            build_strategy(rules.strategy, self.strategy_settings(max_clip=0.0, federation=federation))
        except BadInput as exc:
            raise BadInput(f"{where}: {opt}: {exc}") from None

    def strategy_settings(self, *, max_clip: float, federation: str = "head") -> dict:
        """The strategy's constructor settings: strategy_options, and the federation's own keys."""
        rules = self.rules(federation)
        settings = {**rules.strategy_options, "max_weight": self.max_client_weight, "max_clip": max_clip}
        if "beta" in settings_of(rules.strategy):
            settings["beta"] = self.beta
        return settings


@dataclass(frozen=True)
class Rules:
    federation: str
    min_clients: int
    round_seconds: float
    max_staleness: int
    strategy: str
    strategy_options: dict


def _same_kind(value, default) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return type(value) is type(default)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    return isinstance(value, type(default))


class Home:
    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser()

    keys = property(lambda self: self.root / "keys")
    signing_key_path = property(lambda self: self.keys / "server_ed25519.pem")
    public_key_path = property(lambda self: self.keys / "server_ed25519.pub")
    hpke_path = property(lambda self: self.keys / "hpke.json")
    blobs = property(lambda self: self.root / "blobs")
    config_path = property(lambda self: self.root / "config.json")

    def init(self, config: Config, force: bool = False) -> None:
        if self.signing_key_path.exists() and not force:
            raise BadInput(f"{self.root}: already initialised (keys exist); refusing to replace them")
        config.check(str(self.config_path))
        self.keys.mkdir(parents=True, exist_ok=True)
        os.chmod(self.keys, 0o700)
        key = generate_key()
        save_private_key(key, self.signing_key_path)
        save_public_key(key.public_key(), self.public_key_path)
        HpkePrivate.generate().save(self.hpke_path)
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.save_config(config)

    def save_config(self, config: Config) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        write_atomic(self.config_path, json.dumps(asdict(config), indent=2).encode(), mode=0o600)

    def config(self) -> Config:
        if not self.config_path.exists():
            raise BadInput(f"{self.root}: not a server folder (run `edge-server init --home {self.root}` first)")
        try:
            doc = json.loads(self.config_path.read_text())
        except (OSError, ValueError) as exc:
            raise BadInput(f"{self.config_path}: unreadable configuration ({exc})") from exc
        try:
            return Config.from_dict(doc, str(self.config_path))
        except TypeError as exc:
            raise BadInput(f"{self.config_path}: unreadable configuration ({exc})") from exc

    def db_url(self, override: str | None = None) -> str:
        return override or self.config().db_url or f"sqlite:///{self.root / 'server.db'}"

    def signing_key(self):
        return load_private_key(self.signing_key_path)

    def hpke(self) -> HpkePrivate:
        return HpkePrivate.load(self.hpke_path)
