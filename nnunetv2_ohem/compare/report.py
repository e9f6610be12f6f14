"""Outputs of ``nnunetv2_ohem_compare``: results.csv, summary.md, report.html (with an embedded PNG plot) and
compare.json. The summary and the plot are computed from results.csv as written, so they match it exactly."""
from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
from typing import Dict, List, Sequence

import numpy as np
import pandas as pd

from nnunetv2_ohem.atomic import write_text_atomic
from nnunetv2_ohem.evaluation.run_metrics import LOWER_IS_BETTER, SUMMARY_METRICS
from nnunetv2_ohem.compare.stats import format_ci, format_p, mean_ci, paired_differences, summarize_runs


def _runs_info(out: str, results: pd.DataFrame) -> Dict:
    machines, dates = set(), []
    for rel in results["run_dir"]:
        try:
            with open(os.path.join(out, rel, "run.json")) as f:
                rec = json.load(f)
        except OSError:
            continue
        if rec.get("machine"):
            machines.add(f"{rec['machine']} (host {rec.get('host')})")
        if rec.get("trained"):
            dates.append(rec["trained"])
    return {"machines": sorted(machines), "first": min(dates) if dates else None, "last": max(dates) if dates else None}


def summary_markdown(results: pd.DataFrame, info: Dict, metrics: Sequence[str], level: float = 0.95) -> str:
    """The summary text (pure: results table and run information in, Markdown out)."""
    cfg = info["config"]
    reference = cfg["trainers"][0]
    summ = summarize_runs(results, metrics, level)
    diffs = paired_differences(results, reference, metrics, level)
    pct = f"{level * 100:g} %"
    runs = info.get("runs", {})
    lines = [f"# Trainer comparison on {cfg['dataset_name']} ({cfg['configuration']}, plans {cfg['plans']})", "",
             f"Summary written {info['date']}; runs trained {runs.get('first')} – {runs.get('last')} on "
             f"{'; '.join(runs.get('machines') or ['(unknown)'])}; launcher {cfg['launcher']}, device "
             f"{cfg['device']}.", "",
             "Command:", "", "```", cfg.get("command") or "(API call)", "```", "",
             f"Trainers {', '.join(cfg['trainers'])} (reference: **{reference}**); folds {list(cfg['folds'])}; "
             f"training seeds {list(cfg['seeds'])}; budget(s) {', '.join(cfg['budgets'])}. Metrics "
             f"({cfg['metric']}) on "
             + ("each fold's nnU-Net validation predictions against gt_segmentations." if cfg.get("test") is None
                else f"held-out images {cfg['test']} predicted with nnU-Net's predictor (nnUNetv2_predict; "
                     f"in the run's own process on a CPU).")
             + " `lesion_f1_pooled`: detection F1 from the lesion counts of all the run's cases (lesion-free "
               "cases add their false positives).", ""]
    if info.get("epochs_equal_time"):
        lines += ["Equal wall time: epochs per trainer (its per-epoch cost relative to the reference, median over "
                  "epochs and the paired runs): " + ", ".join(f"{k} {v}" for k, v in info["epochs_equal_time"].items())
                  + ".", ""]
    n_min = int(summ["n_runs"].min()) if len(summ) else 0
    if n_min < 2:
        lines += [f"**Too few runs for a confidence interval**: {n_min} run per trainer. Give at least two folds "
                  f"(-f) or seeds (--seeds); means are shown without intervals.", ""]
    lines += [f"## Mean [{pct} CI] over runs (Student t)", ""]
    head = ["budget", "trainer", "runs", "epochs", "train s"] + list(metrics)
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in summ.iterrows():
        cells = [r["budget"], r["trainer"], str(r["n_runs"]), f"{r['epochs']:.0f}", f"{r['train_seconds']:.0f}"]
        cells += [format_ci(r[f"{m}_mean"], r[f"{m}_lo"], r[f"{m}_hi"], r[f"{m}_n"]) for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"## Difference against {reference}, paired by (fold, seed): mean [{pct} CI], paired t-test", ""]
    if len(cfg["trainers"]) < 2:
        lines += ["(one trainer: nothing to compare)", ""]
    else:
        lines += ["| budget | trainer | metric | pairs | difference | p | better |", "|---|---|---|---|---|---|---|"]
        for _, d in diffs.iterrows():
            if d["n"] < 2 or math.isnan(d["p"]):
                verdict = "too few pairs for a test" if d["n"] < 2 else "n/a"
            elif d["p"] < 1 - level:
                better = (d["mean"] < 0) if d["metric"] in LOWER_IS_BETTER else (d["mean"] > 0)
                verdict = ("yes" if better else "no (worse)") + f", significant at {pct}"
            else:
                verdict = f"not significant at {pct}"
            lines.append(f"| {d['budget']} | {d['trainer']} | {d['metric']} | {d['n']} | "
                         f"{format_ci(d['mean'], d['lo'], d['hi'], d['n'])} | {format_p(d['p'])} | {verdict} |")
        lines.append("")
    lines += ["Per-run rows (every metric, epochs, training seconds): [results.csv](results.csv); plots: "
              "[report.html](report.html). Choose a model: `nnunetv2_ohem_compare select -o OUT`.", ""]
    return "\n".join(lines)


