"""A self-contained HTML report of an audit: summary, accuracy against eps (PNG inline), sanity
checks, per-attack figures with distortions, a 2-D view of clean vs adversarial embeddings, and
how the audit was made. No scripts, no external resources: it opens offline and prints. Its only
styles are the one ``<style>`` block :data:`STYLE` (no style attributes), so a page with a strict
Content-Security-Policy may show it by allowing that block's hash (:func:`style_hash`): the
console opens reports that way."""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
from typing import Any

STATUS_COLOR = {"pass": "#1a7f37", "warn": "#9a6700", "fail": "#cf222e"}
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1000px; color: #1f2328; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #d0d7de; padding: 4px 8px; text-align: left; font-size: 0.9em;
         vertical-align: top; }
th { background: #f6f8fa; }
code, pre { font-size: 0.85em; }
pre { background: #f6f8fa; padding: 1em; overflow-x: auto; }
img { max-width: 100%; }
.lead { font-size: 1.25em; }
""" + "".join(f".status-{k} {{ color: {v}; font-weight: bold; }}\n" for k, v in STATUS_COLOR.items())


def style_hash() -> str:
    """The CSP source that allows :data:`STYLE` as an inline ``<style>`` block."""
    return "'sha256-" + base64.b64encode(hashlib.sha256(STYLE.encode()).digest()).decode() + "'"


def csp() -> str:
    """The Content-Security-Policy the report is served with: nothing may load or run but its own
    style block and its inline PNGs (it has no scripts, forms or external resources)."""
    return "; ".join(
        [
            "default-src 'none'",
            f"style-src {style_hash()}",
            "img-src data:",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def accuracy_plot(result: dict[str, Any]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    eps = [row["eps"] for row in result["per_eps"]]
    labels = [a["label"] for a in result["attacks"]]
    for label in labels:
        acc = [100 * row["attacks"][label]["accuracy"] for row in result["per_eps"]]
        ax.plot(eps, acc, marker="o", markersize=3, label=label)
    union = [100 * row["union"]["accuracy"] for row in result["per_eps"]]
    lo = [100 * row["union"]["ci95"][0] for row in result["per_eps"]]
    hi = [100 * row["union"]["ci95"][1] for row in result["per_eps"]]
    (line,) = ax.plot(
        eps, union, color="black", linewidth=2, marker="s", markersize=4, label="union (all attacks)"
    )
    ax.fill_between(eps, lo, hi, color=line.get_color(), alpha=0.15, label="union 95% CI")
    ax.set_xlabel(f"eps ({result['settings']['norm']})")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{result['model'].get('name', '')}: n = {result['clean']['n']}", fontsize=9)
    return _png(fig)


LEGEND_MAX = 20  # classes named in the embedding view's legend; beyond, colours only


def class_colours(num_classes: int) -> list[Any]:
    """One colour per class: tab10 / tab20 while they last, then evenly spaced hues."""
    import matplotlib.pyplot as plt

    if num_classes <= 10:
        return [plt.get_cmap("tab10")(i) for i in range(num_classes)]
    if num_classes <= 20:
        return [plt.get_cmap("tab20")(i) for i in range(num_classes)]
    hsv = plt.get_cmap("hsv")
    return [hsv(i / num_classes) for i in range(num_classes)]


def embedding_plot(view: dict[str, Any], label_names: list[str] | None = None) -> str:
    """Clean and adversarial embeddings side by side, coloured by true class (named in the legend
    from the model card's label names)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clean, adv = view["clean"], view["adversarial"]
    labels, pred = view["labels"], view["adversarial_pred"]
    names = list(label_names or [])
    colours = class_colours(max(len(names), max(labels, default=0) + 1))
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 4.2), sharex=True, sharey=True)
    for i, (pt, y) in enumerate(zip(clean, labels, strict=True)):
        axes[0].scatter(pt[0], pt[1], s=9, color=colours[y], marker="o")
        q = adv[i]
        fooled = pred[i] != y
        axes[1].scatter(q[0], q[1], s=14 if fooled else 9, color=colours[y], marker="v" if fooled else "o")
    shown = sorted(set(labels))
    if names and len(shown) <= LEGEND_MAX:
        handles = [
            plt.Line2D([], [], marker="o", linestyle="", color=colours[y], label=names[y]) for y in shown
        ]
        axes[0].legend(handles=handles, fontsize=7, loc="best", title="true class", title_fontsize=7)
    axes[0].set_title("clean embeddings (colour: true label)", fontsize=9)
    axes[1].set_title(
        f"adversarial: {view.get('attack', '')} at eps {view.get('eps', '')} (triangle: fooled)", fontsize=9
    )
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(f"{view['method']} of the {view['embed_dim']}-d embedding", fontsize=9)
    return _png(fig)


def _classes(model: dict[str, Any]) -> str:
    names = model.get("label_names") or []
    if not names:
        return ""
    shown = ", ".join(html.escape(str(n)) for n in names[:50])
    return f"Classes ({len(names)}): {shown}{' ...' if len(names) > 50 else ''}."


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def _ci(row: dict[str, Any]) -> str:
    return f"[{100 * row['ci95'][0]:.1f}, {100 * row['ci95'][1]:.1f}]"


def headline(result: dict[str, Any]) -> dict[str, Any] | None:
    """The audit's lead figure: the worst case over every attack (the union row) at the model's
    training eps when it was audited there, else at the largest eps audited."""
    rows = [r for r in result["per_eps"] if r["eps"] > 0]
    if not rows:
        return None
    train_eps = result.get("model", {}).get("train_eps")
    at = [r for r in rows if train_eps is not None and abs(r["eps"] - train_eps) < 1e-9]
    row = at[0] if at else rows[-1]
    return {"eps": row["eps"], "training_eps": bool(at), **row["union"]}


def render(result: dict[str, Any]) -> str:
    e = html.escape
    model = result.get("model", {})
    lead = headline(result)
    suite = result.get("suite") or {}
    if lead is None:
        lead_html = "<p>No eps above 0 was audited: clean accuracy only.</p>"
    else:
        where = "the training eps" if lead["training_eps"] else "the largest eps audited"
        lead_html = (
            f"<p class='lead'>Worst case at {where}, eps {lead['eps']:g} ({e(result['settings']['norm'])}): "
            f"<b>{_pct(lead['accuracy'])}</b> {_ci(lead)} of n = {lead['n']} samples survive every attack "
            f"of {e(str(suite.get('label', 'the audit')))}.</p>"
        )
    threat = result.get("threat_model") or {}
    if threat.get("note"):  # a black-box model: only query attacks ran
        lead_html += (
            f"<p class='lead'><b>{e(str(threat['note']))}</b>: only query attacks ran on this model.</p>"
        )
    cascade_note = (
        " The attacks ran as a cascade (each only on what the earlier ones missed): each column is the "
        "worst case of its attack and the attacks before it."
        if suite.get("cascade")
        else ""
    )
    labels = [a["label"] for a in result["attacks"]]
    head = "".join(f"<th>{e(label)}</th>" for label in labels)
    rows = []
    for row in result["per_eps"]:
        cells = "".join(f"<td>{_pct(row['attacks'][lb]['accuracy'])}</td>" for lb in labels)
        rows.append(
            f"<tr><td>{row['eps']:g}</td><td><b>{_pct(row['union']['accuracy'])}</b> {_ci(row['union'])}</td>"
            f"{cells}</tr>"
        )
    dist_rows = []
    for row in result["per_eps"]:
        for lb in labels:
            d = row["attacks"][lb].get("distortion")
            if d and d.get("count"):
                dist_rows.append(
                    f"<tr><td>{row['eps']:g}</td><td>{e(lb)}</td><td>{d['count']}</td>"
                    f"<td>{d['mean']:.4g}</td><td>{d['median']:.4g}</td><td>{d['max']:.4g}</td></tr>"
                )
    check_rows = "".join(
        f"<tr><td>{e(c['name'])}</td>"
        f"<td class='status-{e(c['status'])}'>"
        f"{e(c['status'].upper())}</td><td><code>{e(json.dumps(c['value']))}</code></td>"
        f"<td><code>{e(json.dumps(c['threshold']))}</code></td><td>{e(c['message'])}</td></tr>"
        for c in result.get("checks", [])
    )
    emb = result.get("embedding")
    emb_html = (
        f"<img alt='clean vs adversarial embeddings' src='{embedding_plot(emb, model.get('label_names'))}'>"
        if emb
        else "<p>No embedding view (no eps above 0 or no correctly classified sample).</p>"
    )
    settings = json.dumps(
        {k: result.get(k) for k in ("settings", "seeds", "data", "environment", "timings_s")}, indent=2
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>Robustness audit: {e(str(model.get("name", "")))}</title>
<style>{STYLE}</style></head><body>
<h1>Robustness audit: {e(str(model.get("name", "")))}</h1>
{lead_html}
<p>Weights sha256 <code>{e(str(model.get("weights_sha256", "")))}</code> ({e(str(model.get("arch", "")))},
{e(str(model.get("dataset", "")))}). Data: {e(json.dumps(result.get("data", {})))}.
{_classes(model)}
Started {e(str(result.get("started_at", "")))} on {e(str(result["environment"].get("device_name", "")))}
({e(str(result["environment"].get("device", "")))}), {result["timings_s"].get("total", 0):.1f} s.</p>
<h2>Summary</h2>
<p>Clean accuracy <b>{_pct(result["clean"]["accuracy"])}</b> {_ci(result["clean"])}
on n = {result["clean"]["n"]}.
A sample counts as robust at an eps only if every attack failed on it (the union).{cascade_note}</p>
<table><tr><th>eps</th><th>union (95% CI)</th>{head}</tr>{"".join(rows)}</table>
<img alt="accuracy against eps" src="{accuracy_plot(result)}">
<h2>Sanity checks</h2>
<table><tr><th>check</th><th>status</th><th>value</th><th>threshold</th><th>meaning</th></tr>{check_rows}</table>
<h2>Distortion of successful attacks ({e(result["settings"]["norm"])})</h2>
<table><tr><th>eps</th><th>attack</th><th>successes</th><th>mean</th><th>median</th><th>max</th></tr>
{"".join(dist_rows)}</table>
<h2>Embeddings</h2>
{emb_html}
<h2>How this audit was made</h2>
<pre>{e(settings)}</pre>
</body></html>
"""
