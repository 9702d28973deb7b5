"""A model registry in a directory: one folder per (model, student version), written atomically.

    <root>/<model>/<version>/model.pt         state dict
                            model.torchscript  TorchScript export (torch.jit.load; takes float32 (n, f), returns logits)
                            metadata.json        architecture, features, sha256 of each file, metrics, parent, config
    <root>/<model>/current                       the promoted version's name

A version folder is written under a temporary name and renamed into place, so a reader never sees
half an artifact; ``current`` is replaced the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

ARTIFACTS = ("model.pt", "model.torchscript")
_SAFE = re.compile(r"[^A-Za-z0-9._-]")


@contextmanager
def torchscript_allowed() -> Iterator[None]:
    """TorchScript on purpose: recent PyTorch releases deprecate it in favour of torch.export, but it is the
    format serving stacks load today (libtorch, Triton's PyTorch backend, TorchServe) and the one the
    issue asks for. Only that FutureWarning is silenced, only here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)
        yield


def _safe(name: str) -> str:
    """A file-system-safe folder name for a model (its real name is in metadata.json)."""
    return _SAFE.sub("_", name) or "_"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Registry:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _model_dir(self, model: str) -> Path:
        return self.root / _safe(model)

    def versions(self, model: str) -> list[str]:
        folder = self._model_dir(model)
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if p.is_dir() and (p / "metadata.json").is_file())

    def next_version(self, model: str, parent: str | None) -> str:
        """``<parent>-kd<n>``: the n-th student distilled from ``parent`` (names never repeat)."""
        stem = f"{parent or 'student'}-kd"
        taken = {v for v in self.versions(model)}
        n = 1
        while _safe(f"{stem}{n}") in taken:
            n += 1
        return f"{stem}{n}"

    def register(self, model: str, version: str, module: torch.nn.Module, metadata: dict[str, Any]) -> Path:
        folder = self._model_dir(model)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / _safe(version)
        if target.exists():
            raise FileExistsError(f"{model} {version} is already registered")
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=folder))
        try:
            torch.save(module.state_dict(), staging / "model.pt")
            with torchscript_allowed():
                torch.jit.script(module).save(str(staging / "model.torchscript"))
            meta = {**metadata, "model": model, "student_version": version, "registered_at": int(time.time() * 1000),
                    "sha256": {name: sha256_of(staging / name) for name in ARTIFACTS}}
            (staging / "metadata.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
            os.replace(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return target

    def promote(self, model: str, version: str) -> None:
        folder = self._model_dir(model)
        pointer = folder / ".current.tmp"
        pointer.write_text(version + "\n")
        os.replace(pointer, folder / "current")

    def current(self, model: str) -> str | None:
        pointer = self._model_dir(model) / "current"
        return pointer.read_text().strip() if pointer.is_file() else None

    def metadata(self, model: str, version: str) -> dict[str, Any]:
        return dict(json.loads((self._model_dir(model) / _safe(version) / "metadata.json").read_text()))

    def load_torchscript(self, model: str, version: str) -> torch.jit.ScriptModule:
        """The exported student, after checking its sha256 against the metadata."""
        folder = self._model_dir(model) / _safe(version)
        expected = self.metadata(model, version)["sha256"]["model.torchscript"]
        path = folder / "model.torchscript"
        if sha256_of(path) != expected:
            raise ValueError(f"{path}: sha256 does not match metadata.json")
        with torchscript_allowed():
            return torch.jit.load(str(path))
