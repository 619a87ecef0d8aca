"""The Python client ships alone: `service.client` imports nothing of the server, and the
`switchboard-client` wheel (client/pyproject.toml) holds every module it needs and works
installed where the server's modules are not."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
SHIPPED = ["service/__init__.py", "service/formats.py", "service/vendors.py"]
"""What the wheel holds besides the client package itself."""


def client_modules() -> list[str]:
    """Every module of the `service/client/` package, as paths in the wheel."""
    return sorted(str(path.relative_to(REPO)) for path in (REPO / "service" / "client").rglob("*.py"))


def test_importing_the_client_imports_nothing_of_the_server() -> None:
    code = (
        "import sys, service.client\n"
        "server = [m for m in sys.modules\n"
        "          if m.startswith(('service.', 'litellm', 'pydantic', 'yaml', 'aiohttp.web'))\n"
        "          and m not in ('service.client', 'service.formats', 'service.vendors')\n"
        "          and not m.startswith('service.client.')]\n"
        "assert not server, server\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30, cwd=REPO)


def test_the_names_of_spec_11_are_importable_from_service_client() -> None:
    import service.client

    names = {
        "Event",
        "Forbidden",
        "Health",
        "NotFound",
        "Provider",
        "Route",
        "Switchboard",
        "SwitchboardClientError",
        "TestResult",
        "Unauthorized",
        "Unavailable",
    }
    assert set(service.client.__all__) == names
    assert all(hasattr(service.client, name) for name in names)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`pip wheel ./client`, built once for the tests of this module, offline: the build
    backend (hatchling, in the `dev` extra) is the one installed here, not one fetched."""
    out = tmp_path_factory.mktemp("wheel")
    offline = ["--no-deps", "--no-build-isolation", "--no-index"]
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", *offline, "-w", str(out), str(REPO / "client")],
        check=True,
        timeout=150,
    )
    (built,) = out.glob("switchboard_client-*.whl")
    return built


@pytest.mark.timeout(180)
def test_the_client_distribution_ships_alone(wheel: Path) -> None:
    """`pip install ./client`: a wheel of the client's modules that depends on aiohttp only."""
    with zipfile.ZipFile(wheel) as archive:
        files = sorted(n for n in archive.namelist() if ".dist-info/" not in n)
        about = archive.read(next(n for n in archive.namelist() if n.endswith("METADATA"))).decode()
    assert "service/client/__init__.py" in files
    assert files == sorted(SHIPPED + client_modules())
    requires = [line for line in about.splitlines() if line.startswith("Requires-Dist:")]
    assert requires == ["Requires-Dist: aiohttp<4,>=3.10"]


def requirement_closure(name: str) -> list[metadata.Distribution]:
    """`name`'s installed distribution and every one it requires here, each once."""
    found: dict[str, metadata.Distribution] = {}
    pending = [name]
    while pending:
        dist = metadata.distribution(pending.pop())
        key = canonicalize_name(dist.metadata["Name"])
        if key in found:
            continue
        found[key] = dist
        for line in dist.requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                pending.append(requirement.name)
    return list(found.values())


def copy_installed(dists: list[metadata.Distribution], site_packages: Path) -> None:
    """Install `dists` into another environment's `site_packages` by copying what this one
    has installed: each top-level module or package and the distribution's metadata folder
    (so pip sees it installed). Offline and without pip's cache or a wheel of each: whatever
    runs this suite (a venv, the system's Python, Debian's packages) has them importable."""
    modules = metadata.packages_distributions()
    for dist in dists:
        name = dist.metadata["Name"]
        tops = sorted(top for top, owners in modules.items() if name in owners) or [
            name.replace("-", "_").lower()
        ]
        for top in tops:
            spec = importlib.util.find_spec(top)
            if spec is None:  # a name of RECORD's that is not a module (a data folder)
                continue
            if spec.submodule_search_locations:
                for folder in spec.submodule_search_locations:
                    shutil.copytree(
                        folder,
                        site_packages / top,
                        ignore=shutil.ignore_patterns("__pycache__"),
                        dirs_exist_ok=True,
                    )
            elif spec.origin:
                shutil.copy2(spec.origin, site_packages / Path(spec.origin).name)
        info = getattr(dist, "_path", None)  # the .dist-info / .egg-info folder
        if info is not None and Path(info).is_dir():
            shutil.copytree(info, site_packages / Path(info).name, dirs_exist_ok=True)


@pytest.mark.timeout(180)
def test_the_installed_wheel_works_without_the_server(wheel: Path, tmp_path: Path) -> None:
    """Installed in a fresh environment that holds aiohttp and nothing else, offline, the
    wheel's `service` is the one imported: the client works, the server's modules and its
    dependencies are absent. The environment is made the same whether this suite runs in a
    virtual environment or in the system's Python: nothing comes from the base interpreter's
    site-packages (which may lack aiohttp, or hold this repository's editable install)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    # Not the tree's `service`: a PYTHONPATH of the repository (as the suite runs) would win.
    alone = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    site_packages = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            check=True,
            capture_output=True,
            text=True,
            timeout=30,
            env=alone,
        ).stdout.strip()
    )
    copy_installed(requirement_closure("aiohttp"), site_packages)
    # With its dependencies checked (no --no-deps): aiohttp, copied in, must satisfy the wheel.
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-index", "--disable-pip-version-check", str(wheel)],
        check=True,
        timeout=120,
        env=alone,
    )
    code = (
        "import importlib.util, sys\n"
        "import service, service.client as client\n"
        f"assert service.__file__.startswith({str(venv)!r}), service.__file__\n"
        "for name in ('service.config', 'service.errors', 'service.http', 'service.gateway',\n"
        "             'litellm', 'pydantic', 'yaml'):\n"
        "    assert importlib.util.find_spec(name) is None, name\n"
        "provider = client.Provider.from_json({'id': 'groq', 'kind': 'api_key', 'provider': 'groq',\n"
        "    'base_url': 'https://api.groq.com/openai/v1', 'timeout_s': 30, 'models': ['m']})\n"
        "assert provider.to_litellm_config('m')['model'] == 'groq/m', provider.to_litellm_config('m')\n"
        "assert client.Switchboard('http://127.0.0.1:1').base_url == 'http://127.0.0.1:1'\n"
    )
    subprocess.run([str(python), "-c", code], check=True, timeout=60, cwd=tmp_path, env=alone)
