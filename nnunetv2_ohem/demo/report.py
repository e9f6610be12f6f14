"""HTML report of a demo run: metrics table per method, training curves, mining diagnostics, image panels.

Pure pieces (:func:`metrics_table`, :func:`choose_slice`) are separate from plotting so they can be tested on
fixed inputs. PNG files are written next to ``report.html``; the whole report folder is built under a
temporary name and renamed, so a report on disk is always complete.
"""
import html
import json
import os
import shutil
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from nnunetv2_ohem import ohem_diagnostics as diagnostics
from nnunetv2_ohem.atomic import AtomicFolder

#: table column -> path into the evaluation's aggregate json (MSSEG-II challenge aggregation)
TABLE_COLUMNS: Dict[str, Tuple[str, ...]] = {
    "Dice": ("challenge", "cases_with_lesions", "dice", "mean"),
    "Lesion F1": ("challenge", "cases_with_lesions", "lesion_f1", "mean"),
    "Lesion sensitivity": ("challenge", "cases_with_lesions", "lesion_sensitivity", "mean"),
    "Lesion PPV": ("challenge", "cases_with_lesions", "lesion_ppv", "mean"),
    "FP lesions per lesion-free case": ("challenge", "lesion_free_cases", "fp_lesions", "mean"),
    "FP volume (mm³) per lesion-free case": ("challenge", "lesion_free_cases", "fp_volume_mm3", "mean"),
    "Cases with lesions": ("challenge", "cases_with_lesions", "n_cases"),
    "Lesion-free cases": ("challenge", "lesion_free_cases", "n_cases"),
    "Training time (s)": ("train_seconds",),
}

COUNT_COLUMNS = ("Cases with lesions", "Lesion-free cases")


def _get(d: Dict, path: Sequence[str]):
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def metrics_table(metrics: Dict[str, Dict]) -> pd.DataFrame:
    """One row per method (in the given order), the columns of :data:`TABLE_COLUMNS`; missing -> NaN."""
    rows = {method: {col: (np.nan if _get(agg, path) is None else float(_get(agg, path)))
                     for col, path in TABLE_COLUMNS.items()} for method, agg in metrics.items()}
    df = pd.DataFrame.from_dict(rows, orient="index", columns=list(TABLE_COLUMNS))
    df.index.name = "Method"
    return df


def load_metrics(metrics_dir: str, methods: Sequence[str]) -> Dict[str, Dict]:
    out = {}
    for m in methods:
        path = os.path.join(metrics_dir, f"{m}.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: metrics of method {m} missing (did its evaluation step run?)")
        with open(path) as f:
            out[m] = json.load(f)
    return out


def choose_slice(masks: Sequence[np.ndarray], axis: int = 0) -> int:
    """Index along ``axis`` with the most voxels summed over ``masks`` (the middle one if all are empty)."""
    if not masks:
        raise ValueError("choose_slice needs at least one mask")
    shape = masks[0].shape
    for m in masks:
        if m.shape != shape:
            raise ValueError(f"masks differ in shape: {shape} vs {m.shape}")
    counts = np.sum([np.count_nonzero(m, axis=tuple(a for a in range(m.ndim) if a != axis)) for m in masks], axis=0)
    return int(np.argmax(counts)) if counts.max() > 0 else shape[axis] // 2


# ------------------------------------------------------------------------------------------------ plotting

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: str) -> None:
    fig.savefig(path, dpi=90, bbox_inches="tight")
    _plt().close(fig)


def load_training_log(training_output: str) -> Optional[Dict[str, List[float]]]:
    """nnU-Net's per-epoch logging (losses, pseudo Dice, timestamps) from the final or latest checkpoint."""
    import torch
    for name in ("checkpoint_final.pth", "checkpoint_latest.pth"):
        path = os.path.join(training_output, name)
        if os.path.exists(path):
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
            # keep the per-epoch scalar series; per-class lists (dice_per_class_or_region) are not plotted
            return {k: [float(x) for x in v] for k, v in ckpt.get("logging", {}).items()
                    if all(isinstance(x, (int, float, np.number)) for x in v)}
    return None


