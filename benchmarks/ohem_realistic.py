"""OHEM-EMA at nnU-Net's real sizes: plans from nnU-Net's own planners, nnU-Net's loader and augmentation.

Used by ``benchmarks/ohem_step.py --realistic`` (see there for the command line). Builds, in a temporary nnU-Net
tree and without real data:

* an MSSEG-II-like dataset fingerprint (2 FLAIR channels, ~1 mm isotropic, brain volumes around 180×220×180,
  40 cases) and the plans nnU-Net's ``ExperimentPlanner`` (``nnUNetPlans``) and ``nnUNetPlannerResEncM``
  (``nnUNetResEncUNetMPlans``) make from it, i.e. the 3d_fullres patch size, batch size and network a user
  gets for such a dataset;
* a few synthetic preprocessed cases of that shape in nnU-Net's preprocessed format (blosc2 ``.b2nd`` with the
  chunking nnU-Net's preprocessor chooses for the plan's patch, ``.pkl`` properties with the foreground class
  locations nnU-Net samples), so nnU-Net's own dataset class and ``nnUNetDataLoader`` read them.

Measurements (one process, nnU-Net's multi-process loaders with ``nnUNet_n_proc_DA`` workers):

* ``loader``: data-pipeline seconds per optimiser step (wall, and CPU seconds summed over the main process and
  every worker process) for plain nnU-Net (one batch of B augmented patches), OHEM-EMA with augmented
  candidates (one batch of B̄ augmented patches) and OHEM-EMA with candidate crops (B̄ un-augmented crops + the
  B winners augmented by nnU-Net's transforms in worker processes);
* ``scoring``: the miner's scoring of B̄ candidates per scoring option, and its selection recall against exact
  scoring on the same candidates (a freshly initialised network: recall here only says whether an option
  ranks like the exact scoring on these candidates; the training-run recall is measured on the tiny plans);
* ``step``: full training steps (plain vs OHEM-EMA), a few at the realistic patch size.
"""
import contextlib
import copy
import json
import os
import statistics
import sys
import time
from typing import Dict, List, Optional

import numpy as np

DATASET_ID = 948
DATASET_NAME = f"Dataset{DATASET_ID:03d}_MSSEG2like"
PLANNERS = {"nnUNetPlans": "ExperimentPlanner", "nnUNetResEncUNetMPlans": "nnUNetPlannerResEncM"}


# ---------------------------------------------------------------------------------------------- plans
def msseg2_like_fingerprint(n_cases: int = 40, seed: int = 0, shape=(180, 220, 180)) -> dict:
    """A dataset_fingerprint.json for 1 mm isotropic 2-channel FLAIR brain volumes of ~180×220×180 voxels
    (± 7 %; ``shape`` changes the centre, e.g. for a fast dry run)."""
    rng = np.random.default_rng(seed)
    spacings = [[float(s) for s in rng.uniform(0.95, 1.05, 3).round(4)] for _ in range(n_cases)]
    shapes = [[int(round(s * f)) for s, f in zip(shape, rng.uniform(0.93, 1.07, 3))] for _ in range(n_cases)]
    flair = {"max": 1800.0, "mean": 620.0, "median": 600.0, "min": 0.0, "percentile_00_5": 120.0,
             "percentile_99_5": 1400.0, "std": 180.0}
    return {"spacings": spacings, "shapes_after_crop": shapes, "median_relative_size_after_cropping": 1.0,
            "foreground_intensity_properties_per_channel": {"0": dict(flair), "1": dict(flair)}}


