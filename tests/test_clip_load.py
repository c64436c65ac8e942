"""clip.load and the checksum-verified download, on tiny local checkpoints (no internet needed).

Downloads are served by a local HTTP server in a thread; files follow OpenAI's URL scheme
(``<base>/<sha256>/<name>.pt``) so the checksum comes from the URL exactly as for the real models.
"""
from __future__ import annotations

import errno
import functools
import hashlib
import io
import os
import pickle
import re
import subprocess
import threading
import warnings
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from test_clip_model import TINY_RESNET, TINY_VIT, example_inputs, make_openai_state_dict  # tests/ is on sys.path

import clip.clip as clip_api
from clip.clip import CLIP_MEAN, CLIP_STD, CLIPLoadError, available_models, build_preprocess, download, load
from clip.model import CLIP, build_model

REPO = Path(__file__).resolve().parents[1]
OFFICIAL_NAMES = ["RN50", "RN101", "RN50x4", "RN50x16", "RN50x64",
                  "ViT-B/32", "ViT-B/16", "ViT-L/14", "ViT-L/14@336px"]


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Keep the test output free of access logs."""


@pytest.fixture
def http_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, str]]:
    """(directory, base URL) of a local HTTP server that serves the directory."""
    root = tmp_path / "served"
    root.mkdir()
    monkeypatch.setenv("no_proxy", "127.0.0.1")  # a CI proxy must not intercept the local server
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


def publish(http_root: tuple[Path, str], payload: bytes, name: str = "tiny.pt") -> tuple[str, str]:
    """Serve ``payload`` at ``<base>/<sha256>/<name>``; return (url, sha256)."""
    root, base = http_root
    sha = hashlib.sha256(payload).hexdigest()
    (root / sha).mkdir(exist_ok=True)
    (root / sha / name).write_bytes(payload)
    return f"{base}/{sha}/{name}", sha


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".part"))


@pytest.fixture(scope="module")
def vit_state_dict() -> dict[str, torch.Tensor]:
    return make_openai_state_dict(TINY_VIT)


def assert_same_outputs(model: torch.nn.Module, reference: CLIP, hp: dict[str, Any]) -> None:
    images, text = example_inputs(hp)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), reference.encode_image(images))
        torch.testing.assert_close(model.encode_text(text), reference.encode_text(text))


# --- model registry and preprocessing ------------------------------------------------------------

def test_available_models_and_their_urls() -> None:
    assert available_models() == OFFICIAL_NAMES
    for name in OFFICIAL_NAMES:
        match = re.fullmatch(r"https://openaipublic\.azureedge\.net/clip/models/([0-9a-f]{64})/([\w-]+)\.pt",
                             clip_api._MODELS[name])
        assert match, name
        assert match.group(2) == name.replace("/", "-").replace("@", "-")


def test_preprocess_gives_normalised_rgb_crops() -> None:
    gray = Image.new("L", (50, 90), color=128)  # not square, not RGB
    tensor = build_preprocess(32)(gray)
    assert tensor.shape == (3, 32, 32)
    expected = (128 / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(tensor[:, 16, 16], expected)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_preprocess_equals_open_clips(mode: str) -> None:
    """Random pixels on a non-square image: resize filter, crop position and normalisation all show."""
    from open_clip.transform import image_transform

    generator = torch.Generator().manual_seed(0)
    pixels = (torch.rand(97, 150, 4, generator=generator) * 255).to(torch.uint8).numpy()
    image = Image.fromarray(pixels, "RGBA").convert(mode)
    oracle = image_transform(224, is_train=False, mean=CLIP_MEAN, std=CLIP_STD)
    torch.testing.assert_close(build_preprocess(224)(image), oracle(image), rtol=0, atol=1e-6)


def test_openai_module_paths_keep_working() -> None:
    """``from clip import clip`` and ``clip.simple_tokenizer``, as scripts written for OpenAI's package use them."""
    from clip import clip as openai_style
    from clip import tokenize
    from clip.simple_tokenizer import SimpleTokenizer

    assert torch.equal(openai_style.tokenize(["a photo of a dog"]), tokenize(["a photo of a dog"]))
    assert openai_style._MODELS["RN50"].endswith("/RN50.pt") and openai_style._download is download
    assert str(openai_style._transform(32)) == str(build_preprocess(32))
    assert SimpleTokenizer().decode(SimpleTokenizer().encode("a photo of a dog")).strip() == "a photo of a dog"
    tokenizer = openai_style._tokenizer  # OpenAI's module-level tokenizer, and its public merge step
    assert tokenizer is openai_style._tokenizer and tokenizer.encode("dog") == [tokenizer.encoder["dog</w>"]]
    assert tokenizer.bpe("photos") == "photos</w>" and tokenizer.bpe("zqxj").replace(" ", "") == "zqxj</w>"
    assert [tokenizer.encoder[piece] for piece in tokenizer.bpe("zqxj").split()] == tokenizer.encode("zqxj")


