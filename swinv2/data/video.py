"""Video clips for the video model: where clips are, how they are decoded, which frames are used.

* **Sources.** :class:`VideoFolder` reads ``ROOT/<class>/*.mp4|avi|webm|mkv|mov`` (one subfolder
  per class, sorted: the image folders' rule), so ``data/train`` and ``data/val`` of the usual
  layout are two sources. :class:`KineticsClips` reads a Kinetics annotation CSV and finds each
  clip under the names the Kinetics download scripts give them.
* **Decoding.** PyAV (FFmpeg bundled in the wheel, so no system FFmpeg is needed) decodes
  frames in order, without seeking, and stops at the last frame a clip uses. Where the container
  does not store a frame count (webm and mkv often do not), the whole stream is decoded once.
  A stream that ends before the count it claims (cut off between frames) is read with the
  frames it has; one whose data is damaged is unreadable.
* **Sampling.** ``clip_len`` frames ``interval`` apart: a random start in training, ``num_clips``
  evenly spread starts in testing (Video Swin: 32 frames, interval 2, 4 clips x 3 crops).
  A clip shorter than the ``(clip_len - 1) * interval + 1`` frames that span needs starts at
  frame 0 and its out-of-range indices wrap round (``loop``, mmaction2's default, which the Video
  Swin recipes train with: motion continues instead of freezing) or repeat the last frame
  (``repeat_last``).
* **Datasets.** :class:`VideoClipDataset` (one clip per item, training) and
  :class:`VideoViewsDataset` (every view of a clip, testing) take the loaders' ``(epoch, index)``
  keys and run sampling, decoding and the transform inside :func:`~swinv2.data.loader.seeded`
  with ``derive_seed("aug", seed, epoch, index)``: a clip is a pure function of those, whatever
  the worker count or resume point. A clip that cannot be decoded gives None and one warning
  naming the file; the loader's collate drops and counts it.
"""

from __future__ import annotations

import csv
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .datasets import MissingFolderError
from .images import is_regular_file
from .loader import TransformedDataset, build_loader, derive_seed, seeded

VIDEO_EXTENSIONS = (".mp4", ".avi", ".webm", ".mkv", ".mov")
OUT_OF_BOUND = ("loop", "repeat_last")
_KINETICS_COLUMNS = ("label", "youtube_id", "time_start", "time_end")


def require_av():
    """The ``av`` module, or a one-line ModuleNotFoundError naming the extra that installs it."""
    try:
        import av
    except ModuleNotFoundError:
        raise ModuleNotFoundError("decoding video needs PyAV: pip install 'swinv2[video]'", name="av") from None
    return av


# -- sources ------------------------------------------------------------------------------------


