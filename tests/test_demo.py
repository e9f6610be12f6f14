"""Demo pipeline: step reuse logic, report table/slices on fixed inputs, and one end-to-end smoke run."""
import json
import math
import os
import time
from html.parser import HTMLParser

import numpy as np
import pytest

from nnunetv2_ohem.demo.pipeline import (DemoConfig, DemoError, Paths, StepRunner, prepare_output,
                                         write_single_split)
from nnunetv2_ohem.demo.report import TABLE_COLUMNS, build_report, choose_slice, metrics_table


class _ReportParser(HTMLParser):
    """Collects <img src> and the cells of table.metrics."""

    def __init__(self):
        super().__init__()
        self.images, self.rows = [], []
        self._in_table = self._in_cell = False
        self._row = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        elif tag == "table" and "metrics" in (attrs.get("class") or ""):
            self._in_table = True
        elif self._in_table and tag == "tr":
            self._row = []
        elif self._in_table and tag in ("td", "th"):
            self._in_cell = True
            self._row.append("")

    def handle_endtag(self, tag):
        if tag == "table":
            self._in_table = False
        elif self._in_table and tag == "tr":
            self.rows.append([c.strip() for c in self._row])
        elif tag in ("td", "th"):
            self._in_cell = False

    def handle_data(self, data):
        if self._in_table and self._in_cell:
            self._row[-1] += data


def parse_report(path):
    p = _ReportParser()
    with open(path) as f:
        p.feed(f.read())
    header = next(r for r in p.rows if "Dice" in r)
    body = {r[0]: dict(zip(header[1:], r[1:])) for r in p.rows if r and r[0] and r[0] not in ("Method",)
            and r is not header and len(r) == len(header)}
    return p.images, body


def _agg(dice, f1, sens, ppv, fp, fpv, n_l, n_f, secs):
    stat = lambda v: {"mean": v, "median": v, "std": 0.0, "n": 2}  # noqa: E731
    return {"challenge": {"cases_with_lesions": {"n_cases": n_l, "dice": stat(dice), "lesion_f1": stat(f1),
                                                 "lesion_sensitivity": stat(sens), "lesion_ppv": stat(ppv)},
                          "lesion_free_cases": {"n_cases": n_f, "fp_lesions": {**stat(fp), "total": fp * n_f},
                                                "fp_volume_mm3": {**stat(fpv), "total": fpv * n_f}}},
            "train_seconds": secs}


FIXED = {"nnUNetTrainerOHEMEMA": _agg(0.5123, 0.25, 0.5, 1 / 3, 1.5, 54.0, 2, 2, 120.25),
         "nnUNetTrainer": _agg(0.0, None, 0.0, 0.0, 0.0, 0.0, 2, 2, 99.0)}


def test_metrics_table_picks_challenge_values():
    df = metrics_table(FIXED)
    assert list(df.index) == ["nnUNetTrainerOHEMEMA", "nnUNetTrainer"]
    assert list(df.columns) == list(TABLE_COLUMNS)
    row = df.loc["nnUNetTrainerOHEMEMA"]
    assert row["Dice"] == pytest.approx(0.5123) and row["Lesion PPV"] == pytest.approx(1 / 3)
    assert row["FP lesions per lesion-free case"] == 1.5 and row["FP volume (mm³) per lesion-free case"] == 54.0
    assert row["Training time (s)"] == 120.25 and row["Lesion-free cases"] == 2
    assert math.isnan(df.loc["nnUNetTrainer", "Lesion F1"])  # None in the json -> n/a, not 0


def test_report_from_fixed_metrics_files_matches_table(tmp_path):
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    for m, agg in FIXED.items():
        (metrics / f"{m}.json").write_text(json.dumps(agg))
    html_path = build_report(str(tmp_path), list(FIXED), {}, str(tmp_path / "none"), str(tmp_path / "none"),
                             str(tmp_path / "none"), str(metrics), str(tmp_path / "report"))
    images, body = parse_report(html_path)
    assert images == []
    assert set(body) == set(FIXED)
    assert body["nnUNetTrainerOHEMEMA"]["Dice"] == "0.512"
    assert body["nnUNetTrainerOHEMEMA"]["Lesion PPV"] == "0.333"
    assert body["nnUNetTrainerOHEMEMA"]["Training time (s)"] == "120.250"
    assert body["nnUNetTrainer"]["Lesion F1"] == "n/a"
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["nnUNetTrainerOHEMEMA"]["FP volume (mm³) per lesion-free case"] == 54.0
    text = open(html_path).read()
    assert "No OHEM method in this run" in text  # no training outputs were given
    assert "No method found any lesion" not in text


def test_report_says_when_nothing_was_found(tmp_path):
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    (metrics / "nnUNetTrainer.json").write_text(json.dumps(_agg(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2, 1, 5.0)))
    html_path = build_report(str(tmp_path), ["nnUNetTrainer"], {}, "", "", "", str(metrics), str(tmp_path / "r"))
    assert "No method found any lesion" in open(html_path).read()


