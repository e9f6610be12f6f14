"""One shared, validated, atomic writer for nnU-Net raw datasets: the dataset description converters fill
in (:class:`DatasetSpec`), the writer (:func:`write_dataset`) and its summary. Reading and checking single
NIfTI files (headers, truncation, NaN/Inf, integer labels) is :mod:`nnunetv2_ohem.dataset_conversion.nifti`,
shared with the evaluator's reader.

Every converter (``msseg2``, ``valdo``, ``brats``, ``acdc``) only *discovers* its cases and describes its
dataset in a :class:`DatasetSpec`; :func:`write_dataset` does everything else the same way for all of them:

* every case is read and checked before its files are written (readable 3D NIfTI, one component, no NaN/Inf,
  all channels and the label on the same grid within :data:`GEOMETRY_TOLERANCE`, integer non-negative known
  label values); the first failure stops the run with a one-line :class:`ConversionError` naming the file;
* all output goes to a hidden temporary sibling folder (``.DatasetXXX_NAME.tmp-*``, invisible to nnU-Net's
  ``Dataset%03d`` lookups) that is renamed onto the target at the very end and removed on any failure, so
  the target is either complete or absent (Ctrl-C and SIGTERM included; a later run removes temporary
  folders of dead runs, see :mod:`nnunetv2_ohem.atomic`); folders and files get the modes a plain
  ``mkdir``/``open`` gives under the umask; ``overwrite`` replaces only a dataset whose ``dataset.json`` says
  this converter wrote it (``"converted_by": "nnunetv2_ohem_convert <challenge>"``), and only after the new
  one is complete;
* source files are only ever read (plain byte copies, never links, so editing the output cannot touch the
  source);
* images that already are ``.nii.gz`` on the reference grid are copied byte for byte instead of being
  re-encoded (gzip encoding dominates the cost); labels are copied only when they need no remapping and
  already are ``uint8`` on the reference grid; everything else is written with SimpleITK, geometry copied
  from the first channel, labels as ``uint8``.
"""
from __future__ import annotations

import multiprocessing
import os
import re
import shutil
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk

from nnunetv2_ohem.atomic import AtomicFolder
from nnunetv2_ohem.cli_common import ignore_sigint
from nnunetv2_ohem.dataset_conversion import nifti
from nnunetv2_ohem.dataset_conversion.nifti import NIFTI_ENDINGS

FILE_ENDING = ".nii.gz"
#: Channels and labels may disagree by this much and still count as one grid: spacing relative, origin in
#: units of the largest voxel edge, direction cosines absolute. Within it, outputs get the first channel's
#: geometry; beyond it the case is rejected.
GEOMETRY_TOLERANCE = 1e-3