class VideoFolder(Dataset):
    """Clips in one subfolder per class: ``i -> (path, class index)``, with ``classes`` (sorted
    subfolder names), ``targets`` and ``samples``. Files with other extensions are ignored, as
    are entries that are no regular files (FIFOs and the like, which would block on opening);
    ``min_classes=2`` for a training folder."""

    def __init__(self, root: str | os.PathLike, *, min_classes: int = 1):
        root = Path(root)
        if not root.is_dir():
            raise MissingFolderError(f"video folder not found: {root}")
        classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
        if not classes:
            raise ValueError(f"{root} has no class subfolders: put each class's clips in their own subfolder, "
                             f"e.g. {root}/juggling/1.mp4")
        samples = []
        for target, name in enumerate(classes):
            for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
                dirnames.sort()
                for file in sorted(filenames):
                    path = os.path.join(dirpath, file)
                    if file.lower().endswith(VIDEO_EXTENSIONS) and is_regular_file(path):
                        samples.append((path, target))
        if not samples:
            raise ValueError(f"{root} holds no clips: none of its class subfolders {_names(classes)} has a file "
                             f"ending in {', '.join(VIDEO_EXTENSIONS)}")
        empty = sorted(set(classes) - {classes[t] for _, t in samples})
        if empty:
            raise ValueError(f"{root}: class subfolder(s) {_names(empty)} hold no clips; remove or fill them")
        if len(classes) < min_classes:
            raise ValueError(f"{root} has {len(classes)} class subfolder(s) ({_names(classes)}): training a "
                             f"classifier needs at least {min_classes}")
        self.root, self.classes, self.samples = root, classes, samples
        self.targets = [t for _, t in samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[str, int]:
        return self.samples[i]


class KineticsClips(Dataset):
    """The clips of a Kinetics annotation CSV (columns label, youtube_id, time_start, time_end,
    and optionally split) that exist under ``root``: ``i -> (path, class index)``.

    Clip ``<youtube_id>_<start:06d>_<end:06d>.mp4`` (the download scripts' name) is looked for in
    ``root/<split>/<label>/``, ``root/<split>/`` (flat archives), then ``root/<label>/`` and
    ``root/``, with the label as written and with spaces as underscores; ``<split>`` is the row's
    split column when there is one. Deleted or private videos make every Kinetics copy incomplete,
    so missing clips are counted (``missing``) and reported in one warning; only a CSV of which no
    clip exists is an error. ``classes``: every label of the CSV, sorted, unless given (pass the
    training set's to a validation CSV so indices agree); ``split`` keeps only the rows of one split.
    """

    def __init__(self, csv_file: str | os.PathLike, root: str | os.PathLike, *, split: str | None = None,
                 classes: Sequence[str] | None = None):
        csv_file, root = Path(csv_file), Path(root)
        if not root.is_dir():
            raise MissingFolderError(f"Kinetics video folder not found: {root}")
        rows = _read_kinetics_csv(csv_file)
        if split is not None:
            rows = [r for r in rows if r.get("split") == split]
            if not rows:
                raise ValueError(f"{csv_file} has no row whose split is {split!r}")
        self.classes = sorted({r["label"] for r in rows}) if classes is None else list(classes)
        index = {c: k for k, c in enumerate(self.classes)}
        samples, missing, listings = [], [], {}
        for row in rows:
            line = row["line"]
            if row["label"] not in index:
                raise ValueError(f"{csv_file} line {line}: label {row['label']!r} is not one of the given classes")
            try:
                start, end = int(float(row["time_start"])), int(float(row["time_end"]))
            except ValueError:
                raise ValueError(f"{csv_file} line {line}: time_start/time_end must be numbers, got "
                                 f"{row['time_start']!r}, {row['time_end']!r}") from None
            name = f"{row['youtube_id']}_{start:06d}_{end:06d}.mp4"
            found = next((p for p in _kinetics_places(root, row, name) if _listed(p, listings)), None)
            if found is None:
                missing.append(root / row.get("split", "") / row["label"] / name)
            else:
                samples.append((os.fspath(found), index[row["label"]]))
        if not samples:
            raise ValueError(f"none of the {len(rows)} clips listed in {csv_file} is under {root} (first looked for "
                             f"as {missing[0]})")
        if missing:
            warnings.warn(f"{len(missing)} of the {len(rows)} clips listed in {csv_file} are not under {root} and are "
                          f"left out (e.g. {missing[0]})", stacklevel=2)
        self.root, self.csv_file, self.samples, self.missing = root, csv_file, samples, len(missing)
        self.targets = [t for _, t in samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[str, int]:
        return self.samples[i]


def _read_kinetics_csv(csv_file: Path) -> list[dict]:
    """The rows as dicts of stripped strings, each with its ``line`` number for messages."""
    try:
        with open(csv_file, newline="") as f:
            reader = csv.DictReader(f)
            rows = [{**{k.strip(): (v or "").strip() for k, v in row.items() if k is not None}, "line": reader.line_num}
                    for row in reader]
            header = [h.strip() for h in reader.fieldnames or ()]
    except FileNotFoundError:
        raise FileNotFoundError(f"Kinetics annotation file not found: {csv_file}") from None
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ValueError(f"cannot read Kinetics annotation file {csv_file}: {err}") from None
    absent = [c for c in _KINETICS_COLUMNS if c not in header]
    if absent:
        raise ValueError(f"{csv_file} lacks the column(s) {', '.join(absent)} (has: {', '.join(header) or 'none'})")
    if not rows:
        raise ValueError(f"{csv_file} lists no clips")
    return rows


def _kinetics_places(root: Path, row: dict, name: str) -> list[Path]:
    labels = dict.fromkeys([row["label"], row["label"].replace(" ", "_")])  # as written, then as folder names
    bases = [root / row["split"], root] if row.get("split") else [root]
    return [p for base in bases for p in [*(base / label / name for label in labels), base / name]]


def _listed(path: Path, listings: dict[Path, frozenset[str]]) -> bool:
    """Whether ``path`` is a regular file, from one listing per folder: a few hundred thousand
    rows then cost a few thousand directory reads instead of a stat for every place tried."""
    folder = path.parent
    if folder not in listings:
        try:
            listings[folder] = frozenset(os.listdir(folder))
        except OSError:  # missing, or not a folder
            listings[folder] = frozenset()
    return path.name in listings[folder] and is_regular_file(path)


def _names(classes: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(repr(c) for c in classes[:limit])
    return f"[{shown}{', ...' if len(classes) > limit else ''}] ({len(classes)})"


# -- decoding -----------------------------------------------------------------------------------


def frame_count(path: str | os.PathLike) -> int:
    """The number of frames the container says the first video stream has; 0 when it does not say."""
    av = require_av()
    with av.open(os.fspath(path)) as container:
        return int(_video_stream(container, path).frames or 0)


def read_clip(path: str | os.PathLike, choose: Callable[[int], Sequence[int]]) -> np.ndarray:
    """The frames ``choose(num_frames)`` picks, uint8 RGB (len(indices), H, W, 3).

    ``choose`` gets the clip's frame count and returns indices in ``[0, num_frames)``. Where the
    container stores the count, frames are decoded in order up to the last index only; else the
    whole stream is decoded first to count them. A stored count that turns out too high (a
    file cut off between frames) is replaced by the number actually decoded, and ``choose`` is called again.
    Raises for a clip that cannot be decoded or has no frame.
    """
    av = require_av()
    with av.open(os.fspath(path)) as container:
        stream = _video_stream(container, path)
        claimed = int(stream.frames or 0)
        indices = _checked(choose(claimed), claimed, path) if claimed > 0 else None
        frames, decoded = _decode(container, stream, indices)
    if indices is not None and decoded > max(indices):
        return np.stack([frames[i] for i in indices])  # (T, H, W, 3)
    if decoded == 0:
        raise ValueError(f"{path}: no frame could be decoded")
    retry = _checked(choose(decoded), decoded, path)
    if not set(retry) <= frames.keys():  # only after a too-high count: the frames kept were another draw's
        with av.open(os.fspath(path)) as container:
            frames, _ = _decode(container, _video_stream(container, path), retry)
    return np.stack([frames[i] for i in retry])


def _decode(container, stream, indices: list[int] | None) -> tuple[dict[int, np.ndarray], int]:
    """({index: frame uint8 (H, W, 3)} for ``indices`` (every frame when None), frames decoded),
    stopping after the last of ``indices``."""
    wanted, last = (None, None) if indices is None else (set(indices), max(indices))
    frames, decoded = {}, 0
    for i, frame in enumerate(container.decode(stream)):
        if wanted is None or i in wanted:
            frames[i] = frame.to_ndarray(format="rgb24")  # (H, W, 3)
        decoded = i + 1
        if last is not None and i >= last:
            break
    return frames, decoded


def _video_stream(container, path):
    if not container.streams.video:
        raise ValueError(f"{path} has no video stream")
    return container.streams.video[0]


def _checked(indices: Sequence[int], num_frames: int, path) -> list[int]:
    indices = [int(i) for i in indices]
    if not indices or min(indices) < 0 or max(indices) >= num_frames:
        raise ValueError(f"{path}: frame indices must be in [0, {num_frames}), got {indices}")
    return indices


# -- frame sampling -----------------------------------------------------------------------------


def clip_span(clip_len: int, interval: int) -> int:
    """Frames from a clip's first sampled frame to its last, both included."""
    return (clip_len - 1) * interval + 1


def train_indices(num_frames: int, clip_len: int, interval: int, *, out_of_bound: str = "loop",
                  generator: torch.Generator | None = None) -> list[int]:
    """``clip_len`` indices ``interval`` apart from a start uniform in ``[0, num_frames - span]``
    (torch's global generator unless ``generator``): every start that fits is equally likely.
    A clip shorter than the span starts at 0 and ``out_of_bound`` maps what lies past its end."""
    _check_sampling(num_frames, clip_len, interval, 1, out_of_bound)
    room = num_frames - clip_span(clip_len, interval)
    start = int(torch.randint(room + 1, (1,), generator=generator)) if room > 0 else 0
    return _in_bounds([start + k * interval for k in range(clip_len)], num_frames, out_of_bound)


def eval_indices(num_frames: int, clip_len: int, interval: int, num_clips: int, *,
                 out_of_bound: str = "loop") -> list[list[int]]:
    """``num_clips`` lists of ``clip_len`` indices: the starts ``[0, num_frames - span]`` split
    into ``num_clips`` equal bins, each clip starting in the middle of its bin (Video Swin's test
    sampling, mmaction2 0.x), so the clips cover the video evenly and one clip is its centre."""
    _check_sampling(num_frames, clip_len, interval, num_clips, out_of_bound)
    starts_room = max(num_frames - clip_span(clip_len, interval) + 1, 1)  # how many starts fit
    starts = [int((k + 0.5) * starts_room / num_clips) for k in range(num_clips)]
    return [_in_bounds([s + k * interval for k in range(clip_len)], num_frames, out_of_bound) for s in starts]


def _in_bounds(indices: list[int], num_frames: int, out_of_bound: str) -> list[int]:
    if out_of_bound == "loop":
        return [i % num_frames for i in indices]
    return [min(i, num_frames - 1) for i in indices]


def _check_sampling(num_frames: int, clip_len: int, interval: int, num_clips: int, out_of_bound: str) -> None:
    if num_frames < 1:
        raise ValueError(f"a clip needs at least one frame, got num_frames={num_frames}")
    if clip_len < 1 or interval < 1 or num_clips < 1:
        raise ValueError(f"clip_len, interval and num_clips must be at least 1, got {clip_len}, {interval}, "
                         f"{num_clips}")
    if out_of_bound not in OUT_OF_BOUND:
        raise ValueError(f"out_of_bound must be one of {OUT_OF_BOUND}, got {out_of_bound!r}")


# -- datasets and loader ------------------------------------------------------------------------


class VideoClipDataset(TransformedDataset):
    """``ds[(epoch, i)] -> (transform(clip) (C, T, H, W) float32, target)`` with one clip drawn
    by :func:`train_indices`, or None when the file cannot be decoded (one warning naming it).

    ``source`` is a :class:`VideoFolder` or :class:`KineticsClips` (anything whose ``samples`` are
    (path, target) pairs, with ``classes`` and ``targets``); ``transform`` maps uint8
    (T, 3, H, W) frames to the model's input (:func:`~swinv2.data.video_transforms.video_train_transform`).
    A plain int key means epoch 0.
    """

    def __init__(self, source, transform: Callable, *, clip_len: int = 32, interval: int = 2, seed: int = 0,
                 out_of_bound: str = "loop"):
        _check_sampling(1, clip_len, interval, 1, out_of_bound)
        if transform is None:
            raise ValueError("a video dataset needs a transform to the model's float input")
        super().__init__(source, transform, seed)
        self.clip_len, self.interval, self.out_of_bound = int(clip_len), int(interval), out_of_bound

    def _choose(self, num_frames: int) -> list[int]:
        return train_indices(num_frames, self.clip_len, self.interval, out_of_bound=self.out_of_bound)

    def _views(self, frames: torch.Tensor) -> torch.Tensor:
        return self.transform(frames)

    def __getitem__(self, key):
        epoch, index = (0, key) if isinstance(key, (int, np.integer)) else key
        path, target = self.base.samples[index]
        with seeded(derive_seed("aug", self.seed, epoch, index)):
            try:
                frames = read_clip(path, self._choose)  # (T', H, W, 3) uint8
            except Exception as err:  # noqa: BLE001 - FFmpeg, OS and container errors all mean "skip this clip"
                warnings.warn(f"skipping unreadable clip {path}: {type(err).__name__}: {err}", stacklevel=2)
                return None
            frames = torch.from_numpy(frames).permute(0, 3, 1, 2)  # (T', 3, H, W)
            return self._views(frames), target


class VideoViewsDataset(VideoClipDataset):
    """``ds[(epoch, i)] -> (views (V, C, T, H, W) float32, target)``: ``num_clips`` clips from
    :func:`eval_indices`, each through ``transform`` (which gives ``(num_crops, C, T, H, W)``, as
    :func:`~swinv2.data.video_transforms.video_eval_transform` does, or one (C, T, H, W) view),
    clip-major: ``V = num_clips x num_crops``. The evaluator averages the scores over views.
    Unreadable clips give None, as in :class:`VideoClipDataset`.
    """

    def __init__(self, source, transform: Callable, *, clip_len: int = 32, interval: int = 2, num_clips: int = 4,
                 seed: int = 0, out_of_bound: str = "loop"):
        _check_sampling(1, clip_len, interval, num_clips, out_of_bound)
        super().__init__(source, transform, clip_len=clip_len, interval=interval, seed=seed,
                         out_of_bound=out_of_bound)
        self.num_clips = int(num_clips)

    def _choose(self, num_frames: int) -> list[int]:
        clips = eval_indices(num_frames, self.clip_len, self.interval, self.num_clips, out_of_bound=self.out_of_bound)
        return [i for clip in clips for i in clip]

    def _views(self, frames: torch.Tensor) -> torch.Tensor:
        views = []
        for clip in frames.split(self.clip_len):  # num_clips x (T, 3, H, W)
            out = self.transform(clip)
            views.append(out if out.dim() == 5 else out.unsqueeze(0))  # (crops, C, T, h, w)
        return torch.cat(views)  # (num_clips * crops, C, T, h, w)


def build_video_loader(dataset: VideoClipDataset, *, batch_size: int, train: bool, workers: int, seed: int,
                       rank: int = 0, world_size: int = 1, drop_last: bool | None = None, pin_memory: bool = False,
                       persistent_workers: bool = False) -> DataLoader:
    """A DataLoader of ``(clips, targets, n_skipped)`` batches: clips (B, C, T, H, W) from a
    :class:`VideoClipDataset`, or (B, V, C, T, H, W) from a :class:`VideoViewsDataset`.

    The image loader's sampler and collate (:func:`~swinv2.data.loader.build_loader`): shuffled
    full global batches when ``train``, unreadable clips dropped and counted, and exact resume
    with ``loader.sampler.set_epoch(epoch, start_batch)`` before each epoch.
    """
    if not isinstance(dataset, VideoClipDataset):
        raise TypeError(f"build_video_loader needs a VideoClipDataset or VideoViewsDataset, got "
                        f"{type(dataset).__name__}")
    return build_loader(dataset, batch_size=batch_size, train=train, workers=workers, seed=seed, rank=rank,
                        world_size=world_size, drop_last=drop_last, pin_memory=pin_memory,
                        persistent_workers=persistent_workers)


__all__ = ["OUT_OF_BOUND", "VIDEO_EXTENSIONS", "KineticsClips", "VideoClipDataset", "VideoFolder",
           "VideoViewsDataset", "build_video_loader", "clip_span", "frame_count", "read_clip", "require_av",
           "eval_indices", "train_indices"]
