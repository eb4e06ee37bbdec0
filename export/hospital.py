"""The hospital client (`edge-export enroll` / `edge-export train-round`, DESIGN §10): the whole
teacher trained federated over the network, through the same server the clinics sync with.

A hospital's state folder is an enrolled identity like a clinic's (edge_runtime.state.ClinicState:
sync/ keys, pinned server keys, clinic.json naming it), plus:

    teacher/vN/              verified global teacher versions (the server-signed manifest, its files)
    teacher/norms/rR.safetensors   the hospital's own normalisation layers after its round R (FedBN)
    teacher/outbox/ID.sealed + ID.json   a sealed update and what to declare for it, until the server has it
    teacher/sent/ID.json     the server's answer for each update sent

A round: send what the outbox holds (resuming from the last chunk the server acknowledged); ask for
the teacher federation's current round; if this hospital has nothing in it yet, pull its base
version (signature and hashes checked), train on the hospital's own cases with the very step the
simulation runs (export.federated.site_round), seal the delta as a stream to the server's HPKE key,
upload it in signed chunks. Run it from cron or a systemd timer: a round it already sent to is a no-op.
"""

from __future__ import annotations

import hashlib
import io
import json
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import httpx
import numpy as np
import torch
from safetensors.numpy import save as save_numpy
from safetensors.torch import load_file, save_file

from edge_runtime.bundle import _verify_signature
from edge_runtime.errors import BadInput, BundleError, Refused
from edge_runtime.fsutil import replace_dir, sha256_file, write_atomic
from edge_runtime.manifest import load_case, read_manifest
from edge_runtime.preprocess import Preprocessing
from edge_runtime.state import ClinicState
from edge_runtime.sync.client import Client, reason
from edge_runtime.sync.hpke import update_info
from federation import teacher as fmt
from federation.sealed_stream import seal_stream

from .config import PipelineConfig, TrainConfig, get_config
from .data import PreparedCases
from .federated import Site, norm_names, site_round
from .models import Teacher

VAL_FRACTION = 0.25  # of a manifest's cases, chosen by case id, score the global model (L_k) before training


@dataclass(frozen=True)
class SyntheticSite:
    """A site of the synthetic cohort as a hospital's data (demo and tests; the simulation's sites)."""
    site: int
    sites: int
    cohort_seed: int
    cases: int
    val_cases: int


