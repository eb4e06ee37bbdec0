"""Soak: many clinics syncing against one server on loopback, round after round, for a bounded time.

A real `edge-server serve` (uvicorn, one process) on 127.0.0.1, SQLite by default (`--db URL`: a
fresh PostgreSQL database under that URL). N clinics are enrolled over HTTP; then, round after round
until `--minutes` or `--rounds` run out, every clinic syncs the way `edge-run sync` does, with the
clinic's own client library: GET the status, pull the current version (manifest signature and every
file's SHA-256 verified, unchanged files copied from the last version, installed atomically, old
versions pruned), write an update for the open round with the update codec into its outbox (a random head
delta: N DP fine-tunings would measure the clinics, not the server), queue it, seal it with HPKE,
sign it and upload it with retries. The syncs of a round start at random moments within
`--spread` seconds, `--workers` at a time. The round closes at N updates; the server aggregates it
(DW-FL) and publishes the next version, which the next round pulls.

Measured per round: sync errors (must be 0), sync latency p50/p95, the round's wall time, the
aggregation time, and the server's resident memory (sampled every 0.25 s): at the end of each round
and its peak. Flat memory = the growth from the end of round 2 (caches warm) to the last round.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import png_path, write_result  # noqa: E402
from benchmarks.server_load import fresh_database, make_home, percentile  # noqa: E402


class MemorySampler:
    """Resident memory of one process, sampled on a thread."""

    def __init__(self, pid: int, every: float = 0.25) -> None:
        import psutil

        self.proc, self.every = psutil.Process(pid), every
        self.samples: list[tuple[float, float]] = []  # (time, MB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((time.time(), self.proc.memory_info().rss / 2**20))
            except Exception:  # noqa: BLE001 - the process is gone
                return
            self._stop.wait(self.every)

    def start(self) -> "MemorySampler":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def between(self, t0: float, t1: float) -> list[float]:
        return [mb for t, mb in self.samples if t0 <= t <= t1]


def clinic_sync(state: Path, url: str, rng_seed: int) -> dict:
    """One clinic's sync: status, verified pull, an update for the open round, upload."""
    from edge_runtime.finetune.plan import FinetunePlan
    from edge_runtime.state import ClinicState
    from edge_runtime.sync.client import Client, contributed

    t0 = time.perf_counter()
    client = Client(state, url, retries=6, backoff=0.5, timeout=120)
    try:
        status = client.get_json("/v1/model")
        version, rnd = int(status["version"]), status.get("round") or {}
        bundle = client.pull(version)
        client.activate(version)  # a soak clinic takes every version (no local scoring here)
        if rnd.get("state") == "open" and int(rnd.get("base_version", -1)) == version and contributed(state, int(rnd["id"])) is None:
            rng = np.random.default_rng(rng_seed)
            plan = FinetunePlan.of_manifest(bundle.manifest)
            with np.load(bundle.path(bundle.manifest["head"]["weights"])) as z:  # the plan's trainable parameters only
                delta = {k: (rng.normal(size=z[k].shape) * 0.01).astype(np.float32) for k in plan.names(z.files)}
            update_id = f"{client.config.clinic}-r{rnd['id']}-{rng_seed}"
            meta = {"update_id": update_id, "n": int(rng.integers(50, 2000)), "val_loss": float(rng.uniform(0.4, 0.8)),
                    "modality_fraction": {m: float(rng.uniform(0.3, 1.0)) for m in ("ct", "pathology", "genomics")},
                    "noise_multiplier": 1.0}
            path = ClinicState(state).write_update(update_id, delta, meta)
            client.queue(path, int(rnd["id"]), version)
        uploads = client.upload_pending()
    finally:
        client.http.close()
    bad = [u for u in uploads if u.get("status") not in ("stored", "already have it")]
    versions = sorted(p.name for p in (state / "bundles").glob("v*"))
    return {"seconds": time.perf_counter() - t0, "version": version, "uploads": len(uploads), "errors": bad, "kept": versions}


def soak(bundle: Path, work: Path, db_url: str | None, clinics: int, rounds: int, minutes: float, workers: int,
         spread: float, seed: int = 0, log=print, server_patch: str = "") -> dict:
    from edge_runtime.sync.client import enroll
    from server.home import Home
    from server.service import Server
    from tests.server_util import ServerProcess

    home = work / "soak"
    make_home(home, bundle, db_url, min_clients=clinics)
    lib = Server(Home(home), db_url)
    srv = ServerProcess(home, db_url, tick=0.5).start(server_patch)
    sampler = MemorySampler(srv.proc.pid).start()
    rng = random.Random(seed)
    states = []
    try:
        for i in range(clinics):
            name = f"clinic{i:03d}"
            states.append(work / "clinics" / name)
            enroll(states[-1], srv.url, lib.issue_token(name), "x25519")
        log(f"{clinics} clinics enrolled", flush=True)
        per_round = []
        t_start = time.time()
        for r in range(1, rounds + 1):
            if time.time() - t_start > minutes * 60:
                break
            t0 = time.time()
            starts = {i: rng.uniform(0, spread) for i in range(clinics)}
            order = sorted(starts, key=starts.get)

            def run(i: int, r: int = r, t0: float = t0) -> dict:
                time.sleep(max(0.0, t0 + starts[i] - time.time()))
                try:
                    return clinic_sync(states[i], srv.url, rng_seed=1_000_000 * r + i)
                except Exception as exc:  # noqa: BLE001 - every failure counts as an error
                    return {"seconds": float("nan"), "version": None, "uploads": 0, "errors": [repr(exc)[:300]], "kept": []}

            with ThreadPoolExecutor(workers) as pool:
                results = list(pool.map(run, order))
            t_synced = time.time()
            deadline = time.time() + 600
            report = lib.rounds_report()
            while time.time() < deadline and report[r - 1]["state"] != "closed":
                time.sleep(0.25)
                report = lib.rounds_report()
            t1 = time.time()
            time.sleep(0.5)  # memory after the round's work, not during it
            rss = sampler.between(t0, time.time())
            lat = [1000 * x["seconds"] for x in results if x["seconds"] == x["seconds"]]
            errors = [e for x in results for e in x["errors"]]
            rr = report[r - 1]
            row = {"round": r, "syncs": len(results), "errors": len(errors), "error_samples": [str(e)[:200] for e in errors[:3]],
                   "sync_ms_p50": round(percentile(lat, 50), 1) if lat else None,
                   "sync_ms_p95": round(percentile(lat, 95), 1) if lat else None,
                   "syncs_s": round(t_synced - t0, 2), "round_s": round(t1 - t0, 2),
                   "state": rr["state"], "arrivals": len(rr["arrivals"]), "result_version": rr["result_version"],
                   "aggregation_s": (rr.get("report") or {}).get("seconds"),
                   "rss_end_mb": round(rss[-1], 1) if rss else None, "rss_peak_mb": round(max(rss), 1) if rss else None,
                   "max_versions_kept": max(len(x["kept"]) for x in results)}
            per_round.append(row)
            log(json.dumps(row), flush=True)
        return {"clinics": clinics, "rounds": per_round, "rss_samples": sampler.samples, "t_start": t_start,
                "seconds": round(time.time() - t_start, 1)}
    finally:
        sampler.stop()
        srv.stop()
        lib.engine.dispose()


