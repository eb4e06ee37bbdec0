"""Aggregation server under load: 50 clinics uploading at once, and aggregating 1,000 updates.

(a) A real `edge-server serve` (uvicorn, one process) on 127.0.0.1, SQLite by default (`--db URL`:
    PostgreSQL; a fresh database is created under that URL for each part). 50 clinics are enrolled
    over HTTP with tokens from the server library (`edge_runtime.sync.client.enroll`, the clinic's
    own code), each builds a valid update for the open round, then all 50 upload at once (one thread
    and one connection each, released together by a barrier). An update is made by the update codec
    (`edge_runtime.sync.update`, what the clinic writes to its outbox) with a random head delta of the model's shapes
    (no fine-tuning is run: 50 DP fine-tunings would measure the clinic, not the server), sealed with
    HPKE (ML-KEM-768 + X25519) to the server key, wrapped in an Envelope signed by the clinic, and sent
    as a signed request: exactly what `edge-run sync` sends. Measured: errors (must be 0), upload
    latency p50/p95/max, throughput, and that the server stored exactly 50 updates (the round closes
    at min_clients = 50 and is aggregated into version 2).
(b) 100 and 1,000 stored updates (received through `Server.receive_update`, every check included,
    no HTTP) are aggregated by `rounds.aggregate_round` (DW-FL: weights and clip bound from the norms
    and metadata stored on arrival, then each sealed blob opened once) in a fresh process each: wall
    time and peak RSS, next to the RSS before aggregating and to what holding every delta at once would take.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import png_path, write_result  # noqa: E402

AGG_CHILD = r"""
import json, sys, time
import psutil
from server.home import Home
from server.service import Server
from server import rounds
srv = Server(Home(sys.argv[1]), sys.argv[2] or None)
proc = psutil.Process()
before = proc.memory_info().rss
t0 = time.perf_counter()
assert rounds.claim(srv, 1), "could not claim round 1"
version = rounds.aggregate_round(srv, 1)
seconds = time.perf_counter() - t0
# VmHWM: this process image's own high-water mark (ru_maxrss would carry the parent's over fork + exec)
peak = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) * 1024
report = srv.rounds_report()[0]["report"]
print(json.dumps({"version": version, "seconds": seconds, "rss_before_mb": before / 2**20, "peak_rss_mb": peak / 2**20,
                  "accepted": len(report["accepted"]), "rejected": len(report["rejected"])}))
"""


def edge_server(*args: str) -> str:
    code = "import sys\nfrom server.cli import main\nsys.argv[0] = 'edge-server'\nmain()"
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"edge-server {' '.join(args[:1])} failed: {proc.stderr[-2000:]}")
    return proc.stdout


def fresh_database(base_url: str | None) -> str | None:
    if not base_url:
        return None
    import psycopg

    name = f"dwfl_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(base_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return base_url.rsplit("/", 1)[0] + "/" + name


def make_home(home: Path, bundle: Path, db_url: str | None, min_clients: int) -> None:
    edge_server("init", "--home", str(home), "--min-clients", str(min_clients), "--round-seconds", "86400",
                *(["--db", db_url] if db_url else []))
    edge_server("publish", "--home", str(home), str(bundle))


def with_head(bundle: Path, config: str, work: Path) -> Path:
    """A copy of BUNDLE whose head.npz is a freshly initialised StudentHead of CONFIG's size, re-signed
    with a throwaway key (BUNDLE.pub next to the copy): the server only ever sees the head, so this
    measures the server with that model size without training it."""
    from edge_runtime.bundle import MANIFEST, write_bundle
    from edge_runtime.keys import generate_key, save_public_key
    from export.config import get_config
    from export.head_weights import save_head_weights
    from export.models import StudentHead

    import torch

    torch.manual_seed(0)
    cfg = get_config(config)
    manifest = json.loads((bundle / MANIFEST).read_text())
    head = save_head_weights(StudentHead(cfg.model.dim, len(cfg.classes)), work / f"head-{config}.npz")
    files = {name: bundle / name for name in manifest["files"]}
    files[manifest["head"]["weights"]] = head
    body = {k: v for k, v in manifest.items() if k not in ("signature", "files", "format_version")}
    body["model_version"] = f"{manifest['model_version']}+head-{config}"
    key = generate_key()
    out = write_bundle(work / f"bundle-{config}-head", files, body, key)
    save_public_key(key.public_key(), work / f"bundle-{config}-head.pub")
    return out


def head_of(bundle: Path) -> dict[str, np.ndarray]:
    with np.load(bundle / "head.npz") as z:
        return {k: np.asarray(z[k], dtype=np.float32) for k in z.files}


def fake_update(head: dict, seed: int) -> tuple[bytes, str]:
    """An update's bytes as the codec writes them to a clinic's outbox: random delta of the head's shapes."""
    from edge_runtime.sync import update as codec

    rng = np.random.default_rng(seed)
    delta = {k: (rng.normal(size=v.shape) * 0.01).astype(np.float32) for k, v in head.items()}
    update_id = f"bench-{seed}-{uuid.uuid4().hex[:8]}"
    meta = {"update_id": update_id, "n": int(rng.integers(50, 2000)), "val_loss": float(rng.uniform(0.4, 0.8)),
            "modality_fraction": {m: float(rng.uniform(0.3, 1.0)) for m in ("ct", "pathology", "genomics")},
            "noise_multiplier": 1.0}
    return codec.encode(delta, meta), update_id


