"""Scale-out on PostgreSQL (issue 16, Deliver 7): two `edge-server serve` processes against one
PostgreSQL database and one server folder (keys, blobs, upload parts), both federations at once.

Part 1: 50 clinics (head updates, as `server_load`) and 3 hospitals (chunked teacher updates, as
`hospital_upload`, tiny teacher) send at once, alternating between the two servers (a hospital's
chunks all go to its server; the acknowledged count lives in the database, so either would do).
Measured: errors (must be 0), wall time, upload latency of the clinics, which process aggregated
each round, and that each round made exactly one version.

Part 2: the next teacher round, both processes armed to die by SIGKILL inside the teacher
aggregation, once: the first to claim the round dies holding the claim; the other takes the round
over when the lease (3 s here) has passed. Measured: seconds from the kill to the new version, and
that it is the round's only version.

    python benchmarks/scale_out.py --db postgresql://USER@HOST/postgres   # a fresh database is made under it
    python benchmarks/scale_out.py                                         # starts a throwaway PostgreSQL (Debian package)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import png_path, write_result  # noqa: E402

DIE_ONCE = """
import os, server.teacher as T
_t = T.teacher_version
def t(*a, **k):
    out = _t(*a, **k)
    try:
        os.close(os.open({marker!r}, os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return out  # the other process died here already: this one publishes
    os.kill(os.getpid(), 9)
T.teacher_version = t
"""


def versions_of(srv, round_id: int) -> int:
    from sqlalchemy import func, select

    from server import db

    with srv.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(db.versions).where(db.versions.c.round == round_id)).scalar_one()


def round_row(srv, round_id: int) -> dict:
    from sqlalchemy import select

    from server import db

    with srv.engine.connect() as conn:
        return dict(conn.execute(select(db.rounds).where(db.rounds.c.id == round_id)).one()._mapping)


def wait_closed(srv, round_ids: list[int], timeout: float) -> None:
    deadline = time.time() + timeout
    while not all(round_row(srv, r)["state"] == "closed" for r in round_ids):
        if time.time() > deadline:
            raise RuntimeError(f"rounds {round_ids} not aggregated: {[round_row(srv, r)['state'] for r in round_ids]}")
        time.sleep(0.1)


def hospital_side(hospital, srv, version: int, round_id: int, seed: int) -> Path:
    from server.teacher import teacher_params

    rng = np.random.default_rng(seed)
    delta = {k: (1e-3 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in teacher_params(srv, version).items()}
    meta = {"n": 100 + seed, "val_loss": 0.6 + 0.01 * seed, "modality_fraction": {"ct": 1.0}, "noise_multiplier": 0.0}
    return hospital.seal(delta, update_id=f"{hospital.name}-t{round_id}", round_id=round_id, base_version=version, meta=meta)


def scenario(work: Path, *, bundle: Path, teacher: Path, db_url: str, clinics: int = 50, hospitals: int = 3,
             lease: float = 3.0) -> dict:
    """Both parts; the figures. Raises nothing for a miss: the figures say it (errors, versions)."""
    import httpx

    from benchmarks.server_load import envelope, fake_update, head_of
    from edge_runtime.bundle import default_public_key_path
    from edge_runtime.keys import load_public_key
    from edge_runtime.sync import protocol
    from edge_runtime.sync.client import Client, enroll
    from export.hospital import Hospital
    from export.hospital import enroll as enroll_hospital
    from server.home import Config, Home
    from server.service import Server
    from server.teacher import publish_teacher
    from tests.server_util import ServerProcess

    home = Home(work / "srv")
    home.init(Config(db_url=db_url, min_clients=clinics, teacher_min_clients=hospitals, lease_seconds=lease,
                     round_seconds=86400.0, teacher_chunk_bytes=2**18))
    srv = Server(home)
    head_version, head_round = srv.publish_bundle(bundle, load_public_key(default_public_key_path(bundle)))
    teacher_version, teacher_round = publish_teacher(srv, teacher)
    servers = [ServerProcess(home.root, None, tick=0.3).start() for _ in range(2)]
    try:
        head = head_of(bundle)
        prepared = []
        for i in range(clinics):
            name = f"clinic{i:03d}"
            enroll(work / "clinics" / name, servers[i % 2].url, srv.issue_token(name))
            c = Client(work / "clinics" / name)
            plain, uid = fake_update(head, seed=i)
            prepared.append((c, servers[i % 2].url, envelope(c.key, name, c.hpke, uid, plain, head_round, head_version).to_json()))
        hosp, sides = [], []
        for k in range(hospitals):
            name = f"hospital-{k}"
            enroll_hospital(work / name, servers[k % 2].url, srv.issue_token(name, "hospital"))
            hosp.append(Hospital(work / name, timeout=120))
            sides.append(hospital_side(hosp[-1], srv, teacher_version, teacher_round, k))
        barrier = threading.Barrier(clinics + hospitals)
        results: list[dict] = [{} for _ in range(clinics + hospitals)]

        def clinic(i: int) -> None:
            c, url, body = prepared[i]
            headers = {**protocol.sign_request(c.key, c.config.clinic, "POST", "/v1/updates", body), "Content-Type": "application/json"}
            barrier.wait()
            t0 = time.perf_counter()
            try:
                resp = httpx.post(url + "/v1/updates", content=body, headers=headers, timeout=120)
                ok = resp.status_code == 200 and resp.json().get("status") == "stored"
                answer = resp.text[:200]
            except httpx.HTTPError as exc:
                ok, answer = False, repr(exc)
            results[i] = {"ok": ok, "ms": 1000 * (time.perf_counter() - t0), "answer": answer}

        def hospital(k: int) -> None:
            barrier.wait()
            t0 = time.perf_counter()
            try:
                done = hosp[k].upload(sides[k])
                ok, answer = done["answer"]["status"] == "stored", done["answer"]
            except Exception as exc:  # noqa: BLE001 - counted as an error
                ok, answer = False, repr(exc)
            results[clinics + k] = {"ok": ok, "ms": 1000 * (time.perf_counter() - t0), "answer": str(answer)[:200]}

        threads = [threading.Thread(target=clinic, args=(i,)) for i in range(clinics)]
        threads += [threading.Thread(target=hospital, args=(k,)) for k in range(hospitals)]
        t_start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t_start
        errors = [r["answer"] for r in results if not r["ok"]]
        wait_closed(srv, [head_round, teacher_round], 120)
        part1 = {
            "clinics": clinics, "hospitals": hospitals, "errors": len(errors), "error_samples": errors[:3],
            "wall_s": round(wall, 2),
            "clinic_latency_ms": {q: round(float(np.percentile([r["ms"] for r in results[:clinics]], p)), 1)
                                  for q, p in (("p50", 50), ("p95", 95), ("max", 100))},
            "hospital_upload_s": [round(r["ms"] / 1000, 2) for r in results[clinics:]],
            "rounds": {fed: {"round": rid, "versions": versions_of(srv, rid), "n_updates": round_row(srv, rid)["n_updates"],
                             "aggregated_by": (round_row(srv, rid)["report"] or {}).get("aggregated_by")}
                       for fed, rid in (("head", head_round), ("teacher", teacher_round))},
        }
        # ---- part 2: the aggregating process is killed; the other takes the round over after the lease
        for s in servers:
            s.stop()
        marker = work / "died-once"
        patch = DIE_ONCE.format(marker=str(marker))
        ports = [s.port for s in servers]
        servers = []
        for port in ports:
            s = ServerProcess(home.root, None, patch=patch, tick=0.3)
            s.port, s.url = port, f"http://127.0.0.1:{port}"
            servers.append(s.start())
        cur = srv.current_round(federation="teacher")
        new_sides = [hospital_side(h, srv, cur["base_version"], cur["id"], 10 + k) for k, h in enumerate(hosp)]
        for h, side in zip(hosp, new_sides):
            h.upload(side)
        deadline = time.time() + 60
        while not marker.exists():
            if time.time() > deadline:
                raise RuntimeError("no process entered the teacher aggregation")
            time.sleep(0.05)
        killed_at = time.time()
        wait_closed(srv, [cur["id"]], lease + 60)
        takeover = time.time() - killed_at
        alive = [s.proc.poll() is None for s in servers]
        row = round_row(srv, cur["id"])
        part2 = {"round": cur["id"], "lease_s": lease, "takeover_s": round(takeover, 2), "versions": versions_of(srv, cur["id"]),
                 "processes_alive_after": sum(alive), "aggregated_by": (row["report"] or {}).get("aggregated_by")}
    finally:
        for s in servers:
            s.stop()
    return {"concurrent": part1, "kill_during_aggregation": part2}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--db", default=None, help="PostgreSQL base URL [default: a throwaway cluster]")
    ap.add_argument("--clinics", type=int, default=50)
    ap.add_argument("--hospitals", type=int, default=3)
    args = ap.parse_args()
    from benchmarks.finetune_memory import micro_bundle
    from export.hospital import teacher_init
    from tests.server_util import fresh_database, postgres_base_url

    with tempfile.TemporaryDirectory(prefix="dwfl-scale-out-") as tmp:
        work = Path(tmp)
        base = args.db or postgres_base_url(work)
        if not base:
            raise SystemExit("no PostgreSQL: pass --db URL or install the postgresql package")
        bundle = micro_bundle(work)
        teacher_init(work / "teacher", config_name="tiny", seed=0, sites=3, cases_per_site=24)
        figures = scenario(work / "run", bundle=bundle, teacher=work / "teacher", db_url=fresh_database(base),
                           clinics=args.clinics, hospitals=args.hospitals)
    print(json.dumps(figures, indent=2))
    write_result("scale_out", figures)
    plot(figures, png_path("scale_out"))


def plot(f: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c, k = f["concurrent"], f["kill_during_aggregation"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    lat = c["clinic_latency_ms"]
    a.bar(list(lat), list(lat.values()), color="#36c")
    a.set_ylabel("ms")
    a.set_title(f"{c['clinics']} clinics + {c['hospitals']} hospitals on 2 servers: {c['errors']} errors")
    b.bar(["lease", "takeover"], [k["lease_s"], k["takeover_s"]], color=["#999", "#c33"])
    b.set_ylabel("s")
    b.set_title(f"kill -9 while aggregating: {k['versions']} version(s) for the round")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
