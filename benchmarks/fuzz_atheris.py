"""Coverage-guided fuzzing (atheris / libFuzzer) of every parser that reads outside input.

Targets: a DICOM slice and a NIfTI volume (read_ct), a PNG tile (read_tiles), an expression table, a
case manifest, a bundle manifest (load_bundle), an update envelope (Envelope JSON + check), and a
sealed update's plaintext (the update codec's decode + validate, what the server's check_update runs). Each starts from a valid seed
input and runs in its own process for `--seconds`; the only acceptable outcome of an input is a
clean refusal (BadInput, the codec's UpdateError included, / AuthError) or success. Any other exception is a finding:
libFuzzer stops and writes the input as crash-* in the results folder of that target.

The hypothesis suites in tests/ (test_fuzz.py, test_fuzz_http.py) are the CI part; this is the long
run. Needs atheris (`pip install atheris`, a libFuzzer build; not a dependency of the product).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGETS = ["dicom", "nifti", "png", "expression", "manifest", "bundle_manifest", "envelope", "update"]


def update_reference() -> dict:
    """The head an "update" input claims to change."""
    import numpy as np

    return {"classifier.weight": np.zeros((2, 8), np.float32), "classifier.bias": np.zeros(2, np.float32)}


# ---------------------------------------------------------------- the child: one target


def seeds(target: str, folder: Path) -> list[bytes]:
    import numpy as np

    from export.synth_files import write_dicom_series, write_nifti, write_png

    vol = np.linspace(-1000, 500, 4 * 8 * 8, dtype=np.float32).reshape(4, 8, 8)
    if target == "dicom":
        write_dicom_series(vol, (4.0, 2.0, 2.0), folder / "dcm", "fz")
        return [sorted((folder / "dcm").iterdir())[0].read_bytes()]
    if target == "nifti":
        write_nifti(vol, (4.0, 2.0, 2.0), folder / "v.nii.gz")
        return [(folder / "v.nii.gz").read_bytes()]
    if target == "png":
        write_png(np.zeros((8, 8, 3), np.uint8), folder / "t.png")
        return [(folder / "t.png").read_bytes()]
    if target == "expression":
        return [b"gene,value\nG1,1.5\nG2,-0.25\nG3,3e2\n"]
    if target == "manifest":
        return [b"case_id,ct,pathology,genomics,label\nc1,ct/c1.nii.gz,path/c1.png,gen/c1.csv,disease\n"]
    if target == "bundle_manifest":
        return [json.dumps({"format_version": 1, "files": {"a.onnx": {"sha256": "0" * 64, "size": 1}}, "classes": ["a", "b"],
                            "signature": {"algorithm": "ed25519", "key_id": "x", "value": "AAAA"}}).encode()]
    if target == "envelope":
        return [json.dumps({"update_id": "u-1", "clinic": "north", "round": 1, "base_version": 1, "kem": "x25519",
                            "sealed": "AAAA", "signature": "AAAA"}).encode()]
    if target == "update":
        from edge_runtime.sync import update as codec

        return [codec.encode(update_reference(), {"update_id": "u-1", "n": 50, "val_loss": 0.6})]
    raise ValueError(target)


def child(target: str, seconds: int, corpus: Path, artifacts: Path) -> None:
    import atheris

    with atheris.instrument_imports():
        from edge_runtime.bundle import MANIFEST, load_bundle
        from edge_runtime.errors import BadInput
        from edge_runtime.keys import generate_key
        from edge_runtime.manifest import read_manifest
        from edge_runtime.readers.ct import TargetGrid, read_ct
        from edge_runtime.readers.genomics import read_expression
        from edge_runtime.readers.pathology import read_tiles
        from edge_runtime.sync import protocol
        from edge_runtime.sync import update as codec
        from server.app import EnvelopeBody
    from pydantic import ValidationError

    work = Path(tempfile.mkdtemp(prefix=f"fz-{target}-"))
    corpus.mkdir(parents=True, exist_ok=True)
    for i, data in enumerate(seeds(target, work)):
        (corpus / f"seed-{i}").write_bytes(data)
    grid, key = TargetGrid((4, 8, 8), (4.0, 2.0, 2.0)), generate_key()
    clean = (BadInput, protocol.AuthError)  # codec.UpdateError is a BadInput
    reference = update_reference()
    suffix = {"dicom": "s.dcm", "nifti": "v.nii.gz", "png": "t.png", "expression": "e.csv", "manifest": "m.csv"}

    def one(data: bytes) -> None:
        try:
            if target in suffix:
                path = work / suffix[target]
                path.write_bytes(data)
                {"dicom": lambda: read_ct(work, grid),  # a folder of slices: here the one fuzzed slice
                 "nifti": lambda: read_ct(path, grid), "png": lambda: read_tiles(path),
                 "expression": lambda: read_expression(path, ("G1", "G2", "G3")),
                 "manifest": lambda: read_manifest(path)}[target]()
            elif target == "bundle_manifest":
                (work / MANIFEST).write_bytes(data)
                load_bundle(work, key.public_key())
            elif target == "envelope":  # what POST /v1/updates does with a body: pydantic, then the Envelope
                try:
                    body = EnvelopeBody.model_validate_json(data)
                except ValidationError:
                    return
                e = protocol.Envelope(**body.model_dump())
                e.check(key.public_key())
                e.sealed_bytes()
            elif target == "update":  # what the server's check_update does with an opened update
                codec.validate(codec.decode(data, codec.size_limit(reference)), reference, "u-1")
        except clean:
            pass

    if target == "dicom":  # read_ct reads the folder: keep only the fuzzed slice in it
        import shutil

        shutil.rmtree(work / "dcm")
    atheris.Setup([sys.argv[0], str(corpus), f"-max_total_time={seconds}", f"-artifact_prefix={artifacts}/",
                   "-print_final_stats=1", "-rss_limit_mb=4096"], one)
    atheris.Fuzz()


# ---------------------------------------------------------------- the parent: every target


def parse(log: str) -> dict:
    points = [(int(m[1]), int(m[2])) for m in re.finditer(r"^#(\d+)\s+\w+\s+cov: (\d+)", log, re.M)]
    execs = re.search(r"stat::number_of_executed_units: (\d+)", log)
    return {"execs": int(execs[1]) if execs else (points[-1][0] if points else 0),
            "coverage_edges": points[-1][1] if points else 0, "curve": points[-200:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=60, help="per target")
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--corpus", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--artifacts", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.seconds, args.corpus, args.artifacts)
        return
    from benchmarks.common import png_path, write_result

    results = {}
    with tempfile.TemporaryDirectory(prefix="dwfl-atheris-") as tmp:
        for target in args.targets.split(","):
            art = Path(tmp) / target / "artifacts"
            art.mkdir(parents=True)
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, __file__, "--child", target, "--seconds", str(args.seconds),
                                   "--corpus", str(Path(tmp) / target / "corpus"), "--artifacts", str(art)],
                                  capture_output=True, text=True, cwd=ROOT, env={**os.environ, "DWFL_NO_PROGRESS": "1"})
            found = sorted(p.name for p in art.iterdir())
            r = {**parse(proc.stderr), "seconds": round(time.perf_counter() - t0, 1), "exit": proc.returncode,
                 "findings": found, "finding_log": proc.stderr[-1500:] if proc.returncode else ""}
            results[target] = r
            print(f"{target}: {r['execs']} inputs, {r['coverage_edges']} edges, exit {r['exit']}, findings {found}", flush=True)
    figures = {t: {k: v for k, v in r.items() if k != "curve"} for t, r in results.items()}
    figures["total_inputs"] = sum(r["execs"] for r in results.values())
    figures["total_findings"] = sum(len(r["findings"]) for r in results.values())

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for t, r in results.items():
        if r["curve"]:
            ax.plot([p[0] for p in r["curve"]], [p[1] for p in r["curve"]], label=f"{t} ({r['execs']:,} inputs)")
    ax.set_xscale("log")
    ax.set_xlabel("inputs run")
    ax.set_ylabel("coverage (edges)")
    ax.set_title(f"atheris, {args.seconds} s per target: {figures['total_findings']} findings")
    ax.legend(fontsize=7)
    fig.tight_layout()
    png = png_path("fuzz_atheris")
    fig.savefig(png, dpi=110)
    path = write_result("fuzz_atheris", figures, {"curves": {t: r["curve"] for t, r in results.items()}, "plot": png.name})
    print(f"wrote {path} and {png}")


if __name__ == "__main__":
    main()
