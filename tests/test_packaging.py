"""Layout and packaging: the fused op's source sits in ``kernels/mslr_kernels/`` and imports as ``mslr_kernels``.

``kernels/`` is deliberately no package (no ``__init__.py``). A regular package named ``kernels`` on
``sys.path`` shadows Hugging Face's ``kernels``, which transformers (>= 5.25) imports; a folder without
``__init__.py`` only becomes a namespace package when no regular ``kernels`` exists anywhere on the path,
so the installed one wins. These tests fail if ``kernels`` ever resolves to this repository again, from a
checkout (this process and a launcher-style subprocess), from a built wheel and from an editable install.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Imports transformers and Hugging Face's kernels (a name only it defines), then reports where
# `kernels`, `mslr_kernels` and `pipeline` came from.
PROBE = """
import json, sys
import transformers
import kernels
from kernels import get_kernel
import mslr_kernels, pipeline
from mslr_kernels import mslr_linear
print(json.dumps({
    "kernels_file": kernels.__file__,
    "kernels_path": list(kernels.__path__),
    "mslr_kernels": mslr_kernels.__file__,
    "pipeline": pipeline.__file__,
}))
"""


def _inside(path: str | None, root: Path) -> bool:
    return path is not None and Path(path).resolve().is_relative_to(root.resolve())


def _in_repo_source(path: str | None, repo: Path) -> bool:
    """Inside the repository but not inside this environment's installed packages: ``make`` puts the
    venv at ``<repo>/.venv``, whose site-packages is where Hugging Face's ``kernels`` belongs."""
    return _inside(path, repo) and not _inside(path, Path(sys.prefix))


def _hub_kernels_dir() -> Path:
    """Where the installed Hugging Face ``kernels`` distribution keeps its package."""
    return Path(importlib.metadata.distribution("kernels").locate_file("kernels")).resolve()


def _assert_hub_kernels(found: dict, repo: Path) -> None:
    assert found["kernels_file"] is not None, f"`kernels` is a namespace package over {found['kernels_path']}"
    assert not _in_repo_source(found["kernels_file"], repo), f"`kernels` resolves to this repository: {found['kernels_file']}"
    assert not any(_in_repo_source(p, repo) for p in found["kernels_path"]), found["kernels_path"]
    assert Path(found["kernels_file"]).resolve().parent == _hub_kernels_dir()


def _probe(command: list[str], *, cwd: Path, pythonpath: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_kernels_folder_holds_the_op_and_is_no_package():
    import mslr_kernels

    assert not (REPO / "kernels" / "__init__.py").exists(), "kernels/__init__.py would shadow Hugging Face's kernels"
    assert sorted(p.name for p in (REPO / "kernels").iterdir() if p.name != "__pycache__") == ["mslr_kernels"]
    assert Path(mslr_kernels.__file__).resolve() == (REPO / "kernels" / "mslr_kernels" / "__init__.py").resolve()
    assert not (REPO / "mslr_kernels").exists(), "the op's source belongs under kernels/"


def test_hugging_face_kernels_wins_in_the_test_process():
    import kernels
    import transformers  # noqa: F401  (transformers >= 5.25 imports kernels)

    # pytest put the repository root on sys.path (pyproject `pythonpath`), as a checkout run does.
    assert str(REPO) in sys.path or "." in sys.path or "" in sys.path
    _assert_hub_kernels({"kernels_file": kernels.__file__, "kernels_path": list(kernels.__path__)}, REPO)


def test_launcher_style_checkout_run_imports_transformers_and_hub_kernels():
    # launch/*.py put the repository root and kernels/ first on sys.path; cwd is the repository root.
    code = f"import sys\nsys.path[:0] = [{str(REPO)!r}, {str(REPO / 'kernels')!r}]\n" + PROBE
    found = _probe([sys.executable, "-c", code], cwd=REPO, pythonpath=None)
    _assert_hub_kernels(found, REPO)
    assert Path(found["mslr_kernels"]).resolve() == (REPO / "kernels" / "mslr_kernels" / "__init__.py").resolve()
    assert Path(found["pipeline"]).resolve() == (REPO / "pipeline" / "__init__.py").resolve()


def _source_copy(tmp_path: Path) -> Path:
    """The files a wheel is built from, copied so that building leaves the checkout untouched."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for folder in ("pipeline", "kernels"):
        shutil.copytree(REPO / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return src


def _build(src: Path, hook: str, out: Path) -> Path:
    """Run setuptools' PEP 517/660 hook in ``src`` (no build isolation: setuptools of this venv)."""
    out.mkdir()
    code = f"from setuptools import build_meta\nprint(build_meta.{hook}({str(out)!r}))"
    done = subprocess.run([sys.executable, "-c", code], cwd=src, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return out / done.stdout.strip().splitlines()[-1]


@pytest.mark.integration
def test_wheel_ships_mslr_kernels_top_level_and_imports_with_hub_kernels(tmp_path):
    wheel = _build(_source_copy(tmp_path), "build_wheel", tmp_path / "dist")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        shipped_op = archive.read("mslr_kernels/mslr.py")
    assert {n.split("/")[0] for n in names} == {"pipeline", "mslr_kernels", "musclelora-0.1.0.dist-info"}
    assert "mslr_kernels/__init__.py" in names and "pipeline/adapters/mslr.py" in names
    assert shipped_op == (REPO / "kernels" / "mslr_kernels" / "mslr.py").read_bytes()
    # Import from the wheel itself (zipimport: pure Python), outside any checkout.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    found = _probe([sys.executable, "-c", PROBE], cwd=elsewhere, pythonpath=str(wheel))
    _assert_hub_kernels(found, REPO)
    assert found["mslr_kernels"] == f"{wheel}/mslr_kernels/__init__.py"
    assert found["pipeline"] == f"{wheel}/pipeline/__init__.py"


@pytest.mark.integration
def test_editable_install_maps_mslr_kernels_to_the_kernels_folder(tmp_path):
    src = _source_copy(tmp_path)
    editable = _build(src, "build_editable", tmp_path / "dist")
    site_dir = tmp_path / "site"
    with zipfile.ZipFile(editable) as archive:
        archive.extractall(site_dir)
    # -S: no site-packages processing, so this environment's own editable install (its .pth finder) stays
    # out. The new install's .pth runs first (its finder module has the same name as any other editable
    # install of musclelora), then this process's library folders (not the checkout's) follow plainly.
    libraries = [p for p in sys.path if p and not _in_repo_source(p, REPO)]
    code = (
        "import site, sys\n"
        f"site.addsitedir({str(site_dir)!r})\n"
        f"sys.path += {libraries!r}\n" + PROBE
    )
    # From the source root: its kernels/ folder is on sys.path (cwd) and must still lose to the hub package.
    found = _probe([sys.executable, "-S", "-c", code], cwd=src, pythonpath=None)
    _assert_hub_kernels(found, src)
    _assert_hub_kernels(found, REPO)
    assert Path(found["mslr_kernels"]).resolve() == (src / "kernels" / "mslr_kernels" / "__init__.py").resolve()
    assert Path(found["pipeline"]).resolve() == (src / "pipeline" / "__init__.py").resolve()
