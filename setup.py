"""ctrkit packaging.

The subpackages live in top-level folders (``layers/``, ``pipelines/``, ``serving/``) but import as
``ctrkit.layers`` etc., hence the ``package_dir`` mapping. This file doubles as Beam's ``--setup_file``:
remote workers run ``pip install`` on the sdist it builds, so it must not import ctrkit or anything beyond
setuptools.
"""
import os
import re

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _read_version() -> str:
    with open(os.path.join(HERE, "ctrkit", "_version.py"), encoding="utf-8") as f:
        return re.search(r'__version__\s*=\s*"([^"]+)"', f.read()).group(1)


def _find_packages(root_pkg: str, folder: str) -> list[str]:
    """Every folder with an ``__init__.py`` below ``folder``, named as a subpackage of ``root_pkg``."""
    found = []
    for dirpath, dirnames, filenames in os.walk(os.path.join(HERE, folder)):
        dirnames[:] = [d for d in dirnames if not d.startswith((".", "__"))]
        if "__init__.py" in filenames:
            rel = os.path.relpath(dirpath, os.path.join(HERE, folder))
            found.append(root_pkg if rel == "." else root_pkg + "." + rel.replace(os.sep, "."))
    return found


PACKAGE_DIRS = {
    "ctrkit": "ctrkit",
    "ctrkit.layers": "layers",
    "ctrkit.pipelines": "pipelines",
    "ctrkit.serving": "serving",
    "ctrkit.configs": "configs",
}

# Folders of data files only (no __init__.py). Listed as packages, not as "deploy/*" data of ctrkit.serving:
# setuptools warns that such a folder is an importable (namespace) package missing from `packages`, and says a
# later release will stop installing it.
DATA_PACKAGE_DIRS = {
    "ctrkit.serving.deploy": "serving/deploy",  # TF Serving models.config, batching.config and their README
}

packages = []
package_dir = {}
for pkg, folder in PACKAGE_DIRS.items():
    subpackages = _find_packages(pkg, folder)
    packages.extend(subpackages)
    for sub in subpackages:
        package_dir[sub] = os.path.join(folder, *sub.split(".")[len(pkg.split(".")):])
packages.extend(DATA_PACKAGE_DIRS)
package_dir.update(DATA_PACKAGE_DIRS)

# Versions that resolve together on Python 3.11 (checked with a fresh `pip install -e ".[test]"`). The stack
# TensorFlow builds on is pinned exactly; every other requirement is capped below its next major version (for a
# 0.x package: 1.0) above the one tested, so a fresh install cannot pick up a breaking release.
INSTALL_REQUIRES = [
    "tensorflow==2.21.0",
    "keras==3.15.1",
    "tensorflow-transform==1.21.0",
    "apache-beam==2.77.0",
    "pyarrow==25.0.1",
    "numpy>=1.26,<3",
    "pyyaml>=6,<7",
    "tqdm>=4.66,<5",
    # tfx-bsl 1.21 requires tensorflow-serving-api >=2.19,<2.20; its protos work with TF 2.21.
    "tensorflow-serving-api>=2.19,<2.20",
    "matplotlib>=3.8,<4",  # the report of `ctrkit run`, the README's main command
]

EXTRAS = {
    # httptools and uvloop are the C HTTP parser and event loop uvicorn picks when they are installed
    # (what uvicorn[standard] would add, without its reload/websocket extras).
    "serve": [
        "starlette>=0.37,<2",
        "uvicorn>=0.29,<1",
        "orjson>=3.9,<4",
        "httptools>=0.6,<1",
        "uvloop>=0.19,<1; sys_platform != 'win32'",
    ],
}
EXTRAS["test"] = sorted(
    set(
        EXTRAS["serve"]
        + [
            "pytest>=8,<10",
            "pytest-xdist==3.8.0",  # the default run uses two workers (pytest.ini)
            "httpx>=0.27,<1",
            "keras-rs==0.4.0",
            "tensorflow-recommenders==0.7.7",
            "tf-keras==2.21.0",
            "build>=1.0,<2",
            "setuptools>=69,<85",  # the wheel test builds without isolation
        ]
    )
)

setup(
    name="ctrkit",
    version=_read_version(),
    description="Large-scale CTR modelling with DCN-V2 feature crosses: Beam/TFT pipelines, "
    "online training, TF Serving export.",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read()
    if os.path.exists(os.path.join(HERE, "README.md"))
    else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.11,<3.12",
    packages=packages,
    package_dir=package_dir,
    package_data={"ctrkit.configs": ["*.yaml"], "ctrkit.serving.deploy": ["*"]},
    include_package_data=True,
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["ctrkit=ctrkit.cli:main"]},
)
