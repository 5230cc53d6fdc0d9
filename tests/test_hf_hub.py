"""Weights from the Hugging Face Hub (``hf-hub:REPO[@REVISION]``), fetched by huggingface_hub.

The Hub is a local HTTP server on 127.0.0.1 that answers the two requests ``hf_hub_download``
makes for a file (HEAD for its commit, ETag and size, then GET), with the Hub's error header for
a file or repository that is not there. huggingface_hub reads its endpoint (``HF_ENDPOINT``)
once, when it is imported, so the downloads run in a fresh interpreter pointed at the server.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import re
import subprocess
import sys
import threading
import urllib.parse
from pathlib import Path

import pytest
import torch
from helpers import randomize_
from safetensors.torch import save

import swinv2
from swinv2 import hub, weights
from swinv2.convert import from_official
from swinv2.hf_folder import hf_config_from_model, hf_state_dict
from swinv2.hub import DownloadError

COMMIT = "0123456789abcdef0123456789abcdef01234567"
TESTS = Path(__file__).resolve().parent


def _model(seed: int, **kw):
    return randomize_(swinv2.create_model("swinv2_debug", **kw), seed).eval()


@pytest.fixture
def hub_server():
    """A Hub with three repositories: timm's copy of (made-up) released weights, a repository
    holding a bare state dict, and a transformers SwinV2 repository. Yields (endpoint, files,
    requests), files mapping (repo, filename) -> bytes."""
    files: dict[tuple[str, str], bytes] = {}
    requests: list[tuple[str, str]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self._answer(body=False)

        def do_GET(self):
            self._answer(body=True)

        def _answer(self, body: bool):
            path = urllib.parse.unquote(urllib.parse.urlparse(self.path).path)
            requests.append((self.command, path))
            m = re.fullmatch(r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)", path)
            data = files.get((m["repo"], m["file"])) if m else None
            if data is None:
                known = m and any(repo == m["repo"] for repo, _ in files)
                self.send_response(404)
                self.send_header("X-Error-Code", "EntryNotFound" if known else "RepoNotFound")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header("X-Repo-Commit", COMMIT)
            self.end_headers()
            if body:
                self.wfile.write(data)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs=dict(poll_interval=0.05), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", files, requests
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


_SCRIPT = """
import json, sys
import torch
import swinv2
from swinv2 import weights

released = weights.PretrainedWeights(arch="swinv2_debug", tag="hub", file="swinv2_debug_hub.pth",
                                     img_size=64, window_size=4, num_classes=10, dataset="fixture")
weights.PRETRAINED[released.name] = released
out = {}
x = torch.load(sys.argv[1])
for key, args in json.loads(sys.argv[2]).items():
    try:
        model = swinv2.create_model(*args[:-1], pretrained=args[-1]).eval()
        with torch.no_grad():
            out[key] = dict(logits=model(x).tolist(), num_classes=model.num_classes)
    except Exception as err:
        out[key] = dict(error=f"{type(err).__name__}: {err}")