def test_report_names_missing_metrics_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nnUNetTrainer.json"):
        build_report(str(tmp_path), ["nnUNetTrainer"], {}, "", "", "", str(tmp_path), str(tmp_path / "r"))
    assert not (tmp_path / "r").exists()


def test_choose_slice_matches_loop():
    rng = np.random.default_rng(0)
    masks = [rng.random((7, 5, 6)) > 0.8 for _ in range(3)]
    for axis in range(3):
        best, best_count = 0, -1
        for i in range(masks[0].shape[axis]):
            count = sum(int(np.take(m, i, axis=axis).sum()) for m in masks)
            if count > best_count:
                best, best_count = i, count
        assert choose_slice(masks, axis) == best
    assert choose_slice([np.zeros((9, 2, 2), bool)]) == 4
    with pytest.raises(ValueError, match="shape"):
        choose_slice([np.zeros((2, 2, 2)), np.zeros((3, 2, 2))])


def test_step_runner_reuses_and_invalidates_downstream(tmp_path):
    cfg = DemoConfig(out=str(tmp_path / "o"))
    paths = prepare_output(cfg)
    calls = []
    r1 = StepRunner(paths, progress=False)
    r1.run("a", {"x": 1}, [], lambda: calls.append("a"))
    r1.run("b", {"y": 1}, ["a"], lambda: calls.append("b"))
    r2 = StepRunner(paths, progress=False)
    r2.run("a", {"x": 1}, [], lambda: calls.append("a"))
    r2.run("b", {"y": 1}, ["a"], lambda: calls.append("b"))
    assert calls == ["a", "b"] and r2.record["b"]["status"] == "reused"
    r3 = StepRunner(paths, progress=False)
    r3.run("a", {"x": 2}, [], lambda: calls.append("a"))  # changed settings
    r3.run("b", {"y": 1}, ["a"], lambda: calls.append("b"))  # same settings, but upstream ran
    assert calls == ["a", "b", "a", "b"]

    def fail():
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError):
        StepRunner(paths, progress=False).run("c", {}, [], fail)
    assert not os.path.exists(os.path.join(paths.steps, "c.json"))  # a failed step is not marked finished


def test_output_folder_guard_and_fresh(tmp_path):
    user = tmp_path / "user_data"
    user.mkdir()
    (user / "precious.nii.gz").write_bytes(b"x")
    with pytest.raises(DemoError, match="not a demo output"):
        prepare_output(DemoConfig(out=str(user), fresh=True))
    assert (user / "precious.nii.gz").exists()
    paths = prepare_output(DemoConfig(out=str(tmp_path / "o")))
    os.makedirs(paths.metrics)
    prepare_output(DemoConfig(out=str(tmp_path / "o"), fresh=True))
    assert not os.path.exists(paths.metrics)


@pytest.mark.parametrize("kwargs, message", [({"methods": ("nnUNetTrainerFoo",)}, "unknown method"),
                                             ({"epochs": 0}, "epochs"), ({"until": "nowhere"}, "until"),
                                             ({"lesion_contrast": (2.8, 2.2)}, "lesion_contrast"),
                                             ({"lesion_volume": (0, 10)}, "lesion_volume")])
def test_bad_demo_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DemoConfig(**kwargs)


def test_lesion_settings_reach_the_phantom_generator():
    from nnunetv2_ohem.demo.pipeline import _phantom_config
    cfg = DemoConfig(lesion_volume=(50.0, 500.0), new_lesions=(2, 3), lesion_contrast=(1.7, 1.9))
    ph = _phantom_config(cfg)
    assert (ph.lesion_volume_mm3, ph.n_new_lesions, ph.lesion_contrast) == ((50.0, 500.0), (2, 3), (1.7, 1.9))
    assert ph.large_lesion_volume_mm3 == (500.0, 3000.0)  # the generator's 6x rule for the few large ones
    # an explicit phantom option still wins over the demo's own setting
    assert _phantom_config(DemoConfig(phantom_options={"lesion_contrast": (3.0, 3.5)})).lesion_contrast == (3.0, 3.5)


def test_single_split_keeps_last_cases_for_validation(tmp_path):
    for i in range(6):
        (tmp_path / f"MSSEG2_{i:03d}.nii.gz").write_bytes(b"")
    split = write_single_split(str(tmp_path), str(tmp_path / "splits.json"))
    assert split == {"train": [f"MSSEG2_{i:03d}" for i in range(5)], "val": ["MSSEG2_005"]}
    assert json.loads((tmp_path / "splits.json").read_text()) == [split]


def _png_ok(path):
    import matplotlib.image as mpimg
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    img = mpimg.imread(path)
    assert img.ndim == 3 and min(img.shape[:2]) > 50
    assert float(img[..., :3].std()) > 0.01, f"{path} is blank"


def _weights(checkpoint):
    import torch
    return torch.load(checkpoint, map_location="cpu", weights_only=False)["network_weights"]


def _same_weights(a, b):
    return a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)