# --- loading files ------------------------------------------------------------------------------

@pytest.mark.parametrize("wrap", [None, "state_dict", "model", "module.", "attn_mask"])
def test_load_state_dict_file(tmp_path: Path, vit_state_dict: dict[str, torch.Tensor], wrap: str | None) -> None:
    path = tmp_path / "tiny.pt"
    if wrap == "module.":  # saved from a DistributedDataParallel wrapper
        torch.save({"state_dict": {f"module.{k}": v for k, v in vit_state_dict.items()}}, path)
    elif wrap == "attn_mask":  # re-implementations that keep the causal mask as a buffer save it
        torch.save({**vit_state_dict, "attn_mask": torch.full((TINY_VIT["context_length"],) * 2, float("-inf")).triu(1)}, path)
    else:
        torch.save(vit_state_dict if wrap is None else {wrap: vit_state_dict, "epoch": 3}, path)
    model, preprocess = load(path, device=torch.device("cpu"))
    assert isinstance(model, CLIP) and not model.training and model.dtype == torch.float32
    assert_same_outputs(model, build_model(vit_state_dict), TINY_VIT)
    assert preprocess(Image.new("RGB", (40, 40))).shape == (3, 32, 32)


def save_torchscript_archive(model: CLIP, path: Path, hp: dict[str, Any], half: bool = False,
                             device_constants: str | None = None) -> None:
    """Trace ``model`` like OpenAI's archives: encode_image/encode_text/forward, plus the three scalar
    tensors (input_resolution, context_length, vocab_size) that their state_dicts carry.

    ``half`` traces in fp16 and ``device_constants`` rewrites the traced device constants (e.g. to
    ``"cuda:0"``): together, what OpenAI's CUDA-traced fp16 archives hold, made without a GPU."""

    class WithArchiveScalars(CLIP):
        def __init__(self) -> None:
            super().__init__(**hp)
            del self.context_length, self.vocab_size
            for name, value in (("input_resolution", hp["image_resolution"]),
                                ("context_length", hp["context_length"]), ("vocab_size", hp["vocab_size"])):
                self.register_buffer(name, torch.tensor(value))

    source = WithArchiveScalars()
    source.load_state_dict(model.state_dict(), strict=False)
    images, text = example_inputs(hp)
    if half:
        source, images = source.half(), images.half()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer and deprecation chatter
        # No trace check: it re-traces every method, and MultiheadAttention's kernel choice differs per run.
        traced = torch.jit.trace_module(source.eval(), {
            "forward": (images, text), "encode_image": (images,), "encode_text": (text,)}, check_trace=False)
        if device_constants:
            for module in traced.modules():
                for method in module._c._method_names():
                    for node in module._c._get_method(method).graph.findAllNodes("prim::Constant"):
                        if str(node.output().type()) == "Device":
                            node.s_("value", device_constants)
        torch.jit.save(traced, str(path))


@pytest.mark.parametrize("hp", [TINY_RESNET, TINY_VIT], ids=["resnet", "vit"])
def test_torchscript_archive_round_trip(tmp_path: Path, hp: dict[str, Any]) -> None:
    reference = build_model(make_openai_state_dict(hp))
    path = tmp_path / "archive.pt"
    save_torchscript_archive(reference, path, hp)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.load is deprecated in favour of torch.export
        archive_keys = set(torch.jit.load(str(path)).state_dict())
    assert archive_keys >= {"input_resolution", "context_length", "vocab_size"}

    eager, preprocess = load(str(path), jit=False)
    assert isinstance(eager, CLIP)
    assert_same_outputs(eager, reference, hp)
    assert preprocess(Image.new("RGB", (99, 70))).shape[-1] == hp["image_resolution"]

    scripted, preprocess = load(str(path), jit=True)
    assert isinstance(scripted, torch.jit.ScriptModule)
    assert_same_outputs(scripted, reference, hp)
    assert preprocess(Image.new("RGB", (99, 70))).shape[-1] == hp["image_resolution"]


