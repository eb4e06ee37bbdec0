"""The export report's table and plot: every candidate's latency against its accuracy, with the
budget lines, so a reviewer sees at once why the bundle's default variant was chosen."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

REPORTED = ("name", "recipe", "fp32_nodes", "val_auc", "auc", "parity_bound", "measured", "passes", "fails", "fallback")


def table_lines(candidates: list[dict], chosen: str) -> list[str]:
    lines = [f"{'variant':<30}{'val AUC':>8}{'model p95':>11}{'case p95':>10}{'peak RSS':>10}  status"]
    for c in candidates:
        m = c["measured"]
        status = "chosen" if c["name"] == chosen else ("ok" if c["passes"] else "fails: " + "; ".join(c["fails"]))
        lines.append(f"{c['name']:<30}{c['val_auc']:>8.4f}{m['model_ms']['p95']:>9.1f}ms{m['latency_ms']['p95']:>8.1f}ms"
                     f"{m['peak_rss_mb']:>8.1f}MB  {status}")
    return lines


def plot_candidates(result, path: Path, log: Callable[[str], None] | None = None) -> Path | None:
    """Latency (case p95) vs validation AUC per candidate; budget and tolerance lines. Needs
    matplotlib (the `dev`/`export` side has it); without it the report JSON still says everything."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    sel = result.selection
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for c in result.candidates:
        m = c["measured"]
        marker = "*" if c["name"] == sel["chosen"] else ("o" if c["passes"] else "x")
        ax.scatter(m["latency_ms"]["p95"], c["val_auc"], marker=marker, s=140 if marker == "*" else 50)
        ax.annotate(c["name"], (m["latency_ms"]["p95"], c["val_auc"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.axvline(sel["budgets"]["latency_ms"], color="red", ls="--", label=f"latency budget {sel['budgets']['latency_ms']:g} ms")
    ax.axhline(sel["reference_val_auc"] - sel["tolerance"], color="grey", ls=":", label=f"FP32 AUC - {sel['tolerance']:g}")
    ax.set_xscale("log")
    ax.set_xlabel("p95 latency per case, ms (log; `edge-run profile` cases, fresh process, %d threads)" % sel["threads"])
    ax.set_ylabel("validation AUC")
    ax.set_title(f"candidates on {sel['measured_on']['cpu'][:40]} ({sel['cpu_class']}); * = chosen")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