def plot_training_curves(logs: Dict[str, Dict[str, List[float]]], path: str) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for i, (method, log) in enumerate(logs.items()):
        color = f"C{i}"
        n = min(len(log.get("train_losses", [])), len(log.get("val_losses", [])))
        epochs = np.arange(n)
        axes[0].plot(epochs, log["train_losses"][:n], "-o", ms=3, color=color, label=f"{method} train")
        axes[0].plot(epochs, log["val_losses"][:n], "--s", ms=3, color=color, label=f"{method} val")
        if log.get("mean_fg_dice"):
            axes[1].plot(np.arange(len(log["mean_fg_dice"])), log["mean_fg_dice"], ":o", ms=3, color=color, alpha=0.6,
                         label=f"{method} pseudo Dice")
        if log.get("ema_fg_dice"):
            axes[1].plot(np.arange(len(log["ema_fg_dice"])), log["ema_fg_dice"], "-s", ms=3, color=color,
                         label=f"{method} pseudo Dice (EMA)")
        starts, ends = log.get("epoch_start_timestamps", []), log.get("epoch_end_timestamps", [])
        m = min(len(starts), len(ends), len(log.get("train_losses", [])))
        if m:
            wall = np.asarray(ends[:m]) - starts[0]
            axes[2].plot(wall, log["train_losses"][:m], "-o", ms=3, color=color, label=method)
    axes[0].set(xlabel="epoch", ylabel="loss (nnU-Net DC+CE)", title="Loss")
    axes[1].set(xlabel="epoch", ylabel="Dice on validation patches", title="Pseudo Dice (nnU-Net)", ylim=(-0.02, 1))
    axes[2].set(xlabel="wall time since start (s)", ylabel="train loss", title="Train loss vs wall time")
    _finish(fig, axes, path)


def _finish(fig, axes, path: str) -> None:
    """Grid and (when anything is labelled) a legend on every axis, then save."""
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    _save(fig, path)


