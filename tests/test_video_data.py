"""Video data: decoding, frame sampling, same-for-every-frame transforms, views, Kinetics CSVs,
skipped clips, seeded resume, and the bundled moving-digit demo."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

av = pytest.importorskip("av")

from swinv2.data.datasets import MissingFolderError  # noqa: E402
from swinv2.data.transforms import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from swinv2.data.video import (  # noqa: E402
    KineticsClips,
    VideoClipDataset,
    VideoFolder,
    VideoViewsDataset,
    build_video_loader,
    eval_indices,
    read_clip,
    require_av,
    train_indices,
)
from swinv2.data.video_demo import CLASSES, prepare_video_demo, render_demo_clip  # noqa: E402
from swinv2.data.video_transforms import three_crop_boxes, video_eval_transform, video_train_transform  # noqa: E402

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1, 1)


def write_lossless(path, frames: np.ndarray) -> None:
    """uint8 (T, H, W, 3) frames, losslessly: H.264 in RGB at qp 0 for .mp4 (the container stores
    the frame count), FFV1 for .mkv (it does not: the decode-everything path)."""
    codec, pix = ("libx264rgb", "rgb24") if str(path).endswith(".mp4") else ("ffv1", "bgr0")
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=10)
        stream.height, stream.width, stream.pix_fmt = frames.shape[1], frames.shape[2], pix
        stream.options = {"qp": "0"} if codec == "libx264rgb" else {}
        for image in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())


def pixels(x: torch.Tensor) -> torch.Tensor:
    """Normalised (..., C, T, H, W) back to 0..255 integers."""
    return torch.round((x * STD + MEAN) * 255).to(torch.int64)


def timed_frames(n: int, size: int = 32) -> np.ndarray:
    """Frame t is the uniform grey 8 * t: any frame's time index can be read off its pixels."""
    return np.broadcast_to((8 * np.arange(n, dtype=np.uint8))[:, None, None, None], (n, size, size, 3)).copy()


# -- decoding -------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])
def test_decode_equals_written_frames(tmp_path, suffix):
    frames = np.random.default_rng(0).integers(0, 256, (9, 24, 40, 3), dtype=np.uint8)
    path = tmp_path / f"clip{suffix}"
    write_lossless(path, frames)
    seen = []
    out = read_clip(path, lambda n: seen.append(n) or [4, 1, 1, 8, 0])
    assert seen == [9]  # the frame count, from the container or from decoding all
    np.testing.assert_array_equal(out, frames[[4, 1, 1, 8, 0]])
    np.testing.assert_array_equal(read_clip(path, lambda n: range(n)), frames)


def test_a_count_larger_than_the_stream_is_corrected(tmp_path):
    frames = np.random.default_rng(1).integers(0, 256, (20, 16, 16, 3), dtype=np.uint8)
    whole = tmp_path / "whole.mp4"
    with av.open(str(whole), "w", options={"movflags": "faststart"}) as container:  # index first, frames after
        stream = container.add_stream("libx264rgb", rate=10)
        stream.height, stream.width, stream.pix_fmt, stream.options = 16, 16, "rgb24", {"qp": "0"}
        for image in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
    with av.open(str(whole)) as container:
        offsets = [p.pos for p in container.demux(container.streams.video[0]) if p.size]
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(whole.read_bytes()[: offsets[12]])  # the index still says 20 frames; 12 remain
    seen = []
    out = read_clip(cut, lambda n: seen.append(n) or [n - 1, 0])
    assert seen == [20, 12]
    np.testing.assert_array_equal(out, frames[[11, 0]])


def test_missing_pyav_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'swinv2\[video\]'"):
        require_av()


# -- sampling -------------------------------------------------------------------------------------


def test_train_indices_cover_every_start_and_nothing_else():
    gen = torch.Generator().manual_seed(0)
    starts = set()
    for _ in range(3000):
        idx = train_indices(100, 4, 3, generator=gen)  # span 10: starts 0..90
        assert idx == [idx[0] + 3 * k for k in range(4)]
        starts.add(idx[0])
    assert starts == set(range(91))
    assert train_indices(7, 4, 2, generator=gen) == [0, 2, 4, 6]  # exactly the span: one start


