"""Candidates without k× augmentation: cheap un-augmented crops for the miner, nnU-Net's augmentation for the
winners only (candidate mode ``"crops"`` of :class:`~nnunetv2_ohem.training.ohem.nnUNetTrainerOHEMEMA`).

Pipeline per mining step (B̄ = k·B candidates, B winners):

1. nnU-Net's multi-process loader (:class:`CandidateCropLoader`, a ``nnUNetDataLoader``) draws B̄ boxes of
   nnU-Net's *initial* patch size (the size its ``SpatialTransform`` needs around a patch for rotation and
   scaling) with nnU-Net's box sampler and foreground forcing, and returns for each only its **centre crop of
   the final patch size** (the patch the spatial transform yields at identity) with nnU-Net's validation
   target transforms (label −1 → 0, regions, deep-supervision downsampling) plus the box itself. No spatial or
   intensity augmentation: the per-candidate CPU cost is a read and a crop.
2. The main process scores the B̄ centre crops with the miner and picks B.
3. :class:`WinnerAugmenter` re-crops each winner's initial-size box from the preprocessed case (the same
   deterministic crop the loader would have made) and runs the trainer's own ``get_training_transforms``
   (nnU-Net's full pipeline for this configuration and plans, deep-supervision targets included, plus
   whatever a subclass adds, e.g. instance maps) on it, in a pool of ``nnUNet_n_proc_DA`` worker processes
   (started from a fork server), one winner per worker, so B augmentations run in parallel and never in the
   main process.

Only the (key, box) identity of a winner crosses a process boundary on the way in and one augmented patch on
the way out; raw initial-size crops (≈2.5× a patch's voxels at 30° rotation) never do.
"""
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd
from threadpoolctl import threadpool_limits

from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader

Box = List[List[int]]