# one method keeps the smoke run within the suite's time share (each method adds a training and a prediction
# subprocess); the multi-method table is covered by the fixed-metrics tests above
SMOKE = ["--cases", "3", "--test_cases", "2", "--epochs", "1", "--iterations", "2", "--val_iterations", "1",
         "--voxel_size", "4", "-d", "943", "--features", "4", "8", "16", "--no_progress", "--methods",
         "nnUNetTrainerOHEMEMA"]


@pytest.mark.slow
def test_demo_end_to_end_reuse_and_fresh(cli, tmp_path):
    out = tmp_path / "demo"
    t0 = time.time()
    cli(["nnunetv2_ohem_demo", "--out", str(out), *SMOKE])
    first = time.time() - t0
    paths = Paths(str(out), DemoConfig())
    methods = ["nnUNetTrainerOHEMEMA"]
    metrics = {}
    for m in methods:
        metrics[m] = json.loads((out / "metrics" / f"{m}.json").read_text())
        row = metrics_table({m: metrics[m]}).loc[m]
        for col, value in row.items():
            assert np.isfinite(value), f"{m}: {col} is not finite ({value})"
        for col in ("Dice", "Lesion F1", "Lesion sensitivity", "Lesion PPV"):
            assert 0.0 <= row[col] <= 1.0
        assert row["Cases with lesions"] >= 1 and row["Lesion-free cases"] >= 1
        assert row["FP lesions per lesion-free case"] >= 0 and row["Training time (s)"] > 0
    report = out / "report" / "report.html"
    images, body = parse_report(str(report))
    assert set(body) == set(methods)
    for m in methods:
        expected = metrics_table({m: metrics[m]}).loc[m]
        for col, value in expected.items():
            assert float(body[m][col]) == pytest.approx(value, abs=6e-4), (m, col)
    expected_images = {"training_curves.png", "mining_diagnostics.png"}
    assert expected_images <= set(images)
    assert sum(i.startswith("case_") for i in images) >= 2  # a lesion case and the lesion-free case
    for src in images:
        _png_ok(out / "report" / src)

    # the per-case path behind the progress bar writes the same segmentations as nnU-Net's folder call
    import SimpleITK as sitk
    from nnunetv2_ohem.runtime import HeldOutPredictor
    cfg943 = DemoConfig(dataset_id=943)
    again = tmp_path / "again"
    HeldOutPredictor("cpu").predict(os.path.dirname(paths.training_output(cfg943, methods[0])),
                                    str(out / "nnUNet_raw" / cfg943.dataset_name / "imagesTs"), str(again),
                                    str(tmp_path / "again.log"), progress="predict again")
    demo_pred = out / "predictions" / methods[0]
    segs = sorted(p.name for p in demo_pred.glob("*.nii.gz"))
    assert segs and segs == sorted(p.name for p in again.glob("*.nii.gz"))
    for name in segs:
        assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(demo_pred / name))),
                              sitk.GetArrayFromImage(sitk.ReadImage(str(again / name)))), name
    # one fixed thread count per training on a CPU (nnU-Net's -device cpu would take every core)
    assert "Demo trainer: 1 torch thread(s)" in (out / "logs" / f"train_{methods[0]}.log").read_text()
    ckpt = os.path.join(paths.training_output(DemoConfig(dataset_id=943), methods[0]), "checkpoint_final.pth")
    mtime = os.path.getmtime(ckpt)
    t0 = time.time()
    cli(["nnunetv2_ohem_demo", "--out", str(out), *SMOKE])
    second = time.time() - t0
    run = json.loads((out / "runs.jsonl").read_text().splitlines()[-1])
    assert {v["status"] for v in run["steps"].values()} == {"reused"}
    assert os.path.getmtime(ckpt) == mtime
    assert second < first / 3
    html = report.read_text()
    for fact in ("train_seed", "machine", "core", "wall seconds of the steps"):
        assert fact in html, f"the report does not state {fact!r}"

    # reproducible: the same training seed gives the same weights and metrics, another seed other weights
    cases = out / "metrics" / f"{methods[0]}_cases.csv"
    first_weights, first_cases = _weights(ckpt), cases.read_text()
    cli(["nnunetv2_ohem_demo", "--out", str(out), *SMOKE, "--train_seed", "1", "--until", "train"])
    assert not _same_weights(_weights(ckpt), first_weights)
    cli(["nnunetv2_ohem_demo", "--out", str(out), *SMOKE])
    assert _same_weights(_weights(ckpt), first_weights)
    assert cases.read_text() == first_cases

    phantom = out / "phantoms" / "MSSEG2" / "training" / "001" / "ground_truth.nii.gz"
    before = os.path.getmtime(phantom)
    cli(["nnunetv2_ohem_demo", "--out", str(out), *SMOKE, "--fresh", "--until", "phantoms"])
    run = json.loads((out / "runs.jsonl").read_text().splitlines()[-1])
    assert run["steps"] == {"phantoms": run["steps"]["phantoms"]} and run["steps"]["phantoms"]["status"] == "ran"
    assert os.path.getmtime(phantom) > before
    assert not (out / "nnUNet_results").exists() and not (out / "report").exists()
