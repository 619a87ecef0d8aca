"""The deployment files (deploy/) agree with the code: settings, command line, ports, probes.

The linters of `just deploy-lint` check each file's own syntax and schema; these tests check
what no linter knows: that every `SWITCHBOARD_*` name is a real setting with a valid value, that
the commands parse with the real parser, that probes ask the routes the app serves, and that
the files agree with each other (names, ports, labels, uids). No container engine runs here:
the compose replica's entrypoint script is run for real on loopback instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import AliasChoices

from service.cli.main import _parser
from service.http.app import create_app
from service.settings import Settings
from tests.conftest import SopsProject, git, git_init, write_key, write_routing, write_server

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
DOC = ROOT / "docs" / "deploy.md"
REPLICAS = ("switchboard-1", "switchboard-2", "switchboard-3")
ANY_ADDRESS = "0.0.0.0"  # noqa: S104 - in a container the service listens on every interface
NAME = re.compile(r"\bSWITCHBOARD_[A-Z0-9_]*[A-Z0-9]\b")


# -- reading the files ------------------------------------------------------------------------


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(_text(path)) if doc]


def _manifests() -> dict[tuple[str, str], dict[str, Any]]:
    """Every Kubernetes object of deploy/kubernetes/ (custom resources included), by (kind, name)."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(KUBERNETES.rglob("*.yaml")):
        for doc in _documents(path):
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in found, f"{key} twice"
            found[key] = doc
    return found


