"""Hospitals uploading `full`-teacher updates at once, and their aggregation (issue 16's targets).

A real `edge-server serve` (uvicorn, one process, SQLite unless --db) on 127.0.0.1 holds the first
global teacher of --config (random initial weights, `edge-export teacher-init`'s files). Each of
--hospitals hospitals is enrolled with a hospital-tier token through the hospital client
(`export.hospital`), seals a random float32 delta of the teacher's shared parameters as a Tink
streaming-AEAD stream to the server's HPKE key (not timed: a hospital seals before it sends), then
all upload at once, one thread each, in signed chunks (`Hospital.upload`, what `edge-export
train-round` runs). The first hospital's connection is cut in the middle of its third chunk (the
request body stops, the connection closes), and the same client resumes: chunks re-sent are counted.

Measured: wall time and throughput (declared bytes / wall) of the concurrent uploads, the server's
peak RSS (VmHWM of the serve process, read after the uploads: the round's min_clients is one more
than the hospitals, so nothing is aggregated while they upload), chunks re-sent after the cut. Then
the round is aggregated by `rounds.aggregate_round` in a fresh process (its peak RSS, next to the
model's FP32 size), which streams each sealed update through decryption into the DW-FL sum.

    python benchmarks/hospital_upload.py                  # full teacher, 3 hospitals (~3 min here)
    python benchmarks/hospital_upload.py --config tiny    # a quick look
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import png_path, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"server_peak_rss_mb": 300, "throughput_mb_s": 50, "chunks_resent": 1}


def vm_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def vm_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def cut_mid_chunk(hospital, side: Path, acknowledged: int) -> None:
    """Begin the upload, send ``acknowledged`` chunks, then cut the connection halfway through the next."""
    import httpx

    from edge_runtime.sync import protocol

    doc = json.loads(side.read_text())
    body = json.dumps({k: doc[k] for k in ("update_id", "round", "base_version", "kem", "stream_key", "total_size", "meta")}).encode()
    status = hospital._json("POST", "/v1/teacher/uploads", body, "begin")
    data = side.with_suffix(".sealed").read_bytes()
    size = status["chunk_size"]
    for i in range(acknowledged):
        resp = hospital.client.request("PUT", f"/v1/teacher/uploads/{doc['update_id']}/{i}", data[i * size:(i + 1) * size])
        assert resp.status_code == 200, resp.text
    chunk = data[acknowledged * size:(acknowledged + 1) * size]
    path = f"/v1/teacher/uploads/{doc['update_id']}/{acknowledged}"
    headers = protocol.sign_request(hospital.client.key, hospital.name, "PUT", path, chunk)
    headers["Content-Length"] = str(len(chunk))

    def half():
        yield chunk[: len(chunk) // 2]
        raise ConnectionResetError("cable pulled")

    try:
        httpx.put(hospital.client.url + path, content=half(), headers=headers, timeout=30)
    except Exception:  # noqa: BLE001 - the cut, as the client sees it
        pass


def aggregate_in_fresh_process(home: Path, round_id: int) -> dict:
    code = f"""