def envelope(key, clinic: str, hpke_pub, update_id: str, plain: bytes, round_id: int = 1, base_version: int = 1):
    from edge_runtime.sync import update as codec
    from edge_runtime.sync.hpke import DEFAULT_KEM

    return codec.seal(plain, key=key, hpke_public=hpke_pub, update_id=update_id, clinic=clinic, round_id=round_id,
                      base_version=base_version, kem=DEFAULT_KEM)


def percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


# ---------------------------------------------------------------- (a) concurrent uploads


def concurrent_uploads(bundle: Path, work: Path, db_url: str | None, clinics: int) -> dict:
    import httpx

    from edge_runtime.sync import protocol
    from edge_runtime.sync.client import Client, enroll
    from server.home import Home
    from server.service import Server
    from tests.server_util import ServerProcess

    home = work / "load"
    make_home(home, bundle, db_url, min_clients=clinics)
    lib = Server(Home(home), db_url)
    srv = ServerProcess(home, db_url, tick=0.5).start()
    head = head_of(bundle)
    try:
        prepared = []
        for i in range(clinics):
            name = f"clinic{i:03d}"
            state = work / "clinics" / name
            enroll(state, srv.url, lib.issue_token(name))
            c = Client(state)
            plain, update_id = fake_update(head, seed=i)
            prepared.append((c, envelope(c.key, name, c.hpke, update_id, plain).to_json()))
        body_kb = float(np.mean([len(b) for _, b in prepared])) / 1024
        barrier = threading.Barrier(clinics + 1)
        results: list[dict] = [{} for _ in range(clinics)]

        def upload(i: int) -> None:
            c, body = prepared[i]
            http = httpx.Client(base_url=srv.url, timeout=120)
            try:
                http.get("/")  # open the connection before the barrier (404 expected)
                headers = {**protocol.sign_request(c.key, c.config.clinic, "POST", "/v1/updates", body),
                           "Content-Type": "application/json"}
                barrier.wait()
                t0 = time.perf_counter()
                try:
                    resp = http.post("/v1/updates", content=body, headers=headers)
                    status, answer = resp.status_code, resp.text[:300]
                except httpx.HTTPError as exc:
                    status, answer = None, repr(exc)
                t1 = time.perf_counter()
                results[i] = {"start": t0, "end": t1, "status": status, "answer": answer}
            finally:
                http.close()

        threads = [threading.Thread(target=upload, args=(i,)) for i in range(clinics)]
        for t in threads:
            t.start()
        barrier.wait()
        for t in threads:
            t.join()
        lat = [1000 * (r["end"] - r["start"]) for r in results]
        errors = [r for r in results if r["status"] != 200 or json.loads(r["answer"]).get("status") != "stored"]
        span = max(r["end"] for r in results) - min(r["start"] for r in results)
        # the 50th update closes the round; the server aggregates it in the background
        t_wait = time.perf_counter()
        deadline = t_wait + 120
        rs = lib.rounds_report()
        while time.perf_counter() < deadline and rs[0]["state"] != "closed":
            time.sleep(0.2)
            rs = lib.rounds_report()
        from sqlalchemy import func, select

        from server import db

        with lib.engine.connect() as conn:
            stored = conn.execute(select(func.count()).select_from(db.updates)).scalar_one()
        return {
            "clinics": clinics,
            "errors": len(errors),
            "error_samples": [e["answer"] for e in errors[:3]],
            "latency_ms": {"p50": round(percentile(lat, 50), 1), "p95": round(percentile(lat, 95), 1),
                           "max": round(max(lat), 1), "min": round(min(lat), 1)},
            "latencies_ms": [round(x, 2) for x in lat],
            "wall_s": round(span, 3),
            "throughput_updates_per_s": round(clinics / span, 1),
            "body_kb": round(body_kb, 1),
            "stored_updates": int(stored),
            "round_1": {"state": rs[0]["state"], "arrivals": len(rs[0]["arrivals"]), "result_version": rs[0]["result_version"],
                        "aggregation_s": (rs[0].get("report") or {}).get("seconds")},
        }
    finally:
        srv.stop()


