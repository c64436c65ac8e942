"""Installs the two packages of this repository: ``lgd`` (the method) and ``clip`` (our CLIP)."""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent

setup(
    name="lgd",
    version="0.1.0",
    description="Language-Guided Distillation: pre-train lightweight backbones from a frozen CLIP teacher",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",  # PEP 604 unions in the config dataclasses are evaluated at run time
    packages=find_packages(include=["lgd", "lgd.*", "clip", "clip.*"]),
    package_data={"clip": ["bpe_simple_vocab_16e6.txt.gz", "LICENSE-CLIP", "weights/*.sh"]},
    # Upper bounds are the newest releases we test against; raise them after a green CI run.
    install_requires=[
        "torch>=2.3,<=2.14.1",  # torch.amp.GradScaler(device) is 2.3+
        "torchvision>=0.18,<=0.29.1",
        "ftfy",
        "regex",
        "tqdm",
        "numpy",
        "pillow",
        "pyyaml",  # experiment configs in configs/*.yaml
        "tensorboard",  # training curves; the JSON-lines log works without it
    ],
    extras_require={
        # open_clip_torch is the independent oracle for CLIP parity tests; mmengine parses the
        # OpenMMLab configs (it resolves `mmdet::`/`mmseg::` bases through pkg_resources, which
        # setuptools 81 removed); mmdet and mmsegmentation (with mmcv-lite: full mmcv has no wheels)
        # are the real base configs and backbones our configs and conversions are checked against;
        # pycocotools computes COCO AP in the transfer tests.
        "test": ["pytest", "open_clip_torch", "mmengine", "setuptools<81", "pycocotools",
                 "mmcv-lite==2.1.0", "mmdet==3.3.0", "mmsegmentation==1.2.2"],
        "coco": ["pycocotools"],
    },
)
