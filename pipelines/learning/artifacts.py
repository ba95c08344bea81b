"""Model directories: writing, digesting and loading the files a model version is made of."""

from __future__ import annotations

import functools
import hashlib
import subprocess
from pathlib import Path

from pipelines import __version__
from pipelines.config import PROJECT_ROOT

MODEL_FILES = ("model.onnx", "weights.safetensors", "model_card.json", "metadata.json")


def model_digest(model_dir: Path) -> str:
    """sha256 over the model's weights and graph: what a base-model reference pins."""
    digest = hashlib.sha256()
    for name in ("model.onnx", "weights.safetensors"):
        with (model_dir / name).open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return "sha256:" + digest.hexdigest()


def save_weights(model, model_dir: Path) -> Path:
    from safetensors.torch import save_file

    path = model_dir / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def load_weights(model_dir: Path) -> dict:
    """The state dict of a model directory. safetensors, never pickle: weights come from other sites."""
    from safetensors.torch import load_file

    return load_file(str(model_dir / "weights.safetensors"))


def load_model(model_dir: Path):
    """The model of a model directory, rebuilt from its metadata.json (family, architecture, spec)
    with its weights loaded; metadata without a family is the digits CNN."""
    import json

    from pipelines.learning.families import model_from_metadata

    model = model_from_metadata(json.loads((model_dir / "metadata.json").read_text()))
    model.load_state_dict(load_weights(model_dir))
    model.eval()
    return model


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """Package version plus the project's git commit when run from a checkout."""
    result = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, check=False
    )
    commit = result.stdout.strip() if result.returncode == 0 else "unknown"
    return f"{__version__}+{commit[:12]}" if commit != "unknown" else __version__


def code_commit() -> str:
    version = code_version()
    return version.split("+", 1)[1] if "+" in version else "unknown"
