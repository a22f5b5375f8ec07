"""setup.py beside pyproject.toml builds the same squad-ds: pyproject.toml holds every piece of metadata, setup.py
only calls setuptools, so a wheel built through `python setup.py bdist_wheel` and one built from pyproject.toml by
`pip wheel` hold the same files and the same metadata (about 5 s on 2 cores)."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# What a build reads: the package, its metadata and the README it embeds.
SOURCES = ("squad_ds", "pyproject.toml", "setup.py", "README.md")


def _copy(dst: Path, with_setup_py: bool) -> Path:
    dst.mkdir()
    for name in SOURCES:
        src = REPO / name
        if name == "setup.py" and not with_setup_py:
            continue
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so"))
        else:
            shutil.copy2(src, dst / name)
    return dst


def _wheel(out: Path) -> tuple[set[str], str]:
    (wheel,) = out.glob("squad_ds-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
        return {n for n in names if not n.endswith(".dist-info/RECORD")}, z.read(meta).decode()


def test_setup_py_names_the_package_as_pyproject_does():
    proc = subprocess.run([sys.executable, "setup.py", "--name", "--version"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    import squad_ds

    assert proc.stdout.split()[-2:] == ["squad-ds", squad_ds.__version__]


def test_a_wheel_through_setup_py_equals_the_wheel_from_pyproject(tmp_path):
    legacy = _copy(tmp_path / "with_setup_py", with_setup_py=True)
    modern = _copy(tmp_path / "pyproject_only", with_setup_py=False)
    subprocess.run([sys.executable, "setup.py", "-q", "bdist_wheel", "-d", str(tmp_path / "a")], cwd=legacy,
                   check=True, capture_output=True, timeout=300)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "b"), str(modern)], check=True, capture_output=True, timeout=300)
    files_a, meta_a = _wheel(tmp_path / "a")
    files_b, meta_b = _wheel(tmp_path / "b")
    assert files_a == files_b
    assert meta_a == meta_b
    assert "squad_ds/recipes/demo.yaml" in files_a and "squad_ds/cli.py" in files_a
    assert any(n.endswith("entry_points.txt") for n in files_a)