def plot_png(results: pd.DataFrame, metrics: Sequence[str], trainers: Sequence[str]) -> bytes:
    """Per budget (rows) and metric (columns): every run as a dot, mean ± 95 % CI as a bar."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    budgets = list(dict.fromkeys(results["budget"]))
    fig, axes = plt.subplots(len(budgets), len(metrics), figsize=(3.6 * len(metrics), 0.8 + 2.8 * len(budgets)),
                             squeeze=False)
    for i, budget in enumerate(budgets):
        g = results[results["budget"] == budget]
        for j, m in enumerate(metrics):
            ax = axes[i, j]
            for k, tr in enumerate(trainers):
                v = pd.to_numeric(g.loc[g["trainer"] == tr, m], errors="coerce").to_numpy(float)
                v = v[np.isfinite(v)]
                if len(v) == 0:
                    continue
                ax.plot(np.full(len(v), k) + np.linspace(-0.12, 0.12, len(v)), v, "o", ms=4, alpha=0.6, color="C0")
                mean, lo, hi = mean_ci(v.tolist())
                if math.isnan(lo):
                    ax.plot(k, mean, "s", color="C3", ms=5)
                else:
                    ax.errorbar(k, mean, yerr=[[mean - lo], [hi - mean]], fmt="s", color="C3", capsize=4, ms=5)
            ax.set_xticks(range(len(trainers)))
            ax.set_xticklabels([t.replace("nnUNetTrainer", "").strip("_") or "nnUNetTrainer" for t in trainers],
                               fontsize=7, rotation=30, ha="right")
            ax.set_title(f"{m} — equal {budget}", fontsize=9)
            ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def _md_table_to_html(lines: List[str]) -> str:
    rows = [ln.strip().strip("|").split("|") for ln in lines if not set(ln.strip()) <= set("|-")]
    out = ["<table>"]
    for i, r in enumerate(rows):
        tag = "th" if i == 0 else "td"
        out.append("<tr>" + "".join(f"<{tag}>{html.escape(c.strip())}</{tag}>" for c in r) + "</tr>")
    return "\n".join(out + ["</table>"])


def report_html(summary_md: str, png: bytes) -> str:
    """A self-contained HTML page: the summary (tables as HTML tables) and the plot as an embedded PNG."""
    body, table = [], []
    in_code = False
    for ln in summary_md.splitlines() + [""]:
        if ln.startswith("```"):
            body.append("</pre>" if in_code else "<pre>")
            in_code = not in_code
            continue
        if in_code:
            body.append(html.escape(ln))
            continue
        if ln.startswith("|"):
            table.append(ln)
            continue
        if table:
            body.append(_md_table_to_html(table))
            table = []
        if ln.startswith("## "):
            body.append(f"<h2>{html.escape(ln[3:])}</h2>")
        elif ln.startswith("# "):
            body.append(f"<h1>{html.escape(ln[2:])}</h1>")
        elif ln.strip():
            text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", html.escape(ln))
            body.append("<p>" + re.sub(r"`(.+?)`", r"<code>\1</code>", text) + "</p>")
    img = base64.b64encode(png).decode("ascii")
    return ("<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>nnunetv2_ohem_compare</title>"
            "<style>body{font-family:sans-serif;max-width:1200px;margin:auto}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px}</style></head><body>\n"
            + "\n".join(body) + "\n<h2>Per-run values</h2>\n"
            f"<img alt='per-run metrics' src='data:image/png;base64,{img}'>\n</body></html>\n")


def write_outputs(cfg, results: pd.DataFrame, info: Dict) -> None:
    out = os.path.abspath(cfg.out)
    path = os.path.join(out, "results.csv")
    write_text_atomic(path, results.to_csv(index=False, float_format="%.6g"))
    written = pd.read_csv(path)
    info = dict(info, runs=_runs_info(out, written))
    metrics = [m for m in SUMMARY_METRICS[cfg.metric] if m in written.columns]
    md = summary_markdown(written, info, metrics)
    write_text_atomic(os.path.join(out, "summary.md"), md)
    write_text_atomic(os.path.join(out, "report.html"),
                      report_html(md, plot_png(written, metrics, [t for t in cfg.trainers
                                                                  if t in set(written["trainer"])])))
    write_text_atomic(os.path.join(out, "compare.json"), json.dumps(info, indent=1, default=str))