class Hospital:
    def __init__(self, root: Path, *, retries: int = 5, backoff: float = 0.5, timeout: float = 120.0) -> None:
        self.state = ClinicState(Path(root))
        self.client = Client(self.state, retries=retries, backoff=backoff, timeout=timeout)
        self.name = self.client.config.clinic
        self.root = self.state.root / "teacher"
        for sub in ("outbox", "sent", "norms"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------ global teacher versions

    def version_dir(self, version: int) -> Path:
        return self.root / f"v{int(version)}"

    def pull(self, version: int) -> Path:
        """The verified folder of teacher ``version``: the manifest signed by the pinned server key,
        every file's SHA-256 as it lists. Files are streamed to disk, never held whole."""
        folder = self.version_dir(version)
        if (folder / "manifest.json").is_file():
            return folder
        where = f"teacher version {version}"
        resp = self.client.request("GET", f"/v1/bundle/{version}/manifest.json")
        if resp.status_code != 200:
            raise Refused(f"{where}: server refused (HTTP {resp.status_code}): {reason(resp)}")
        manifest = resp.json()
        _verify_signature(manifest, Path(where), self.client.server_key)
        if manifest.get("kind") != "teacher" or sorted(manifest.get("files", {})) != sorted(fmt.FILES):
            raise BundleError(f"{where}: not a teacher version (its files: {sorted(manifest.get('files', {}))})")
        with tempfile.TemporaryDirectory(dir=self.root, prefix=".pull-") as tmp:
            for name, meta in manifest["files"].items():
                self._download(f"/v1/bundle/{version}/files/{name}", Path(tmp) / name, meta["sha256"], f"{where}: {name}")
            write_atomic(Path(tmp) / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True).encode())
            replace_dir(Path(tmp), folder)
        return folder

    def _download(self, path: str, dest: Path, sha256: str, where: str) -> None:
        headers = self.client_headers("GET", path)
        digest = hashlib.sha256()
        with self.client.http.stream("GET", path, headers=headers) as resp:
            if resp.status_code != 200:
                resp.read()
                raise Refused(f"{where}: server refused (HTTP {resp.status_code}): {reason(resp)}")
            with open(dest, "wb") as fh:
                for block in resp.iter_bytes(1 << 20):
                    digest.update(block)
                    fh.write(block)
        if digest.hexdigest() != sha256:
            raise BundleError(f"{where}: downloaded file does not match the signed manifest's SHA-256")

    def client_headers(self, method: str, path: str, body: bytes = b"") -> dict:
        from edge_runtime.sync import protocol

        return protocol.sign_request(self.client.key, self.name, method, path, body)

    # ------------------------------------------------------------ the model at this hospital

    def model(self, folder: Path, *, round_number: int, init_checkpoint: Path | None = None,
              device: str = "cpu") -> tuple[Teacher, fmt.TeacherSpec, PipelineConfig, dict[str, np.ndarray]]:
        """The global teacher of ``folder`` as this hospital runs it (its own normalisation layers
        from its latest round before ``round_number``, else --init-checkpoint's, else the federation's
        first ones), and the global shared parameters (what the delta is taken against)."""
        norms = self._own_norms(round_number)
        if norms is None and init_checkpoint is not None:
            spec = read_spec(folder)
            probe = Teacher(*_teacher_args(spec_config(spec, folder)))
            norms = _checkpoint_norms(init_checkpoint, probe)
        return global_teacher(folder, norms, device)

    def latest(self) -> tuple[int, Path, Path | None]:
        """The federation's latest teacher version (pulled and verified) and this hospital's newest
        normalisation layers: what `edge-export pipeline --teacher-state` distills from."""
        doc = self._json("GET", "/v1/teacher", b"", "teacher federation")
        folder = self.pull(int(doc["version"]))
        own = self.norm_files()
        return int(doc["version"]), folder, (own[-1] if own else None)

    def norm_files(self, before: int | None = None) -> list[Path]:
        """The hospital's own normalisation layers after each of its rounds, oldest first (those
        before round ``before`` only, when given)."""
        found = sorted((int(p.stem[1:]), p) for p in (self.root / "norms").glob("r*.safetensors") if p.stem[1:].isdigit())
        return [p for r, p in found if before is None or r < before]

    def _own_norms(self, round_number: int) -> dict[str, torch.Tensor] | None:
        earlier = self.norm_files(before=round_number)
        return load_file(str(earlier[-1])) if earlier else None

    def save_norms(self, round_number: int, state: dict[str, torch.Tensor]) -> None:
        path = self.root / "norms" / f"r{round_number}.safetensors"
        tmp = path.with_suffix(".tmp")
        save_file({k: v.detach().cpu().float().contiguous() for k, v in state.items()}, str(tmp))
        tmp.replace(path)

    # ------------------------------------------------------------ outbox and upload

    def contributed(self, round_id: int) -> str | None:
        """The update this hospital has queued, or had stored, for a round (trained for it, or counted
        in it: one sent for R and stored in R+1 counts for R+1); refused ones do not count."""
        for folder in (self.root / "outbox", self.root / "sent"):
            for side in folder.glob("*.json"):
                doc = json.loads(side.read_text())
                if doc.get("status") == "refused":
                    continue
                if round_id in (int(doc.get("round", -1)), int((doc.get("answer") or {}).get("round", -1))):
                    return side.stem
        return None

    def seal(self, delta: dict[str, np.ndarray], *, update_id: str, round_id: int, base_version: int, meta: dict) -> Path:
        """Seal the delta (safetensors) as a stream to the server's HPKE key into the outbox; the
        sidecar, written last, is what makes it count as sent-to-be."""
        outbox = self.root / "outbox"
        kem = self.client.config.kem
        sealed = outbox / f"{update_id}.sealed"
        info = update_info(self.name, round_id, base_version, update_id, kem)
        with open(sealed, "wb") as sink:
            key = seal_stream(io.BytesIO(save_numpy({k: np.ascontiguousarray(v, np.float32) for k, v in delta.items()})), sink,
                              public=self.client.hpke, info=info, kem=kem)
            sink.flush()
        side = {"update_id": update_id, "round": round_id, "base_version": base_version, "kem": kem,
                "stream_key": key.to_dict(), "total_size": sealed.stat().st_size, "sha256": sha256_file(sealed), "meta": meta}
        write_atomic(outbox / f"{update_id}.json", json.dumps(side, indent=2).encode(), mode=0o600)
        return outbox / f"{update_id}.json"

    def send_pending(self) -> list[dict]:
        """Upload the outbox. An update the server refuses for good (4xx: stale, already sent, does not
        fit) is recorded in sent/ as refused and dropped, so it never blocks later rounds; an
        unreachable or busy server leaves it queued (the run fails; the next one resumes)."""
        out = []
        for side in sorted((self.root / "outbox").glob("*.json")):
            try:
                out.append(self.upload(side))
            except ServerRefused as exc:
                if exc.status >= 500 or exc.status in (408, 429):
                    raise
                doc = {**json.loads(side.read_text()), "status": "refused", "reason": str(exc)}
                doc.pop("stream_key", None)
                write_atomic(self.root / "sent" / side.name, json.dumps(doc, indent=2).encode())
                side.unlink()
                side.with_suffix(".sealed").unlink(missing_ok=True)
                out.append(doc)
        return out

    def upload(self, side_path: Path) -> dict:
        """Upload one outbox update: begin (idempotent), then from the server's acknowledged count on,
        one signed chunk per request; after a dropped connection or a busy answer the count is asked
        for again after a backoff (at most ``retries`` failures in a row), so no acknowledged chunk is
        sent twice; then complete. The outbox entry moves to sent/."""
        side = json.loads(side_path.read_text())
        uid = side["update_id"]
        begin = {k: side[k] for k in ("update_id", "round", "base_version", "kem", "stream_key", "total_size", "meta")}
        status = self._json("POST", "/v1/teacher/uploads", json.dumps(begin).encode(), f"update {uid}: begin")
        sent, failures = 0, 0
        sealed = side_path.with_suffix(".sealed")
        with open(sealed, "rb") as fh:
            while status["received_chunks"] < status["chunks"] and status["state"] == "receiving":
                index = status["received_chunks"]
                fh.seek(index * status["chunk_size"])
                data = fh.read(status["chunk_size"])
                try:
                    resp = self.client.request("PUT", f"/v1/teacher/uploads/{uid}/{index}", data, retry=False)
                except Refused as exc:  # dropped connection or busy server: whatever was stored, the count says
                    failures += 1
                    if failures > self.client.retries:
                        raise Refused(f"update {uid}: chunk {index} not acknowledged after {failures} tries ({exc})") from exc
                    time.sleep(self.client.backoff * 2 ** (failures - 1))
                    status = self._json("GET", f"/v1/teacher/uploads/{uid}", b"", f"update {uid}: status")
                    continue
                sent += 1
                if resp.status_code == 200:
                    status, failures = resp.json(), 0
                elif resp.status_code == 409:  # the count moved meanwhile (another try got through): ask for it
                    status = self._json("GET", f"/v1/teacher/uploads/{uid}", b"", f"update {uid}: status")
                else:
                    raise ServerRefused(resp.status_code, f"update {uid}: chunk {index} refused (HTTP {resp.status_code}): {reason(resp)}")
        done = self._json("POST", f"/v1/teacher/uploads/{uid}/complete", json.dumps({"sha256": side["sha256"]}).encode(),
                          f"update {uid}: complete")
        answer = {**side, "answer": done, "chunks_sent": sent}
        answer.pop("stream_key")
        write_atomic(self.root / "sent" / f"{uid}.json", json.dumps(answer, indent=2).encode())
        side_path.unlink()
        sealed.unlink(missing_ok=True)
        return answer

    def _json(self, method: str, path: str, body: bytes, what: str) -> dict:
        resp = self.client.request(method, path, body)
        if resp.status_code != 200:
            raise ServerRefused(resp.status_code, f"{what}: server refused (HTTP {resp.status_code}): {reason(resp)}")
        return resp.json()


