import fractions
import os

import numpy as np
import pytest
import torch
from PIL import Image

from modeling_nbp.video_io import (VideoDecodeError, as_uint8_frames, export_to_gif, export_to_mp4,
                                   make_contact_sheet, read_video)


def smooth_video(frames=17, height=48, width=64):
    """A smooth, slowly moving colour pattern, float (T, H, W, 3) in [0, 1]."""
    t, y, x = np.meshgrid(np.arange(frames), np.arange(height), np.arange(width), indexing="ij")
    red = 0.5 + 0.35 * np.sin(2 * np.pi * (x + 2 * t) / width)
    green = 0.5 + 0.35 * np.cos(2 * np.pi * (y - t) / height)
    blue = 0.3 + 0.2 * np.sin(2 * np.pi * (x + y) / (width + height))
    return np.stack([red, green, blue], axis=-1)


def index_video(frames, size=16):
    """Grey frames whose brightness is 10 * frame index, so each decoded frame names its source frame."""
    return np.repeat((np.arange(frames) * 10).astype(np.uint8), size * size * 3).reshape(frames, size, size, 3)


def decoded_indices(frames):
    return np.round(frames.astype(float).mean(axis=(1, 2, 3)) / 10).astype(int).tolist()


def test_mp4_round_trip(tmp_path):
    video = smooth_video()
    path = export_to_mp4(video, tmp_path / "clip.mp4", fps=8)
    frames, fps = read_video(path)
    assert frames.shape == (17, 48, 64, 3) and frames.dtype == np.uint8
    assert fps == 8.0
    error = np.abs(frames.astype(float) - as_uint8_frames(video).astype(float)).mean()
    assert error < 6.0, error
    assert [f for f in os.listdir(tmp_path)] == ["clip.mp4"]  # no temporary file left behind


def test_mp4_accepts_tensor_and_pil_frames_alike(tmp_path):
    video = as_uint8_frames(smooth_video(frames=5, height=16, width=16))
    tensor = torch.from_numpy(video).permute(3, 0, 1, 2).float() / 255  # (3, T, H, W)
    from_tensor = read_video(export_to_mp4(tensor, tmp_path / "t.mp4"))[0]
    from_pil = read_video(export_to_mp4([Image.fromarray(f) for f in video], tmp_path / "p.mp4"))[0]
    np.testing.assert_array_equal(from_tensor, from_pil)
    # (T, 3, H, W), a video of the pipeline's "pt" output, is the same video
    np.testing.assert_array_equal(as_uint8_frames(tensor.transpose(0, 1)), video)
    with pytest.raises(ValueError, match=r"\(T, 3, H, W\) or \(3, T, H, W\), got \(5, 16, 16, 3\)"):
        export_to_mp4(tensor.permute(1, 2, 3, 0), tmp_path / "bad.mp4")
    with pytest.raises(ValueError, match=r"a \(3, 3, H, W\) video tensor is either .* pass a \(T, H, W, 3\) numpy"):
        export_to_mp4(tensor[:, :3], tmp_path / "bad.mp4")  # 3 frames: not silently read the other way
    with pytest.raises(ValueError, match=r"of shape \(3, 16, 16, 3\) looks channels-last"):
        export_to_mp4(tensor[:, :3].permute(1, 2, 3, 0), tmp_path / "bad.mp4")  # (3 frames, H, W, 3)


def test_mp4_odd_size_is_padded_to_even(tmp_path):
    video = as_uint8_frames(smooth_video(frames=3, height=47, width=63))
    frames, _ = read_video(export_to_mp4(video, tmp_path / "odd.mp4"))
    assert frames.shape == (3, 48, 64, 3)
    assert np.abs(frames[:, :47, :63].astype(float) - video).mean() < 6.0