# ---------------------------------------------------------------- (b) aggregation memory


def stored_round(bundle: Path, work: Path, db_url: str | None, n: int) -> Path:
    """A server home whose open round holds n updates received through the server library."""
    from cryptography.hazmat.primitives import serialization

    from edge_runtime.keys import generate_key
    from edge_runtime.sync import protocol
    from edge_runtime.sync.hpke import HpkePublic
    from server.home import Home
    from server.service import Server

    home = work / f"agg-{n}"
    make_home(home, bundle, db_url, min_clients=100_000)
    srv = Server(Home(home), db_url)
    hpke_pub = HpkePublic.from_dict(srv.server_identity()["hpke_public"])
    head = head_of(bundle)
    for i in range(n):
        name = f"c{i:05d}"
        key = generate_key()
        raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        token, pub = srv.issue_token(name), base64.b64encode(raw).decode()
        body = json.dumps({"token": token, "public_key": pub}).encode()
        srv.enroll(protocol.sign_request(key, name, "POST", "/v1/enroll", body), "POST", "/v1/enroll", body, token, pub)
        plain, update_id = fake_update(head, seed=10_000 + i)
        acc = srv.receive_update(name, key.public_key(), envelope(key, name, hpke_pub, update_id, plain))
        assert acc.status == "stored", acc
    srv.engine.dispose()
    return home