def _dockerfile_lines() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of deploy/Dockerfile, continuation lines joined, comments left out."""
    text = re.sub(r"\\\n\s*", " ", _text(DEPLOY / "Dockerfile"))
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(" ", 1)[0].upper(), line.split(" ", 1)[1].strip()) for line in lines]


def _dockerfile() -> list[tuple[str, str]]:
    """The runtime stage (the last FROM) of deploy/Dockerfile."""
    lines = _dockerfile_lines()
    last_from = max(i for i, (instruction, _) in enumerate(lines) if instruction == "FROM")
    return lines[last_from:]


def _exec_form(arguments: str) -> list[str]:
    value = yaml.safe_load(arguments)  # a JSON array is YAML too
    assert isinstance(value, list), f"not the exec form: {arguments}"
    return [str(v) for v in value]


def _compose() -> dict[str, Any]:
    data = yaml.safe_load(_text(DEPLOY / "compose.yaml"))  # merge keys (<<) resolved
    assert isinstance(data, dict)
    return data


def _env_names() -> set[str]:
    """Every environment variable name Settings reads."""
    names: set[str] = set()
    prefix = Settings.model_config.get("env_prefix", "")
    for field_name, field in Settings.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            names.update(str(choice).upper() for choice in alias.choices if str(choice).isupper())
        else:
            names.add(f"{prefix}{field_name}".upper())
    return names


def _settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    for name in list(os.environ):
        if name.startswith(("SWITCHBOARD_", "SOPS_AGE_")):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Settings()


def _serve(argv: list[str]) -> Any:
    """`argv` (without the program name) parsed by the real `switchboard` parser, as `serve`."""
    assert next(arg for arg in argv if not arg.startswith("-")) == "serve", argv
    ns = _parser().parse_args(argv)  # exits (SystemExit 2) on anything it does not know
    assert {"providers", "host", "port", "events"} <= set(vars(ns))
    return ns


# -- settings: every SWITCHBOARD_* name is real, every value valid ---------------------------


def test_every_switchboard_name_in_the_deployment_files_and_their_doc_is_a_setting() -> None:
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z", "--", "deploy"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    )
    # What git would take (an operator's deploy/secrets/ and deploy/.env are ignored).
    files = [ROOT / name for name in listed.stdout.decode().split("\0") if name] + [DOC]
    assert DEPLOY / "compose.yaml" in files
    used = {name: path for path in files for name in NAME.findall(_text(path))}
    assert used, "the files name no setting at all"
    unknown = {name: str(path.relative_to(ROOT)) for name, path in used.items() if name not in _env_names()}
    assert not unknown, f"not a setting of service/settings.py: {unknown}"


def test_the_operators_guide_is_linked_from_the_readme() -> None:
    assert "](docs/deploy.md)" in _text(ROOT / "README.md")
    for path in ("deploy/compose.yaml", "deploy/kubernetes/deployment.yaml"):
        assert "docs/deploy.md" in _text(ROOT / path)


def test_the_compose_replicas_settings_are_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    services = _compose()["services"]
    for name in REPLICAS:
        env = {k: str(v) for k, v in services[name]["environment"].items() if v is not None}
        settings = _settings_from({k: v for k, v in env.items() if k in _env_names()}, monkeypatch)
        assert settings.replica == name
        assert settings.git_pull == "origin/main"
        assert settings.redis_url is not None
        assert settings.redis_url.get_secret_value().startswith("redis://redis:")
        # The event log lies outside the clone: the pull needs a clean working tree.
        assert not settings.events_file.is_relative_to(settings.root)
        _ledger_outside(settings, settings.root, settings.events_file.parent)


def test_the_kubernetes_settings_are_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    manifests = _manifests()
    container = _container(manifests, "switchboard")
    env: dict[str, str] = {}
    for source in container["envFrom"]:
        env |= manifests["ConfigMap", source["configMapRef"]["name"]]["data"]
    env |= {e["name"]: e["value"] for e in container["env"] if "value" in e}
    env["SWITCHBOARD_REPLICA"] = "switchboard-0"  # the downward API gives the pod's name
    settings = _settings_from(env, monkeypatch)
    args = _serve(container["args"])
    _ledger_outside(settings, Path(args.root), args.events.parent)  # git-sync swaps that checkout
    redis = manifests["Service", "switchboard-redis"]
    assert settings.redis_url is not None
    assert (
        settings.redis_url.get_secret_value()
        == f"redis://switchboard-redis:{redis['spec']['ports'][0]['port']}/0"
    )


def _ledger_outside(settings: Settings, checkout: Path, var: Path) -> None:
    """The usage ledger and its spool lie beside the event log, never in the configuration's
    checkout (a pull needs it clean; git-sync replaces it at every commit, spool and all)."""
    db = settings.path(Path(settings.usage_db.get_secret_value()))
    for path in (db, settings.usage_spool_dir):
        assert path.is_absolute() and not path.is_relative_to(checkout), path
        assert path.parent == var, path  # beside the event log, on its writable volume


# -- the Dockerfile ----------------------------------------------------------------------------


def test_the_image_runs_the_console_script_with_a_command_that_parses() -> None:
    stage = dict(_dockerfile())
    entrypoint, command = _exec_form(stage["ENTRYPOINT"]), _exec_form(stage["CMD"])
    scripts = tomllib.loads(_text(ROOT / "pyproject.toml"))["project"]["scripts"]
    assert entrypoint == ["switchboard"]
    assert scripts["switchboard"] == "service.cli.main:main"
    ns = _serve(command)
    assert ns.host == ANY_ADDRESS
    assert stage["EXPOSE"] == str(Settings.model_fields["port"].default) == "8080"


def test_the_image_is_non_root_checks_its_health_and_sets_the_defaults() -> None:
    stage = _dockerfile()
    user = [rest for instruction, rest in stage if instruction == "USER"]
    assert user == ["65533:65533"]
    env = " ".join(rest for instruction, rest in stage if instruction == "ENV")
    assert "LITELLM_LOCAL_MODEL_COST_MAP=True" in env
    assert "PYTHONUNBUFFERED=1" in env
    healthcheck = next(rest for instruction, rest in stage if instruction == "HEALTHCHECK")
    assert "/healthz" in healthcheck
    assert "'8080'" in healthcheck
    installs = " ".join(rest for instruction, rest in stage if instruction == "RUN")
    assert re.search(r"apt-get install .*\bgit\b", installs)


def test_the_build_context_lets_in_only_what_the_image_copies() -> None:
    patterns = [
        line.strip()
        for line in _text(ROOT / ".dockerignore").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*", "an allow-list: everything is left out first"
    allowed = {p.removeprefix("!").rstrip("/") for p in patterns if p.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "service"}
    for never in ("**/.git", "**/var", "**/.demo", "**/*.age-key", "**/keys.txt"):
        assert never in patterns
    copied = set()
    for rest in (rest for instruction, rest in _dockerfile_lines() if instruction == "COPY"):
        if rest.startswith("--from"):
            continue
        copied.update(p.rstrip("/") for p in rest.split()[:-1])
    assert copied <= allowed, f"COPY of what the context leaves out: {copied - allowed}"


# -- routes: probes and scrapes ask what the app serves ---------------------------------------


def test_probes_and_scrapes_name_routes_the_app_serves(tmp_path: Path) -> None:
    app = create_app(Settings(providers=tmp_path, events=tmp_path / "events.jsonl"))
    routes = {resource.canonical for resource in app.router.resources()}
    assert {"/healthz", "/readyz", "/metrics"} <= routes

    manifests = _manifests()
    container = _container(manifests, "switchboard")
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    annotations = manifests["Deployment", "switchboard"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] == "/metrics"
    assert annotations["prometheus.io/port"] == "8080"
    monitor = manifests["ServiceMonitor", "switchboard"]
    assert [e["path"] for e in monitor["spec"]["endpoints"]] == ["/metrics"]

    haproxy = _text(DEPLOY / "haproxy.cfg")
    assert "http-check send meth GET uri /readyz " in haproxy
    prometheus = yaml.safe_load(_text(DEPLOY / "prometheus.yml"))
    job = next(j for j in prometheus["scrape_configs"] if j["job_name"] == "switchboard")
    assert job["metrics_path"] == "/metrics"


# -- compose ------------------------------------------------------------------------------------


def test_compose_runs_three_named_replicas_behind_the_balancer_and_prometheus() -> None:
    compose = _compose()
    services = compose["services"]
    assert "version" not in compose, "the compose spec has no version key"
    assert {*REPLICAS, "remote", "haproxy", "redis", "prometheus"} <= set(services)
    servers = re.findall(r"^\s*server (\S+) (\S+):(\d+)", _text(DEPLOY / "haproxy.cfg"), re.M)
    assert [(name, host, int(port)) for name, host, port in servers] == [(r, r, 8080) for r in REPLICAS]
    prometheus = yaml.safe_load(_text(DEPLOY / "prometheus.yml"))
    job = next(j for j in prometheus["scrape_configs"] if j["job_name"] == "switchboard")
    assert job["static_configs"][0]["targets"] == [f"{r}:8080" for r in REPLICAS]
    for name in REPLICAS:
        service = services[name]
        env = service["environment"]
        assert service["hostname"] == env["SWITCHBOARD_REPLICA"] == name
        ns = _serve(service["command"])
        assert ns.host == ANY_ADDRESS
        assert service["entrypoint"] == ["/bin/sh", "/deploy/replica-entrypoint.sh"]
        assert "./replica-entrypoint.sh:/deploy/replica-entrypoint.sh:ro" in service["volumes"]
        # The age identity is the compose secret's file, never a value in the environment.
        secret = service["secrets"][0]
        assert env["SOPS_AGE_KEY_FILE"] == f"/run/secrets/{secret['target']}"
        assert "SOPS_AGE_KEY" not in env
        assert env["SWITCHBOARD_WEBHOOK_SECRET"] is None, "passed through, never written here"
        # Each replica its own clone and log; the remote is what they share.
        own = [v for v in service["volumes"] if v.endswith(":/srv/switchboard")]
        assert own == [f"replica-{name[-1]}:/srv/switchboard"]
        assert env["CONFIG_REMOTE"] == services["remote"]["environment"]["CONFIG_REMOTE"]
        assert env["SWITCHBOARD_GIT_PULL"].split("/", 1) == [
            "origin",
            services["remote"]["environment"]["SEED_BRANCH"],
        ]
    assert services["redis"]["healthcheck"]["test"][1] == "redis-cli"
    # The seeded remote is handed to the image's user, who pulls from and pushes to it.
    user = next(rest for instruction, rest in _dockerfile() if instruction == "USER")
    assert services["remote"]["environment"]["OWNER"] == user


def test_the_compose_secret_file_is_ignored_by_git() -> None:
    secret = _compose()["secrets"]["age-key"]["file"]
    path = (DEPLOY / secret).resolve().relative_to(ROOT)
    ignored = subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=ROOT, check=False)
    assert ignored.returncode == 0, f"{path} is not git-ignored"


# -- Kubernetes ---------------------------------------------------------------------------------


def _container(manifests: dict[tuple[str, str], dict[str, Any]], name: str) -> dict[str, Any]:
    pod = manifests["Deployment", "switchboard"]["spec"]["template"]["spec"]
    return next(c for c in pod["containers"] + pod.get("initContainers", []) if c["name"] == name)


def test_the_deployment_runs_three_replicas_with_a_git_sync_sidecar() -> None:
    manifests = _manifests()
    deployment = manifests["Deployment", "switchboard"]
    pod = deployment["spec"]["template"]["spec"]
    assert deployment["spec"]["replicas"] == 3
    sync = _container(manifests, "git-sync")
    assert re.fullmatch(r"registry\.k8s\.io/git-sync/git-sync:v4\.\d+\.\d+", sync["image"])
    assert sync["restartPolicy"] == "Always", "a native sidecar, ready before the service starts"
    assert {"--root=/git", "--link=current"} <= set(sync["args"])
    server = _container(manifests, "switchboard")
    ns = _serve(server["args"])
    assert (ns.host, ns.providers, ns.root) == (
        ANY_ADDRESS,
        Path("/git/current/providers.d"),
        Path("/git/current"),
    )
    # Both see the same checkout.
    mounts = {c["name"]: {m["name"]: m for m in c["volumeMounts"]} for c in (sync, server)}
    assert mounts["git-sync"]["git"]["mountPath"] == mounts["switchboard"]["git"]["mountPath"] == "/git"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes["git"]
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert ports == {"http": 8080}
    env = {e["name"]: e for e in server["env"]}
    assert env["SWITCHBOARD_REPLICA"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    webhook = env["SWITCHBOARD_WEBHOOK_SECRET"]["valueFrom"]["secretKeyRef"]
    assert webhook["optional"] is True


def test_the_age_identity_is_a_read_only_secret_file_and_the_log_is_writable() -> None:
    manifests = _manifests()
    pod = manifests["Deployment", "switchboard"]["spec"]["template"]["spec"]
    server = _container(manifests, "switchboard")
    env = {e["name"]: e for e in server["env"]}
    key_file = Path(env["SOPS_AGE_KEY_FILE"]["value"])
    assert "SOPS_AGE_KEY" not in env
    volumes = {v["name"]: v for v in pod["volumes"]}
    mount = next(m for m in server["volumeMounts"] if key_file.is_relative_to(m["mountPath"]))
    assert mount["readOnly"] is True
    secret = volumes[mount["name"]]["secret"]
    assert [item["path"] for item in secret["items"]] == [key_file.relative_to(mount["mountPath"]).as_posix()]
    assert secret["defaultMode"] & 0o007 == 0, "not readable by others"
    # Read-only root: the event log must land on a writable volume.
    ns = _serve(server["args"])
    log_mount = next(m for m in server["volumeMounts"] if ns.events.is_relative_to(m["mountPath"]))
    assert not log_mount.get("readOnly", False)
    assert "emptyDir" in volumes[log_mount["name"]]


def test_every_container_is_locked_down() -> None:
    manifests = _manifests()
    image_uid = int(next(rest for instruction, rest in _dockerfile() if instruction == "USER").split(":")[0])
    for kind_name, doc in manifests.items():
        if kind_name[0] != "Deployment":
            continue
        pod = doc["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        for container in pod["containers"] + pod.get("initContainers", []):
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, container["name"]
            assert context["allowPrivilegeEscalation"] is False, container["name"]
            assert context["capabilities"]["drop"] == ["ALL"], container["name"]
            assert "memory" in container["resources"]["limits"], container["name"]
            assert "cpu" in container["resources"]["requests"], container["name"]
    server_pod = manifests["Deployment", "switchboard"]["spec"]["template"]["spec"]
    # git refuses a repository owned by another user: git-sync and the service share one uid.
    assert server_pod["securityContext"]["runAsUser"] == image_uid


def test_the_service_budget_and_monitor_select_the_replicas() -> None:
    manifests = _manifests()
    deployment = manifests["Deployment", "switchboard"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = manifests["Service", "switchboard"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"] == [
        {"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP"}
    ]
    budget = manifests["PodDisruptionBudget", "switchboard"]["spec"]
    assert budget["selector"]["matchLabels"].items() <= labels.items()
    assert budget["minAvailable"] == deployment["spec"]["replicas"] - 1
    rolling = deployment["spec"]["strategy"]["rollingUpdate"]
    assert rolling["maxUnavailable"] == 0
    monitor = manifests["ServiceMonitor", "switchboard"]["spec"]
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["endpoints"]] == ["http"]
    redis = manifests["Deployment", "switchboard-redis"]["spec"]["template"]["metadata"]["labels"]
    assert manifests["Service", "switchboard-redis"]["spec"]["selector"].items() <= redis.items()
    assert not service["spec"]["selector"].items() <= redis.items(), "Redis is no endpoint of the service"


def test_the_custom_resources_stay_out_of_the_linted_and_applied_folder() -> None:
    # kubernetes-validate only warns about a kind it has no schema for; `just deploy-lint` fails
    # on any warning, so custom resources live in a folder of their own.
    for path in KUBERNETES.glob("*.yaml"):
        for doc in _documents(path):
            group = doc["apiVersion"].rpartition("/")[0]
            assert "." not in group or group.endswith(".k8s.io"), f"{path.name}: {doc['apiVersion']}"


# -- the compose replica's entrypoint, run for real --------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _get(url: str) -> tuple[int, bytes]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=2) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.fixture
def shim(tmp_path: Path) -> Path:
    """A `switchboard` on PATH that runs this checkout (the editable install may be another)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "switchboard"
    script.write_text(
        f'#!/bin/sh\nPYTHONPATH={shlex.quote(str(ROOT))} exec {shlex.quote(sys.executable)} -m service "$@"\n'
    )
    script.chmod(0o755)
    return bin_dir


