"""swinv2.hub and swinv2.weights: the swinv2 safetensors format, the table of released weights, and downloads
(end to end against a local HTTP server; nothing leaves 127.0.0.1)."""

from __future__ import annotations

import copy
import functools
import hashlib
import http.server
import json
import os
import socket
import threading
import time
import urllib.error
from functools import partial

import pytest
import torch
from helpers import randomize_
from safetensors.torch import save_file
from torch import nn

import swinv2
import swinv2.fast
from swinv2 import hub, weights
from swinv2.files import CheckpointError
from swinv2.hub import DownloadError
from swinv2.loading import StateDictMismatchError, load_model
from swinv2.variants import VARIANTS
from swinv2.weights import PretrainedWeights

DEBUG = "swinv2_debug"


def _model(seed=0, **kw):
    return randomize_(swinv2.create_model(DEBUG, **kw), seed).eval()


def _same_weights(a: nn.Module, b: nn.Module, skip=()) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa if k not in skip)


# -- swinv2's own file -----------------------------------------------------------------------


def test_round_trip_restores_config_and_outputs(tmp_path):
    src = _model(1, img_size=(64, 96), window_rule="official", num_classes=7, drop_path_rate=0.0)
    src.set_input_size(window_size=(4, 6))  # recorded in config too
    path = hub.save_pretrained(src, tmp_path / "run" / "best.safetensors", metadata={"epoch": 12})

    meta = hub.read_metadata(path)
    assert meta[hub.META_FORMAT] == "swinv2" and meta[hub.META_FORMAT_VERSION] == "1"
    assert meta[hub.META_LIBRARY_VERSION] == swinv2.__version__ and meta["epoch"] == "12"
    assert json.loads(meta[hub.META_CONFIG]) == json.loads(json.dumps(src.config))

    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():  # bit for bit, against the source model with or without the speedups
        refs = {True: src(x), False: swinv2.fast.remove(copy.deepcopy(src))(x)}
    for model in (
        load_model(path),
        swinv2.create_model(pretrained=path),  # no name: the file says what it is
        swinv2.create_model(DEBUG, pretrained=os.fspath(path)),
    ):
        model.eval()
        assert model.config == src.config
        assert model.img_size == (64, 96) and model.window_size == (4, 6) and model.window_rule == "official"
        assert model.num_classes == 7
        assert _same_weights(model, src)
        with torch.no_grad():
            assert torch.equal(model(x), refs[swinv2.fast.is_applied(model)])


def test_round_trip_keeps_dtype_and_applies_overrides(tmp_path):
    src = _model(2).double()
    path = hub.save_pretrained(src, tmp_path / "w.safetensors")
    model = load_model(path)
    assert model.head.weight.dtype == torch.float64 and _same_weights(model, src)
    assert load_model(path, dtype=torch.float32).head.weight.dtype == torch.float32

    # A new head for another number of classes; everything else loaded.
    other = swinv2.create_model(pretrained=path, num_classes=3, img_size=128)
    assert other.head.weight.shape == (3, 256) and other.img_size == (128, 128)
    assert torch.equal(other.layers[2].blocks[1].attn.qkv.weight, src.layers[2].blocks[1].attn.qkv.weight)


def test_name_of_another_structure_warns_and_the_file_wins(tmp_path):
    path = hub.save_pretrained(_model(3), tmp_path / "w.safetensors")
    with pytest.warns(UserWarning, match="another structure"):
        model = swinv2.create_model("swinv2_tiny_window8_256", pretrained=path)
    assert model.embed_dim == 32


@pytest.mark.parametrize("crash", [RuntimeError("disk full"), KeyboardInterrupt()])
@pytest.mark.parametrize("existing", [True, False])
def test_save_is_atomic(tmp_path, monkeypatch, crash, existing):
    import safetensors.torch

    target = tmp_path / "best.safetensors"
    if existing:
        hub.save_pretrained(_model(4), target)
    before = target.read_bytes() if existing else None

    def crashing_save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as f:  # a partial file, then the crash
            f.write(b"\x00" * 100)
        raise crash

    monkeypatch.setattr(safetensors.torch, "save_file", crashing_save_file)
    with pytest.raises(type(crash)):
        hub.save_pretrained(_model(5), target)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["best.safetensors"] if existing else [])
    if existing:
        assert target.read_bytes() == before and hub.is_swinv2_file(target)