def test_short_clips_loop_or_repeat_the_last_frame():
    assert train_indices(5, 4, 2) == [0, 2, 4, 1]  # 6 wraps to 1, as mmaction2's loop
    assert train_indices(5, 4, 2, out_of_bound="repeat_last") == [0, 2, 4, 4]
    assert eval_indices(5, 4, 2, 2) == [[0, 2, 4, 1], [0, 2, 4, 1]]
    assert eval_indices(1, 3, 1, 1, out_of_bound="repeat_last") == [[0, 0, 0]]
    with pytest.raises(ValueError, match="out_of_bound"):
        train_indices(5, 4, 2, out_of_bound="clamp")


def test_eval_indices_centre_of_equal_bins():
    # 91 possible starts in 4 bins of 22.75: centres 11.375, 34.125, 56.875, 79.625
    assert eval_indices(100, 4, 3, 4) == [[s + 3 * k for k in range(4)] for s in (11, 34, 56, 79)]
    assert eval_indices(100, 4, 3, 1) == [[45, 48, 51, 54]]


# -- transforms -----------------------------------------------------------------------------------


def test_train_crop_and_flip_are_the_same_on_every_frame():
    torch.manual_seed(0)
    base = torch.randint(0, 200, (1, 3, 40, 56), dtype=torch.uint8)
    clip = base + 10 * torch.arange(5, dtype=torch.uint8).view(5, 1, 1, 1)  # (5, 3, 40, 56), frame t = base + 10t
    tf = video_train_transform(24, scale=(0.2, 0.6), short_side=36)
    for _ in range(5):
        out = tf(clip)  # (3, 5, 24, 24)
        assert out.shape == (3, 5, 24, 24) and out.dtype == torch.float32
        # Resizing is linear and the offsets are integers: one crop for all frames keeps them 10t apart.
        diff = pixels(out) - pixels(out[:, :1])
        assert torch.equal(diff, (10 * torch.arange(5)).view(1, 5, 1, 1).expand_as(diff))


def test_random_crop_box_and_flip_match_the_input():
    # Channel 0 holds the pixel's row, channel 1 its column, channel 2 the frame's time.
    rows, cols = torch.meshgrid(torch.arange(20), torch.arange(30), indexing="ij")
    clip = torch.stack([torch.stack([rows, cols, torch.full_like(rows, 7 * t)]) for t in range(4)]).to(torch.uint8)
    tf = video_train_transform((8, 12), crop="random", short_side=20)  # short side already 20: no resize
    flips = set()
    for seed in range(12):
        torch.manual_seed(seed)
        out = pixels(tf(clip))  # (3, 4, 8, 12)
        top, left = int(out[0, 0].min()), int(out[1, 0].min())
        flipped = bool(out[1, 0, 0, 0] > out[1, 0, 0, -1])
        flips.add(flipped)
        expected = clip[:, :, top:top + 8, left:left + 12].permute(1, 0, 2, 3).long()  # (3, 4, 8, 12)
        assert torch.equal(out, expected.flip(-1) if flipped else expected)
    assert flips == {True, False}


def test_eval_crops_along_the_long_side():
    assert three_crop_boxes(16, 24, (16, 16)) == [(0, 0), (0, 4), (0, 8)]
    assert three_crop_boxes(30, 16, (16, 16)) == [(0, 0), (7, 0), (14, 0)]
    rows, cols = torch.meshgrid(torch.arange(16), torch.arange(24), indexing="ij")
    clip = torch.stack([torch.stack([rows, cols, torch.full_like(rows, t)]) for t in range(2)]).to(torch.uint8)
    out = pixels(video_eval_transform(16, num_crops=3)(clip))  # (3 crops, 3, 2, 16, 16)
    assert out.shape == (3, 3, 2, 16, 16)
    for crop, (top, left) in zip(out, [(0, 0), (0, 4), (0, 8)]):
        assert torch.equal(crop, clip[:, :, top:top + 16, left:left + 16].permute(1, 0, 2, 3).long())
    centre = pixels(video_eval_transform(16)(clip))
    assert torch.equal(centre, out[1:2])


# -- datasets, views, loader ----------------------------------------------------------------------