@contextlib.contextmanager
def _replica(env: dict[str, str], port: int) -> Iterator[subprocess.Popen[bytes]]:
    """deploy/replica-entrypoint.sh as compose runs it, but on loopback."""
    proc = subprocess.Popen(
        [
            "/bin/sh",
            str(DEPLOY / "replica-entrypoint.sh"),
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()


def _ready(proc: subprocess.Popen[bytes], port: int, timeout: float = 30.0) -> dict[str, Any]:
    """/readyz's answer once it is 200; fails at once when the replica exits instead."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            stderr = proc.stderr.read().decode() if proc.stderr else ""
            pytest.fail(f"the replica exited with {proc.returncode}: {stderr}")
        try:
            status, body = _get(f"http://127.0.0.1:{port}/readyz")
            if status == 200:
                answer: dict[str, Any] = json.loads(body)
                return answer
        except OSError:
            pass
        assert time.monotonic() < deadline, "the replica never became ready"
        time.sleep(0.1)


def test_a_compose_replica_clones_the_seeded_remote_and_serves_it(
    sops_project: SopsProject, tmp_path: Path, shim: Path
) -> None:
    # The operator's configuration repository: a key (encrypted for the test identity), a server.
    project = sops_project
    git_init(project.root)
    write_key(project, "openrouter-main", "sk-or-" + "0123456789abcdef")
    write_server(project, "local-vllm")
    write_routing(project, ["openrouter-main"], ["local-vllm"])
    git(project.root, "add", "-A")
    git(project.root, "commit", "-q", "-m", "configuration")
    head = git(project.root, "rev-parse", "HEAD")

    remote = tmp_path / "remote" / "config.git"
    seed = {**os.environ, "CONFIG_REMOTE": str(remote), "SEED": str(project.root), "SEED_BRANCH": "main"}
    subprocess.run(["/bin/sh", str(DEPLOY / "seed-remote.sh")], env=seed, check=True, capture_output=True)
    assert git(remote, "rev-parse", "main") == head
    subprocess.run(["/bin/sh", str(DEPLOY / "seed-remote.sh")], env=seed, check=True, capture_output=True)

    replica = tmp_path / "replica-1"
    compose_env = _compose()["services"]["switchboard-1"]["environment"]
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("SWITCHBOARD_", "SOPS_"))},
        "PATH": f"{shim}{os.pathsep}{os.environ['PATH']}",
        "CONFIG_REMOTE": str(remote),
        "SWITCHBOARD_ROOT": str(replica / "config"),
        "SWITCHBOARD_EVENTS": str(replica / "var" / "events.jsonl"),
        "SWITCHBOARD_USAGE_DB": str(replica / "var" / "usage.db"),  # as compose.yaml: outside the clone
        "SWITCHBOARD_USAGE_SPOOL": str(replica / "var" / "usage-spool"),
        "SWITCHBOARD_GIT_PULL": compose_env["SWITCHBOARD_GIT_PULL"],
        "SWITCHBOARD_REPLICA": "switchboard-1",
        "SWITCHBOARD_HEALTH_INTERVAL_S": "0",
        "SOPS_AGE_KEY_FILE": str(project.identity.key_file),
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    }
    port = _free_port()
    with _replica(env, port) as proc:
        ready = _ready(proc, port)
        assert ready["last_applied_commit"] == head
        assert ready["refused"] == []
        assert ready["degraded"] is False
    clone = replica / "config"
    assert git(clone, "rev-parse", "HEAD") == head
    assert git(clone, "status", "--porcelain") == "", "the clone stays clean (the log is outside it)"
    assert (replica / "var" / "events.jsonl").stat().st_size > 0
    assert not (replica / "config.partial").exists()

    # A restart keeps its clone (and whatever the pull brought into it) and serves again.
    marker = clone / ".git" / "restart-marker"
    marker.write_text("kept")
    port = _free_port()
    with _replica(env, port) as proc:
        assert _ready(proc, port)["last_applied_commit"] == head
    assert marker.read_text() == "kept"


def test_no_balancer_asks_for_affinity() -> None:
    """Consumers behind a balancer hold on tags, which every replica serving one commit gives
    alike (docs/deploy.md, "What the load balancer may do"): nothing here pins a client to one."""
    haproxy = _text(DEPLOY / "haproxy.cfg")
    for line in haproxy.splitlines():
        words = line.split("#", 1)[0].split()
        assert not words or words[0] not in {"stick", "stick-table", "cookie", "hash-type"}, line
        if words[:1] == ["balance"]:
            assert words[1] in {"roundrobin", "leastconn", "random"}, line
    services = [
        d for path in KUBERNETES.rglob("*.yaml") for d in _documents(path) if d.get("kind") == "Service"
    ]
    assert services
    for service in services:
        assert service["spec"].get("sessionAffinity", "None") == "None", service["metadata"]["name"]