import json, resource, time, sys
sys.path.insert(0, {str(ROOT)!r})
from pathlib import Path
from server.home import Home
from server.service import Server
from server import rounds
srv = Server(Home(Path({str(home)!r})))
before = int(open('/proc/self/status').read().split('VmRSS:')[1].split()[0]) / 1024
t = time.perf_counter()
assert rounds.claim(srv, {round_id})
version = rounds.aggregate_round(srv, {round_id})
seconds = time.perf_counter() - t
peak = int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]) / 1024
print(json.dumps({{"version": version, "seconds": round(seconds, 2), "rss_before_mb": round(before, 1), "peak_rss_mb": round(peak, 1)}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="full")
    ap.add_argument("--hospitals", type=int, default=3)
    ap.add_argument("--chunk-mb", type=float, default=8.0)
    ap.add_argument("--db", default="", help="PostgreSQL URL (a fresh database is made under it) [default: SQLite]")
    args = ap.parse_args()

    from export.hospital import Hospital, enroll, teacher_init
    from server.home import Config, Home
    from server.service import Server
    from server.teacher import publish_teacher, teacher_params
    from tests.server_util import ServerProcess

    with tempfile.TemporaryDirectory(prefix="hospital-upload-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        teacher_init(tmp / "init", config_name=args.config, seed=0, sites=1, cases_per_site=4)
        home = Home(tmp / "srv")
        db_url = ""
        if args.db:
            sys.path.insert(0, str(ROOT / "tests"))
            from server_util import fresh_database

            db_url = fresh_database(args.db)
        home.init(Config(db_url=db_url, teacher_min_clients=args.hospitals + 1, teacher_chunk_bytes=int(args.chunk_mb * 2**20)))
        srv = Server(home)
        version, round_id = publish_teacher(srv, tmp / "init")
        params = teacher_params(srv, version)
        n_params = int(sum(v.size for v in params.values()))
        server = ServerProcess(home.root, None, tick=0.5).start()
        proc = server.proc
        try:
            url = server.url
            hospitals, sides = [], []
            for k in range(args.hospitals):
                enroll(tmp / f"h{k}", url, srv.issue_token(f"hospital-{k}", "hospital"))
                h = Hospital(tmp / f"h{k}", timeout=300)
                rng = np.random.default_rng(k)
                delta = {name: (1e-3 * rng.standard_normal(v.shape)).astype(np.float32) for name, v in params.items()}
                sides.append(h.seal(delta, update_id=f"hospital-{k}-t{round_id}", round_id=round_id, base_version=version,
                                    meta={"n": 1000, "val_loss": 0.6 + 0.01 * k, "modality_fraction": {"ct": 1.0}, "noise_multiplier": 0.0}))
                hospitals.append(h)
                del delta
            del params
            setup_s = time.perf_counter() - t0
            sizes = [json.loads(s.read_text())["total_size"] for s in sides]
            rss_idle = vm_rss_mb(proc.pid)
            answers: list[dict | None] = [None] * args.hospitals
            errors: list[str] = []
            barrier = threading.Barrier(args.hospitals)

            def run(k: int) -> None:
                try:
                    barrier.wait()
                    if k == 0:
                        cut_mid_chunk(hospitals[0], sides[0], acknowledged=2)
                    answers[k] = hospitals[k].upload(sides[k])
                except Exception as exc:  # noqa: BLE001 - counted as an error
                    errors.append(f"hospital-{k}: {exc}")

            threads = [threading.Thread(target=run, args=(k,)) for k in range(args.hospitals)]
            start = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - start
            peak_upload = vm_hwm_mb(proc.pid)
        finally:
            server.stop()
        chunks = [-(-s // int(args.chunk_mb * 2**20)) for s in sizes]
        # chunks whose bytes went out twice: 2 acknowledged + the cut one + what the resumed client sent, beyond the count
        resent = (2 + 1 + answers[0]["chunks_sent"] - chunks[0]) if answers[0] else None
        acked_resent = (2 + answers[0]["chunks_sent"] - chunks[0]) if answers[0] else None
        agg = aggregate_in_fresh_process(home.root, round_id) if not errors else {}
    total_mb = sum(sizes) / 1e6
    figures = {
        "config": args.config, "hospitals": args.hospitals, "teacher_parameters": n_params,
        "update_mb": round(sizes[0] / 1e6, 1), "chunk_mb": args.chunk_mb, "chunks_per_update": chunks[0],
        "errors": errors, "stored": sum(1 for a in answers if a and a["answer"]["status"] == "stored"),
        "upload_wall_s": round(wall, 2), "throughput_mb_s": round(total_mb / wall, 1),
        "server_rss_idle_mb": round(rss_idle, 1), "server_peak_rss_mb": round(peak_upload, 1),
        "chunks_resent_after_cut": resent, "acknowledged_chunks_resent": acked_resent,
        "aggregation": agg, "model_fp32_mb": round(n_params * 4 / 1e6, 1), "setup_s": round(setup_s, 1),
        "database": "postgresql" if args.db else "sqlite", "targets": TARGETS,
        "met": {"server_peak_rss_mb": peak_upload <= TARGETS["server_peak_rss_mb"],
                "throughput_mb_s": total_mb / wall >= TARGETS["throughput_mb_s"],
                "chunks_resent": resent is not None and resent <= TARGETS["chunks_resent"]},
    }
    name = "hospital_upload" if args.config == "full" else f"hospital_upload_{args.config}"
    print(json.dumps(figures, indent=2))
    write_result(name, figures)
    plot(figures, png_path(name))


def plot(f: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    labels = ["server idle", "server, uploads", "aggregation", "model FP32"]
    values = [f["server_rss_idle_mb"], f["server_peak_rss_mb"], f["aggregation"].get("peak_rss_mb", 0), f["model_fp32_mb"]]
    a.bar(labels, values, color=["#999", "#2a6", "#36c", "#ccc"])
    a.axhline(TARGETS["server_peak_rss_mb"], color="r", ls="--", label="upload target 300 MB")
    a.set_ylabel("MB (peak RSS)")
    a.set_title(f"{f['hospitals']} × {f['update_mb']} MB teacher updates")
    a.legend()
    a.tick_params(axis="x", rotation=20)
    b.bar(["throughput"], [f["throughput_mb_s"]], color="#2a6")
    b.axhline(TARGETS["throughput_mb_s"], color="r", ls="--", label="target 50 MB/s")
    b.set_ylabel("MB/s (declared bytes / wall)")
    b.set_title(f"re-sent after a cut: {f['chunks_resent_after_cut']} chunk")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
