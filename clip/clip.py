"""OpenAI-compatible loader: ``available_models()``, ``load()`` and checksum-verified downloads.

``load`` accepts a model name (downloaded once into a cache directory, SHA-256 verified) or the path of
an OpenAI TorchScript archive or of a ``torch.save``'d state_dict, and returns our eager :class:`CLIP`
with the matching image preprocessing. State_dict files are never unpickled beyond tensors
(``weights_only=True``). TorchScript archives go through ``torch.jit.load``, which runs the archive's own
TorchScript code, as OpenAI's loader does: load archives only from sources you trust.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import pickle
import re
import ssl
import tempfile
import urllib.error
import urllib.request
import warnings
import zipfile
from collections.abc import Mapping
from typing import Any, BinaryIO

import torch
from PIL import Image
from torch import nn
from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor
from tqdm import tqdm

from .model import CLIP, CLIPLoadError, build_model, convert_weights, infer_hyperparameters
from .tokenizer import _default_tokenizer, tokenize

__all__ = ["CLIP_MEAN", "CLIP_STD", "CLIPLoadError", "available_models", "build_preprocess",
           "default_download_root", "download", "download_model", "load"]

# The SHA-256 of each file is the second-to-last segment of its URL; download() checks it.
_MODELS: dict[str, str] = {
    "RN50": "https://openaipublic.azureedge.net/clip/models/"
            "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762/RN50.pt",
    "RN101": "https://openaipublic.azureedge.net/clip/models/"
             "8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599/RN101.pt",
    "RN50x4": "https://openaipublic.azureedge.net/clip/models/"
              "7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd/RN50x4.pt",
    "RN50x16": "https://openaipublic.azureedge.net/clip/models/"
               "52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa/RN50x16.pt",
    "RN50x64": "https://openaipublic.azureedge.net/clip/models/"
               "be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c/RN50x64.pt",
    "ViT-B/32": "https://openaipublic.azureedge.net/clip/models/"
                "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
    "ViT-B/16": "https://openaipublic.azureedge.net/clip/models/"
                "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
    "ViT-L/14": "https://openaipublic.azureedge.net/clip/models/"
                "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
    "ViT-L/14@336px": "https://openaipublic.azureedge.net/clip/models/"
                      "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02/ViT-L-14-336px.pt",
}

# Hugging Face copies of the same weights (open_clip's state_dicts, whose keys are OpenAI's), tried when OpenAI's
# host cannot be reached: its CDN answers 404 since late 2025 (openai/CLIP issue 516). Set HF_ENDPOINT for a mirror.
_HF_REPOS: dict[str, str] = {
    "RN50": "timm/resnet50_clip.openai",
    "RN101": "timm/resnet101_clip.openai",
    "RN50x4": "timm/resnet50x4_clip.openai",
    "RN50x16": "timm/resnet50x16_clip.openai",
    "RN50x64": "timm/resnet50x64_clip.openai",
    "ViT-B/32": "timm/vit_base_patch32_clip_224.openai",
    "ViT-B/16": "timm/vit_base_patch16_clip_224.openai",
    "ViT-L/14": "timm/vit_large_patch14_clip_224.openai",
    "ViT-L/14@336px": "timm/vit_large_patch14_clip_336.openai",
}
_HF_FILE = "open_clip_pytorch_model.bin"

# Per-channel RGB statistics of CLIP's training images, which the image encoders expect.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_SHA256 = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1 << 20


def available_models() -> list[str]:
    """Names accepted by :func:`load` and :func:`download_model`."""
    return list(_MODELS)


def default_download_root() -> str:
    """``$CLIP_CACHE`` if set, else ``~/.cache/clip`` (where OpenAI's package keeps the same files)."""
    return os.path.expanduser(os.environ.get("CLIP_CACHE") or os.path.join("~", ".cache", "clip"))


def _to_rgb(image: Image.Image) -> Image.Image:
    """Grayscale, palette and RGBA images become 3-channel RGB (module-level so DataLoader workers can pickle it)."""
    return image.convert("RGB")


def build_preprocess(n_px: int) -> Compose:
    """CLIP's evaluation transform for a PIL image: bicubic resize of the short side, center crop, RGB,
    tensor in [0, 1], normalisation with :data:`CLIP_MEAN` / :data:`CLIP_STD`."""
    return Compose([
        Resize(n_px, interpolation=InterpolationMode.BICUBIC),
        CenterCrop(n_px),
        _to_rgb,
        ToTensor(),
        Normalize(CLIP_MEAN, CLIP_STD),
    ])


def _first_line(err: BaseException) -> str:
    """``Type: first line of the message``: torch's errors run to many lines of generic advice."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def _sha256_of_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class DownloadUnavailable(CLIPLoadError):
    """The server could not be reached or did not serve the file (as opposed to a bad file or a full disk)."""


class ChecksumMismatch(CLIPLoadError):
    """The server sent bytes other than the expected file (e.g. a retired host's parking page); they were discarded."""


def download(url: str, root: str | os.PathLike[str], sha256: str | None = None, filename: str | None = None) -> str:
    """Return the path of ``root/<filename>`` (default: the basename of ``url``), downloading it unless a
    verified copy is there.

    ``sha256`` defaults to the second-to-last URL segment (OpenAI's URL scheme). The file is streamed to
    a ``.part`` file in ``root`` and renamed only once its checksum matches, so an interrupted or
    corrupted download never becomes the cached file; an existing file with the wrong checksum is
    replaced.
    """
    expected = (sha256 or url.rstrip("/").split("/")[-2]).lower()
    if not _SHA256.fullmatch(expected):
        raise CLIPLoadError(f"no SHA-256 to verify {url} against: pass sha256= (64 hex digits), got {expected!r}")
    root = os.path.expanduser(os.fspath(root))
    filename = filename or os.path.basename(url.rstrip("/"))
    target = os.path.join(root, filename)
    if os.path.isfile(target):
        try:
            intact = _sha256_of_file(target) == expected
        except OSError as err:
            raise CLIPLoadError(f"cannot read the cached {target} ({_first_line(err)}); fix its permissions or "
                                "delete it") from None
        if intact:
            return target
        warnings.warn(f"{target} exists but its SHA-256 is not {expected}; downloading it again", stacklevel=2)
    elif os.path.exists(target):
        raise CLIPLoadError(f"{target} exists and is not a file; move it away so that {filename} can be stored there")

    try:
        os.makedirs(root, exist_ok=True)
        fd, part = tempfile.mkstemp(dir=root, prefix=filename + ".", suffix=".part")
    except OSError as err:
        raise CLIPLoadError(f"cannot write to the download directory {root} ({err.strerror or err}); pass "
                            "download_root= or set CLIP_CACHE to a writable directory") from None
    try:
        with os.fdopen(fd, "wb") as out:
            got = _stream_to(url, out, target, expected)
            out.flush()
            os.fsync(out.fileno())
        if got != expected:
            raise ChecksumMismatch(f"the download of {url} has SHA-256 {got}, expected {expected}; it was discarded. "
                                   f"Retry, or place a verified copy of the file at {target}")
        _publish(part, target)
    except OSError as err:  # a full disk, a broken TLS stream: the partial file is removed below
        raise CLIPLoadError(f"downloading {url} to {target} failed ({_first_line(err)}); check the free space "
                            f"there and the connection, then retry") from None
    finally:
        if os.path.exists(part):
            os.remove(part)
    return target


def _publish(part: str, target: str) -> None:
    """Give a finished temp file the permissions of a normal file and rename it into place."""
    umask = os.umask(0o022)
    os.umask(umask)
    os.chmod(part, 0o666 & ~umask)  # mkstemp's 0600 would hide a shared model cache from the team
    os.replace(part, target)


def _stream_to(url: str, out: BinaryIO, target: str, expected: str) -> str:
    """Copy ``url`` into the open binary file ``out`` with a progress bar; return the SHA-256 of the bytes."""
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            size = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024,
                      desc=os.path.basename(target)) as progress:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    progress.update(len(chunk))
    except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError, ssl.SSLError) as err:
        reason = getattr(err, "reason", None) or err
        raise DownloadUnavailable(f"could not download {url} ({reason}). Without network access, fetch that URL "
                                  f"on another machine and place the file at {target} (its SHA-256 must be "
                                  f"{expected}), or pass the file's path to clip.load()") from None
    return digest.hexdigest()


