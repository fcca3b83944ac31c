"""Image tasks: a folder of class subfolders (``root/cat/001.jpg``, ``root/dog/002.png``), read with Pillow.

Each image is converted to RGB, resized so its shorter side is ``resize`` pixels (bilinear), cut
to a centred ``crop`` x ``crop`` square, scaled to [0, 1] and normalised with ``mean``/``std`` per
channel: float32 ``(N, 3, crop, crop)``, the usual ImageNet preprocessing by default (256, 224,
ImageNet's mean and std). The label of an image is the index of its subfolder in sorted order.
Files whose suffix is not an image format's, and hidden files and folders, are not read.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from analysis.data.options import Options, split_calib_eval
from analysis.data.tasks import Task, TaskError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
OPTIONS = ("resize", "crop", "mean", "std", "calib", "batch_size")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _visible(p: Path) -> bool:
    return not p.name.startswith(".")


def image_files(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """``(class names, [(file, class index)])``: subfolders in sorted order, their images sorted by name."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and _visible(p))
    if not classes:
        raise TaskError(f"{root}: holds no class subfolders (expected {root}/<class>/<image>)")
    files = []
    for i, name in enumerate(classes):
        imgs = sorted(p for p in (root / name).iterdir()
                      if p.is_file() and _visible(p) and p.suffix.lower() in IMAGE_SUFFIXES)
        if not imgs:
            raise TaskError(f"{root / name}: class folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
        files += [(f, i) for f in imgs]
    return classes, files


def preprocess(file: Path, resize: int, crop: int, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """One image as float32 ``(3, crop, crop)``: shorter side to ``resize``, centre crop, normalised."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file) as im:
            im = im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise TaskError(f"{file}: not a readable image ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    w, h = im.size
    # as torchvision's Resize(int): the shorter side becomes ``resize``, the longer keeps the aspect ratio
    ow, oh = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
    im = im.resize((ow, oh), Image.BILINEAR)
    left, top = int(round((ow - crop) / 2.0)), int(round((oh - crop) / 2.0))
    a = np.asarray(im.crop((left, top, left + crop, top + crop)), dtype=np.float32) / 255.0
    return ((a - mean) / std).transpose(2, 0, 1).astype(np.float32)


def image_folder_task(path: str | Path, *, options: dict | None = None, metric: str | None = None,
                      calib: int | None = None, seed: int = 0) -> Task:
    """A task from a folder of class subfolders of images (see the module docstring).

    Args:
        options: resize (default 256), crop (224, at most resize), mean and std (three comma-separated
            numbers each; ImageNet's by default), calib, batch_size (default 32).
        calib: calibration images drawn with ``seed`` (default a quarter, at most 128); the rest is evaluated.

    Raises:
        TaskError: no class subfolders, a class without images, an unreadable image, or a bad option.
    """
    root = Path(path)
    if not root.is_dir():
        raise TaskError(f"{root}: no such folder")
    opts = Options(options, str(root), OPTIONS)
    resize, crop = opts.int("resize", 256), opts.int("crop", 224)
    if crop > resize:
        raise TaskError(f"--task-option crop={crop}: must be at most resize={resize} ({root})")
    mean = np.asarray(opts.floats("mean", IMAGENET_MEAN, 3), dtype=np.float32)
    std = np.asarray(opts.floats("std", IMAGENET_STD, 3), dtype=np.float32)
    if (std <= 0).any():
        raise TaskError(f"--task-option std: must be positive ({root})")
    _, files = image_files(root)
    if len(files) < 2:
        raise TaskError(f"{root}: holds {len(files)} image(s); a task needs at least 2")
    x = np.stack([preprocess(f, resize, crop, mean, std) for f, _ in files])
    labels = np.asarray([c for _, c in files], dtype=np.int64)
    ci, ei = split_calib_eval(len(x), opts.calib(calib), seed)
    return Task(root.name, str(root), x[ci], x[ei], labels[ei], metric=metric, batch_size=opts.int("batch_size", 32))
