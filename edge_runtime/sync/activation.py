"""Whether a pulled global version goes live on this clinic (``edge-run sync``): it is scored on the
clinic's local validation split (the cases fine-tuning holds out) before it replaces the version in
use, and kept aside when its AUC falls below the head in use by more than the tolerance. The
decision and both AUCs go to STATE/versions.json (``edge-run status`` lists them).

The head in use is the current version's active head: the clinic's own fine-tuned head when one is
live for it, else the version's global head. Without labelled cases there is nothing to score on:
the version goes live, recorded as not scored.
"""

from __future__ import annotations

from ..bundle import Bundle, load_bundle
from ..errors import BadInput
from ..finetune.cache import bundle_encoder_key
from ..manifest import Manifest
from ..state import ClinicState, bundle_head, now_utc


def _encoders(bundle: Bundle) -> dict:
    """What the embeddings depend on, for every variant (the clinic may run any): same -> comparable."""
    m = bundle.manifest
    return {v["name"]: bundle_encoder_key(m, v["name"]) for v in m["variants"]}


def _settle(state: ClinicState, version: int) -> None:
    """versions.json agrees with current.json: the version in use is the one active entry."""
    for e in state.version_log():
        if e.get("status") == "active" and int(e["version"]) != int(version):
            state.record_version({**e, "status": "replaced"})


def decide(client, bundle: Bundle, version: int, cases: Manifest | None, opts) -> dict:
    """Score ``bundle`` (version ``version``, installed, not yet live) and activate it or hold it back;
    the versions.json entry. ``opts``: the FinetuneOptions of this sync (tolerance, validation split)."""
    from ..finetune.run import score_heads

    state: ClinicState = client.state
    entry = {"version": int(version), "model_version": bundle.model_version, "pulled_utc": now_utc()}
    cur = state.current_version()
    if cur is not None and cur[0] == int(version):
        known = next((e for e in state.version_log() if e.get("version") == int(version)), None)
        if known is None or known.get("status") != "active":  # a crash between current.json and versions.json
            known = {**(known or entry), "status": "active"}
            state.record_version(known)
        _settle(state, version)
        return known
    candidate = bundle_head(bundle)[0]
    in_use = load_bundle(cur[1], client.server_key) if cur is not None and cur[1].is_dir() else None
    if cases is None:
        entry.update(status="active", scored=False, reason="no labelled cases to score it on (sync without --manifest)")
    else:
        heads = {"candidate": candidate}
        comparable = in_use is not None and _encoders(in_use) == _encoders(bundle)
        if comparable:
            active = state.active_head(in_use)
            heads["in_use"] = active.params if active.params is not None else bundle_head(in_use)[0]
        try:
            scores = score_heads(bundle, cases, state, opts, heads)
        except BadInput as exc:
            scores = None
            entry.update(status="active", scored=False, reason=f"not scored: {exc}")
        if scores is not None:
            entry.update(scored=True, val_auc=scores["candidate"]["auc"], val_loss=scores["candidate"]["loss"],
                         validation_cases=scores["validation_cases"])
            if comparable:
                entry.update(in_use_version=cur[0], in_use_val_auc=scores["in_use"]["auc"], tolerance=opts.tolerance)
                held = not entry["val_auc"] >= entry["in_use_val_auc"] - opts.tolerance
                entry.update(status="held back" if held else "active",
                             reason=(f"validation AUC {entry['val_auc']:.4f} is below the version in use (v{cur[0]}: "
                                     f"{entry['in_use_val_auc']:.4f}) by more than {opts.tolerance:g}") if held else "")
            else:
                entry.update(status="active", reason="first version on this clinic" if in_use is None
                             else "encoders changed: not comparable with the version in use")
    state.record_version(entry)  # first: a crash before current.json moves is settled by the next sync
    if entry["status"] == "active":
        client.activate(int(version))
        _settle(state, version)
    else:
        client.prune()  # held back: kept as the round's base; older held-back folders go
    return entry