class ConversionError(Exception):
    """Bad input or unusable target; the message is one line and names the offending file or folder."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


# ----------------------------------------------------------------------------------------------- pure parts

@dataclass(frozen=True)
class Geometry:
    """Grid of an image in ITK (x, y, z) order."""
    size: Tuple[int, ...]
    spacing: Tuple[float, ...]
    origin: Tuple[float, ...]
    direction: Tuple[float, ...]

    @classmethod
    def of(cls, image: sitk.Image) -> "Geometry":
        return cls(tuple(image.GetSize()), tuple(image.GetSpacing()), tuple(image.GetOrigin()),
                   tuple(image.GetDirection()))


def geometry_mismatch(reference: Geometry, other: Geometry, tol: float = GEOMETRY_TOLERANCE) -> Optional[str]:
    """Why ``other`` is not on ``reference``'s grid, or ``None`` when it is (within ``tol``).

    Shape must match exactly; spacing may differ by ``tol`` relative, origin by ``tol`` × the largest voxel
    edge (mm), direction cosines by ``tol`` absolute. These are the checks nnU-Net's
    ``verify_dataset_integrity`` makes (there as errors for shape/spacing and warnings for origin/direction),
    with a tolerance for float rounding in headers.
    """
    if len(reference.size) != len(other.size):
        return f"dimension {len(other.size)} != {len(reference.size)}"
    if reference.size != other.size:
        return f"shape {other.size} != {reference.size}"
    ref_sp, sp = np.asarray(reference.spacing), np.asarray(other.spacing)
    if np.any(np.abs(ref_sp - sp) > tol * np.abs(ref_sp)):
        return f"spacing {tuple(np.round(sp, 6))} != {tuple(np.round(ref_sp, 6))}"
    if np.any(np.abs(np.asarray(reference.origin) - np.asarray(other.origin)) > tol * ref_sp.max()):
        return f"origin {tuple(np.round(other.origin, 4))} != {tuple(np.round(reference.origin, 4))}"
    if np.any(np.abs(np.asarray(reference.direction) - np.asarray(other.direction)) > tol):
        return f"direction {tuple(np.round(other.direction, 4))} != {tuple(np.round(reference.direction, 4))}"
    return None


def label_values(labels: np.ndarray) -> np.ndarray:
    """Sorted distinct values of a label array as int64, after checking they are integers ≥ 0.

    Integer arrays use one ``bincount`` (O(voxels), no sort) when their range is small; float arrays must hold
    whole numbers only (NIfTI masks are often stored as float). Raises ``ValueError`` with the reason.
    """
    flat = np.asarray(labels).ravel()
    if flat.size == 0:
        return np.zeros(0, np.int64)
    if flat.dtype.kind == "f":
        problem = nifti.integer_problem(flat)
        if problem:
            raise ValueError(problem)
        flat = flat.astype(np.int64)
    elif flat.dtype.kind == "b":
        flat = flat.astype(np.uint8)
    elif flat.dtype.kind not in "iu":
        raise ValueError(f"unsupported label dtype {flat.dtype}")
    low, high = int(flat.min()), int(flat.max())
    if low < 0:
        raise ValueError(f"negative values (e.g. {low})")
    if high < 1 << 16:
        return np.flatnonzero(np.bincount(flat, minlength=high + 1)).astype(np.int64)
    return np.unique(flat).astype(np.int64)


def remap_labels(labels: np.ndarray, mapping: Mapping[int, int]) -> np.ndarray:
    """Map source label values to nnU-Net values with a lookup table: ``out[v] = mapping[labels[v]]``.

    ``mapping`` lists every allowed source value (e.g. BraTS 2020/21 → nnU-Net, as nnU-Net's
    ``Dataset137_BraTS21.py``: {0: 0, 2: 1, 1: 2, 4: 3}). Values outside it, negative or non-integer values
    raise ``ValueError`` naming them. Output is ``uint8`` with ``labels``' shape.
    """
    if not mapping:
        raise ValueError("empty label mapping")
    if min(mapping) < 0 or not all(0 <= v <= 255 for v in mapping.values()):
        raise ValueError(f"label mapping must go from values >= 0 to 0..255, got {dict(mapping)}")
    present = label_values(labels)
    unknown = [int(v) for v in present if int(v) not in mapping]
    if unknown:
        raise ValueError(f"unknown label values {unknown} (expected {sorted(mapping)})")
    lut = np.zeros(max(mapping) + 1, np.uint8)
    for src, dst in mapping.items():
        lut[src] = dst
    arr = np.asarray(labels)
    index = arr if arr.dtype.kind in "iu" else arr.astype(np.int64)
    return lut[index]


def invert_mapping(mapping: Mapping[int, int]) -> Dict[int, int]:
    """Inverse of a one-to-one label mapping (raises ``ValueError`` when two sources share a target)."""
    inverse = {dst: src for src, dst in mapping.items()}
    if len(inverse) != len(mapping):
        raise ValueError(f"label mapping {dict(mapping)} is not one-to-one")
    return inverse


# ------------------------------------------------------------------------------------- dataset description

@dataclass(frozen=True)
class Case:
    """One output case: ``images`` in channel order; ``label`` is ``None`` for unlabelled cases.

    ``test`` cases go to ``imagesTs`` (their label, if any, to ``labelsTs``, which nnU-Net ignores but the
    evaluation tools use).
    """
    identifier: str
    images: Tuple[str, ...]
    label: Optional[str] = None
    test: bool = False


@dataclass
class DatasetSpec:
    """What a converter found and how the dataset is described; :func:`write_dataset` does the rest."""
    command: str                      # converter name, e.g. "msseg2"
    source_dir: str
    default_name: str                 # e.g. "MSSEG2" -> DatasetXXX_MSSEG2
    channel_names: Dict[int, str]
    labels: Dict[str, Union[int, Tuple[int, ...]]]
    label_map: Dict[int, int]         # source value -> nnU-Net value; keys are the allowed source values
    cases: List[Case]
    description: str
    reference: str
    licence: str
    regions_class_order: Optional[Tuple[int, ...]] = None
    skipped: List[Tuple[str, str]] = field(default_factory=list)   # (path, reason)
    notes: List[str] = field(default_factory=list)                 # things handled that a user should know
    value_names: Optional[Dict[int, str]] = None   # names of nnU-Net label values for the summary (regions)


@dataclass
class CaseReport:
    identifier: str
    test: bool
    label_voxels: Optional[Dict[int, int]]   # nnU-Net label value -> voxel count; None when unlabelled
    copied: int
    encoded: int


# ---------------------------------------------------------------------------------------- source scanning

def check_source_dir(source_dir: str) -> str:
    """Absolute path of an existing, non-empty folder, else :class:`ConversionError`."""
    path = os.path.abspath(os.path.expanduser(str(source_dir)))
    if not os.path.exists(path):
        raise ConversionError(f"{path}: source folder does not exist")
    if not os.path.isdir(path):
        raise ConversionError(f"{path}: source is not a folder")
    if not any(not n.startswith(".") for n in os.listdir(path)):
        raise ConversionError(f"{path}: source folder is empty")
    return path


def visible_entries(folder: str) -> List[str]:
    """Sorted names in ``folder`` without hidden ones (``.DS_Store``, editors' and our own temporary files)."""
    return sorted(n for n in os.listdir(folder) if not n.startswith("."))


def strip_nifti(filename: str) -> Optional[str]:
    """``'a_t1.nii.gz'`` → ``'a_t1'``; ``None`` when not a NIfTI file name."""
    for ending in NIFTI_ENDINGS:
        if filename.endswith(ending) and len(filename) > len(ending):
            return filename[:-len(ending)]
    return None


def find_nifti(folder: str, stem: str) -> Optional[str]:
    """``folder/stem.nii.gz`` or ``folder/stem.nii``; both present is ambiguous and an error."""
    found = [os.path.join(folder, stem + e) for e in NIFTI_ENDINGS if os.path.isfile(os.path.join(folder, stem + e))]
    if len(found) > 1:
        raise ConversionError(f"{found[0]}: both .nii.gz and .nii versions exist, keep one")
    return found[0] if found else None


def scan_case_dirs(source: str, is_case: Callable[[str], bool], what: str
                   ) -> Tuple[List[Tuple[str, str]], List[Tuple[str, str]]]:
    """Case folders directly in ``source`` or one level down (``source/training/<case>``, ...).

    Returns ``[(case_dir, container_name)]`` (container ``""`` for direct children), sorted, and the
    visible entries that are neither, as ``(path, reason)`` for the summary.
    """
    cases, skipped = [], []
    for name in visible_entries(source):
        path = os.path.join(source, name)
        if os.path.isdir(path) and is_case(path):
            cases.append((path, ""))
        elif os.path.isdir(path):
            inner = [(os.path.join(path, n), name) for n in visible_entries(path)
                     if os.path.isdir(os.path.join(path, n)) and is_case(os.path.join(path, n))]
            if inner:
                cases.extend(inner)
                inner_paths = {p for p, _ in inner}
                skipped.extend((os.path.join(path, n), f"not a {what} case folder") for n in visible_entries(path)
                               if os.path.join(path, n) not in inner_paths)
            else:
                skipped.append((path, f"not a {what} case folder"))
        else:
            skipped.append((path, f"not a {what} case folder"))
    return cases, skipped


# ---------------------------------------------------------------------------------------- reading

def read_image(path: str, label: bool = False) -> sitk.Image:
    """Read a 3D single-component image with the shared validated reader
    (:func:`nnunetv2_ohem.dataset_conversion.nifti.read_image`), or raise :class:`ConversionError` naming
    ``path`` and the reason."""
    try:
        image = nifti.read_image(path, label=label)
    except nifti.NiftiError as e:
        raise ConversionError(str(e)) from None
    if image.GetDimension() != 3:
        raise ConversionError(f"{path}: image is {image.GetDimension()}D, expected 3D")
    return image


def _convert_case(case: Case, out_root: str, label_map: Dict[int, int], num_channels: int) -> CaseReport:
    """Validate one case completely, then write it under ``out_root`` (the temporary dataset folder)."""
    if len(case.images) != num_channels:
        raise ConversionError(f"{case.identifier}: {len(case.images)} channels, expected {num_channels}")
    images = [read_image(p) for p in case.images]
    reference = Geometry.of(images[0])
    for path, image in zip(case.images, images):
        why = geometry_mismatch(reference, Geometry.of(image))
        if why:
            raise ConversionError(f"{path}: channel grid differs from {os.path.basename(case.images[0])}: {why}")
    label_out, label_img, voxels = None, None, None
    if case.label is not None:
        label_img = read_image(case.label, label=True)
        why = geometry_mismatch(reference, Geometry.of(label_img))
        if why:
            raise ConversionError(f"{case.label}: label grid differs from image "
                                  f"{os.path.basename(case.images[0])}: {why}")
        try:
            label_out = remap_labels(sitk.GetArrayViewFromImage(label_img), label_map)
        except ValueError as e:
            raise ConversionError(f"{case.label}: {e}") from None
        counts = np.bincount(label_out.ravel(), minlength=max(label_map.values()) + 1)
        voxels = {int(v): int(c) for v, c in enumerate(counts)}

    # Everything is checked; now write. Byte copies where the file already is what nnU-Net would get.
    images_dir = os.path.join(out_root, "imagesTs" if case.test else "imagesTr")
    labels_dir = os.path.join(out_root, "labelsTs" if case.test else "labelsTr")
    copied = encoded = 0
    for channel, (path, image) in enumerate(zip(case.images, images)):
        target = os.path.join(images_dir, f"{case.identifier}_{channel:04d}{FILE_ENDING}")
        # exact equality, not the tolerance: a grid within the tolerance must get the first channel's geometry,
        # which a byte copy (keeping the file's own header) would not give it
        if path.endswith(FILE_ENDING) and Geometry.of(image) == reference:
            shutil.copyfile(path, target)
            copied += 1
        else:
            if channel:
                image = sitk.Image(image)
                image.CopyInformation(images[0])
            sitk.WriteImage(image, target, useCompression=True)
            encoded += 1
    if label_img is not None:
        target = os.path.join(labels_dir, case.identifier + FILE_ENDING)
        identity = all(k == v for k, v in label_map.items())
        if (identity and case.label.endswith(FILE_ENDING) and label_img.GetPixelID() == sitk.sitkUInt8
                and Geometry.of(label_img) == reference):
            shutil.copyfile(case.label, target)
            copied += 1
        else:
            out = sitk.GetImageFromArray(label_out)
            out.CopyInformation(images[0])
            sitk.WriteImage(out, target, useCompression=True)
            encoded += 1
    return CaseReport(case.identifier, case.test, voxels, copied, encoded)


def _convert_case_star(args) -> CaseReport:
    return _convert_case(*args)


# ------------------------------------------------------------------------------------------------ targets

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")


def resolve_raw_dir(raw_dir: Optional[str]) -> str:
    """``raw_dir`` or ``$nnUNet_raw`` (read now, not at import), else :class:`ConversionError`."""
    value = raw_dir if raw_dir else os.environ.get("nnUNet_raw")
    if not value:
        raise ConversionError("nnUNet_raw is not set and no output folder was given (set $nnUNet_raw or pass "
                              "-o RAW_DIR)")
    return os.path.abspath(os.path.expanduser(value))


def dataset_folder_name(dataset_id: int, name: str) -> str:
    if isinstance(dataset_id, bool) or not isinstance(dataset_id, (int, np.integer)) or not 1 <= dataset_id <= 999:
        raise ConversionError(f"dataset id must be an integer in 1..999, got {dataset_id!r}")
    if not _NAME_RE.match(name):
        raise ConversionError(f"dataset name {name!r} must be letters, digits, '_' or '-'")
    return f"Dataset{int(dataset_id):03d}_{name}"


def _id_clash(dataset_id: int, folder_name: str, roots: Iterable[str]) -> Optional[str]:
    prefix = f"Dataset{int(dataset_id):03d}_"
    for root in roots:
        if root and os.path.isdir(root):
            for n in os.listdir(root):
                if n.startswith(prefix) and n != folder_name and os.path.isdir(os.path.join(root, n)):
                    return os.path.join(root, n)
    return None


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def prepare_target(raw_dir: Optional[str], dataset_id: int, name: str, overwrite: bool,
                   source_dir: Optional[str] = None) -> Tuple[str, str]:
    """Checks on the target before any work: returns ``(raw_dir, target_folder)``.

    Errors: no raw dir; bad id/name; the id already used with another name (in the raw dir or in
    ``$nnUNet_preprocessed``/``$nnUNet_results``, where nnU-Net would later find two names for one id);
    target exists without ``overwrite``; target and source nested in each other.
    """
    raw = resolve_raw_dir(raw_dir)
    folder_name = dataset_folder_name(dataset_id, name)
    target = os.path.join(raw, folder_name)
    if os.path.exists(raw) and not os.path.isdir(raw):
        raise ConversionError(f"{raw}: output raw folder is not a folder")
    clash = _id_clash(dataset_id, folder_name, [raw, os.environ.get("nnUNet_preprocessed"),
                                                os.environ.get("nnUNet_results")])
    if clash:
        raise ConversionError(f"{clash}: dataset id {dataset_id} is already used by another name; pick another "
                              f"-d or remove it")
    if source_dir is not None and (_inside(target, source_dir) or _inside(source_dir, target)):
        raise ConversionError(f"{target}: output would be inside the source (or contain it) {source_dir}; the "
                              f"source is never modified, choose another output folder")
    if os.path.lexists(target) and not overwrite:
        raise ConversionError(f"{target}: target dataset already exists (use --overwrite to replace it)")
    if os.path.lexists(target):
        why = foreign_dataset(target)
        if why:
            raise ConversionError(f"{target}: --overwrite refused, {why}; remove it yourself or choose another -d")
    return raw, target


#: ``dataset.json`` key that marks a dataset written by this converter; only such a dataset is replaced by
#: ``--overwrite`` (nnU-Net ignores keys it does not know)
PROVENANCE_KEY = "converted_by"
PROVENANCE_PREFIX = "nnunetv2_ohem_convert "


def foreign_dataset(folder: str) -> Optional[str]:
    """Why ``folder`` is not a dataset this converter wrote (and must not be replaced), or ``None``."""
    import json

    if os.path.islink(folder) or not os.path.isdir(folder):
        return "it is not a folder written by nnunetv2_ohem_convert (a file or link)"
    path = os.path.join(folder, "dataset.json")
    try:
        with open(path) as f:
            value = json.load(f).get(PROVENANCE_KEY, "")
    except (OSError, ValueError, AttributeError):
        return "it has no readable dataset.json, so it was not written by nnunetv2_ohem_convert"
    if not str(value).startswith(PROVENANCE_PREFIX):
        return f"its dataset.json has no '{PROVENANCE_KEY}: {PROVENANCE_PREFIX}...' entry, so it was not " \
               f"written by this converter"
    return None


# ------------------------------------------------------------------------------------------------- writer

def _progress(iterable, total: int, desc: str, enabled: bool):
    from tqdm import tqdm
    return tqdm(iterable, total=total, desc=desc, unit="case", disable=not enabled, leave=False)


def write_dataset(spec: DatasetSpec, dataset_id: int, name: Optional[str] = None, raw_dir: Optional[str] = None,
                  overwrite: bool = False, num_processes: int = 1, verbose: bool = True,
                  progress: bool = False) -> str:
    """Validate and write ``spec`` as ``raw_dir/DatasetXXX_NAME`` atomically; returns that folder.

    Raises :class:`ConversionError` (one line, naming the file) on bad input; then nothing exists under the
    target (an existing target with ``overwrite`` is left as it was).
    """
    name = name or spec.default_name
    raw, target = prepare_target(raw_dir, dataset_id, name, overwrite, spec.source_dir)
    if not spec.cases:
        raise ConversionError(f"{spec.source_dir}: no {spec.command} cases found")
    ids = Counter(c.identifier for c in spec.cases)
    dup = [i for i, n in ids.items() if n > 1]
    if dup:
        raise ConversionError(f"{spec.source_dir}: case identifier {dup[0]} occurs {ids[dup[0]]} times")
    if not any(c.label is not None and not c.test for c in spec.cases):
        raise ConversionError(f"{spec.source_dir}: no labelled training case found")

    num_channels = len(spec.channel_names)
    reports: List[CaseReport] = []
    with AtomicFolder(target, overwrite) as tmp:
        for sub in ("imagesTr", "labelsTr"):
            os.makedirs(os.path.join(tmp, sub))
        if any(c.test for c in spec.cases):
            os.makedirs(os.path.join(tmp, "imagesTs"))
        if any(c.test and c.label for c in spec.cases):
            os.makedirs(os.path.join(tmp, "labelsTs"))
        jobs = [(case, tmp, spec.label_map, num_channels) for case in spec.cases]
        desc = f"{spec.command} -> {os.path.basename(target)}"
        if num_processes > 1 and len(jobs) > 1:
            # spawn, as nnU-Net does: forking a process that has ITK threads running can deadlock
            # workers ignore Ctrl-C: the main process stops them (the pool's exit terminates them) before the
            # temporary folder is removed, so no worker writes into it afterwards
            with multiprocessing.get_context("spawn").Pool(min(num_processes, len(jobs)), ignore_sigint) as pool:
                for r in _progress(pool.imap_unordered(_convert_case_star, jobs), len(jobs), desc, progress):
                    reports.append(r)
        else:
            for job in _progress(jobs, len(jobs), desc, progress):
                reports.append(_convert_case(*job))
        _write_dataset_json(spec, tmp, name, dataset_id, reports)
    if verbose:
        print(format_summary(spec, target, reports))
    return target


def _write_dataset_json(spec: DatasetSpec, folder: str, name: str, dataset_id: int,
                        reports: Sequence[CaseReport]) -> None:
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    extra = {}
    if spec.regions_class_order is not None:
        extra["regions_class_order"] = tuple(spec.regions_class_order)
    generate_dataset_json(
        folder, channel_names=dict(spec.channel_names), labels=dict(spec.labels),
        num_training_cases=sum(not r.test for r in reports), file_ending=FILE_ENDING,
        dataset_name=f"Dataset{int(dataset_id):03d}_{name}", description=spec.description,
        reference=spec.reference, license=spec.licence,
        **{PROVENANCE_KEY: f"{PROVENANCE_PREFIX}{spec.command}"}, numTest=sum(r.test for r in reports), **extra)


def _label_name(spec: DatasetSpec, value: int) -> str:
    if spec.value_names and value in spec.value_names:
        return spec.value_names[value]
    if spec.regions_class_order is None:
        for k, v in spec.labels.items():
            if v == value:
                return k
    return str(value)


def format_summary(spec: DatasetSpec, target: str, reports: Sequence[CaseReport]) -> str:
    """Cases, channels, per-label voxel/case counts, byte copies vs re-encodes, notes and skipped items."""
    train = [r for r in reports if not r.test]
    test = [r for r in reports if r.test]
    lines = [f"Wrote {target}",
             f"  cases: {len(train)} training (imagesTr/labelsTr), {len(test)} test (imagesTs"
             f"{', with labels in labelsTs' if any(r.label_voxels for r in test) else ''})",
             "  channels: " + ", ".join(f"{k:04d}={v}" for k, v in sorted(spec.channel_names.items()))]
    voxels: Dict[int, int] = defaultdict(int)
    cases_with: Dict[int, int] = defaultdict(int)
    for r in train:
        for v, n in (r.label_voxels or {}).items():
            voxels[v] += n
            cases_with[v] += n > 0
    lines.append("  labels (training): " + ", ".join(
        f"{v} {_label_name(spec, v)}: {voxels[v]} voxels in {cases_with[v]} cases" for v in sorted(voxels)))
    empty = sum(1 for r in train if not any(n for v, n in (r.label_voxels or {}).items() if v))
    lines.append(f"  foreground-free training cases (kept): {empty}")
    lines.append(f"  files: {sum(r.copied for r in reports)} copied byte for byte, "
                 f"{sum(r.encoded for r in reports)} re-encoded")
    for note in spec.notes:
        lines.append(f"  note: {note}")
    by_reason: Dict[str, List[str]] = defaultdict(list)
    for path, reason in spec.skipped:
        by_reason[reason].append(os.path.relpath(path, spec.source_dir))
    for reason, paths in sorted(by_reason.items()):
        more = f" (+{len(paths) - 3} more)" if len(paths) > 3 else ""
        lines.append(f"  skipped {len(paths)}: {reason}: {', '.join(paths[:3])}{more}")
    return "\n".join(lines)


def digits_or_name(text: str, width: int = 3) -> str:
    """``'13'`` → ``'013'``; other text is kept with characters nnU-Net file names dislike replaced."""
    if text.isdigit():
        return text.zfill(width)
    return re.sub(r"[^A-Za-z0-9\-]", "-", text)