class ServerRefused(Refused):
    """The server answered, and refused (HTTP status kept: 4xx is final, 5xx worth a later try)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def read_spec(folder: Path) -> fmt.TeacherSpec:
    try:
        return fmt.TeacherSpec.from_dict(json.loads((folder / fmt.SPEC).read_text()), str(folder / fmt.SPEC))
    except (OSError, ValueError) as exc:
        raise BundleError(f"{folder / fmt.SPEC}: unreadable teacher specification ({exc})") from None


def spec_config(spec: fmt.TeacherSpec, folder: Path) -> PipelineConfig:
    try:
        return replace(get_config(spec.config), train=TrainConfig(**spec.train))
    except (TypeError, BadInput) as exc:
        raise BundleError(f"{folder / fmt.SPEC}: a configuration this release does not know ({exc})") from None


def _teacher_args(cfg: PipelineConfig) -> tuple:
    return cfg.model, cfg.input.n_genes, len(cfg.classes), cfg.train.contrastive_temperature


def global_teacher(folder: Path, norms: dict[str, torch.Tensor] | None, device: str = "cpu"
                   ) -> tuple[Teacher, fmt.TeacherSpec, PipelineConfig, dict[str, np.ndarray]]:
    """The teacher of a version folder: built as the first global teacher was (same seed: its
    non-shared buffers alike), the shared parameters loaded, then ``norms`` (a hospital's own
    normalisation layers; None: the federation's first ones)."""
    spec = read_spec(folder)
    cfg = spec_config(spec, folder)
    torch.manual_seed(spec.seed)
    model = Teacher(*_teacher_args(cfg))
    shared = load_file(str(folder / fmt.WEIGHTS))
    own = model.state_dict()
    bad = sorted(k for k, v in shared.items() if k not in own or own[k].shape != v.shape)
    if bad:
        raise BundleError(f"{folder / fmt.WEIGHTS}: tensors that the {spec.config!r} teacher does not have: {bad[:3]}")
    model.load_state_dict(shared, strict=False)
    if spec.local_norm:
        model.load_state_dict(norms if norms is not None else load_file(str(folder / fmt.LOCAL_INIT)), strict=False)
    return model.to(device), spec, cfg, {k: v.numpy() for k, v in shared.items()}


def hospital_site(data: Path | SyntheticSite, pre: Preprocessing, cfg: PipelineConfig, folder: Path) -> Site:
    """The hospital's own cases, preprocessed as the federation says, cached in ``folder``: a labelled
    manifest (validation: the cases whose id hashes into the first VAL_FRACTION), or a site of the
    synthetic cohort (built exactly as the simulation builds that site)."""
    if isinstance(data, SyntheticSite):
        from edge_runtime.synthetic import SynthConfig, SyntheticCohort

        from .federated import SITE_STRIDE, VAL_OFFSET, _Pinned

        cohort = _Pinned(SyntheticCohort(SynthConfig(seed=data.cohort_seed, n_sites=data.sites, spec=cfg.input)), data.site)
        base = data.site * SITE_STRIDE
        return Site(data.site, PreparedCases(folder / "train", cohort, pre, range(base, base + data.cases)),
                    PreparedCases(folder / "val", cohort, pre, range(base + VAL_OFFSET, base + VAL_OFFSET + data.val_cases)))
    manifest = read_manifest(data)
    entries = [e for e in manifest.entries if not e.problem]
    if len(entries) < 4:
        raise BadInput(f"{data}: {len(entries)} usable case(s); training needs at least 4 labelled cases")
    classes = list(cfg.classes)

    class _Files:  # PreparedCases reads cases by index
        def case(self, i: int):
            try:
                return load_case(entries[i], manifest.folder, pre, classes)
            except BadInput as exc:
                raise BadInput(f"{data}: case {entries[i].case_id!r} (line {entries[i].line}): {exc}") from None

    def is_val(e) -> bool:
        return int(hashlib.sha256(e.case_id.encode()).hexdigest()[:8], 16) / 2**32 < VAL_FRACTION

    val = [i for i, e in enumerate(entries) if is_val(e)]
    train = [i for i, e in enumerate(entries) if not is_val(e)]
    if not val or not train:
        raise BadInput(f"{data}: {len(entries)} cases give no validation or no training split; add cases")
    return Site(0, PreparedCases(folder / "train", _Files(), pre, train), PreparedCases(folder / "val", _Files(), pre, val))


def _checkpoint_norms(path: Path, model: Teacher) -> dict[str, torch.Tensor]:
    """The normalisation layers of a local pretrained checkpoint (transfer to this hospital's scanners
    and stains); shared weights always come from the global teacher, or the update would carry the jump."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - OSError, UnpicklingError, RuntimeError on bad files
        raise BadInput(f"{path}: not a readable torch checkpoint ({type(exc).__name__})") from exc
    for key in ("teacher", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    own = model.state_dict()
    names = norm_names(model)
    norms = {k: v for k, v in (state if isinstance(state, dict) else {}).items()
             if k in names and getattr(v, "shape", None) == own[k].shape}
    if not norms:
        raise BadInput(f"{path}: no normalisation layer of the checkpoint matches this teacher")
    return norms


def teacher_init(out: Path, *, config_name: str, seed: int, sites: int, cases_per_site: int,
                 init_checkpoint: Path | None = None, local_norm: bool = True) -> dict:
    """The first global teacher as `edge-server publish-teacher` takes it (federation.teacher's three
    files): the teacher of ``config_name`` initialised with ``seed`` (or from a local pretrained
    checkpoint: transfer learning), and the preprocessing every hospital applies, fitted on the
    synthetic cohort's sites as `train-teacher` fits it (a consortium would fit it on a shared
    reference set; the statistics are per-modality intensity and colour ranges, not patient data)."""
    from .federated import FederationSpec, prepare_cohort
    from .train import load_pretrained

    cfg = get_config(config_name)
    spec = FederationSpec(sites=sites, rounds=1, cases_per_site=cases_per_site)
    _, pre = prepare_cohort(cfg, spec, seed)
    torch.manual_seed(seed)
    model = Teacher(cfg.model, cfg.input.n_genes, len(cfg.classes), cfg.train.contrastive_temperature)
    if init_checkpoint is not None:
        load_pretrained(model, init_checkpoint)
    norms = norm_names(model) if local_norm else set()
    shared = {k: v.detach().numpy().astype(np.float32) for k, v in model.named_parameters() if k not in norms}
    state = model.state_dict()
    local = {k: state[k].detach().float().contiguous().numpy() for k in sorted(norms)}
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / fmt.WEIGHTS, save_numpy(shared))
    write_atomic(out / fmt.LOCAL_INIT, save_numpy(local))
    teacher_spec = fmt.TeacherSpec(config=config_name, preprocessing=pre.to_dict(), train=asdict(cfg.train), local_norm=local_norm,
                                   seed=seed, local_tensors=sorted(local))
    write_atomic(out / fmt.SPEC, json.dumps(teacher_spec.to_dict(), indent=2).encode())
    return {"folder": str(out), "tensors": len(shared), "parameters": int(sum(v.size for v in shared.values())),
            "local_tensors": len(local)}


def default_seed(name: str) -> int:
    return int(hashlib.sha256(name.encode()).hexdigest()[:6], 16)


def train_round(root: Path, data: Path | SyntheticSite, *, device: str = "cpu", init_checkpoint: Path | None = None,
                seed: int | None = None, epochs: int = 1, dp=None, log=print) -> dict:
    """One scheduled run (see the module docstring): what it did, as a dict. ``dp``
    (export.hospital_dp.DPOptions): record-level DP-SGD, charged to the hospital's privacy ledger
    (dataset ``teacher``) before training; refused once its lifetime budget is spent."""
    if dp is not None:
        dp.check()
    hospital = Hospital(root)
    sent = hospital.send_pending()
    doc = hospital._json("GET", "/v1/teacher", b"", "teacher federation")
    rnd = doc.get("round") or {}
    if rnd.get("state") != "open":
        return {"status": "no open teacher round", "sent": sent, "round": rnd}
    if hospital.contributed(rnd["id"]):
        return {"status": f"already sent an update for round {rnd['id']}", "sent": sent, "round": rnd}
    folder = hospital.pull(rnd["base_version"])
    model, spec, cfg, global_params = hospital.model(folder, round_number=rnd["number"], init_checkpoint=init_checkpoint,
                                                     device=device)
    pre = Preprocessing.from_dict(spec.preprocessing)
    seed = default_seed(hospital.name) if seed is None else seed
    with tempfile.TemporaryDirectory(dir=hospital.root, prefix=".cases-") as work:
        site = hospital_site(data, pre, cfg, Path(work))
        log(f"round {rnd['id']} (teacher round {rnd['number']}): training on {len(site.train)} cases, "
            f"{len(site.val)} for validation, base version {rnd['base_version']}")
        norms = norm_names(model) if spec.local_norm else set()
        local_seed = seed + 100 * (rnd["number"] - 1)
        privacy = None
        if dp is None:
            step = site_round(model, site, global_params, cfg=cfg.train, epochs=epochs, mu=0.0, seed=local_seed, norms=norms,
                              device=device)
        else:
            from .hospital_dp import dp_site_round

            if not spec.local_norm:
                raise BadInput("DP at a hospital needs the federation's local normalisation layers (FedBN)")
            state = hospital.state
            ledger = state.ledger("teacher", epsilon_total=dp.epsilon_total, delta=dp.delta)
            step, privacy = dp_site_round(model, site, global_params, cfg=cfg.train, epochs=epochs, seed=local_seed, norms=norms,
                                          ledger=ledger, round_id=f"teacher-r{rnd['id']}", opts=dp,
                                          register=lambda: state.register_dataset("teacher"))
            log(f"DP-SGD: sigma {privacy['noise_multiplier']}, {privacy['steps']} steps; epsilon spent "
                f"{privacy['epsilon_spent']:.3f} of {privacy['epsilon_total']:g} (delta {privacy['delta']:g})")
    if spec.local_norm:
        hospital.save_norms(rnd["number"], step.norm_state)
    meta = {**step.meta, "noise_multiplier": privacy["released_noise_multiplier"] if privacy else 0.0}
    side = hospital.seal(step.delta, update_id=f"{hospital.name}-t{rnd['id']}", round_id=rnd["id"],
                         base_version=rnd["base_version"], meta=meta)
    answer = hospital.upload(side)
    return {"status": "sent", "round": rnd, "val_loss": step.meta["val_loss"], "val_auc_before": step.auc_before,
            "update": answer, "sent": sent, "privacy": privacy}


def enroll(root: Path, url: str, token: str) -> dict:
    from edge_runtime.sync.client import enroll as enroll_identity

    try:
        return enroll_identity(ClinicState(Path(root)), url, token, tier="hospital")
    except httpx.HTTPError as exc:
        raise Refused(f"server {url} unreachable ({exc})") from exc