@pytest.mark.parametrize("hp", [TINY_RESNET, TINY_VIT], ids=["resnet", "vit"])
def test_cuda_fp16_archive_runs_on_cpu_with_jit(tmp_path: Path, hp: dict[str, Any]) -> None:
    """OpenAI's archives were traced on CUDA in fp16, which their graphs remember: jit=True must rewrite that."""
    path = tmp_path / "cuda_fp16.pt"
    save_torchscript_archive(build_model(make_openai_state_dict(hp)), path, hp, half=True, device_constants="cuda:0")
    images, text = example_inputs(hp)
    if not torch.cuda.is_available():  # the archive as traced cannot run here: proof that load has work to do
        with warnings.catch_warnings(), pytest.raises(RuntimeError):
            warnings.simplefilter("ignore")
            torch.jit.load(str(path), map_location="cpu").encode_text(text)
    scripted, _ = load(str(path), jit=True)
    eager, _ = load(str(path), jit=False)  # the same fp16-rounded weights in our fp32 model
    with torch.no_grad():
        for method, inputs in (("encode_image", images), ("encode_text", text)):
            features = getattr(scripted, method)(inputs)
            assert features.dtype == torch.float32 and features.device.type == "cpu"
            torch.testing.assert_close(features, getattr(eager, method)(inputs))


