#!/usr/bin/env bash
# Download official OpenAI CLIP checkpoints, SHA-256 verified, into $CLIP_DIR, by default where clip.load()
# looks by itself ($CLIP_CACHE, else ~/.cache/clip), so nothing has to be pointed at them.
#
#   clip/weights/download_clip_models.sh [MODEL ...]      (default: RN50)
#   clip/weights/download_clip_models.sh RN50 ViT-B/16 ViT-L/14@336px
#
# The checksum logic is clip.clip.download_model, the same code clip.load() uses, so files that are
# already present and intact are not fetched again, corrupt ones are replaced, and when OpenAI's host cannot
# serve a file its Hugging Face copy is fetched instead (verified against the Hub's SHA-256). Afterwards use
#   clip.load("RN50")   or, with CLIP_DIR=<dir>,   clip.load("RN50", download_root=<dir>) (--clip-root <dir> in lgd);
# the path printed for each model (RN50.pt, or RN50.openai-hf.bin for a Hugging Face copy) also works as clip.load(path).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
dest="${CLIP_DIR:-}"
repo_root="$(cd "$here/../.." && pwd)"

if [ "$#" -eq 0 ]; then
    set -- RN50
fi

PYTHONPATH="$repo_root${PYTHONPATH:+:$PYTHONPATH}" "${PYTHON:-python3}" - "$dest" "$@" <<'PY'
import sys

from clip.clip import CLIPLoadError, available_models, download_model

dest, names = sys.argv[1], sys.argv[2:]
if any(name in ("-h", "--help") for name in names):
    print("usage: download_clip_models.sh [MODEL ...]  (default RN50; target dir: $CLIP_DIR, else clip.load's cache)")
    print("models: " + " ".join(available_models()))
    sys.exit(0)
unknown = [name for name in names if name not in available_models()]
if unknown:
    print(f"unknown CLIP model(s): {', '.join(unknown)}; available: {' '.join(available_models())}",
          file=sys.stderr)
    sys.exit(2)
failed = False
for name in names:
    try:
        print(f"{name}: {download_model(name, dest or None)}", flush=True)
    except CLIPLoadError as err:
        print(f"{name}: error: {err}", file=sys.stderr)
        failed = True
sys.exit(1 if failed else 0)
PY