def test_gif_round_trip(tmp_path):
    video = smooth_video(frames=9, height=32, width=40)
    path = export_to_gif(video, tmp_path / "clip.gif", fps=10)
    with Image.open(path) as gif:
        assert gif.info["loop"] == 0 and gif.info["duration"] == 100
        assert gif.n_frames == 9
    frames, _ = read_video(path)
    assert frames.shape == (9, 32, 40, 3)
    assert np.abs(frames.astype(float) - as_uint8_frames(video).astype(float)).mean() < 8.0
    # frame delays are whole hundredths of a second, and players slow delays under 2 down to 10
    for fps, delay in [(8, 120), (6, 170), (30, 30), (60, 20), (1000, 20)]:
        with Image.open(export_to_gif(video[:2], tmp_path / "rate.gif", fps=fps)) as gif:
            assert gif.info["duration"] == delay, fps


@pytest.mark.parametrize("damage", ["random_bytes", "first_half", "missing"])
def test_unreadable_files_raise_video_decode_error(tmp_path, damage):
    good = export_to_mp4(smooth_video(frames=9, height=16, width=16), tmp_path / "good.mp4")
    data = open(good, "rb").read()
    path = tmp_path / "bad.mp4"
    if damage == "random_bytes":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    elif damage == "first_half":  # truncated: the index (moov box) at the end is lost
        path.write_bytes(data[: len(data) // 2])
    with pytest.raises(VideoDecodeError):
        read_video(path)


def test_missing_file_and_folder_are_named(tmp_path):
    with pytest.raises(VideoDecodeError, match="video file not found"):
        read_video(tmp_path / "missing.mp4")
    with pytest.raises(VideoDecodeError, match="is a folder, not a video file"):  # was "video file not found"
        read_video(tmp_path)


def test_fps_resampling_picks_nearest_frames(tmp_path):
    path = export_to_mp4(index_video(16), tmp_path / "count.mp4", fps=16)  # 1 s of video
    half, fps = read_video(path, fps=8)
    assert fps == 8.0 and decoded_indices(half) == [0, 2, 4, 6, 8, 10, 12, 14]
    double, _ = read_video(path, fps=32)
    assert decoded_indices(double) == [k // 2 for k in range(32)]
    third, _ = read_video(path, fps=16 / 3)  # targets at 0, 3, 6, ... source frames
    assert decoded_indices(third) == [0, 3, 6, 9, 12]
    # targets between two source frames take the nearer one: 8k / 3 (flooring would give 0, 2, 5, 8, 10, 13)
    sixth, _ = read_video(path, fps=6)
    assert decoded_indices(sixth) == [0, 3, 5, 8, 11, 13]
    for fps in (0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="`fps` must be a positive finite number"):
            read_video(path, fps=fps)


def test_read_video_select_returns_only_chosen_frames(tmp_path):
    path = export_to_mp4(index_video(12), tmp_path / "count.mp4", fps=8)
    frames, _ = read_video(path, select=lambda n: [n - 1, 0, 0])
    assert decoded_indices(frames) == [11, 0, 0]
    with pytest.raises(ValueError, match="select"):
        read_video(path, select=lambda n: [n])


def test_read_video_decodes_only_up_to_the_last_frame_it_returns(tmp_path, monkeypatch):
    import av

    from modeling_nbp import video_io

    path = export_to_mp4(index_video(24), tmp_path / "count.mp4", fps=8)
    gif = export_to_gif(index_video(9), tmp_path / "count.gif", fps=8)
    # the whole-file decoder (used for files whose packets have no timestamps) gives the same frames
    # an MP4 whose edit list hides its first 3 frames (as `ffmpeg -ss ... -c copy` makes): their packets are
    # decoded as references but give no frames, so they are not frames of the video
    hidden = str(tmp_path / "edit_list.mp4")
    with av.open(path) as source, av.open(hidden, "w", format="mp4") as target:
        stream = target.add_stream_from_template(source.streams.video[0])
        for packet in source.demux(source.streams.video[0]):
            if packet.dts is not None:
                shift = 3 * int(1 / (8 * packet.time_base))  # 3 frames at 8 fps, in time-base units
                packet.pts, packet.dts, packet.stream = packet.pts - shift, packet.dts - shift, stream
                target.mux(packet)
    assert decoded_indices(read_video(hidden)[0]) == list(range(3, 24))
    counts = []
    assert decoded_indices(read_video(hidden, select=lambda n: counts.append(n) or [5])[0]) == [8] and counts == [21]
    cases = [(path, None, None), (path, 4, None), (path, 16, lambda n: [5, 1, 1, n - 1]), (gif, None, lambda n: [2, 0]),
             (hidden, None, lambda n: [0, 5, n - 1]), (hidden, 4, None)]
    for file, fps, select in cases:
        frames, rate = read_video(file, fps=fps, select=select)
        with monkeypatch.context() as m:
            m.setattr(video_io, "_packet_times", lambda path: None)
            whole, whole_rate = read_video(file, fps=fps, select=select)
        np.testing.assert_array_equal(frames, whole)
        assert rate == whole_rate
    assert decoded_indices(read_video(path, fps=4)[0]) == list(range(0, 24, 2))

    decoded = []
    real_open = av.open

    class CountingPacket:  # a demuxed packet, counting the frames its decoding gives
        def __init__(self, packet):
            self.packet = packet

        def __getattr__(self, name):
            return getattr(self.packet, name)

        def decode(self):
            frames = self.packet.decode()
            decoded.extend(frame.pts for frame in frames)
            return frames

    class CountingContainer:  # av.open's container, whose packets count the frames decoded
        def __init__(self, *args, **kwargs):
            self.container = real_open(*args, **kwargs)
            self.streams = self.container.streams

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.container.close()

        def demux(self, *args):
            return (CountingPacket(packet) for packet in self.container.demux(*args))

    monkeypatch.setattr(av, "open", CountingContainer)
    frames, _ = read_video(path, select=lambda n: range(3))
    assert decoded_indices(frames) == [0, 1, 2] and len(decoded) == 3


def test_as_uint8_frames_validates_input():
    np.testing.assert_array_equal(as_uint8_frames(np.array([[[[-0.2, 0.5, 1.2]]]])), [[[[0, 128, 255]]]])
    with pytest.raises(TypeError):
        as_uint8_frames(np.zeros((1, 2, 2, 3), dtype=np.int64))
    with pytest.raises(ValueError):
        as_uint8_frames(np.zeros((2, 2, 3)))
    with pytest.raises(TypeError):
        as_uint8_frames("frames")
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="NaN or infinite"):  # not silently black (or white) pixels
            as_uint8_frames(np.array([[[[0.5, bad, 0.5]]]]))
        with pytest.raises(ValueError, match="NaN or infinite"):
            as_uint8_frames(torch.tensor([bad, 0.5]).view(1, 2, 1, 1).expand(3, 2, 1, 1))


def test_float_frames_far_outside_0_1_and_bad_rates_are_refused(tmp_path):
    # not silently white (0..255) or half black ([-1, 1]) videos; small float overshoot is still clipped
    video = smooth_video(frames=2, height=8, width=8)
    for frames in (video * 255, torch.from_numpy(video * 255).permute(3, 0, 1, 2)):
        with pytest.raises(ValueError, match=r"values up to 2\d\d(\.\d+)?: for 0..255 pixels pass `frames / 255`"):
            export_to_mp4(frames, tmp_path / "white.mp4")
    with pytest.raises(ValueError, match=r"values down to -0.\d+: for \[-1, 1\] pixels pass `\(frames \+ 1\) / 2`"):
        export_to_gif(video * 2 - 1, tmp_path / "dark.gif")
    for fps in (float("nan"), float("inf"), 0):
        for export in (export_to_mp4, export_to_gif):
            with pytest.raises(ValueError, match=r"`fps` must be a positive finite number"):
                export(video, tmp_path / "clip.mp4", fps=fps)
    assert not os.listdir(tmp_path)


def test_as_uint8_frames_accepts_low_precision_tensors():
    video = torch.tensor([0.0, 0.25, 0.5, 1.0]).view(1, 4, 1, 1).expand(3, 4, 1, 1)  # (3, T, H, W)
    expected = np.array([0, 64, 128, 255], dtype=np.uint8).repeat(3).reshape(4, 1, 1, 3)
    for dtype in (torch.bfloat16, torch.float16):
        np.testing.assert_array_equal(as_uint8_frames(video.to(dtype)), expected)


def test_contact_sheet_layout(tmp_path):
    long = index_video(5, size=16)
    short = index_video(3, size=16)
    sheet = make_contact_sheet([long, short], gap=2)
    assert sheet.size == (5 * 18 + 2, 2 * 18 + 2)
    pixels = np.asarray(sheet)
    np.testing.assert_array_equal(pixels[2:18, 2 + 3 * 18:18 + 3 * 18], long[3])  # row 0, column 3
    np.testing.assert_array_equal(pixels[20:36, 2 + 2 * 18:18 + 2 * 18], short[2])  # row 1, column 2
    assert pixels[20:36, 2 + 4 * 18:18 + 4 * 18].max() == 0  # past the short video's end: black

    labelled = make_contact_sheet([long, short], path=tmp_path / "sheet.png", labels=["first", "second"], columns=2)
    assert labelled.size[0] > 2 * 18 + 2 and labelled.size[1] == 38
    with Image.open(tmp_path / "sheet.png") as saved:
        assert saved.size == labelled.size
    with pytest.raises(ValueError, match="labels"):
        make_contact_sheet([long, short], labels=["only one"])
    # class names are any text: a line break made PIL raise (a training run's first sample step, `nbp demo`)
    broken = make_contact_sheet([long, short], labels=["first\nline", "tab\there"], columns=2)
    assert broken.size == make_contact_sheet([long, short], labels=["first line", "tab here"], columns=2).size


def test_atomic_writes_reach_the_disk_before_their_name(tmp_path, monkeypatch):
    from modeling_nbp.video_io import atomic_output_path

    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    with atomic_output_path(tmp_path / "video.npy") as tmp:
        np.save(tmp, np.zeros(3))
    assert synced[0] == tmp and synced[-1] == str(tmp_path)  # the contents, then the rename in the folder
    synced.clear()
    with atomic_output_path(tmp_path / "folder") as tmp:
        os.makedirs(os.path.join(tmp, "sub"))
        open(os.path.join(tmp, "sub", "a"), "w").close()
    assert os.path.join(tmp, "sub", "a") in synced and synced[-1] == str(tmp_path)


def with_display_rotation(path, out, degrees_clockwise: int) -> str:
    """A copy of the MP4 `path` whose track header asks players to turn the frames `degrees_clockwise` (a multiple of
    90), as phones store portrait videos: the same frames, only the tkhd matrix (16.16 fixed point) changed."""
    import struct

    data = bytearray(open(path, "rb").read())
    at = data.find(b"tkhd") + 4
    assert data[at] == 0  # version 0: 4-byte times
    matrix = at + 4 + 5 * 4 + 8 + 4 * 2  # after flags, times/track id/duration, reserved, layer/group/volume
    cos, sin = {0: (1, 0), 90: (0, 1), 180: (-1, 0), 270: (0, -1)}[degrees_clockwise]
    data[matrix : matrix + 36] = struct.pack(">9i", cos << 16, sin << 16, 0, -sin << 16, cos << 16, 0, 0, 0, 1 << 30)
    with open(out, "wb") as f:
        f.write(data)
    return str(out)


def test_read_video_turns_phone_videos_upright(tmp_path, monkeypatch):
    from modeling_nbp import video_io

    video = np.zeros((6, 32, 48, 3), np.uint8)
    video[:, :8, :8] = 255  # a white corner at the top left of a landscape frame
    path = export_to_mp4(video, tmp_path / "plain.mp4", fps=8)
    plain, _ = read_video(path)
    assert plain[0, :8, :8].mean() > 200 and plain[0, -8:, -8:].mean() < 50
    assert (plain == read_video(with_display_rotation(path, tmp_path / "zero.mp4", 0))[0]).all()
    for degrees in (90, 180, 270):
        rotated = with_display_rotation(path, tmp_path / f"turn{degrees}.mp4", degrees)
        expected = np.rot90(plain, k=-degrees // 90, axes=(1, 2))  # clockwise
        frames, _ = read_video(rotated, select=lambda n: [0, n - 1])
        np.testing.assert_array_equal(frames, expected[[0, -1]])
        with monkeypatch.context() as m:  # the whole-file decoder turns them too
            m.setattr(video_io, "_packet_times", lambda path: None)
            np.testing.assert_array_equal(read_video(rotated)[0], expected)
    # 90 clockwise: portrait, the white corner now at the top right
    turned, _ = read_video(tmp_path / "turn90.mp4")
    assert turned.shape[1:3] == (48, 32) and turned[0, :8, -8:].mean() > 200


def write_h264(path, frames, fmt, options=None, fps=8):
    """`frames` (T, H, W, 3) uint8 as H.264 in container `fmt` (PyAV muxer options: e.g. an MP4 index at the front)."""
    import av

    with av.open(str(path), "w", format=fmt, options=options or {}) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return str(path)


def test_a_cut_off_mp4_gives_the_frames_before_the_cut(tmp_path):
    import av

    video = index_video(24).copy()
    video[:, :4, :4] = np.random.default_rng(0).integers(0, 256, (24, 4, 4, 3))  # detail, so packets have a size
    # the index at the front, as downloads have it: a file cut short still lists every packet, the last ones broken
    path = write_h264(tmp_path / "full.mp4", video, "mp4", {"movflags": "faststart"})
    with av.open(path) as container:
        packets = sorted((p.pts, p.pos, p.size) for p in container.demux(container.streams.video[0]) if p.size)
    _, pos, size = packets[12]
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(open(path, "rb").read()[: pos + size // 2])  # stops inside frame 12's packet
    frames, _ = read_video(cut)
    assert decoded_indices(frames[:12, 4:, 4:]) == list(range(12))  # (the noisy corner left out)
    clip, _ = read_video(cut, select=lambda n: range(n // 2 - 4, n // 2 + 4))  # a centre window reaching the cut
    assert len(clip) == 8


def test_a_video_whose_frame_size_changes_is_an_unreadable_video(tmp_path):
    import av

    small = write_h264(tmp_path / "small.ts", index_video(8, size=16), "mpegts")
    large = write_h264(tmp_path / "large.ts", index_video(8, size=32)[::-1].copy(), "mpegts")
    path = str(tmp_path / "joined.ts")  # the second part's timestamps follow the first's
    with av.open(small) as first, av.open(large) as second, av.open(path, "w", format="mpegts") as out:
        stream = out.add_stream_from_template(first.streams.video[0])
        shift = 0
        for source in (first, second):
            for packet in source.demux(source.streams.video[0]):
                if packet.dts is not None:
                    packet.pts, packet.dts, packet.stream = packet.pts + shift, packet.dts + shift, stream
                    out.mux(packet)
            shift = 10 * 90000  # 10 s in the 90 kHz time base
    for select in (None, lambda n: [0, n - 1]):
        with pytest.raises(VideoDecodeError, match=r"frame size changes .*16x16.*32x32"):
            read_video(path, select=select)


def write_with_times(path, times, fps=8):
    """index_video frames at the given times (in 1/fps s units): a variable frame rate file."""
    import av

    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps, options={"bf": "0"})
        stream.width = stream.height = 16
        stream.pix_fmt, stream.time_base = "yuv420p", fractions.Fraction(1, fps)
        for frame, time in zip(index_video(len(times)), times):
            frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
            frame.pts, frame.time_base = time, stream.time_base
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return str(path)


def test_a_leap_in_the_timestamps_is_an_unreadable_video_not_a_wrong_fps(tmp_path):
    # 8 frames at 8 fps, then one two hours later (a damaged file, or recordings joined without retiming): read at
    # 8 fps that is hours of one frame; it raised ValueError("`fps` 8 would repeat..."), which no dataset skips
    path = write_with_times(tmp_path / "leap.mp4", list(range(8)) + [8 * 7200])
    assert decoded_indices(read_video(path)[0]) == list(range(9))  # every frame is there
    with pytest.raises(VideoDecodeError, match=r"leap.mp4: its frames' timestamps leap: 9 frames span 7200 s"):
        read_video(path, fps=8)
    gaps = write_with_times(tmp_path / "gaps.mp4", [0, 1, 2, 40, 41, 42, 80])  # gaps of seconds are variable rate
    frames = decoded_indices(read_video(gaps, fps=8)[0])
    assert frames[:3] == [0, 1, 2] and frames[40:43] == [3, 4, 5] and frames[80] == 6