def plot_mining(diags: Dict[str, Dict], path: str) -> None:
    """Ranking error of selected vs all candidates and their foreground fractions, per OHEM method."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))

    arr = diagnostics.as_array
    for i, (method, d) in enumerate(diags.items()):
        c = f"C{i}"
        e = np.asarray(d.get("epoch", []))
        axes[0].plot(e, arr(d, diagnostics.ERROR_CANDIDATES), "--o", ms=3, color=c, label=f"{method}: all candidates")
        axes[0].plot(e, arr(d, diagnostics.ERROR_SELECTED), "-s", ms=3, color=c, label=f"{method}: selected top-B")
        axes[1].plot(e, arr(d, diagnostics.FG_FRACTION_CANDIDATES), "--o", ms=3, color=c,
                     label=f"{method}: candidates")
        axes[1].plot(e, arr(d, diagnostics.FG_FRACTION_SELECTED), "-s", ms=3, color=c, label=f"{method}: selected")
        axes[2].plot(e, arr(d, diagnostics.MINER_ONLINE_DISAGREEMENT), "-o", ms=3, color=c,
                     label=f"{method} (mu={d.get('ema_momentum')})")
    axes[0].set(xlabel="epoch", ylabel="ranking error", title="Mining: error of candidates vs selected")
    axes[1].set(xlabel="epoch", ylabel="share of patches with lesion", title="Mining: foreground share",
                ylim=(-0.05, 1.05))
    axes[2].set(xlabel="epoch", ylabel="mean |p_miner - p_online|", title="Miner vs online network")
    _finish(fig, axes, path)


def _read(path: str) -> np.ndarray:
    import SimpleITK as sitk
    return sitk.GetArrayFromImage(sitk.ReadImage(path))


def plot_case(case: str, t1: np.ndarray, t2: np.ndarray, gt: np.ndarray, preds: Dict[str, np.ndarray],
              rows: Dict[str, Dict], path: str, focus: str = "gt") -> int:
    """One row of axial panels: FLAIR t1, FLAIR t2, ground truth, one prediction per method. Ground truth
    in green, predictions in red. ``focus`` picks the slice: most lesion voxels ("gt") or most false-positive
    voxels over all methods ("fp"). Returns the slice index."""
    plt = _plt()
    from matplotlib.colors import ListedColormap
    head = t1 > 0.25 * np.percentile(t1, 99)
    # false positives outside the head are as wrong, but a slice of pure background shows no anatomy
    masks = [gt] if focus == "gt" else [(p > 0) & (gt == 0) & head for p in preds.values()]
    z = choose_slice(masks, axis=0)
    brain = head[z]
    ys, xs = np.nonzero(brain) if brain.any() else (np.arange(t1.shape[1]), np.arange(t1.shape[2]))
    crop = (slice(max(ys.min() - 3, 0), ys.max() + 4), slice(max(xs.min() - 3, 0), xs.max() + 4))
    vmax = np.percentile(t2[z][brain], 99.5) if brain.any() else t2[z].max()

    def show(ax, img, title):
        ax.imshow(np.flipud(img[z][crop]), cmap="gray", vmin=0, vmax=vmax, interpolation="nearest")
        ax.set_title(title, fontsize=8)
        ax.axis("off")

    green, red = ListedColormap([(0, 0, 0, 0), (0.1, 1, 0.1, 0.8)]), ListedColormap([(0, 0, 0, 0), (1, 0.1, 0.1, 0.8)])
    n = 3 + len(preds)
    fig, axes = plt.subplots(1, n, figsize=(2.6 * n, 3.0))
    show(axes[0], t1, "FLAIR time 1")
    show(axes[1], t2, "FLAIR time 2")
    show(axes[2], t2, f"ground truth ({int(gt[z].astype(bool).sum())} vox.)")
    axes[2].imshow(np.flipud((gt[z] > 0)[crop]), cmap=green, vmin=0, vmax=1, interpolation="nearest")
    for ax, (method, pred) in zip(axes[3:], preds.items()):
        r = rows.get(method, {})
        if focus == "gt":
            label = f"Dice {r.get('dice', float('nan')):.2f}, F1 {r.get('lesion_f1', float('nan')):.2f}"
        else:
            label = f"{int(r.get('fp_lesions', 0))} FP lesions"
        show(ax, t2, f"{method}\n{label}")
        if (gt[z] > 0).any():
            ax.contour(np.flipud((gt[z] > 0)[crop]).astype(float), levels=[0.5], colors=["lime"], linewidths=0.7)
        ax.imshow(np.flipud((pred[z] > 0)[crop]), cmap=red, vmin=0, vmax=1, interpolation="nearest")
    fig.suptitle(f"{case}, axial slice {z}" + (" (lesion-free: false positives in red)" if focus == "fp" else ""),
                 fontsize=9, y=1.06)
    _save(fig, path)
    return z


# ------------------------------------------------------------------------------------------------ html

_CSS = """body{font-family:system-ui,Segoe UI,Helvetica,Arial,sans-serif;max-width:1200px;margin:2em auto;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table.metrics{border-collapse:collapse;font-size:.9em}table.metrics td,table.metrics th{border:1px solid #bbb;
padding:.3em .6em;text-align:right}table.metrics th{background:#f0f0f0}img{max-width:100%;border:1px solid #ddd;
margin:.4em 0}code,pre{background:#f6f6f6;padding:.1em .3em}pre{padding:.6em;overflow-x:auto;font-size:.8em}
.note{color:#555;font-size:.9em}"""


def _img(src: str, alt: str) -> str:
    return f'<img src="{html.escape(src)}" alt="{html.escape(alt)}">'


def render_html(table: pd.DataFrame, run_info: Dict, sections: List[Tuple[str, str]]) -> str:
    """The report page: run summary, metrics table, then ``sections`` (title, inner html) in order."""
    info = "".join(f"<li><b>{html.escape(str(k))}</b>: {html.escape(str(v))}</li>" for k, v in run_info.items())
    counts = {c: (lambda v: "n/a" if pd.isna(v) else f"{v:.0f}") for c in COUNT_COLUMNS if c in table.columns}
    shown = table.rename_axis(None)
    table_html = shown.to_html(classes="metrics", float_format=lambda v: f"{v:.3f}", formatters=counts,
                               na_rep="n/a", border=0)
    body = [f"<h1>nnunetv2-ohem demo: new MS lesions on MNI152 phantoms</h1><ul>{info}</ul>",
            "<h2>Metrics on held-out phantoms</h2>", table_html,
            '<p class="note">MSSEG-II challenge metrics (anima definitions): Dice and lesion-wise F1 / '
            'sensitivity / PPV are means over held-out cases with new lesions; false-positive lesions and their '
            'volume are means over lesion-free cases. Lesions are 6-connected, below 3 mm³ ignored. Tiny '
            'training budgets give noisy numbers: this demo shows the pipeline, not which method is better.</p>']
    found = pd.concat([table.get("Dice", pd.Series(dtype=float)),
                       table.get("FP lesions per lesion-free case", pd.Series(dtype=float))]).fillna(0)
    if len(table) and not (found > 0).any():
        body.append('<p class="note"><b>No method found any lesion (nor any false positive) on the held-out '
                    'cases.</b> The networks still predict background everywhere: the training budget was too '
                    'short (small lesions take nnU-Net a few hundred to a few thousand iterations to appear). '
                    'Rerun with more epochs, e.g. <code>nnunetv2_ohem_demo --epochs 100</code>; finished steps '
                    'before training are reused.</p>')
    for title, inner in sections:
        body.append(f"<h2>{html.escape(title)}</h2>{inner}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>nnunetv2-ohem demo report</title>"
            f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>")


def build_report(out: str, methods: Sequence[str], training_outputs: Dict[str, str], test_images: str,
                 test_labels: str, predictions: str, metrics_dir: str, report_dir: str,
                 run_info: Optional[Dict] = None, n_cases: int = 3) -> str:
    """Write ``report_dir/report.html`` (+ PNGs and ``summary.json``); returns the html path."""
    metrics = load_metrics(metrics_dir, methods)
    table = metrics_table(metrics)
    # the report folder is rebuilt whole: a rerun never mixes old and new figures, an interrupted one leaves
    # the previous report as it was
    with AtomicFolder(report_dir, overwrite=True) as tmp:
        sections: List[Tuple[str, str]] = []
        logs = {m: load_training_log(training_outputs[m]) for m in methods if training_outputs.get(m)}
        logs = {m: v for m, v in logs.items() if v}
        if logs:
            plot_training_curves(logs, os.path.join(tmp, "training_curves.png"))
            progress = []
            for m in logs:
                src = os.path.join(training_outputs[m], "progress.png")
                if os.path.exists(src):
                    shutil.copyfile(src, os.path.join(tmp, f"progress_{m}.png"))
                    progress.append(f"<h3>{html.escape(m)}</h3>" + _img(f"progress_{m}.png", f"progress of {m}"))
            sections.append(("Training curves", _img("training_curves.png", "training curves")
                             + "<details><summary>nnU-Net's own progress.png per method</summary>"
                             + "".join(progress) + "</details>"))
        diags = {}
        for m in methods:
            d = diagnostics.read_diagnostics(training_outputs.get(m, ""))
            if d is not None:
                diags[m] = d
        if diags:
            plot_mining(diags, os.path.join(tmp, "mining_diagnostics.png"))
            sections.append(("Hard-example mining diagnostics", _img("mining_diagnostics.png", "mining diagnostics")
                             + '<p class="note">Per epoch: mean ranking error of all B̄ candidates vs the B selected '
                               'ones (selected > all means mining picks harder patches), the share of patches that '
                               'contain lesion, and how far the EMA miner\'s predictions are from the online '
                               'network\'s (0 for OHEM with mu = 0).</p>'))
        else:
            sections.append(("Hard-example mining diagnostics",
                             '<p class="note">No OHEM method in this run.</p>'))
        if os.path.isdir(test_labels) and os.path.isdir(predictions):
            sections.append(("Held-out cases", _case_panels(methods, test_images, test_labels, predictions,
                                                            metrics_dir, tmp, n_cases)))
        summary = {m: {c: (None if pd.isna(v) else float(v)) for c, v in row.items()} for m, row in table.iterrows()}
        with open(os.path.join(tmp, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        info = {"generated": time.strftime("%Y-%m-%d %H:%M:%S"), "output folder": os.path.abspath(out)}
        info.update(run_info or {})
        with open(os.path.join(tmp, "report.html"), "w") as f:
            f.write(render_html(table, info, sections))
    return os.path.join(report_dir, "report.html")


def _case_panels(methods: Sequence[str], test_images: str, test_labels: str, predictions: str, metrics_dir: str,
                 out_dir: str, n_cases: int) -> str:
    rows: Dict[str, Dict[str, Dict]] = {}
    for m in methods:
        csv = os.path.join(metrics_dir, f"{m}_cases.csv")
        if os.path.exists(csv):
            for r in pd.read_csv(csv).to_dict("records"):
                rows.setdefault(str(r["case"]), {})[m] = r
    cases = sorted(f[:-len(".nii.gz")] for f in os.listdir(test_labels) if f.endswith(".nii.gz"))
    gts = {c: _read(os.path.join(test_labels, f"{c}.nii.gz")) for c in cases}
    with_lesions = sorted((c for c in cases if gts[c].any()), key=lambda c: -int(np.count_nonzero(gts[c])))
    free = [c for c in cases if not gts[c].any()]
    preds = {c: {m: _read(os.path.join(predictions, m, f"{c}.nii.gz")) for m in methods} for c in cases}
    chosen = [(c, "gt") for c in with_lesions[:n_cases]]
    if free:
        worst = max(free, key=lambda c: sum(int(np.count_nonzero(p)) for p in preds[c].values()))
        chosen.append((worst, "fp"))
    parts = []
    for case, focus in chosen:
        t1 = _read(os.path.join(test_images, f"{case}_0000.nii.gz"))
        t2 = _read(os.path.join(test_images, f"{case}_0001.nii.gz"))
        name = f"case_{case}.png"
        plot_case(case, t1, t2, gts[case], preds[case], rows.get(case, {}), os.path.join(out_dir, name), focus)
        title = "lesion-free case, false positives" if focus == "fp" else "case with new lesions"
        parts.append(f"<h3>{html.escape(case)} ({title})</h3>" + _img(name, f"{case} panels"))
    return "".join(parts) or '<p class="note">No held-out cases.</p>'