@pytest.fixture
def umask_027():
    """A umask other than the usual 022, so that a mode copied from elsewhere shows."""
    old = os.umask(0o027)
    yield 0o640
    os.umask(old)


def test_saved_files_get_the_mode_open_would_give(tmp_path, umask_027):
    """safetensors writes through a private 0600 temporary file; the saved file (like a
    checkpoint written with open) gets 0666 less the umask."""
    path = hub.save_pretrained(_model(), tmp_path / "model-best.safetensors")
    assert path.stat().st_mode & 0o777 == umask_027
    with open(tmp_path / "plain", "w"):
        pass
    assert (tmp_path / "plain").stat().st_mode & 0o777 == umask_027


def test_save_refuses_what_the_config_cannot_rebuild(tmp_path):
    odd = swinv2.create_model(DEBUG, norm_layer=partial(nn.LayerNorm, eps=1e-6))
    with pytest.raises(ValueError, match="norm_layer"):
        hub.save_pretrained(odd, tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match="reserved"):
        hub.save_pretrained(_model(), tmp_path / "w.safetensors", metadata={hub.META_CONFIG: "{}"})
    assert not list(tmp_path.iterdir())


def _saved(tmp_path, name="w.safetensors"):
    return hub.save_pretrained(_model(6), tmp_path / name)