def aggregate_fresh(home: Path, db_url: str | None) -> dict:
    proc = subprocess.run([sys.executable, "-c", AGG_CHILD, str(home), db_url or ""], capture_output=True, text=True, cwd=ROOT,
                          timeout=900, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- main


def plot(load: dict, agg: dict, model_mb: float) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.hist(load["latencies_ms"], bins=20, color="tab:blue")
    for q, style in (("p50", "--"), ("p95", ":")):
        a.axvline(load["latency_ms"][q], color="k", linestyle=style, label=f"{q} {load['latency_ms'][q]:.0f} ms")
    a.set_xlabel("upload latency (ms)")
    a.set_ylabel("clinics")
    a.set_title(f"{load['clinics']} concurrent uploads, {load['errors']} errors, {load['throughput_updates_per_s']:.1f} updates/s")
    a.legend()
    ns = sorted(agg, key=int)
    x = np.arange(len(ns))
    before = [agg[n]["rss_before_mb"] for n in ns]
    peak = [agg[n]["peak_rss_mb"] for n in ns]
    held = [int(n) * model_mb for n in ns]
    b.bar(x - 0.27, before, 0.27, label="RSS before aggregating")
    b.bar(x, peak, 0.27, label="peak RSS (fresh process)")
    b.bar(x + 0.27, held, 0.27, label="all deltas held at once", color="lightgray")
    for i, n in enumerate(ns):
        b.text(x[i], peak[i], f"{peak[i]:.0f} MB\n{agg[n]['seconds']:.1f} s", ha="center", va="bottom", fontsize=8)
    b.set_xticks(x, [f"{int(n):,} updates" for n in ns])
    b.set_ylabel("MB")
    b.set_title("aggregation (DW-FL, each sealed update opened once)")
    b.legend(fontsize=8)
    fig.tight_layout()
    path = png_path("server_load")
    fig.savefig(path, dpi=110)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=None, help="signed bundle (BUNDLE.pub next to it) [default: build a micro bundle]")
    ap.add_argument("--db", default=None, help="PostgreSQL URL; a fresh database is created under it per part [default: SQLite]")
    ap.add_argument("--head-config", default="bundle", choices=["bundle", "micro", "tiny", "full"],
                    help="give the bundle a (random) head of this config's size, re-signed [default: the bundle's own head]")
    ap.add_argument("--clinics", type=int, default=50)
    ap.add_argument("--aggregate", default="100,1000", help="update counts aggregated in a fresh process each")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="dwfl-server-load-") as tmp:
        work = Path(tmp)
        if args.bundle is None:
            from benchmarks.finetune_memory import micro_bundle

            bundle = micro_bundle(work)
        else:
            bundle = args.bundle.resolve()
        if args.head_config != "bundle":
            bundle = with_head(bundle, args.head_config, work)
        head = head_of(bundle)
        model_mb = sum(v.nbytes for v in head.values()) / 2**20
        t0 = time.perf_counter()
        load = concurrent_uploads(bundle, work, fresh_database(args.db), args.clinics)
        print(f"(a) {load['clinics']} concurrent uploads: errors {load['errors']}, latency p50 {load['latency_ms']['p50']} ms, "
              f"p95 {load['latency_ms']['p95']} ms, max {load['latency_ms']['max']} ms, {load['throughput_updates_per_s']} updates/s, "
              f"stored {load['stored_updates']}, round 1 {load['round_1']}  ({time.perf_counter() - t0:.0f} s)", flush=True)
        agg = {}
        for n in (int(s) for s in args.aggregate.split(",")):
            t0 = time.perf_counter()
            db_url = fresh_database(args.db)
            home = stored_round(bundle, work, db_url, n)
            prep = time.perf_counter() - t0
            agg[str(n)] = {**aggregate_fresh(home, db_url), "store_s": round(prep, 1)}
            print(f"(b) {n} updates: {agg[str(n)]}", flush=True)
        figures = {
            "concurrent_uploads": {k: v for k, v in load.items() if k != "latencies_ms"},
            "aggregation": {n: {k: round(v, 2) if isinstance(v, float) else v for k, v in a.items()} for n, a in agg.items()},
            "head_mb": round(model_mb, 3),
            "head_parameters": int(sum(v.size for v in head.values())),
        }
        extra = {
            "database": "postgresql" if args.db else "sqlite (WAL, synchronous=FULL)",
            "bundle": str(args.bundle) if args.bundle else "micro bundle built by the benchmark (edge-export pipeline --config micro --seed 3)",
            "head": "the bundle's own head.npz" if args.head_config == "bundle" else
                    f"head.npz replaced by a randomly initialised StudentHead of the '{args.head_config}' config "
                    f"(dim {head['classifier.weight'].shape[1]}), bundle re-signed with a throwaway key: the server only handles the head",
            "model_version": json.loads((bundle / "manifest.json").read_text())["model_version"],
            "updates": "random head deltas of the model's shapes in the clinic's outbox format (edge_runtime.sync.update), "
                       "HPKE-sealed (mlkem768-x25519) and signed exactly as edge-run sync does; no fine-tuning run",
            "latencies_ms": load["latencies_ms"],
            "server": "one `edge-server serve` process (uvicorn, one worker) on 127.0.0.1, same machine as the clients",
        }
        write_result("server_load", figures, extra)
        print(f"wrote {plot(load, agg, model_mb)}")


if __name__ == "__main__":
    main()