def summarize(result: dict) -> dict:
    rows = result["rounds"]
    ends = [r["rss_end_mb"] for r in rows]
    base = ends[1] if len(ends) > 1 else ends[0]
    slope = float(np.polyfit(np.arange(len(ends) - 1), ends[1:], 1)[0]) if len(ends) > 2 else 0.0
    lat95 = [r["sync_ms_p95"] for r in rows if r["sync_ms_p95"] is not None]
    return {
        "clinics": result["clinics"], "rounds": len(rows), "seconds": result["seconds"],
        "syncs": sum(r["syncs"] for r in rows), "errors": sum(r["errors"] for r in rows),
        "rounds_closed_with_every_clinic": sum(1 for r in rows if r["state"] == "closed" and r["arrivals"] == result["clinics"]),
        "sync_ms_p95_worst_round": max(lat95) if lat95 else None,
        "aggregation_s_max": max((r["aggregation_s"] or 0) for r in rows),
        "server_rss_mb_first_round_end": ends[0], "server_rss_mb_round2_end": base, "server_rss_mb_last_round_end": ends[-1],
        "server_rss_growth_after_round2_mb": round(ends[-1] - base, 1),
        "server_rss_growth_after_round2_pct": round(100 * (ends[-1] - base) / base, 1),
        "server_rss_slope_mb_per_round_after_round1": round(slope, 2),
        "server_rss_peak_mb": max(r["rss_peak_mb"] for r in rows),
        "max_versions_kept_by_a_clinic": max(r["max_versions_kept"] for r in rows),
    }


def plot(result: dict, summary: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4))
    t0 = result["t_start"]
    ts = [(t - t0) / 60 for t, _ in result["rss_samples"] if t >= t0]
    mb = [m for t, m in result["rss_samples"] if t >= t0]
    a.plot(ts, mb, lw=0.8)
    a.set_xlabel("minutes")
    a.set_ylabel("server RSS (MB)")
    a.set_ylim(0, max(mb) * 1.15)
    a.set_title(f"server memory, {summary['clinics']} clinics, {summary['rounds']} rounds "
                f"(growth after round 2: {summary['server_rss_growth_after_round2_mb']:+.1f} MB)")
    rows = result["rounds"]
    x = [r["round"] for r in rows]
    b.plot(x, [r["sync_ms_p50"] for r in rows], "o-", label="sync p50")
    b.plot(x, [r["sync_ms_p95"] for r in rows], "s-", label="sync p95")
    b.plot(x, [1000 * (r["aggregation_s"] or 0) for r in rows], "^-", label="aggregation")
    b.set_xlabel("round")
    b.set_ylabel("ms")
    b.set_title(f"{summary['syncs']} syncs, {summary['errors']} errors")
    b.legend()
    fig.tight_layout()
    path = png_path("server_soak")
    fig.savefig(path, dpi=110)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=None, help="signed bundle (BUNDLE.pub next to it) [default: build a micro bundle]")
    ap.add_argument("--db", default=None, help="PostgreSQL URL; a fresh database is created under it [default: SQLite]")
    ap.add_argument("--clinics", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=12, help="at most this many rounds")
    ap.add_argument("--minutes", type=float, default=10.0, help="start no round after this long")
    ap.add_argument("--workers", type=int, default=16, help="syncs running at once")
    ap.add_argument("--spread", type=float, default=10.0, help="a round's syncs start within this many seconds")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="dwfl-soak-") as tmp:
        work = Path(tmp)
        if args.bundle is None:
            from benchmarks.finetune_memory import micro_bundle

            bundle = micro_bundle(work)
        else:
            bundle = args.bundle.resolve()
        result = soak(bundle, work, fresh_database(args.db), args.clinics, args.rounds, args.minutes, args.workers, args.spread)
    summary = summarize(result)
    print(json.dumps(summary, indent=2))
    png = plot(result, summary)
    path = write_result("server_soak", summary, {"per_round": result["rounds"], "database": "postgresql" if args.db else "sqlite",
                                                 "settings": {k: v for k, v in vars(args).items() if k not in ("bundle", "db")},
                                                 "plot": png.name})
    print(f"wrote {path} and {png}")


if __name__ == "__main__":
    main()