def msseg2_like_plans(root: str, shape=(180, 220, 180)) -> Dict[str, dict]:
    """Write raw dataset.json + one dummy image and the fingerprint under ``root`` (nnU-Net env vars set to it)
    and run nnU-Net's two planners; returns ``{plans_name: {"plans": dict, "planner": name}}``."""
    import SimpleITK as sitk
    raw, pre = os.path.join(root, "raw"), os.path.join(root, "preprocessed")
    os.environ.update(nnUNet_raw=raw, nnUNet_preprocessed=pre)
    os.environ.setdefault("nnUNet_results", os.path.join(root, "results"))
    for sub in ("imagesTr", "labelsTr"):
        os.makedirs(os.path.join(raw, DATASET_NAME, sub), exist_ok=True)
    os.makedirs(os.path.join(pre, DATASET_NAME), exist_ok=True)
    # the planners open one image to choose the reader/writer; the geometry comes from the fingerprint
    img = sitk.GetImageFromArray(np.zeros((4, 4, 4), np.float32))
    for ch in (0, 1):
        sitk.WriteImage(img, os.path.join(raw, DATASET_NAME, "imagesTr", f"case_000_{ch:04d}.nii.gz"))
    sitk.WriteImage(sitk.Cast(img, sitk.sitkUInt8), os.path.join(raw, DATASET_NAME, "labelsTr", "case_000.nii.gz"))
    dataset_json = {"channel_names": {"0": "FLAIR_time01", "1": "FLAIR_time02"},
                    "labels": {"background": 0, "new_lesion": 1}, "numTraining": 1, "file_ending": ".nii.gz"}
    with open(os.path.join(raw, DATASET_NAME, "dataset.json"), "w") as f:
        json.dump(dataset_json, f)
    with open(os.path.join(pre, DATASET_NAME, "dataset.json"), "w") as f:
        json.dump(dataset_json, f)
    with open(os.path.join(pre, DATASET_NAME, "dataset_fingerprint.json"), "w") as f:
        json.dump(msseg2_like_fingerprint(shape=shape), f)
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    from nnunetv2.experiment_planning.experiment_planners.residual_unets.residual_encoder_unet_planners import \
        nnUNetPlannerResEncM
    out = {}
    for planner_cls in (ExperimentPlanner, nnUNetPlannerResEncM):
        with contextlib.redirect_stdout(sys.stderr):  # stdout is for the JSON lines
            planner = planner_cls(DATASET_NAME)
            planner.plan_experiment()
        with open(os.path.join(pre, DATASET_NAME, planner.plans_identifier + ".json")) as f:
            out[planner.plans_identifier] = {"plans": json.load(f), "planner": planner_cls.__name__}
    return out


def plans_summary(name: str, entry: dict, configuration: str = "3d_fullres") -> dict:
    c = entry["plans"]["configurations"][configuration]
    kw = c["architecture"]["arch_kwargs"]
    return {"benchmark": "ohem_realistic_plans", "plans": name, "planner": entry["planner"],
            "configuration": configuration, "patch": c["patch_size"], "B": c["batch_size"],
            "spacing": c["spacing"], "median_shape": c["median_image_size_in_voxels"],
            "network": c["architecture"]["network_class_name"].rsplit(".", 1)[-1],
            "features_per_stage": kw["features_per_stage"], "n_stages": kw["n_stages"],
            "strides": kw["strides"]}


