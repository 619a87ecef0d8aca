"""The Python client ships alone: `service.client` imports nothing of the server, and the
`switchboard-client` wheel (client/pyproject.toml) holds every module it needs and works
installed where the server's modules are not."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

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
    """`pip wheel ./client`, built once for the tests of this module."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(REPO / "client")],
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
        metadata = archive.read(next(n for n in archive.namelist() if n.endswith("METADATA"))).decode()
    assert "service/client/__init__.py" in files
    assert files == sorted(SHIPPED + client_modules())
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    assert requires == ["Requires-Dist: aiohttp<4,>=3.10"]


@pytest.mark.timeout(180)
def test_the_installed_wheel_works_without_the_server(wheel: Path, tmp_path: Path) -> None:
    """Installed in a fresh environment (aiohttp from the system's packages, offline), the
    wheel's `service` is the one imported: the client works, the server's modules are absent."""
    venv = tmp_path / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=120
    )
    python = venv / "bin" / "python"
    # Not the tree's `service`: a PYTHONPATH of the repository (as the suite runs) would win.
    alone = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-index", "--no-deps", str(wheel)],
        check=True,
        timeout=120,
        env=alone,
    )
    code = (
        "import importlib.util, sys\n"
        # The system's site-packages (where aiohttp comes from) also hold this repository's
        # editable install, whose finder maps every `service.*` name to the tree: an
        # application's environment has no such thing, so it is left out here.
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
        "import service, service.client as client\n"
        f"assert service.__file__.startswith({str(venv)!r}), service.__file__\n"
        "for name in ('service.config', 'service.errors', 'service.http', 'service.gateway'):\n"
        "    assert importlib.util.find_spec(name) is None, name\n"
        "provider = client.Provider.from_json({'id': 'groq', 'kind': 'api_key', 'provider': 'groq',\n"
        "    'base_url': 'https://api.groq.com/openai/v1', 'timeout_s': 30, 'models': ['m']})\n"
        "assert provider.to_litellm_config('m')['model'] == 'groq/m', provider.to_litellm_config('m')\n"
        "assert client.Switchboard('http://127.0.0.1:1').base_url == 'http://127.0.0.1:1'\n"
    )
    subprocess.run([str(python), "-c", code], check=True, timeout=60, cwd=tmp_path, env=alone)