def test_truncated_and_corrupted_files(tmp_path):
    good = _saved(tmp_path).read_bytes()
    cases = {
        "truncated.safetensors": good[: len(good) // 2],
        "cut_in_header.safetensors": good[:40],
        "garbled_header.safetensors": good[:9] + b"#" * 50 + good[59:],
        "empty.safetensors": b"",
    }
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(CheckpointError, match=name):
            load_model(path)
        # create_model reports the damage rather than asking for a model name
        with pytest.raises(CheckpointError, match=name):
            swinv2.create_model(pretrained=path)
    with pytest.raises(CheckpointError, match="truncated or damaged"):
        load_model(tmp_path / "truncated.safetensors")
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_model(tmp_path / "nope.safetensors")


def test_foreign_files_say_what_they_are(tmp_path):
    src = _model(7)
    plain = tmp_path / "plain.safetensors"
    save_file(src.state_dict(), plain)
    with pytest.raises(CheckpointError, match=r"plain.safetensors is a safetensors file .* no swinv2 metadata") as err:
        load_model(plain)
    assert "create_model(name, pretrained=" in str(err.value)
    assert not hub.is_swinv2_file(plain)
    # loaded into a named architecture, as before
    assert _same_weights(swinv2.create_model(DEBUG, pretrained=plain), src)
    with pytest.raises(ValueError, match="plain.safetensors is not a file written by .* needs a model name"):
        swinv2.create_model(pretrained=plain)

    pth = tmp_path / "official.pth"
    torch.save({"model": src.state_dict()}, pth)
    with pytest.raises(CheckpointError, match=r"official.pth is not a swinv2 safetensors file.*create_model\(name"):
        load_model(pth)


@pytest.mark.parametrize(
    "meta, error, match",
    [
        ({hub.META_CONFIG: "{not json"}, CheckpointError, "not valid JSON"),
        ({hub.META_CONFIG: "[1, 2]"}, CheckpointError, "not an object"),
        ({hub.META_CONFIG: None}, CheckpointError, "no swinv2.config entry"),
        ({"config_patch": {"window_size": 0}}, CheckpointError, "window_size = 0 is out of range"),
        ({"config_patch": {"no_such_arg": 1}}, CheckpointError, "unknown model setting 'no_such_arg'"),
        ({"config_patch": {"embed_dim": 48}}, CheckpointError, "describes 5,.* parameters but the file holds only"),
        ({"config_patch": {"embed_dim": 16}}, StateDictMismatchError, "does not fit"),
        ({hub.META_FORMAT_VERSION: "99"}, CheckpointError, "format 99.*upgrade swinv2"),
    ],
)
def test_bad_metadata_gets_clear_errors(tmp_path, meta, error, match):
    src = _model(8)
    config = dict(src.config, **meta.pop("config_patch", {}))
    metadata = {
        hub.META_FORMAT: "swinv2",
        hub.META_FORMAT_VERSION: "1",
        hub.META_LIBRARY_VERSION: "0.0.1",
        hub.META_CONFIG: json.dumps(config),
    }
    metadata.update(meta)
    metadata = {k: v for k, v in metadata.items() if v is not None}
    path = tmp_path / "bad.safetensors"
    save_file(src.state_dict(), path, metadata=metadata)
    with pytest.raises(error, match=match) as err:
        load_model(path)
    assert "bad.safetensors" in str(err.value)


# -- the registry ------------------------------------------------------------------------------

TIMM_TAGS = [
    "swinv2_tiny_window8_256.ms_in1k",
    "swinv2_tiny_window16_256.ms_in1k",
    "swinv2_small_window8_256.ms_in1k",
    "swinv2_small_window16_256.ms_in1k",
    "swinv2_base_window8_256.ms_in1k",
    "swinv2_base_window16_256.ms_in1k",
    "swinv2_base_window12_192.ms_in22k",
    "swinv2_large_window12_192.ms_in22k",
    "swinv2_base_window12to16_192to256.ms_in22k_ft_in1k",
    "swinv2_base_window12to24_192to384.ms_in22k_ft_in1k",
    "swinv2_large_window12to16_192to256.ms_in22k_ft_in1k",
    "swinv2_large_window12to24_192to384.ms_in22k_ft_in1k",
]


def test_registry_matches_the_release_and_the_variants():
    assert weights.list_pretrained() == TIMM_TAGS
    assert weights.list_pretrained("*to24*") == [t for t in TIMM_TAGS if "to24" in t]
    for name in TIMM_TAGS:
        w = weights.get_pretrained(name)
        v = VARIANTS[w.arch]
        assert w.name == name
        assert (w.img_size, w.window_size, w.num_classes) == (v.img_size, v.window_size, v.num_classes)
        assert w.pretrained_window_sizes == v.pretrained_window_sizes
        assert w.url == f"https://github.com/SwinTransformer/storage/releases/download/v2.0.0/{w.file}"
        size, rest = w.arch[len("swinv2_"):].split("_", 1)
        official = f"swinv2_{size}_patch4_{rest}"
        suffix = {"ms_in1k": "", "ms_in22k": "_22k", "ms_in22k_ft_in1k": "_22kto1k_ft"}[w.tag]
        assert w.file == f"{official}{suffix}.pth"
        assert w.sha256 is None and w.interpolation == "bicubic"
        assert w.hf_hub_id == f"timm/{name}" and w.hub_source == f"hf-hub:timm/{name}"
        if w.img_size == 384:  # TEST.CROP False: resize straight to 384
            assert (w.crop_mode, w.crop_pct, w.resize_size) == ("squash", 1.0, 384)
        else:  # Resize(int(256 / 224 * size)) then CenterCrop(size)
            assert (w.crop_mode, w.crop_pct, w.resize_size) == ("center", 0.875, int(256 / 224 * w.img_size))
        assert (w.top1 is None) == (w.tag == "ms_in22k")
    top = {n: (weights.get_pretrained(n).top1, weights.get_pretrained(n).top5) for n in TIMM_TAGS}
    assert top["swinv2_tiny_window8_256.ms_in1k"] == (81.8, 95.9)
    assert top["swinv2_base_window16_256.ms_in1k"] == (84.6, 97.0)
    assert top["swinv2_large_window12to24_192to384.ms_in22k_ft_in1k"] == (87.6, 98.3)
    assert weights.get_pretrained("swinv2_base_window12_192").num_classes == 21841


def test_default_tags_and_unknown_ones():
    assert weights.get_pretrained("swinv2_small_window16_256").name == "swinv2_small_window16_256.ms_in1k"
    with pytest.raises(ValueError, match="swinv2_tiny_window8_256.ms_in1k"):
        weights.get_pretrained("swinv2_tiny_window8_256.ms_in22k")
    with pytest.raises(ValueError, match=r"checkpoint path.*") as err:
        swinv2.create_model("swinv2_huge_window12_192", pretrained=True)
    assert "swinv2_base_window12_192.ms_in22k" in str(err.value)  # lists what exists


# -- downloads, end to end against 127.0.0.1 ----------------------------------------------------


@pytest.fixture
def server(tmp_path):
    """A local HTTP server on an ephemeral port serving tmp_path/'srv'; counts requests."""
    root = tmp_path / "srv"
    root.mkdir()
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            if self.path == "/short.pth":  # promises 1000 bytes, sends 10, hangs up
                self.send_response(200)
                self.send_header("Content-Length", "1000")
                self.end_headers()
                self.wfile.write(b"0123456789")
                self.close_connection = True
                return
            super().do_GET()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs=dict(poll_interval=0.05), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", root, requests
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)
    assert not thread.is_alive()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv("SWINV2_HOME", str(path))
    return path