# ---------------------------------------------------------------------------------------------- data
def smooth_volume(rng, shape, base=8) -> np.ndarray:
    """A brain-ish smooth random field (low-resolution noise upsampled, plus voxel noise), float32."""
    from scipy.ndimage import zoom
    low = rng.standard_normal([max(2, s // base) for s in shape]).astype(np.float32)
    vol = zoom(low, [s / l for s, l in zip(shape, low.shape)], order=1)[tuple(slice(0, s) for s in shape)]
    return (vol + 0.2 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)


_WRITTEN: Dict[tuple, str] = {}


def write_preprocessed_cases(plans: dict, configuration: str, n_cases: int = 3, shape=None, seed: int = 0,
                             lesions_per_case: int = 20) -> str:
    """Synthetic preprocessed cases (2 channels, z-scored smooth fields; ~20 small lesions each) saved with
    nnU-Net's ``nnUNetDatasetBlosc2.save_case`` and the chunking its preprocessor computes for this patch size.
    ``shape`` defaults to the plan's median image size (in nnU-Net's transposed axis order, as preprocessed
    data are). Returns the data folder (``preprocessed/<dataset>/<data_identifier>``); existing cases are kept."""
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params, nnUNetDatasetBlosc2

    conf = plans["configurations"][configuration]
    shape = tuple(int(round(x)) for x in (shape or conf["median_image_size_in_voxels"]))
    folder = os.path.join(str(nnUNet_preprocessed), plans["dataset_name"], conf["data_identifier"])
    # plans with the same spacing, patch and case shape (nnUNetPlans and ResEncM here) share the same data
    same = (tuple(conf["spacing"]), tuple(conf["patch_size"]), shape, n_cases, seed)
    if same in _WRITTEN and not os.path.exists(folder):
        os.symlink(_WRITTEN[same], folder)
        return folder
    _WRITTEN[same] = folder
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n_cases):
        out = os.path.join(folder, f"case_{i:03d}")
        if os.path.isfile(out + ".pkl"):
            continue
        data = np.stack([smooth_volume(rng, shape) for _ in range(2)])
        seg = np.zeros((1, *shape), np.int8)
        for _ in range(lesions_per_case):
            c = [int(rng.integers(min(20, s // 4), s - min(20, s // 4))) for s in shape]
            r = int(rng.integers(1, 4))
            seg[(0, *[slice(x - r, x + r + 1) for x in c])] = 1
            data[1][tuple(slice(x - r, x + r + 1) for x in c)] += 2.0  # new lesions bright at time 2
        props = {"spacing": conf["spacing"], "shape_before_cropping": list(shape),
                 "bbox_used_for_cropping": [[0, s] for s in shape], "shape_after_cropping_and_before_resampling":
                     list(shape), "class_locations": DefaultPreprocessor._sample_foreground_locations(seg, [1])}
        blocks, chunks = comp_blosc2_params(data.shape, tuple(conf["patch_size"]), data.itemsize)
        blocks_s, chunks_s = comp_blosc2_params(seg.shape, tuple(conf["patch_size"]), seg.itemsize)
        nnUNetDatasetBlosc2.save_case(data, seg, props, out, chunks=chunks, blocks=blocks, chunks_seg=chunks_s,
                                      blocks_seg=blocks_s)
    return folder


# ---------------------------------------------------------------------------------------------- CPU time
def _descendants(pid: int) -> List[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                with open(f"/proc/{p}/task/{t}/children") as f:
                    kids = [int(x) for x in f.read().split()]
            except OSError:
                kids = []
            out.extend(kids)
            todo.extend(kids)
    return out


def _cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


class CpuMeter:
    """CPU seconds of this process plus all its (living) descendants, e.g. nnU-Net's loader workers."""

    def __init__(self):
        self.pid = os.getpid()

    def read(self) -> float:
        return sum(_cpu_seconds(p) for p in [self.pid, *_descendants(self.pid)])


# ---------------------------------------------------------------------------------------------- trainers
#: every optimiser step mines, and all B trained patches are the hardest (the benchmarks measure mining steps;
#: the trainers' default schedule starts with plain nnU-Net steps and mixes in random candidates)
MINE_EVERY_STEP = {"ohem_warmup_fraction": 0.0, "ohem_end_fraction": 1.0, "ohem_hard_fraction": 1.0}


def mining_attrs(cls) -> dict:
    return {k: v for k, v in MINE_EVERY_STEP.items() if hasattr(cls, k)}


def make_trainer(cls, plans: dict, configuration: str, device: str, attrs: Optional[dict] = None,
                 start: bool = True):
    import torch
    from nnunetv2.paths import nnUNet_preprocessed
    plans = copy.deepcopy(plans)
    plans["continue_training"] = False
    with open(os.path.join(str(nnUNet_preprocessed), plans["dataset_name"], "dataset.json")) as f:
        dj = json.load(f)
    if attrs is not None:
        cls = type(cls.__name__, (cls,), {**mining_attrs(cls), **attrs})
    with contextlib.redirect_stdout(sys.stderr):
        tr = cls(plans, configuration, "all", dj, torch.device(device))
        if start:
            tr.on_train_start()
            tr.on_train_epoch_start()
        else:
            tr.initialize()
    return tr


def finish(tr) -> None:
    for dl in (getattr(tr, "dataloader_train", None), getattr(tr, "dataloader_val", None)):
        if dl is not None and hasattr(dl, "_finish"):
            with contextlib.suppress(Exception):
                dl._finish()
    wa = getattr(tr, "winner_augmenter", None)
    if wa is not None:
        with contextlib.suppress(Exception):
            wa.close()


def median(xs):
    return statistics.median(xs) if xs else None


# ---------------------------------------------------------------------------------------------- measurements
#: scoring options measured (name → ScoringOptions kwargs); "exact" is the reference of the selection recall
SCORING_OPTIONS = {
    "exact": dict(downsample=1, dtype="fp32", deep_supervision=True, channels_last=False),
    "ds2": dict(downsample=2, dtype="fp32", deep_supervision=True, channels_last=False),
    "bf16": dict(downsample=1, dtype="bf16", deep_supervision=True, channels_last=False),
    "no_ds_heads": dict(downsample=1, dtype="fp32", deep_supervision=False, channels_last=False),
    "channels_last": dict(downsample=1, dtype="fp32", deep_supervision=True, channels_last=True),
    "ds2_bf16": dict(downsample=2, dtype="bf16", deep_supervision=True, channels_last=False),
    "fp16": dict(downsample=1, dtype="fp16", deep_supervision=True, channels_last=False),
    "ds2_fp16": dict(downsample=2, dtype="fp16", deep_supervision=True, channels_last=False),
}
CPU_OPTIONS = ("exact", "ds2", "bf16", "no_ds_heads", "channels_last", "ds2_bf16")
CUDA_OPTIONS = ("exact", "ds2", "bf16", "fp16", "no_ds_heads", "channels_last", "ds2_bf16", "ds2_fp16")


def scoring_options(name: str):
    from nnunetv2_ohem.training.ohem import ScoringOptions
    return ScoringOptions(**SCORING_OPTIONS[name])


def class_attrs_for(name: str) -> dict:
    o = SCORING_OPTIONS[name]
    return {"ohem_score_downsample": o["downsample"], "ohem_score_dtype": o["dtype"],
            "ohem_score_deep_supervision": o["deep_supervision"], "ohem_score_channels_last": o["channels_last"]}


def loader_step_fn(tr, mode: str):
    """One optimiser step's worth of data pipeline: plain = next(loader); augmented = next(candidate loader);
    crops = next(candidate loader) + the trainer's winner augmentation of B candidates (the first B: which
    ones does not change the cost)."""
    if mode == "crops":
        def step():
            b = next(tr.dataloader_train)
            picks = list(range(tr.batch_size))
            return tr.winner_augmenter([b["keys"][i] for i in picks], [b["bboxes"][i] for i in picks])
        return step
    return lambda: next(tr.dataloader_train)


def measure_loaders(steps: Dict[str, callable], n: int, warmup: int, repeats: int) -> Dict[str, dict]:
    """Per step: wall seconds and CPU seconds (this process + every worker process), median over ``repeats``
    rounds. Each round first drains ``warmup`` steps (at least what nnU-Net's augmenter can hold prefetched: its
    worker queue and its results queue of ``num_cached`` batches each, plus one batch per worker), so the ``n``
    measured steps are produced while measured."""
    meter = CpuMeter()
    res = {k: {"wall": [], "cpu": []} for k in steps}
    for _ in range(repeats):
        for k, fn in steps.items():
            for _ in range(warmup):
                fn()
            c0, t0 = meter.read(), time.perf_counter()
            for _ in range(n):
                fn()
            res[k]["wall"].append((time.perf_counter() - t0) / n)
            res[k]["cpu"].append((meter.read() - c0) / n)
    return {k: {"wall_s": median(v["wall"]), "cpu_s": median(v["cpu"])} for k, v in res.items()}


def time_scoring(tr, data, target, names, repeats: int, sync) -> Dict[str, dict]:
    """Seconds of ``tr.score_candidates`` per option (median of ``repeats``, interleaved) and the option's
    top-B selection recall against exact scoring of the same candidates."""
    import torch
    from nnunetv2_ohem.mining.selection import select_top_b, selection_recall
    times = {k: [] for k in names}
    errors = {}
    cl = tr._channels_last_format()

    def run(name):
        opts = scoring_options(name)
        if opts.channels_last:
            tr.miner.to(memory_format=cl)
        try:
            sync()
            t0 = time.perf_counter()
            e = tr.score_candidates(data, target, opts)
            sync()
            return time.perf_counter() - t0, e
        finally:
            if opts.channels_last:
                tr.miner.to(memory_format=torch.contiguous_format)

    for r in range(repeats):
        for name in names:
            dt, e = run(name)
            times[name].append(dt)
            errors[name] = e.float().cpu()
    b = min(tr.batch_size, data.shape[0])
    ref = select_top_b(errors["exact"], b).tolist() if "exact" in errors else None
    out = {}
    for name in names:
        rec = selection_recall(select_top_b(errors[name], b).tolist(), ref) if ref is not None and \
            data.shape[0] > b else None
        out[name] = {"s": median(times[name]), "recall_same_candidates": rec}
    return out