def clip_folder(tmp_path, counts=(("a", 2), ("b", 1)), frames=24):
    for name, n in counts:
        (tmp_path / name).mkdir(parents=True)
        for i in range(n):
            write_lossless(tmp_path / name / f"{i}.mp4", timed_frames(frames))
    return VideoFolder(tmp_path)


def test_views_follow_the_eval_clips_crop_by_crop(tmp_path):
    source = clip_folder(tmp_path)
    ds = VideoViewsDataset(source, video_eval_transform(16, short_side=16, num_crops=3), clip_len=4, interval=2,
                           num_clips=2)
    views, target = ds[2]
    assert views.shape == (6, 3, 4, 16, 16) and target == 1
    times = pixels(views)[:, 0, :, 0, 0] // 8  # (views, T): each frame's time index
    clips = eval_indices(24, 4, 2, 2)
    assert times.tolist() == [clips[0]] * 3 + [clips[1]] * 3  # clip-major, 3 crops each
    short = clip_folder(tmp_path / "short", counts=(("a", 1),), frames=3)  # span 7 > 3 frames: both clips loop
    views, _ = VideoViewsDataset(short, video_eval_transform(16), clip_len=4, interval=2, num_clips=2)[0]
    assert (pixels(views)[:, 0, :, 0, 0] // 8).tolist() == [[0, 2, 1, 0]] * 2


def test_seeded_clips_resume_exactly(tmp_path):
    source = clip_folder(tmp_path, counts=(("a", 3), ("b", 3)), frames=40)
    ds = VideoClipDataset(source, video_train_transform(16), clip_len=4, interval=3, seed=5)
    first = ds[(0, 2)][0]
    assert first.shape == (3, 4, 16, 16)
    assert torch.equal(first, ds[(0, 2)][0])
    assert not torch.equal(first, ds[(1, 2)][0])
    times = pixels(first)[0, :, 8, 8] // 8
    assert torch.equal(times - times[0], torch.tensor([0, 3, 6, 9]))  # from the random start, interval 3
    loader = build_video_loader(ds, batch_size=2, train=True, workers=0, seed=5)
    loader.sampler.set_epoch(1)
    whole = list(loader)
    loader.sampler.set_epoch(1, start_batch=1)
    resumed = list(loader)
    assert len(whole) == 3 and len(resumed) == 2
    for (a, ta, sa), (b, tb, sb) in zip(whole[1:], resumed):
        assert a.shape == (2, 3, 4, 16, 16) and torch.equal(a, b) and torch.equal(ta, tb) and sa == sb == 0
    workers = build_video_loader(ds, batch_size=2, train=True, workers=2, seed=5)
    workers.sampler.set_epoch(1)
    for (a, ta, _), (b, tb, _) in zip(whole, workers, strict=True):  # same clips in worker processes
        assert torch.equal(a, b) and torch.equal(ta, tb)


@pytest.mark.filterwarnings("ignore:skipping unreadable clip")
def test_unreadable_clips_are_skipped_and_counted(tmp_path):
    source = clip_folder(tmp_path, counts=(("a", 1), ("b", 1)))
    (tmp_path / "a" / "garbage.mp4").write_bytes(b"not a video" * 50)
    data = (tmp_path / "b" / "0.mp4").read_bytes()
    (tmp_path / "b" / "truncated.mp4").write_bytes(data[: len(data) // 2])
    source = VideoFolder(tmp_path)
    assert len(source) == 4
    ds = VideoClipDataset(source, video_train_transform(16), clip_len=4, interval=1)
    with pytest.warns(UserWarning, match=r"skipping unreadable clip .*garbage\.mp4"):
        assert ds[1] is None
    clips, targets, skipped = next(iter(build_video_loader(ds, batch_size=4, train=False, workers=0, seed=0)))
    assert clips.shape == (2, 3, 4, 16, 16) and targets.tolist() == [0, 1] and skipped == 2


def test_folder_errors_name_the_folder(tmp_path):
    with pytest.raises(MissingFolderError, match="nowhere"):
        VideoFolder(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no class subfolders"):
        VideoFolder(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=f"{tmp_path} holds no clips"):
        VideoFolder(tmp_path)


def test_kinetics_csv_finds_clips_and_counts_the_missing(tmp_path):
    placed = {
        "train/abseiling/aaa_000010_000020.mp4": "abseiling,aaa,10,20,train",
        "train/air_drumming/bbb_000003_000013.mp4": "air drumming,bbb,3.0,13.0,train",  # spaces as underscores
        "val/ccc_000000_000010.mp4": "abseiling,ccc,0,10,val",  # a flat split folder
    }
    for relative in placed:
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_bytes(b"x")
    csv_file = tmp_path / "k.csv"
    lines = ["label,youtube_id,time_start,time_end,split", *placed.values(), "zumba,ddd,5,15,train"]
    csv_file.write_text("\n".join(lines) + "\n")
    with pytest.warns(UserWarning, match=r"1 of the 4 clips .* \(e\.g\. .*ddd_000005_000015\.mp4") as caught:
        clips = KineticsClips(csv_file, tmp_path)
    assert len(caught) == 1
    assert clips.classes == ["abseiling", "air drumming", "zumba"] and clips.missing == 1
    assert [(os.path.relpath(p, tmp_path), t) for p, t in clips.samples] == [(r, t) for r, t in zip(placed, [0, 1, 0])]
    val = KineticsClips(csv_file, tmp_path, split="val", classes=clips.classes)
    assert len(val) == 1 and val.targets == [0] and val.missing == 0
    csv_file.write_text("label,youtube_id,time_start,time_end\nzumba,ddd,5,15\n")
    with pytest.raises(ValueError, match=r"none of the 1 clips listed in .*k\.csv"):
        KineticsClips(csv_file, tmp_path)
    csv_file.write_text("label,youtube_id,time_start\nzumba,ddd,5\n")
    with pytest.raises(ValueError, match=r"k\.csv lacks the column\(s\) time_end"):
        KineticsClips(csv_file, tmp_path)


# -- bundled demo ---------------------------------------------------------------------------------


def test_demo_is_balanced_decodes_and_matches_its_rendering(tmp_path):
    root = prepare_video_demo(tmp_path / "demo", train_clips=24, val_clips=8, frames=8, size=48)
    assert prepare_video_demo(tmp_path / "demo", train_clips=24, val_clips=8, frames=8, size=48) == root  # cached
    for split, n in (("train", 24), ("val", 8)):
        folder = VideoFolder(root / split)
        assert folder.classes == list(CLASSES)
        assert np.bincount(folder.targets).tolist() == [n // 4] * 4
    path = root / "train" / CLASSES[5 % 4] / "00005.mp4"
    decoded = read_clip(path, lambda n: range(n))
    rendered = render_demo_clip("train", 5, frames=8, size=48)
    assert decoded.shape == rendered.frames.shape == (8, 48, 48, 3)
    # yuv420p halves the colour resolution: sharp coloured edges lose most, flat areas little
    assert np.abs(decoded.astype(np.int16) - rendered.frames).mean() < 6


@pytest.mark.parametrize("where", ["middle frame", "all frames"])
def test_demo_single_frames_do_not_tell_the_direction(where):
    """What a one-frame model sees, the middle frame in testing and any frame in training, places
    the digit alike for every direction; only the motion tells them apart."""
    clips = [render_demo_clip("train", i, frames=5, size=64) for i in range(160)]
    labels = np.array([c.label for c in clips])
    seen = np.array([c.corners[2] if where == "middle frame" else c.corners.mean(0) for c in clips])  # (N, 2)
    moves = np.array([c.corners[-1] - c.corners[0] for c in clips])
    expected = {"down": (1, 0), "left": (0, -1), "right": (0, 1), "up": (-1, 0)}
    for k, name in enumerate(CLASSES):
        assert (np.sign(np.round(moves[labels == k])) == expected[name]).all()
        # Each class's mean position within 4 standard errors of the overall mean, on both axes: a
        # path started at a shared point would shift it by half the travel (over 5 px).
        bound = 4 * seen.std(0) / np.sqrt((labels == k).sum())
        assert (np.abs(seen[labels == k].mean(0) - seen.mean(0)) < bound).all(), name
