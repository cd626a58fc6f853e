"""The package installs and imports as users will: editable, and as a built wheel in a fresh venv."""
from __future__ import annotations

import os
import subprocess
import sys
import venv

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_subpackages_map_to_their_folders():
    import ctrkit.layers
    import ctrkit.pipelines
    import ctrkit.serving

    for module, folder in ((ctrkit.layers, "layers"), (ctrkit.pipelines, "pipelines"), (ctrkit.serving, "serving")):
        assert os.path.dirname(os.path.abspath(module.__file__)) == os.path.join(ROOT, folder)


def test_cli_help_and_version():
    out = subprocess.run([sys.executable, "-m", "ctrkit.cli", "--help"], capture_output=True, text=True, check=True)
    assert "usage: ctrkit" in out.stdout and "COMMAND" in out.stdout
    from ctrkit import __version__

    ver = subprocess.run([sys.executable, "-m", "ctrkit.cli", "--version"], capture_output=True, text=True, check=True)
    assert ver.stdout.strip() == f"ctrkit {__version__}"


def test_cli_without_command_prints_help_and_fails():
    out = subprocess.run([sys.executable, "-m", "ctrkit.cli"], capture_output=True, text=True)
    assert out.returncode == 2
    assert "usage: ctrkit" in out.stdout


@pytest.mark.slow
def test_built_wheel_imports_in_fresh_venv(tmp_path):
    """Build the wheel, install it (no deps) into a fresh venv that sees the already-installed third-party
    packages, and import ctrkit.layers from the wheel, not from this checkout."""
    dist = tmp_path / "dist"
    built = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), ROOT],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    # setuptools' warning that a folder Python can import is missing from `packages` (it was serving/deploy/):
    # it says a later setuptools will leave such a folder out of the wheel.
    assert "absent from the `packages` configuration" not in built.stdout + built.stderr
    wheels = list(dist.glob("ctrkit-*.whl"))
    assert len(wheels) == 1, wheels
    import zipfile

    shipped = set(zipfile.ZipFile(wheels[0]).namelist())
    deploy_files = {f"ctrkit/serving/deploy/{f}" for f in os.listdir(os.path.join(ROOT, "serving", "deploy"))}
    assert deploy_files <= shipped, deploy_files - shipped
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False, system_site_packages=True).create(env_dir)
    py = str(env_dir / "bin" / "python")
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", str(wheels[0])], check=True, cwd=tmp_path)
    probe = (
        "import ctrkit, ctrkit.layers, ctrkit.pipelines, ctrkit.serving, ctrkit.configs, os;"
        "from ctrkit.config import builtin_config_path;"
        "print(os.path.dirname(ctrkit.layers.__file__));"
        "print(sorted(f for f in os.listdir(os.path.dirname(ctrkit.configs.__file__)) if f.endswith('.yaml')))"
    )
    out = subprocess.run([py, "-c", probe], capture_output=True, text=True, cwd=tmp_path, check=True)
    layers_dir = out.stdout.splitlines()[0]
    assert layers_dir.startswith(str(env_dir)), f"ctrkit.layers imported from {layers_dir}, not the wheel"
    assert not layers_dir.startswith(ROOT)
    shipped_configs = sorted(f for f in os.listdir(os.path.join(ROOT, "configs")) if f.endswith(".yaml"))
    assert out.stdout.splitlines()[1] == repr(shipped_configs)
    cli = subprocess.run([str(env_dir / "bin" / "ctrkit"), "--version"], capture_output=True, text=True, check=True)
    assert cli.stdout.startswith("ctrkit ")


def _declared_requirements() -> list[str]:
    """install_requires and every extra of setup.py, read by running it with setuptools.setup stubbed out."""
    import runpy

    import setuptools

    captured: dict = {}
    real = setuptools.setup
    setuptools.setup = lambda **kw: captured.update(kw)
    try:
        runpy.run_path(os.path.join(ROOT, "setup.py"), run_name="not_main")
    finally:
        setuptools.setup = real
    return list(captured["install_requires"]) + [r for reqs in captured["extras_require"].values() for r in reqs]


def test_every_requirement_has_an_upper_bound_that_admits_the_installed_version():
    from importlib.metadata import PackageNotFoundError, version

    from packaging.requirements import Requirement

    declared = _declared_requirements()
    assert len(declared) > 10
    for line in declared:
        req = Requirement(line)
        assert any(s.operator in ("==", "===", "<", "<=", "~=") for s in req.specifier), f"{line}: no upper bound"
        if req.marker is not None and not req.marker.evaluate():
            continue
        try:
            installed = version(req.name)
        except PackageNotFoundError:
            continue
        assert req.specifier.contains(installed, prereleases=True), f"{line} excludes the installed {req.name} {installed}"