print(json.dumps(out))
"""


def _run(endpoint: str, tmp_path: Path, x: torch.Tensor, cases: dict, **env) -> dict:
    torch.save(x, tmp_path / "x.pt")
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "SWINV2_HOME"))}
    environ.update(HF_ENDPOINT=endpoint, HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_XET="1",
                   HF_HOME=str(tmp_path / "hf-home"), PYTHONPATH=os.pathsep.join([str(TESTS.parent)]), **env)
    done = subprocess.run([sys.executable, "-c", _SCRIPT, str(tmp_path / "x.pt"), json.dumps(cases)], env=environ,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_hub_repositories_end_to_end(hub_server, tmp_path):
    pytest.importorskip("huggingface_hub")
    endpoint, files, requests = hub_server
    released, plain, transformers_model = _model(1), _model(2), _model(3, img_size=32, num_classes=3)
    # timm's copy of released weights: timm's layout, in model.safetensors
    files[("timm/swinv2_debug.hub", "model.safetensors")] = save(from_official(released.state_dict(), "timm"))
    # a bare state dict at a revision, in the older pickle name only
    torch.save(plain.state_dict(), tmp_path / "plain.bin")
    files[("someone/plain", "pytorch_model.bin")] = (tmp_path / "plain.bin").read_bytes()
    # a transformers repository: config.json (model_type swinv2) and its weights
    config = hf_config_from_model(transformers_model, ["a", "b", "c"])
    files[("someone/tiny-swinv2", "config.json")] = json.dumps(config).encode()
    files[("someone/tiny-swinv2", "model.safetensors")] = save(hf_state_dict(transformers_model))

    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    cases = {
        "released": ["hf-hub:timm/swinv2_debug.hub"],  # no name: the table knows the architecture
        "again": ["hf-hub:timm/swinv2_debug.hub"],
        "plain": ["swinv2_debug", "hf-hub:someone/plain@v1"],
        "transformers": ["hf-hub:someone/tiny-swinv2"],  # rebuilt from its config.json
        "no_repo": ["swinv2_debug", "hf-hub:someone/nothing"],
        "unnamed": ["hf-hub:someone/plain@v1"],
    }
    out = _run(endpoint, tmp_path, x, cases, SWINV2_HOME=str(tmp_path / "swinv2-home"))

    with torch.no_grad():
        for key, model, inputs in (("released", released, x), ("again", released, x), ("plain", plain, x),
                                   ("transformers", transformers_model, x)):
            assert "error" not in out[key], out[key]
            assert torch.allclose(torch.tensor(out[key]["logits"]), model(inputs), atol=1e-5), key
    assert out["transformers"]["num_classes"] == 3
    assert "RepositoryNotFoundError" in out["no_repo"]["error"] and "hf-hub:someone/nothing" in out["no_repo"]["error"]
    assert "needs a model name" in out["unnamed"]["error"]

    # huggingface_hub's own cache, under $SWINV2_HOME when that is set; each file fetched once
    assert (tmp_path / "swinv2-home" / "huggingface" / "models--timm--swinv2_debug.hub").is_dir()
    gets = [path for method, path in requests if method == "GET"]
    assert gets.count("/timm/swinv2_debug.hub/resolve/main/model.safetensors") == 1
    assert ("GET", "/someone/plain/resolve/v1/pytorch_model.bin") in requests  # the revision asked for
    assert ("HEAD", "/someone/plain/resolve/v1/model.safetensors") in requests  # looked for first


def test_without_huggingface_hub_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails as if not installed
    with pytest.raises(DownloadError, match=r"needs huggingface_hub: pip install 'swinv2\[hub\]'.*pretrained=True"):
        swinv2.create_model(pretrained="hf-hub:timm/swinv2_tiny_window8_256.ms_in1k")


def test_offline_hub_error_says_what_to_do(monkeypatch):
    errors = pytest.importorskip("huggingface_hub.utils")

    def offline(*args, **kwargs):
        raise errors.LocalEntryNotFoundError("Cannot reach the Hub and the file is not in the cache.")

    monkeypatch.setattr("huggingface_hub.hf_hub_download", offline)
    with pytest.raises(DownloadError, match="hf-hub:timm/swinv2_tiny_window8_256.ms_in1k.*offline.*local path") as err:
        swinv2.create_model(pretrained="hf-hub:timm/swinv2_tiny_window8_256.ms_in1k")
    assert len(str(err.value).splitlines()) == 1


def test_hub_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("SWINV2_HOME", raising=False)
    assert hub.hub_cache_dir() is None  # huggingface_hub's own cache, shared with timm and transformers
    assert hub.hub_cache_dir(tmp_path) == tmp_path
    monkeypatch.setenv("SWINV2_HOME", str(tmp_path))
    assert hub.hub_cache_dir() == tmp_path / "huggingface"


def test_every_release_names_timms_copy():
    """timm hosts each released weight as ``timm/<arch>.<tag>``; where timm is installed its table
    must agree with ours."""
    timm_models = pytest.importorskip("timm.models")
    for name, release in weights.PRETRAINED.items():
        assert release.hub_source == f"hf-hub:timm/{name}"
        assert timm_models.get_pretrained_cfg(name).hf_hub_id == release.hf_hub_id