def centre_box(box: Box, size: Sequence[int]) -> Box:
    """The box of ``size`` centred in ``box`` (``[[lb, ub], ...]`` per axis): lower bound ``lb + (P0 − P)//2``."""
    return [[lb + ((ub - lb) - s) // 2, lb + ((ub - lb) - s) // 2 + s] for (lb, ub), s in zip(box, size)]


def crop_arrays(data, seg, seg_prev, box: Box, patch_size_was_2d: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Crop ``box`` from a loaded case exactly as ``nnUNetDataLoader.generate_train_batch`` does (image padded
    with 0, segmentation with −1 as int16, a cascade's previous stage appended, the pseudo-3D axis of 2D
    patches dropped)."""
    image = torch.from_numpy(crop_and_pad_nd(data, box, 0)).float()
    segmentation = torch.from_numpy(crop_and_pad_nd(seg, box, -1, cast_cropped_to=np.int16)).to(torch.int16)
    if seg_prev is not None:
        prev = torch.from_numpy(crop_and_pad_nd(seg_prev, box, -1, cast_cropped_to=np.int16)).to(torch.int16)
        segmentation = torch.cat((segmentation, prev[None]), dim=0)
    if patch_size_was_2d:
        image, segmentation = image[:, 0], segmentation[:, 0]
    return image, segmentation


def crop_case(dataset, key: str, box: Box, patch_size_was_2d: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Load case ``key`` from an nnU-Net dataset and :func:`crop_arrays` ``box``."""
    data, seg, seg_prev, _ = dataset.load_case(key)
    return crop_arrays(data, seg, seg_prev, box, patch_size_was_2d)


def collate(samples: Sequence[Tuple[torch.Tensor, object]]) -> dict:
    """Stack ``(image, segmentation or list of deep-supervision targets)`` samples into nnU-Net's batch layout."""
    data = torch.stack([s[0] for s in samples])
    segs = [s[1] for s in samples]
    target = [torch.stack(scale) for scale in zip(*segs)] if isinstance(segs[0], list) else torch.stack(segs)
    return {"data": data, "target": target}


def _transform(transforms, image: torch.Tensor, segmentation: torch.Tensor):
    if transforms is None:
        return image, segmentation
    out = transforms(**{"image": image, "segmentation": segmentation})
    return out["image"], out["segmentation"]


class CandidateCropLoader(nnUNetDataLoader):
    """nnU-Net's training loader, but each of the B̄ samples is the un-augmented centre crop (final patch size)
    of the initial-size box nnU-Net's sampler drew, passed through ``transforms`` (the validation transforms:
    target formatting only). The batch also carries ``bboxes`` (B̄ initial-size boxes) and ``keys``."""

    def generate_train_batch(self):
        keys = self.get_indices()
        samples, boxes = [], []
        with torch.no_grad(), threadpool_limits(limits=1, user_api=None):
            for j, key in enumerate(keys):
                data, seg, seg_prev, properties = self._data.load_case(key)
                lbs, ubs = self.get_bbox(data.shape[1:], self.get_do_oversample(j), properties["class_locations"])
                box = [[int(lb), int(ub)] for lb, ub in zip(lbs, ubs)]
                boxes.append(box)
                image, seg = crop_arrays(data, seg, seg_prev, centre_box(box, self.final_patch_size),
                                         self.patch_size_was_2d)
                samples.append(_transform(self.transforms, image, seg))
        batch = collate(samples)
        batch.update(keys=keys, bboxes=np.asarray(boxes, dtype=np.int64))
        return batch


_WORKER_STATE: Optional[tuple] = None


def _init_worker(dataset, transforms, patch_size_was_2d: bool) -> None:
    global _WORKER_STATE
    torch.set_num_threads(1)  # one sample per worker, like nnU-Net's loader workers
    _WORKER_STATE = (dataset, transforms, patch_size_was_2d)


def augment_winner(dataset, transforms, patch_size_was_2d: bool, key: str, box: Box):
    """Re-crop a winner's initial-size box and apply the training transforms: one sample of a plain nnU-Net
    batch, only the box was chosen by the miner instead of at random."""
    with torch.no_grad(), threadpool_limits(limits=1, user_api=None):
        image, seg = crop_case(dataset, key, box, patch_size_was_2d)
        return _transform(transforms, image, seg)


def _worker_context():
    """Workers come from a fork server (a fresh single-threaded process with torch and this module imported
    once): forking the trainer itself, which runs torch's thread pools and loader threads, can copy a held
    lock into the child and hang it (seen in tests). The dataset and transforms are pickled to each worker
    once (a few kB). Platforms without fork servers spawn."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])
        return context
    return multiprocessing.get_context("spawn")


def _augment_in_worker(key: str, box: Box):
    return augment_winner(*_WORKER_STATE, key, box)


class PendingWinners:
    """Winners being augmented: done samples (in-process) or one future per winner (worker pool)."""

    def __init__(self, samples: Optional[list] = None, futures: Optional[list] = None):
        self._samples, self._futures = samples, futures

    def result(self) -> dict:
        if self._samples is None:
            self._samples = [f.result() for f in self._futures]
        return collate(self._samples)


class WinnerAugmenter:
    """Applies the training transforms to the B winners, in parallel worker processes (``num_processes`` > 0,
    the pool starts at the first call) or in the calling process (0, as nnU-Net with ``nnUNet_n_proc_DA=0``)."""

    def __init__(self, dataset, transforms, patch_size_was_2d: bool, num_processes: int):
        self.dataset, self.transforms, self.patch_size_was_2d = dataset, transforms, patch_size_was_2d
        self.num_processes = int(num_processes)
        self._pool: Optional[ProcessPoolExecutor] = None

    def __call__(self, keys: Sequence[str], boxes: Sequence[Box]) -> dict:
        """The augmented winners as one nnU-Net batch (waits for them)."""
        return self.submit(keys, boxes).result()

    def submit(self, keys: Sequence[str], boxes: Sequence[Box]) -> "PendingWinners":
        """Start augmenting the winners; ``.result()`` of the returned handle waits and collates. In-process
        (``num_processes`` = 0) the work is done here, before returning."""
        boxes = [[[int(a), int(b)] for a, b in box] for box in boxes]
        if self.num_processes <= 0:
            return PendingWinners(samples=[augment_winner(self.dataset, self.transforms, self.patch_size_was_2d,
                                                          k, b) for k, b in zip(keys, boxes)])
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.num_processes, _worker_context(), initializer=_init_worker,
                                             initargs=(self.dataset, self.transforms, self.patch_size_was_2d))
        return PendingWinners(futures=[self._pool.submit(_augment_in_worker, k, b) for k, b in zip(keys, boxes)])

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