def test_jit_true_on_state_dict_falls_back_to_eager(tmp_path: Path, vit_state_dict: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "tiny.pt"
    torch.save(vit_state_dict, path)
    with pytest.warns(UserWarning, match="not a TorchScript archive"):
        model, _ = load(str(path), jit=True)
    assert isinstance(model, CLIP)


# --- bad input --------------------------------------------------------------------------------

class Payload:
    """An arbitrary class: weights_only loading must refuse to rebuild it."""


@pytest.mark.parametrize("write, message", [
    (lambda p: p.write_text("these are not weights\n"), "neither a PyTorch checkpoint nor a TorchScript"),
    (lambda p: torch.save({"weights": Payload()}, p), "Python objects other than tensors.*Payload"),
    pytest.param(lambda p: p.write_bytes(pickle.dumps({"a": 1})), "Python objects other than tensors",
                 marks=pytest.mark.filterwarnings("ignore:Detected pickle protocol")),
    (lambda p: torch.save([torch.zeros(2)], p), "holds a list, not a state_dict"),
    (lambda p: torch.save(torch.nn.Linear(2, 2).state_dict(), p), "not an OpenAI CLIP state_dict.*weight"),
    (lambda p: torch.save({"model": {"epoch": 1}}, p), "not an OpenAI CLIP state_dict"),
], ids=["text", "arbitrary-object", "plain-pickle", "list", "other-state-dict", "no-tensors"])
def test_bad_files_raise_clear_errors(tmp_path: Path, write: Any, message: str) -> None:
    path = tmp_path / "bad.pt"
    write(path)
    with pytest.raises(CLIPLoadError, match=message) as info:
        load(str(path))
    assert str(path) in str(info.value)
    assert info.value.__cause__ is None
    assert info.value.__context__ is None or info.value.__suppress_context__  # no chained traceback


def test_corrupt_torchscript_archive(tmp_path: Path) -> None:
    path = tmp_path / "broken.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("broken/constants.pkl", b"garbage")
    with pytest.raises(CLIPLoadError, match="looks like a TorchScript archive but cannot be loaded"):
        load(str(path))


def test_unknown_name_lists_models_and_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(CLIPLoadError, match=r"'RN51' is neither.*RN50, RN101.*ViT-L/14@336px"):
        load("RN51")
    missing = tmp_path / "nowhere" / "RN50.pt"
    with pytest.raises(CLIPLoadError, match=re.escape(str(missing))):
        load(missing)
    with pytest.raises(CLIPLoadError, match="is a directory"):
        load(tmp_path)


def test_invalid_device(tmp_path: Path) -> None:
    with pytest.raises(CLIPLoadError, match="invalid device 'gpu'"):
        load(tmp_path / "unused.pt", device="gpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda(tmp_path: Path) -> None:
    with pytest.raises(CLIPLoadError, match="CUDA is not available"):
        load(tmp_path / "unused.pt", device="cuda")


# --- downloads ----------------------------------------------------------------------------------

def test_download_verifies_and_is_atomic(http_root: tuple[Path, str], tmp_path: Path) -> None:
    payload = os.urandom(3 * (1 << 20) + 17)  # several read chunks
    url, _ = publish(http_root, payload)
    cache = tmp_path / "cache"
    path = download(url, cache)
    assert Path(path) == cache / "tiny.pt" and Path(path).read_bytes() == payload
    assert leftovers(cache) == []


def test_corrupt_cached_file_is_replaced(http_root: tuple[Path, str], tmp_path: Path) -> None:
    payload = os.urandom(100_000)
    url, _ = publish(http_root, payload)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "tiny.pt").write_bytes(payload[:5000])  # an interrupted copy from elsewhere
    with pytest.warns(UserWarning, match="SHA-256 is not"):
        path = download(url, cache)
    assert Path(path).read_bytes() == payload and leftovers(cache) == []


def test_download_with_wrong_checksum_is_discarded(http_root: tuple[Path, str], tmp_path: Path) -> None:
    url, sha = publish(http_root, b"the real weights")
    (http_root[0] / sha / "tiny.pt").write_bytes(b"tampered in transit")
    cache = tmp_path / "cache"
    with pytest.raises(CLIPLoadError, match=f"expected {sha}.*discarded"):
        download(url, cache)
    assert list(cache.iterdir()) == []


def test_unreachable_url_says_where_to_put_the_file(http_root: tuple[Path, str], tmp_path: Path) -> None:
    url = f"{http_root[1]}/{'0' * 64}/absent.pt"
    with pytest.raises(CLIPLoadError, match=re.escape(url) + ".*" + re.escape(str(tmp_path / "absent.pt"))):
        download(url, tmp_path)
    assert leftovers(tmp_path) == []


class _FullDisk(io.FileIO):
    """The download's temporary file on a disk that has just filled up."""

    def write(self, data: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")


def test_write_failure_during_download_is_a_load_error(http_root: tuple[Path, str], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    url, _ = publish(http_root, os.urandom(10_000))
    monkeypatch.setattr(clip_api.os, "fdopen", lambda fd, mode: _FullDisk(fd, "w"))
    with pytest.raises(CLIPLoadError, match="No space left on device.*free space"):
        download(url, tmp_path)
    monkeypatch.undo()
    assert leftovers(tmp_path) == [] and not (tmp_path / "tiny.pt").exists()


def test_load_by_name_downloads_once(http_root: tuple[Path, str], tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch,
                                     vit_state_dict: dict[str, torch.Tensor]) -> None:
    checkpoint = tmp_path / "tiny-vit.pt"
    torch.save(vit_state_dict, checkpoint)
    url, _ = publish(http_root, checkpoint.read_bytes(), name="Tiny-ViT.pt")
    monkeypatch.setitem(clip_api._MODELS, "Tiny/ViT", url)
    monkeypatch.setenv("CLIP_CACHE", str(tmp_path / "cache"))
    model, _ = load("Tiny/ViT")
    assert_same_outputs(model, build_model(vit_state_dict), TINY_VIT)
    cached = tmp_path / "cache" / "Tiny-ViT.pt"
    assert cached.is_file()
    for served in http_root[0].rglob("Tiny-ViT.pt"):
        served.unlink()  # a second load must use the verified cache, not the network
    model, _ = load("Tiny/ViT")
    assert isinstance(model, CLIP)


class _Hub(BaseHTTPRequestHandler):
    """OpenAI's host answering 404 and the Hugging Face Hub as ``download_model`` sees it: a resolve URL
    redirects to storage and carries the file's SHA-256 in ``X-Linked-Etag``."""

    payload = b""
    etag: str | None = None
    openai_body: bytes | None = None  # what OpenAI's retired host answers with 200 (e.g. a parking page)

    def log_message(self, format: str, *args: Any) -> None:
        """No access logs in the test output."""

    def _answer(self, body: bool) -> None:
        if self.path == "/timm/tiny_clip.openai/resolve/main/open_clip_pytorch_model.bin":
            self.send_response(302)
            self.send_header("Location", "/storage/blob")
            if self.etag is not None:
                self.send_header("X-Linked-Etag", f'"{self.etag}"')
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path.startswith("/clip/models/") and self.openai_body is not None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(self.openai_body)))
            self.end_headers()
            if body:
                self.wfile.write(self.openai_body)
        elif self.path == "/storage/blob":
            self.send_response(200)
            self.send_header("Content-Length", str(len(self.payload)))
            self.end_headers()
            if body:
                self.wfile.write(self.payload)
        else:
            self.send_error(404)

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        vit_state_dict: dict[str, torch.Tensor]) -> Iterator[type[_Hub]]:
    """A local server for the name 'Tiny/ViT': OpenAI's URL is gone, the Hub serves the tiny state_dict."""
    checkpoint = tmp_path / "hub.bin"
    torch.save(vit_state_dict, checkpoint)
    handler = type("Hub", (_Hub,), {"payload": checkpoint.read_bytes()})
    handler.etag = hashlib.sha256(handler.payload).hexdigest()
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setitem(clip_api._MODELS, "Tiny/ViT", f"{base}/clip/models/{'1' * 64}/Tiny-ViT.pt")
    monkeypatch.setitem(clip_api._HF_REPOS, "Tiny/ViT", "timm/tiny_clip.openai")
    monkeypatch.setenv("HF_ENDPOINT", base)
    yield handler
    server.shutdown()
    server.server_close()
    thread.join()