class _KeepRedirects(urllib.request.HTTPRedirectHandler):
    """Report a redirect instead of following it: Hugging Face puts a file's checksum on the redirect."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def hf_sha256(url: str) -> str:
    """The SHA-256 that the Hugging Face Hub publishes for a large file (its ``X-Linked-Etag`` header).

    It is the hash of the stored file, so a truncated or corrupted download is caught; it comes from the same
    server as the file, so unlike OpenAI's URL-embedded checksums it does not vouch for the server itself.
    """
    request = urllib.request.Request(url, method="HEAD")
    try:
        with urllib.request.build_opener(_KeepRedirects).open(request, timeout=60) as response:
            headers = response.headers
    except urllib.error.HTTPError as err:
        if err.code not in (301, 302, 303, 307, 308):
            raise DownloadUnavailable(f"{url} answered HTTP {err.code} ({err.reason})") from None
        headers = err.headers
    except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError) as err:
        raise DownloadUnavailable(f"could not reach {url} ({getattr(err, 'reason', None) or err})") from None
    etag = (headers.get("X-Linked-Etag") or "").strip().removeprefix("W/").strip('"').lower()
    if not _SHA256.fullmatch(etag):
        raise DownloadUnavailable(f"{url} publishes no SHA-256 (X-Linked-Etag header), so a download could not be "
                                  "verified")
    return etag


def download_model(name: str, download_root: str | os.PathLike[str] | None = None) -> str:
    """Download (or find, verified, in the cache) the official checkpoint ``name``; return its path.

    OpenAI's file (checksum in its URL) comes first; when its host cannot serve it, the same weights from the
    Hugging Face Hub (``$HF_ENDPOINT``, default https://huggingface.co), checked against the hash the Hub
    publishes, which is kept next to the file so that later loads verify it offline.
    """
    if name not in _MODELS:
        raise CLIPLoadError(f"unknown CLIP model {name!r}; available models: {', '.join(_MODELS)}")
    root = os.path.expanduser(os.fspath(download_root or default_download_root()))
    openai_path = os.path.join(root, os.path.basename(_MODELS[name]))
    mirror_path = os.path.splitext(openai_path)[0] + ".openai-hf.bin"
    if _matches_sha256(openai_path, _MODELS[name].split("/")[-2]):
        return openai_path
    if _matches_recorded_sha256(mirror_path):
        if os.path.exists(openai_path):
            warnings.warn(f"{openai_path} is not OpenAI's file (wrong SHA-256); using the verified Hugging Face copy "
                          f"{mirror_path}", stacklevel=2)
        return mirror_path
    try:
        return download(_MODELS[name], root)
    except (DownloadUnavailable, ChecksumMismatch) as openai_error:
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
        url = f"{endpoint}/{_HF_REPOS[name]}/resolve/main/{_HF_FILE}"
        warnings.warn(f"{openai_error}; trying the Hugging Face copy {url}", stacklevel=2)
        try:
            sha = hf_sha256(url)
            path = download(url, root, sha256=sha, filename=os.path.basename(mirror_path))
        except (DownloadUnavailable, ChecksumMismatch) as mirror_error:
            raise CLIPLoadError(f"{name}: neither OpenAI's file nor its Hugging Face copy could be downloaded. "
                                f"OpenAI: {openai_error} Hugging Face: {mirror_error}. Place OpenAI's file at "
                                f"{openai_path}, or pass the path of either file to clip.load()") from None
        _record_sha256(path, sha)
        return path


def _record_sha256(path: str, sha: str) -> None:
    """Keep the Hub's hash next to its file (atomically: another rank may be reading it) for offline checks."""
    fd, part = tempfile.mkstemp(dir=os.path.dirname(path), prefix=os.path.basename(path) + ".", suffix=".part")
    try:
        with os.fdopen(fd, "w", encoding="ascii") as record:
            record.write(sha + "\n")
        _publish(part, path + ".sha256")
    except OSError as err:
        raise CLIPLoadError(f"cannot record the SHA-256 of {path} in {path}.sha256 ({_first_line(err)}); check "
                            "the free space and permissions there") from None
    finally:
        if os.path.exists(part):
            os.remove(part)


def _matches_sha256(path: str, expected: str) -> bool:
    """Whether ``path`` is a readable file with SHA-256 ``expected`` (unreadable files are left to ``download``)."""
    try:
        return os.path.isfile(path) and _sha256_of_file(path) == expected.lower()
    except OSError:
        return False


def _matches_recorded_sha256(path: str) -> bool:
    """Whether ``path`` exists with the SHA-256 recorded in ``path.sha256`` when it was downloaded."""
    try:
        with open(path + ".sha256", encoding="ascii") as record:
            expected = record.read().strip()
    except (OSError, UnicodeDecodeError):
        return False
    return _SHA256.fullmatch(expected) is not None and _matches_sha256(path, expected)


def _is_torchscript_archive(path: str) -> bool:
    """TorchScript archives are zips holding ``<name>/code/`` and ``<name>/constants.pkl``; plain
    ``torch.save`` files are zips too, but have neither."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(entry.split("/")[1:2] == ["code"] or entry.endswith("/constants.pkl")
                       for entry in archive.namelist())
    except zipfile.BadZipFile:  # not a zip (e.g. a legacy pickle): torch.load decides
        return False
    except OSError as err:
        raise CLIPLoadError(f"cannot read {path} ({_first_line(err)})") from None


def _load_checkpoint(path: str) -> Mapping[str, Any]:
    """The CLIP state_dict in a ``torch.save`` file: the top-level dict, or one under "state_dict"/"model"."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        detail = next((line.strip() for line in str(err).splitlines() if "Unsupported" in line), "")
        raise CLIPLoadError(f"{path} holds Python objects other than tensors, which are not unpickled for safety "
                            f"({detail or 'weights_only=True refused it'}). Save the weights alone with "
                            "torch.save(model.state_dict(), path)") from None
    except Exception as err:  # torch.load reports non-checkpoints with many exception types
        raise CLIPLoadError(f"{path} is neither a PyTorch checkpoint nor a TorchScript archive "
                            f"(torch.load failed with {_first_line(err)})") from None
    if not isinstance(obj, Mapping):
        raise CLIPLoadError(f"{path} holds a {type(obj).__name__}, not a state_dict")
    for candidate in (obj, obj.get("state_dict"), obj.get("model")):
        if isinstance(candidate, Mapping) and "text_projection" in candidate:
            return candidate
        if isinstance(candidate, Mapping) and "module.text_projection" in candidate:  # saved from a DDP wrapper
            return {k.removeprefix("module."): v for k, v in candidate.items()}
    return obj  # build_model names the keys it lacks


_HALF, _FLOAT = 5, 6  # TorchScript's ScalarType codes of torch.float16 and torch.float32


def retarget_archive(archive: torch.jit.ScriptModule, device: torch.device) -> torch.jit.ScriptModule:
    """Make a traced CLIP archive run on ``device``.

    Tracing freezes the tracing device (OpenAI's: CUDA) into the graphs as constants, and the fp16 casts
    of their half-precision weights (``image.type(self.dtype)``) as dtype constants; moving the weights
    alone leaves both behind. So: point every device constant at ``device`` and, on CPU (where fp16 is slow
    and imprecise), run in fp32 by turning the graphs' fp16 casts into fp32 ones.
    """
    archive = archive.to(device)
    if device.type == "cpu":
        archive = archive.float()
    for module in archive.modules():
        for method in module._c._method_names():
            graph = module._c._get_method(method).graph
            for node in graph.findAllNodes("prim::Constant"):
                if str(node.output().type()) == "Device" and node.kindOf("value") == "s":
                    node.s_("value", str(device))
            if device.type != "cpu":
                continue
            for node in graph.nodes():
                for position in _dtype_inputs(node):
                    value = node.inputsAt(position)
                    if (value.node().kind() == "prim::Constant" and str(value.type()) == "int"
                            and value.node().i("value") == _HALF):
                        with graph.insert_point_guard(node):  # a new constant: the old one may have other uses
                            node.replaceInput(position, graph.insertConstant(_FLOAT))
    return archive


def _dtype_inputs(node: torch._C.Node) -> list[int]:
    """Positions of the inputs of ``node`` that its operator schema declares as a dtype (``ScalarType``)."""
    schema = node.schema()
    if schema == "(no schema)":
        return []
    arguments = torch._C.parse_schema(schema).arguments
    return [i for i, arg in enumerate(arguments[: node.inputsSize()]) if arg.name == "dtype"]


def _resolve(name: str | os.PathLike[str], download_root: str | os.PathLike[str] | None) -> str:
    """A model name is downloaded (or found in the cache); anything else must be an existing file."""
    spec = os.fspath(name)
    if spec in _MODELS:
        return download_model(spec, download_root)
    path = os.path.expanduser(spec)
    if os.path.isfile(path):
        return path
    if os.path.isdir(path):
        raise CLIPLoadError(f"{path} is a directory; pass the checkpoint file inside it")
    raise CLIPLoadError(f"{spec!r} is neither a CLIP model name nor an existing file. Available models: "
                        f"{', '.join(_MODELS)}; or pass the path of an OpenAI CLIP checkpoint")


def load(name: str | os.PathLike[str], device: str | torch.device = "cpu", jit: bool = False,
         download_root: str | os.PathLike[str] | None = None) -> tuple[nn.Module, Compose]:
    """Load a CLIP model and its image preprocessing, like OpenAI's ``clip.load``.

    ``name`` is one of :func:`available_models` (downloaded into ``download_root``, default
    :func:`default_download_root`) or the path of an OpenAI TorchScript archive or of a state_dict.
    With ``jit=False`` (default) the weights go into our eager :class:`CLIP`, in eval mode, fp32 on
    CPU and on CUDA fp16 matrices with fp32 norms (:func:`~clip.model.convert_weights`, as OpenAI's loader does). ``jit=True`` returns the TorchScript archive itself,
    retargeted to ``device`` (:func:`retarget_archive`: fp32 on CPU, the archive's own precision on CUDA).
    Every failure raises :class:`CLIPLoadError`.
    """
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise CLIPLoadError(f"invalid device {device!r}; use e.g. 'cpu', 'cuda' or 'cuda:1'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIPLoadError(f"device {str(device)!r} was requested but CUDA is not available here; use device='cpu'")
    path = _resolve(name, download_root)
    if _is_torchscript_archive(path):
        try:
            with warnings.catch_warnings():
                # OpenAI ships TorchScript, so torch's advice to move to torch.export cannot be acted on.
                warnings.filterwarnings("ignore", message=".*torch.jit.load.* is deprecated", category=FutureWarning)
                archive = torch.jit.load(path, map_location="cpu")
        except Exception as err:  # TorchScript raises RuntimeError or its own error types
            raise CLIPLoadError(f"{path} looks like a TorchScript archive but cannot be loaded "
                                f"({_first_line(err)})") from None
        state_dict = archive.state_dict()
        if jit:
            try:
                n_px = infer_hyperparameters(state_dict)["image_resolution"]
            except CLIPLoadError as err:
                raise CLIPLoadError(f"{path}: {err}") from None
            try:
                return retarget_archive(archive, device).eval(), build_preprocess(n_px)
            except RuntimeError as err:  # a graph this rewrite does not understand
                raise CLIPLoadError(f"{path}: cannot move the TorchScript archive to {device} ({_first_line(err)}); "
                                    "load it with jit=False") from None
    else:
        if jit:
            warnings.warn(f"{path} is not a TorchScript archive; loading its state_dict into the eager model",
                          stacklevel=2)
        state_dict = _load_checkpoint(path)
    try:
        model: CLIP = build_model(state_dict)
    except CLIPLoadError as err:
        raise CLIPLoadError(f"{path}: {err}") from None
    model = model.to(device)
    if device.type == "cuda":
        convert_weights(model)
    return model, build_preprocess(model.visual.input_resolution)


_download = download  # OpenAI's names: the checksum comes from the URL, as theirs does
_transform = build_preprocess


def __getattr__(name: str) -> Any:
    """``clip.clip._tokenizer``, OpenAI's module-level tokenizer, built on first use (it takes about a second)."""
    if name == "_tokenizer":
        return _default_tokenizer()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

# What scripts written for OpenAI's package import from ``clip.clip`` (``from clip import clip``).
__all__ = ["available_models", "load", "tokenize", "_MODELS", "_download", "_transform"]