def _publish(root, seed=9, name="swinv2_debug_test.pth"):
    """An official-layout checkpoint of the debug model, as the release ships them."""
    src = _model(seed)
    torch.save({"model": src.state_dict(), "epoch": 299}, root / name)
    return src, hashlib.sha256((root / name).read_bytes()).hexdigest()


def _register(monkeypatch, url, sha256=None, tag="test", file="swinv2_debug_test.pth"):
    released = PretrainedWeights(
        arch=DEBUG, tag=tag, file=file, url=url, img_size=64, window_size=4, num_classes=10,
        dataset="fixture", sha256=sha256,
    )
    monkeypatch.setitem(weights.PRETRAINED, released.name, released)
    return released


def test_pretrained_true_downloads_verifies_and_reuses_the_cache(server, cache, monkeypatch):
    base, root, requests = server
    src, digest = _publish(root)
    _register(monkeypatch, f"{base}/swinv2_debug_test.pth", sha256=digest)

    model = swinv2.create_model("swinv2_debug.test", pretrained=True)
    assert _same_weights(model, src)
    assert requests == ["/swinv2_debug_test.pth"]
    assert [p.name for p in cache.iterdir()] == ["swinv2_debug_test.pth"]  # no temp left behind
    assert (cache / "swinv2_debug_test.pth").read_bytes() == (root / "swinv2_debug_test.pth").read_bytes()

    # Cached: the untagged name finds its default tag, and no request is made.
    again = swinv2.create_model(DEBUG, pretrained=True)
    assert _same_weights(again, src) and len(requests) == 1
    # Another number of classes: a fresh head, the rest loaded.
    three = swinv2.create_model(DEBUG, pretrained=True, num_classes=3)
    assert three.head.weight.shape == (3, 256) and len(requests) == 1
    assert _same_weights(three, src, skip=("head.weight", "head.bias"))
    assert hub.download("swinv2_debug.test", progress=False) == cache / "swinv2_debug_test.pth"
    assert len(requests) == 1


def test_wrong_sha256_deletes_the_download(server, cache, monkeypatch):
    base, root, requests = server
    _publish(root)
    _register(monkeypatch, f"{base}/swinv2_debug_test.pth", sha256="0" * 64)
    with pytest.raises(DownloadError, match="SHA-256 mismatch.*expected 0000"):
        swinv2.create_model("swinv2_debug.test", pretrained=True)
    assert requests == ["/swinv2_debug_test.pth"]
    assert not cache.exists() or not list(cache.iterdir())


def test_cached_file_with_wrong_sha256_is_refused(server, cache, monkeypatch):
    base, root, requests = server
    _, digest = _publish(root)
    cache.mkdir()
    (cache / "swinv2_debug_test.pth").write_bytes(b"stale")
    _register(monkeypatch, f"{base}/swinv2_debug_test.pth", sha256=digest)
    with pytest.raises(DownloadError, match="cached file .*delete it"):
        swinv2.create_model(DEBUG, pretrained=True)
    assert requests == []


def test_damaged_cached_file_without_hash_says_delete_it(cache, monkeypatch):
    cache.mkdir()
    (cache / "swinv2_debug_test.pth").write_bytes(b"not a checkpoint")
    _register(monkeypatch, "http://127.0.0.1:9/never-asked.pth")
    with pytest.raises(CheckpointError, match="not a readable checkpoint.*may be damaged: delete it") as err:
        swinv2.create_model(DEBUG, pretrained=True)
    assert len(str(err.value).splitlines()) == 1