def test_hugging_face_copy_when_openai_is_gone(hub: type[_Hub], tmp_path: Path,
                                               vit_state_dict: dict[str, torch.Tensor]) -> None:
    cache = tmp_path / "cache"
    with pytest.warns(UserWarning, match="Not Found.*trying the Hugging Face copy"):
        model, _ = load("Tiny/ViT", download_root=cache)
    assert_same_outputs(model, build_model(vit_state_dict), TINY_VIT)
    assert sorted(p.name for p in cache.iterdir()) == ["Tiny-ViT.openai-hf.bin", "Tiny-ViT.openai-hf.bin.sha256"]
    hub.payload, hub.etag = b"", None  # offline from now on: the recorded hash verifies the cached copy
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model, _ = load("Tiny/ViT", download_root=cache)
    assert_same_outputs(model, build_model(vit_state_dict), TINY_VIT)
    (cache / "Tiny-ViT.pt").write_bytes(b"half a file")  # a broken OpenAI file must not hide the verified copy
    with pytest.warns(UserWarning, match="Tiny-ViT.pt is not OpenAI's file.*using the verified Hugging Face copy"):
        model, _ = load("Tiny/ViT", download_root=cache)
    assert_same_outputs(model, build_model(vit_state_dict), TINY_VIT)
    (cache / "Tiny-ViT.pt").unlink()
    (cache / "Tiny-ViT.openai-hf.bin").write_bytes(b"damaged")  # no longer matches its record: fetched again
    with pytest.warns(UserWarning, match="trying the Hugging Face copy"), \
            pytest.raises(CLIPLoadError, match="publishes no SHA-256"):
        load("Tiny/ViT", download_root=cache)


def test_openai_host_serving_other_bytes_falls_back_to_the_hugging_face_copy(
        hub: type[_Hub], tmp_path: Path, vit_state_dict: dict[str, torch.Tensor]) -> None:
    hub.openai_body = b"<html>This domain is parked</html>"
    cache = tmp_path / "cache"
    with pytest.warns(UserWarning, match="discarded.*trying the Hugging Face copy"):
        model, _ = load("Tiny/ViT", download_root=cache)
    assert_same_outputs(model, build_model(vit_state_dict), TINY_VIT)
    assert sorted(p.name for p in cache.iterdir()) == ["Tiny-ViT.openai-hf.bin", "Tiny-ViT.openai-hf.bin.sha256"]


def test_hugging_face_copy_must_match_the_published_hash(hub: type[_Hub], tmp_path: Path) -> None:
    hub.etag = hashlib.sha256(b"other weights").hexdigest()
    with pytest.warns(UserWarning, match="trying the Hugging Face copy"), \
            pytest.raises(CLIPLoadError, match=f"expected {hub.etag}.*discarded"):
        load("Tiny/ViT", download_root=tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_neither_source_names_both_errors_and_where_to_put_the_file(hub: type[_Hub], tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(clip_api._HF_REPOS, "Tiny/ViT", "timm/absent")
    with pytest.warns(UserWarning), pytest.raises(CLIPLoadError) as err:
        load("Tiny/ViT", download_root=tmp_path / "cache")
    message = str(err.value)
    assert "neither OpenAI's file nor its Hugging Face copy" in message and "HTTP 404" in message
    assert str(tmp_path / "cache" / "Tiny-ViT.pt") in message


def test_every_official_model_has_a_hugging_face_copy() -> None:
    assert set(clip_api._HF_REPOS) == set(OFFICIAL_NAMES)


# --- download script ------------------------------------------------------------------------------

def test_download_script_rejects_unknown_models(tmp_path: Path) -> None:
    script = REPO / "clip" / "weights" / "download_clip_models.sh"
    result = subprocess.run(["bash", str(script), "RN51", "ViT-B/33"], capture_output=True, text=True,
                            timeout=120, check=False, env={**os.environ, "CLIP_DIR": str(tmp_path)})
    assert result.returncode == 2
    assert "unknown CLIP model(s): RN51, ViT-B/33" in result.stderr and "ViT-L/14@336px" in result.stderr
    assert list(tmp_path.iterdir()) == []