def test_download_by_url_with_progress_and_http_errors(server, tmp_path, capsys):
    base, root, requests = server
    src, digest = _publish(root, name="by_url.pth")
    path = hub.download(f"{base}/by_url.pth", cache_dir=tmp_path / "c", progress=True, sha256=digest.upper())
    assert path == tmp_path / "c" / "by_url.pth" and path.read_bytes() == (root / "by_url.pth").read_bytes()
    assert "by_url.pth" in capsys.readouterr().err  # the tqdm bar
    model = swinv2.create_model(DEBUG, pretrained=f"{base}/by_url.pth")  # a URL as pretrained=
    assert _same_weights(model, src)

    with pytest.raises(DownloadError, match="HTTP Error 404") as err:
        hub.download(f"{base}/missing.pth", cache_dir=tmp_path / "c", progress=False)
    assert isinstance(err.value.__cause__, urllib.error.HTTPError)
    with pytest.raises(DownloadError, match="short.pth"):
        hub.download(f"{base}/short.pth", cache_dir=tmp_path / "c", progress=False)
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["by_url.pth"]  # nothing partial kept


def test_downloads_go_through_torch_hub(server, tmp_path, monkeypatch):
    """torch.hub's downloader fetches the file (temporary file, SHA-256 check); swinv2 adds the
    cache, the check that a whole checkpoint arrived, and the messages."""
    import torch.hub

    base, root, _ = server
    _, digest = _publish(root, name="hubbed.pth")
    calls = []
    real = torch.hub.download_url_to_file
    monkeypatch.setattr(torch.hub, "download_url_to_file",
                        lambda url, dst, hash_prefix=None, progress=True: calls.append((url, hash_prefix))
                        or real(url, dst, hash_prefix=hash_prefix, progress=progress))
    hub.download(f"{base}/hubbed.pth", cache_dir=tmp_path / "c", progress=False, sha256=digest)
    assert calls == [(f"{base}/hubbed.pth", digest)]


def test_a_file_cut_on_the_server_is_not_cached(server, tmp_path):
    """The server sends the whole (cut) file with its true length, so the transfer itself looks
    complete: the file is still refused before it enters the cache."""
    base, root, _ = server
    _publish(root, name="cut.pth")
    data = (root / "cut.pth").read_bytes()
    (root / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(DownloadError, match="cut.pth: what arrived is not a whole checkpoint .*truncated") as err:
        hub.download(f"{base}/cut.pth", cache_dir=tmp_path / "c", progress=False)
    assert len(str(err.value).splitlines()) == 1
    assert not list((tmp_path / "c").iterdir())


def test_downloads_get_the_mode_open_would_give(server, tmp_path, umask_027):
    base, root, _ = server
    _publish(root, name="w.pth")
    path = hub.download(f"{base}/w.pth", cache_dir=tmp_path / "c", progress=False)
    assert path.stat().st_mode & 0o777 == umask_027


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_offline_failure_says_what_to_do(cache, monkeypatch):
    url = f"http://127.0.0.1:{_closed_port()}/swinv2_debug_test.pth"
    _register(monkeypatch, url)
    with pytest.raises(DownloadError) as err:
        swinv2.create_model("swinv2_debug.test", pretrained=True)
    msg = str(err.value)
    assert f"download {url} elsewhere and pass the local path" in msg
    assert "create_model('swinv2_debug', pretrained='/path/swinv2_debug_test.pth')" in msg
    assert str(cache / "swinv2_debug_test.pth") in msg
    assert isinstance(err.value.__cause__, urllib.error.URLError)
    assert not cache.exists() or not list(cache.iterdir())


def test_stalled_server_times_out(tmp_path):
    with socket.socket() as listener:  # accepts connections (backlog) but never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/w.pth"
        start = time.monotonic()
        with pytest.raises(DownloadError, match="timed out"):
            hub.download(url, cache_dir=tmp_path, progress=False, timeout=0.5)
        assert time.monotonic() - start < 10
    assert not list(tmp_path.iterdir())


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("SWINV2_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert hub.get_cache_dir() == tmp_path / ".cache" / "swinv2"
    monkeypatch.setenv("SWINV2_HOME", str(tmp_path / "elsewhere"))
    assert hub.get_cache_dir() == tmp_path / "elsewhere"
    assert hub.get_cache_dir(tmp_path / "x") == tmp_path / "x"
