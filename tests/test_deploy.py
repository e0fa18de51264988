"""Static tests of the demo stack: docker-compose.yml and everything it mounts.

Docker does not run where these tests run, yet users run the stack with
``docker compose up`` from a clean clone, so every mistake that can be found
without Docker is looked for here: files that do not parse or do not exist,
unpinned images, ports open to the network, services without health checks,
collector pipelines naming undefined components, an app that would push its
metrics twice, Prometheus configuration and rules that the real ``promtool``
rejects or whose unit tests fail, and rules or dashboard panels that query a
metric otelkit does not export.

The metric names below are the contract with the first user's dashboards:
they are written once, here, and both checked against the rules and the
dashboard and against what the example service actually serves on /metrics.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from tests.support.prometheus import promtool_binary

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
COLLECTOR_FILE = ROOT / "otel-collector.yaml"
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
RULES_DIR = PROMETHEUS_DIR / "rules"
RULE_TESTS_DIR = PROMETHEUS_DIR / "tests"
GRAFANA_DIR = ROOT / "deploy" / "grafana"
DASHBOARDS_DIR = GRAFANA_DIR / "dashboards"
DATASOURCES_DIR = GRAFANA_DIR / "provisioning" / "datasources"
DASHBOARD_PROVIDERS_DIR = GRAFANA_DIR / "provisioning" / "dashboards"
EXAMPLE_APP = ROOT / "examples" / "modelling" / "app.py"

EXPECTED_SERVICES = {"app", "otel-collector", "jaeger", "prometheus", "grafana"}
#: Container port of every published port: the app, the Jaeger UI,
#: Prometheus and Grafana. Nothing else is reachable from the host.
EXPECTED_PUBLISHED_PORTS = {8000, 16686, 9090, 3000}
OTLP_PORTS = {"grpc": 4317, "http/protobuf": 4318}
OTLP_RECEIVER_PROTOCOLS = {"grpc": "grpc", "http/protobuf": "http"}


@dataclass(frozen=True)
class ExportedMetric:
    """A sample name otelkit serves on /metrics, with its labels.

    ``open_labels`` marks families whose listed labels are only the ones a
    query may rely on; they carry more (resource attributes, semantic
    convention attributes that depend on the request).
    """

    labels: frozenset[str]
    open_labels: bool = False


def _metric(*labels: str, open_labels: bool = False) -> ExportedMetric:
    return ExportedMetric(frozenset(labels), open_labels)


#: Every sample name otelkit exports, as the first user's dashboards and
#: queries know them. Rules and dashboard may use these and nothing else.
EXPORTED_METRICS: dict[str, ExportedMetric] = {
    "http_requests_total": _metric("method", "endpoint", "status"),
    "http_request_duration_seconds_bucket": _metric("method", "endpoint", "le"),
    "http_request_duration_seconds_sum": _metric("method", "endpoint"),
    "http_request_duration_seconds_count": _metric("method", "endpoint"),
    "http_requests_in_progress": _metric("method", "endpoint"),
    "errors_total": _metric("error_type", "endpoint"),
    "exceptions_total": _metric("exception_type"),
    "models_created_total": _metric("model_type"),
    "simulations_run_total": _metric("simulation_type"),
    "budget_calculations_total": _metric(),
    "http_server_request_duration_seconds_bucket": _metric(
        "http_request_method", "http_route", "http_response_status_code", "le", open_labels=True
    ),
    "http_server_request_duration_seconds_sum": _metric(
        "http_request_method", "http_route", "http_response_status_code", open_labels=True
    ),
    "http_server_request_duration_seconds_count": _metric(
        "http_request_method", "http_route", "http_response_status_code", open_labels=True
    ),
    "http_server_active_requests": _metric("http_request_method", "url_scheme", open_labels=True),
    "target_info": _metric(
        "service_name", "service_version", "deployment_environment_name", open_labels=True
    ),
    "otelkit_exporter_dropped_total": _metric("signal"),
}
#: Series Prometheus writes itself for every target; rules may use them.
PROMETHEUS_SYNTHETIC = {
    "up": _metric(),
    "scrape_duration_seconds": _metric(),
    "scrape_samples_scraped": _metric(),
}
#: Labels every scraped series gets from its target.
TARGET_LABELS = frozenset({"job", "instance"})
ERROR_TYPES = {"client_error", "server_error", "exception"}


# -- loading -------------------------------------------------------------------


def _load_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as handle:
        return yaml.safe_load(handle)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = _load_yaml(COMPOSE_FILE)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    result: dict[str, dict[str, Any]] = compose["services"]
    return result


@pytest.fixture(scope="module")
def collector() -> dict[str, Any]:
    data: dict[str, Any] = _load_yaml(COLLECTOR_FILE)
    return data


@pytest.fixture(scope="module")
def prometheus_config() -> dict[str, Any]:
    data: dict[str, Any] = _load_yaml(PROMETHEUS_CONFIG)
    return data


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    (path,) = DASHBOARDS_DIR.glob("*.json")
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


@pytest.fixture(scope="module")
def datasources() -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for path in sorted(DATASOURCES_DIR.glob("*.y*ml")):
        found.extend(_load_yaml(path)["datasources"])
    return found


def _rule_files() -> list[Path]:
    return sorted(RULES_DIR.glob("*.yml"))


def _rule_test_files() -> list[Path]:
    return sorted(RULE_TESTS_DIR.glob("*.yml"))


def _rules(key: str) -> list[dict[str, Any]]:
    """Every rule that has ``key``: "record", "alert" (or "expr" for all)."""
    return [
        rule
        for path in _rule_files()
        for group in _load_yaml(path)["groups"]
        for rule in group["rules"]
        if key in rule
    ]


def _recorded_names() -> set[str]:
    return {rule["record"] for rule in _rules("record")}


def _walk_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _walk_panels(panel.get("panels", []))


def _dashboard_queries(dashboard: Mapping[str, Any]) -> list[str]:
    """Every PromQL expression of the dashboard: panel targets and variables."""
    queries = [
        target["expr"]
        for panel in _walk_panels(dashboard["panels"])
        for target in panel.get("targets", [])
        if target.get("expr")
    ]
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        text = query.get("query") if isinstance(query, dict) else query
        if not text:
            continue
        match = re.fullmatch(r"\s*label_values\((.+),\s*(\w+)\s*\)\s*", text)
        if match:
            # label_values(selector, label): the selector is PromQL, and the
            # label must exist on it (checked as a `by` label would be).
            queries.append(f"group by ({match.group(2)}) ({match.group(1)})")
        else:
            queries.append(text)
    return queries


def _rule_queries() -> list[str]:
    """The expression of every recording and alerting rule."""
    return [rule["expr"] for rule in _rules("expr")]


# -- a small PromQL reader -------------------------------------------------------

_TOKEN = re.compile(
    r"""
    (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
  | (?P<range>\[[^\]]*\])
  | (?P<variable>\$\{[^}]*\}|\$\w+)
  | (?P<number>(?:\d|\.\d)[\w.]*)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<space>\s+)
  | (?P<punct>=~|!~|!=|==|>=|<=|[(){},=<>+\-*/%^])
    """,
    re.VERBOSE,
)
_LABEL_LIST_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
# Aggregation operators may be followed by `by (...)` instead of `(`.
_AGGREGATIONS = {
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
    "bottomk", "topk", "quantile", "limitk", "limit_ratio",
}  # fmt: skip
_KEYWORDS = (
    _LABEL_LIST_KEYWORDS | _AGGREGATIONS | {"bool", "and", "or", "unless", "offset", "inf", "nan"}
)


@dataclass
class PromQLNames:
    """What a PromQL expression refers to."""

    metrics: set[str]
    #: (metric, label) for every label matcher in a selector.
    selector_labels: set[tuple[str, str]]
    #: Labels named in by/without/on/ignoring/group_x lists.
    grouping_labels: set[str]


def promql_names(expr: str) -> PromQLNames:
    """Metric and label names used by ``expr``.

    Not a full parser: it tells metric names from function names (followed
    by ``(``), from keywords, and from label names (inside ``{...}`` or in a
    ``by (...)``-style list), which is all the checks below need. Grafana's
    ``$variables`` are skipped.
    """
    tokens: list[tuple[str, str]] = []
    position = 0
    while position < len(expr):
        match = _TOKEN.match(expr, position)
        if match is None:
            raise ValueError(f"cannot read {expr[position:]!r} in {expr!r}")
        kind = match.lastgroup or ""
        if kind != "space":
            tokens.append((kind, match.group()))
        position = match.end()

    names = PromQLNames(set(), set(), set())
    brace_metric: str | None = None
    in_braces = False
    label_list_pending = False
    in_label_list = False
    for index, (kind, text) in enumerate(tokens):
        following = tokens[index + 1][1] if index + 1 < len(tokens) else ""
        if in_braces:
            if text == "}":
                in_braces = False
            elif kind == "ident" and brace_metric is not None:
                names.selector_labels.add((brace_metric, text))
            continue
        if in_label_list:
            if text == ")":
                in_label_list = False
            elif kind == "ident":
                names.grouping_labels.add(text)
            continue
        if text == "{":
            in_braces = True
            previous = tokens[index - 1] if index else ("", "")
            brace_metric = previous[1] if previous[0] == "ident" else None
            continue
        if text == "(" and label_list_pending:
            in_label_list = True
            label_list_pending = False
            continue
        if kind != "ident":
            continue
        lowered = text.lower()
        if lowered in _LABEL_LIST_KEYWORDS:
            label_list_pending = True
        elif lowered in _KEYWORDS or following == "(":
            continue
        else:
            names.metrics.add(text)
    return names


def test_promql_reader_tells_metrics_from_functions_and_labels() -> None:
    """The checks below are only as good as this reader, so it is tested too."""
    names = promql_names(
        'histogram_quantile(0.95, sum by (endpoint, le) (rate(x_bucket{job=~"$job",'
        'status=~"5.."}[$__rate_interval]))) / ignoring (le) group_left y offset 5m '
        "or on() vector(0) > bool 1 unless count without (instance) (up)"
    )
    assert names.metrics == {"x_bucket", "y", "up"}
    assert names.selector_labels == {("x_bucket", "job"), ("x_bucket", "status")}
    assert names.grouping_labels == {"endpoint", "le", "instance"}
    assert promql_names("sum(rate(a_total[5m])) by (job)").grouping_labels == {"job"}
    assert promql_names("job:http_requests:rate5m > 0.05").metrics == {"job:http_requests:rate5m"}


# -- every file parses, every referenced path exists ------------------------------


def test_every_config_file_parses() -> None:
    """A YAML or JSON syntax error would stop a container at start-up."""
    yaml_files = [COMPOSE_FILE, COLLECTOR_FILE, *sorted((ROOT / "deploy").rglob("*.yml"))]
    for path in yaml_files:
        assert _load_yaml(path) is not None, f"{path} is empty"
    json_files = sorted((ROOT / "deploy").rglob("*.json"))
    assert json_files, "no dashboard JSON found"
    for path in json_files:
        json.loads(path.read_text(encoding="utf-8"))
    assert len(yaml_files) >= 8


def test_compose_has_the_expected_services(services: dict[str, Any]) -> None:
    """The five services the README and DESIGN.md promise, and no stray ones."""
    assert set(services) == EXPECTED_SERVICES


def _bind_mounts(service: Mapping[str, Any]) -> list[tuple[Path, PurePosixPath, bool]]:
    """(host path, container path, read-only) of each bind mount of ``service``."""
    mounts = []
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            parts = volume.split(":")
            source, target = parts[0], parts[1]
            read_only = len(parts) > 2 and "ro" in parts[2].split(",")
        else:
            source, target = volume["source"], volume["target"]
            read_only = bool(volume.get("read_only"))
        assert source.startswith("./"), f"{volume!r}: only repository paths are mounted"
        mounts.append((ROOT / source, PurePosixPath(target), read_only))
    return mounts


def _host_path(service: Mapping[str, Any], container_path: str) -> Path | None:
    """The repository path a container path of ``service`` is mounted from."""
    wanted = PurePosixPath(container_path)
    for host, target, _ in _bind_mounts(service):
        if wanted == target:
            return host
        if target in wanted.parents:
            return host / wanted.relative_to(target)
    return None


def test_every_mounted_path_exists_and_is_read_only(services: dict[str, Any]) -> None:
    """A missing file becomes an empty directory in the container; configs are never written."""
    mounted = 0
    for name, service in services.items():
        for host, target, read_only in _bind_mounts(service):
            assert host.exists(), f"{name}: {host.relative_to(ROOT)} does not exist"
            assert read_only, f"{name}: {target} should be mounted read-only"
            mounted += 1
    assert mounted >= 5


def test_build_contexts_and_dockerfile_sources_exist(services: dict[str, Any]) -> None:
    """Every build context, Dockerfile and COPY source is in the repository."""
    for name, service in services.items():
        build = service.get("build")
        if build is None:
            continue
        context = ROOT / build["context"]
        assert context.is_dir(), f"{name}: build context {context} missing"
        if "dockerfile_inline" not in build:
            assert (context / build.get("dockerfile", "Dockerfile")).is_file()
    for instruction in _dockerfile_instructions(DOCKERFILE.read_text(encoding="utf-8")):
        keyword, _, arguments = instruction.partition(" ")
        if keyword.upper() != "COPY" or "--from=" in arguments:
            continue
        *sources, _destination = arguments.split()
        for source in sources:
            assert (ROOT / source).exists(), f"Dockerfile copies {source}, which does not exist"


def test_dockerfile_installs_the_demo_extra_and_serves_the_example() -> None:
    """The image runs the example from this checkout, unprivileged, on the published port."""
    text = DOCKERFILE.read_text(encoding="utf-8")
    instructions = _dockerfile_instructions(text)
    (base,) = [i.split()[1] for i in instructions if i.upper().startswith("FROM ")]
    assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?", base), base
    assert 'RUN pip install ".[demo]"' in instructions
    (cmd,) = [i for i in instructions if i.startswith("CMD ")]
    command = json.loads(cmd.removeprefix("CMD "))
    assert command[0] == "uvicorn"
    module, _, attribute = command[1].partition(":")
    assert attribute == "app"
    assert ROOT.joinpath(*module.split(".")).with_suffix(".py") == EXAMPLE_APP
    assert command[command.index("--port") + 1] == "8000"
    assert any(i.startswith("HEALTHCHECK ") and "/health" in i for i in instructions)
    assert any(i.startswith("USER ") and i != "USER root" for i in instructions)


def _dockerfile_instructions(text: str) -> list[str]:
    """Instructions with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", text)
    lines = [line.strip() for line in joined.splitlines()]
    return [re.sub(r"\s+", " ", line) for line in lines if line and not line.startswith("#")]


# -- images, ports, health checks, start order ---------------------------------

_PINNED = re.compile(
    r"^[a-z0-9][a-z0-9._/-]*:v?\d+\.\d+\.\d+(-[a-z0-9.-]+)?(@sha256:[0-9a-f]{64})?$"
)


def _images(services: Mapping[str, Any]) -> dict[str, list[str]]:
    """Every image each service pulls: its image, or the FROMs of its build."""
    images: dict[str, list[str]] = {}
    for name, service in services.items():
        build = service.get("build")
        if build is None:
            images[name] = [service["image"]]
            continue
        if "dockerfile_inline" in build:
            text = build["dockerfile_inline"]
        else:
            dockerfile = ROOT / build["context"] / build.get("dockerfile", "Dockerfile")
            text = dockerfile.read_text(encoding="utf-8")
        stages: set[str] = set()
        images[name] = []
        for instruction in _dockerfile_instructions(text):
            words = instruction.split()
            if words[0].upper() != "FROM":
                continue
            if words[1] not in stages:
                images[name].append(words[1])
            if len(words) == 4 and words[2].upper() == "AS":
                stages.add(words[3])
    return images


def test_every_image_is_pinned_to_a_version(services: dict[str, Any]) -> None:
    """No `latest`, no floating tag: `docker compose up` next year runs what we tested."""
    images = _images(services)
    for name, refs in images.items():
        assert refs, f"{name} pulls no image"
        for ref in refs:
            assert "latest" not in ref, f"{name}: {ref}"
            assert _PINNED.match(ref), f"{name}: {ref} is not pinned to a x.y.z version"
    pulled = {ref.split(":")[0] for refs in images.values() for ref in refs}
    assert {
        "otel/opentelemetry-collector-contrib",
        "jaegertracing/jaeger",
        "prom/prometheus",
        "grafana/grafana",
        "python",
    } <= pulled
    (jaeger,) = images["jaeger"]
    assert jaeger.split(":")[1].startswith("2."), "Jaeger v2 takes OTLP in natively"


def test_published_ports_are_loopback_only(services: dict[str, Any]) -> None:
    """The demo has no authentication: nothing may listen on the host's network interfaces."""
    published: set[int] = set()
    for name, service in services.items():
        for port in service.get("ports", []):
            if isinstance(port, str):
                host_ip, _host_port, container = port.rsplit(":", 2)
            else:
                host_ip, container = port.get("host_ip", ""), str(port["target"])
            assert host_ip == "127.0.0.1", f"{name}: {port!r} is reachable from the network"
            published.add(int(container.split("/")[0]))
    assert published == EXPECTED_PUBLISHED_PORTS


def test_every_service_has_a_healthcheck(services: dict[str, Any]) -> None:
    """`depends_on: service_healthy` needs one, and the images have no shell for CMD-SHELL."""
    for name, service in services.items():
        check = service.get("healthcheck")
        assert check, f"{name} has no healthcheck"
        assert not check.get("disable"), name
        test = check["test"]
        assert isinstance(test, list), f"{name}: use the exec form, not a shell string"
        assert test[0] == "CMD", f"{name}: {test[0]} (the images have no shell to run CMD-SHELL)"
        assert any("127.0.0.1" in word for word in test), f"{name}: probe the container itself"


def test_app_healthcheck_matches_the_dockerfile(services: dict[str, Any]) -> None:
    """The compose check and the image's HEALTHCHECK are the same probe."""
    instructions = _dockerfile_instructions(DOCKERFILE.read_text(encoding="utf-8"))
    (healthcheck,) = [i for i in instructions if i.startswith("HEALTHCHECK ")]
    image_command = json.loads(healthcheck.split(" CMD ", 1)[1])
    assert services["app"]["healthcheck"]["test"] == ["CMD", *image_command]


def test_collector_healthcheck_binary_is_built_into_its_image(services: dict[str, Any]) -> None:
    """The upstream collector image is FROM scratch: the probe's binary must be added."""
    service = services["otel-collector"]
    binary = service["healthcheck"]["test"][1]
    copies = [
        i.split()
        for i in _dockerfile_instructions(service["build"]["dockerfile_inline"])
        if i.startswith("COPY ")
    ]
    assert any(words[-1] == binary for words in copies), f"{binary} is not copied in"


def test_health_probes_use_the_ports_the_services_listen_on(
    services: dict[str, Any], collector: dict[str, Any]
) -> None:
    """A probe on the wrong port keeps a healthy service 'starting' and blocks its dependants."""

    def probe_port(name: str) -> int | None:
        for word in services[name]["healthcheck"]["test"]:
            if word.startswith("http://") or "'http://" in word:
                url: str = word[word.index("http://") :].split("'")[0]
                return urlsplit(url).port
        return None

    health_endpoint = collector["extensions"]["health_check"]["endpoint"]
    assert probe_port("otel-collector") == int(health_endpoint.rsplit(":", 1)[1])
    assert probe_port("app") == 8000
    assert probe_port("jaeger") == 13133
    assert probe_port("prometheus") == 9090
    assert probe_port("grafana") == 3000


def test_start_order_waits_for_healthy_dependencies(services: dict[str, Any]) -> None:
    """Each service starts once what it sends to or reads from answers, without cycles."""
    for name, service in services.items():
        for dependency, spec in service.get("depends_on", {}).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            assert spec["condition"] == "service_healthy", f"{name} -> {dependency}"
            assert services[dependency].get("healthcheck"), dependency

    def reaches(start: str, goal: str, seen: frozenset[str] = frozenset()) -> bool:
        for dependency in services[start].get("depends_on", {}):
            if dependency == goal or (
                dependency not in seen and reaches(dependency, goal, seen | {start})
            ):
                return True
        return False

    for name in services:
        assert not reaches(name, name), f"{name} depends on itself"
    assert reaches("app", "otel-collector")
    assert reaches("otel-collector", "jaeger")
    assert reaches("prometheus", "app")
    assert reaches("grafana", "prometheus")
    assert reaches("grafana", "jaeger")


# -- the app's telemetry goes where the collector listens -------------------------


def test_app_exports_traces_to_the_collector_with_matching_protocol(
    services: dict[str, Any], collector: dict[str, Any]
) -> None:
    """gRPC to 4317 or HTTP to 4318: a mismatch loses every span silently."""
    env = services["app"]["environment"]
    protocol = env["OTEL_EXPORTER_OTLP_PROTOCOL"]
    endpoint = urlsplit(env["OTEL_EXPORTER_OTLP_ENDPOINT"])
    assert endpoint.scheme == "http", "the collector's receivers have no TLS in the demo"
    assert endpoint.hostname == "otel-collector"
    assert endpoint.hostname in services
    assert endpoint.port == OTLP_PORTS[protocol]
    receiver = collector["receivers"]["otlp"]["protocols"][OTLP_RECEIVER_PROTOCOLS[protocol]]
    assert receiver["endpoint"] == f"0.0.0.0:{endpoint.port}"
    assert "otlp" in env["OTEL_TRACES_EXPORTER"].split(",")
    assert env["OTEL_SERVICE_NAME"] == "modelling-backend"


def test_app_metrics_reach_prometheus_once(
    services: dict[str, Any], prometheus_config: dict[str, Any]
) -> None:
    """Scraped directly, never also pushed through the collector: no double counting."""
    env = services["app"]["environment"]
    exporters = {value.strip() for value in env["OTEL_METRICS_EXPORTER"].split(",")}
    assert "prometheus" in exporters
    assert "otlp" not in exporters
    assert not env.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")
    jobs = {job["job_name"]: job for job in prometheus_config["scrape_configs"]}
    app_job = jobs["modelling-backend"]
    assert app_job.get("metrics_path", "/metrics") == "/metrics"
    assert [t for c in app_job["static_configs"] for t in c["targets"]] == ["app:8000"]


def test_app_environment_is_valid_otelkit_configuration(services: dict[str, Any]) -> None:
    """otelkit fails at start-up on a bad setting; the container must not be that case."""
    from otelkit.settings import resolve_settings

    env = {key: str(value) for key, value in services["app"]["environment"].items()}
    settings = resolve_settings(environ=env)
    assert settings.metrics_exporter == ("prometheus",)
    assert "otlp" in settings.traces_exporter
    assert settings.otlp_protocol == env["OTEL_EXPORTER_OTLP_PROTOCOL"]
    assert settings.otlp_endpoint == env["OTEL_EXPORTER_OTLP_ENDPOINT"]
    assert settings.service_name == "modelling-backend"
    # Prometheus scrapes the path otelkit serves.
    assert settings.metrics_path == "/metrics"
    assert settings.prometheus_port is None, "metrics must be on the app's own port 8000"


def test_every_scrape_target_is_a_listening_compose_service(
    services: dict[str, Any], collector: dict[str, Any], prometheus_config: dict[str, Any]
) -> None:
    """Every target names a compose service and a port that service really listens on."""
    telemetry = collector["service"]["telemetry"]["metrics"]["readers"][0]
    listening = {
        "app:8000",
        "otel-collector:" + collector["exporters"]["prometheus"]["endpoint"].rsplit(":", 1)[1],
        f"otel-collector:{telemetry['pull']['exporter']['prometheus']['port']}",
        "localhost:9090",
    }
    targets = {
        job["job_name"]: {t for c in job["static_configs"] for t in c["targets"]}
        for job in prometheus_config["scrape_configs"]
    }
    assert set().union(*targets.values()) == listening
    assert targets["otel-collector"] == {"otel-collector:8889"}
    for job_targets in targets.values():
        for target in job_targets:
            host = target.rsplit(":", 1)[0]
            assert host == "localhost" or host in services, target


def test_prometheus_runs_with_exemplars_and_the_mounted_config(services: dict[str, Any]) -> None:
    """Without exemplar storage the trace ids on the latency histogram are dropped at scrape."""
    service = services["prometheus"]
    command = service["command"]
    assert "--enable-feature=exemplar-storage" in command
    (config_flag,) = [c for c in command if c.startswith("--config.file=")]
    assert _host_path(service, config_flag.split("=", 1)[1]) == PROMETHEUS_CONFIG
    assert _host_path(service, "/etc/prometheus/rules") == RULES_DIR


def test_grafana_is_provisioned_for_anonymous_viewers(services: dict[str, Any]) -> None:
    """Datasources and dashboards load from the mounted files; viewers need no login."""
    service = services["grafana"]
    env = service["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    home = _host_path(service, env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert home is not None
    assert home.is_file()
    assert _host_path(service, "/etc/grafana/provisioning/datasources") == DATASOURCES_DIR
    assert _host_path(service, "/etc/grafana/provisioning/dashboards") == DASHBOARD_PROVIDERS_DIR
    for path in DASHBOARD_PROVIDERS_DIR.glob("*.yml"):
        for provider in _load_yaml(path)["providers"]:
            assert _host_path(service, provider["options"]["path"]) == DASHBOARDS_DIR


def test_grafana_datasources_link_exemplars_to_jaeger(
    datasources: list[dict[str, Any]], services: dict[str, Any]
) -> None:
    """An exemplar's trace_id opens the trace in the provisioned Jaeger datasource."""
    by_type = {source["type"]: source for source in datasources}
    prometheus, jaeger = by_type["prometheus"], by_type["jaeger"]
    assert urlsplit(prometheus["url"]).hostname == "prometheus"
    assert urlsplit(prometheus["url"]).port == 9090
    assert urlsplit(jaeger["url"]).hostname == "jaeger"
    assert urlsplit(jaeger["url"]).port == 16686
    assert {"prometheus", "jaeger"} <= set(services)
    (destination,) = prometheus["jsonData"]["exemplarTraceIdDestinations"]
    assert destination["name"] == "trace_id"
    assert destination["datasourceUid"] == jaeger["uid"]


# -- the collector ------------------------------------------------------------------


def test_collector_pipelines_use_exactly_the_defined_components(
    collector: dict[str, Any],
) -> None:
    """The collector refuses to start on an undefined component and warns on unused ones."""
    service = collector["service"]
    used: dict[str, set[str]] = {"receivers": set(), "processors": set(), "exporters": set()}
    for pipeline_id, pipeline in service["pipelines"].items():
        assert pipeline_id.split("/")[0] in {"traces", "metrics", "logs"}, pipeline_id
        assert pipeline.get("receivers"), f"{pipeline_id} has no receiver"
        assert pipeline.get("exporters"), f"{pipeline_id} has no exporter"
        for kind, components in used.items():
            for component in pipeline.get(kind, []):
                assert component in (collector.get(kind) or {}), f"{pipeline_id}: {component}"
                components.add(component)
        processors = pipeline.get("processors", [])
        # memory_limiter must see data first to refuse it in time; batch last.
        assert processors[0] == "memory_limiter", pipeline_id
        assert processors[-1] == "batch", pipeline_id
    for kind, components in used.items():
        assert set(collector[kind]) == components, (
            f"unused {kind}: {set(collector[kind]) - components}"
        )
    assert set(service["extensions"]) == set(collector["extensions"])
    assert "health_check" in service["extensions"]


def test_collector_sends_traces_to_jaeger_and_exposes_metrics(
    collector: dict[str, Any], services: dict[str, Any]
) -> None:
    """Traces reach Jaeger over OTLP; pushed metrics are exposed for Prometheus."""
    pipelines = collector["service"]["pipelines"]
    (trace_exporter,) = pipelines["traces"]["exporters"]
    assert trace_exporter.split("/")[0] == "otlp"
    jaeger = collector["exporters"][trace_exporter]
    assert jaeger["endpoint"] == "jaeger:4317"
    assert jaeger["tls"]["insecure"] is True
    assert "jaeger" in services
    assert pipelines["metrics"]["exporters"] == ["prometheus"]
    assert collector["exporters"]["prometheus"]["endpoint"].startswith("0.0.0.0:")


# -- Prometheus: promtool on the real files ------------------------------------------


def _promtool(*args: str, cwd: Path) -> str:
    result = subprocess.run(
        [promtool_binary(), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"promtool {' '.join(args)} failed:\n{output}"
    return output


def test_promtool_check_config_as_mounted_in_the_container(
    services: dict[str, Any], tmp_path: Path
) -> None:
    """Lay the files out as the compose mounts do, then check prometheus.yml there.

    This checks the config, and that its rule_files pattern finds every rule
    file at the path where compose mounts them.
    """
    for host, target, _ in _bind_mounts(services["prometheus"]):
        destination = tmp_path / target.relative_to("/")
        destination.parent.mkdir(parents=True, exist_ok=True)
        if host.is_dir():
            shutil.copytree(host, destination)
        else:
            shutil.copy(host, destination)
    config = tmp_path / "etc" / "prometheus" / "prometheus.yml"
    output = _promtool("check", "config", str(config), cwd=tmp_path)
    rule_count = len(_rule_files())
    assert rule_count >= 2
    assert f"SUCCESS: {rule_count} rule files found" in output


def test_promtool_check_rules() -> None:
    """Every rule file is valid PromQL and rule syntax for the real Prometheus."""
    output = _promtool("check", "rules", *map(str, _rule_files()), cwd=PROMETHEUS_DIR)
    assert output.count("SUCCESS") == len(_rule_files())


def test_promtool_unit_tests_pass() -> None:
    """The rules do what their unit tests in deploy/prometheus/tests say."""
    tests = _rule_test_files()
    assert tests
    output = _promtool("test", "rules", *map(str, tests), cwd=PROMETHEUS_DIR)
    assert output.count("SUCCESS") == len(tests)


def test_every_rule_has_unit_tests() -> None:
    """Each recording rule is evaluated; each alert is seen firing and seen quiet."""
    firing: set[str] = set()
    quiet: set[str] = set()
    evaluated: set[str] = set()
    for path in _rule_test_files():
        for case in _load_yaml(path)["tests"]:
            for alert_test in case.get("alert_rule_test", []):
                target = firing if alert_test.get("exp_alerts") else quiet
                target.add(alert_test["alertname"])
            for expr_test in case.get("promql_expr_test", []):
                evaluated |= promql_names(expr_test["expr"]).metrics
    alerts = {rule["alert"] for rule in _rules("alert")}
    assert {"OtelkitHighServerErrorRatio", "OtelkitHighLatencyP95"} <= alerts
    assert {"OtelkitTargetDown", "OtelkitNoTraffic"} <= alerts
    assert alerts - firing == set(), "alerts never tested firing"
    assert alerts - quiet == set(), "alerts never tested not firing"
    assert _recorded_names() - evaluated == set(), "recording rules never evaluated"


def test_recording_rules_cover_red_per_endpoint() -> None:
    """Rate, 5xx ratio and p50/p95/p99 latency are recorded per endpoint."""
    by_name = {rule["record"]: rule["expr"] for rule in _rules("record")}
    per_endpoint = {name for name in by_name if name.startswith("job_endpoint:")}
    assert any(":http_requests:rate" in name for name in per_endpoint)
    assert any("server_errors:ratio" in name for name in per_endpoint)
    quantiles = {
        match
        for name in per_endpoint
        for match in re.findall(r"histogram_quantile\(\s*([0-9.]+)", by_name[name])
    }
    assert {float(q) for q in quantiles} == {0.5, 0.95, 0.99}


# -- metric names: rules and dashboard use only what otelkit exports ----------------------


def _used_names(queries: list[str]) -> PromQLNames:
    total = PromQLNames(set(), set(), set())
    for query in queries:
        names = promql_names(query)
        total.metrics |= names.metrics
        total.selector_labels |= names.selector_labels
        total.grouping_labels |= names.grouping_labels
    return total


def _check_names(queries: list[str], allowed: Mapping[str, ExportedMetric], where: str) -> None:
    """Each query uses known metrics, and labels those metrics (or its rules) have."""
    # A recorded series keeps the labels its rule aggregates by.
    recorded = {
        rule["record"]: promql_names(rule["expr"]).grouping_labels for rule in _rules("record")
    }
    for query in queries:
        names = promql_names(query)
        unknown = names.metrics - set(allowed) - set(recorded)
        assert not unknown, f"{where}: {query!r} uses metrics otelkit does not export: {unknown}"
        for metric, label in names.selector_labels:
            if metric in recorded or label in TARGET_LABELS:
                continue
            spec = allowed[metric]
            assert label in spec.labels or spec.open_labels, f"{where}: {metric} has no {label!r}"
        if any(allowed[m].open_labels for m in names.metrics - set(recorded)):
            continue
        available = TARGET_LABELS.union(
            *(recorded[m] if m in recorded else allowed[m].labels for m in names.metrics)
        )
        unavailable = names.grouping_labels - available
        assert not unavailable, f"{where}: {query!r} groups by {unavailable}, which it lacks"


def test_rules_use_only_exported_metric_names() -> None:
    """A rule on a misspelt metric evaluates to nothing and never alerts."""
    queries = _rule_queries()
    _check_names(queries, {**EXPORTED_METRICS, **PROMETHEUS_SYNTHETIC}, "rules")
    used = _used_names(queries).metrics
    assert {"http_requests_total", "http_request_duration_seconds_bucket", "up"} <= used


def test_dashboard_uses_only_exported_metric_names(dashboard: dict[str, Any]) -> None:
    """A panel on a misspelt metric shows 'No data' instead of failing loudly."""
    queries = _dashboard_queries(dashboard)
    _check_names(queries, EXPORTED_METRICS, "dashboard")
    used = _used_names(queries).metrics
    assert not used & _recorded_names(), "panels query raw series, which carry exemplars"
    assert {
        "http_requests_total",
        "http_request_duration_seconds_bucket",
        "http_requests_in_progress",
        "errors_total",
        "exceptions_total",
        "models_created_total",
        "simulations_run_total",
        "budget_calculations_total",
    } <= used


def test_dashboard_shows_red_latency_quantiles_with_exemplars(
    dashboard: dict[str, Any], datasources: list[dict[str, Any]]
) -> None:
    """Rate, errors and p50/p95/p99 per endpoint, with exemplars on every latency query."""
    panels = list(_walk_panels(dashboard["panels"]))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    uids = {source["uid"] for source in datasources}
    quantiles: set[float] = set()
    for panel in panels:
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] in uids
            expr = target["expr"]
            if "http_request_duration_seconds_bucket" in expr:
                assert target.get("exemplar") is True, f"{panel['title']}: exemplars off"
                assert "endpoint" in promql_names(expr).grouping_labels, panel["title"]
                quantiles |= {float(q) for q in re.findall(r"histogram_quantile\(([0-9.]+)", expr)}
    assert quantiles == {0.5, 0.95, 0.99}
    exprs = [t["expr"] for p in panels for t in p.get("targets", [])]
    assert any('status=~"5.."' in e and " / " in e for e in exprs), "no 5xx error ratio panel"


# -- the example service really exports every name the rules and dashboard use -------


@pytest.fixture
def example_app() -> Iterator[Any]:
    """A fresh import of the example service's FastAPI app (examples/modelling/app.py).

    Loaded by file path on every use rather than taken from ``sys.modules``:
    the suite's autouse fixture resets otelkit's metric declarations after
    each test, so a module imported by an earlier test would hold business
    counters that no longer export anything.
    """
    if not EXAMPLE_APP.is_file():
        pytest.fail(f"{EXAMPLE_APP.relative_to(ROOT)} does not exist")
    name = "_otelkit_example_under_test"
    spec = importlib.util.spec_from_file_location(name, EXAMPLE_APP)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # pydantic resolves the request models' annotations through sys.modules.
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        yield module.app
    finally:
        sys.modules.pop(name, None)


def _exposition_samples(text: str) -> dict[str, set[str]]:
    """Sample name -> the label names seen on it, from a /metrics response."""
    samples: dict[str, set[str]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = re.match(r"([A-Za-z_:][A-Za-z0-9_:]*)(\{)?", line)
        assert match, f"unreadable exposition line {line!r}"
        labels = samples.setdefault(match.group(1), set())
        if match.group(2):
            # Label values cannot contain an unescaped `"`, so `name="` only
            # ever starts a label; stop at the first `}` outside a value.
            body = re.match(r'\{((?:[^"}]|"(?:\\.|[^"\\])*")*)\}', line[match.end(1) :])
            assert body, f"unreadable labels in {line!r}"
            labels.update(re.findall(r'([A-Za-z_][A-Za-z0-9_]*)="', body.group(1)))
    return samples


def test_rule_and_dashboard_metrics_are_exported(
    dashboard: dict[str, Any], example_app: Any
) -> None:
    """Drive the example app and check /metrics has every name the rules and dashboard use."""
    from starlette.testclient import TestClient

    with TestClient(example_app, raise_server_exceptions=False) as client:
        for path in ("/api/v1/projects", "/api/v1/projects/1", "/api/v1/projects/999"):
            client.get(path)
        created = client.post(
            "/api/v1/modeling", json={"project_id": 1, "name": "bracket", "model_type": "mesh"}
        )
        assert created.status_code == 201, created.text
        simulated = client.post(
            "/api/v1/simulations", json={"model_id": 1, "simulation_type": "thermal"}
        )
        assert simulated.status_code == 200, simulated.text
        budget = client.post("/api/v1/budgets", json={"material": "pla", "volume_cm3": 12.5})
        assert budget.status_code == 200, budget.text
        assert client.get("/api/v1/boom").status_code == 500
        client.get("/no/such/route")
        openmetrics = client.get(
            "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
        )
        text = client.get("/metrics", headers={"Accept": "text/plain"})
    assert openmetrics.status_code == 200
    assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
    assert text.status_code == 200
    assert text.headers["content-type"].startswith("text/plain")

    used = _used_names(_rule_queries() + _dashboard_queries(dashboard))
    needed = used.metrics - _recorded_names() - set(PROMETHEUS_SYNTHETIC)
    assert "http_request_duration_seconds_bucket" in needed
    for response in (openmetrics, text):
        samples = _exposition_samples(response.text)
        missing = needed - set(samples)
        assert not missing, f"{response.headers['content-type']}: not exported: {sorted(missing)}"
        for metric, label in used.selector_labels:
            if metric in needed and label not in TARGET_LABELS:
                assert label in samples[metric], f"{metric} has no {label!r} label"
        for metric in needed:
            for label in EXPORTED_METRICS[metric].labels & used.grouping_labels:
                assert label in samples[metric], f"{metric} has no {label!r} label"

    # What the panels filter and group on has the values they expect.
    om = openmetrics.text
    assert re.search(r'http_requests_total\{[^}]*status="5\d\d"', om)
    error_types = "|".join(sorted(ERROR_TYPES))
    assert re.search(rf'errors_total\{{[^}}]*error_type="({error_types})"', om)
    assert 'exceptions_total{exception_type="RuntimeError"}' in om
    assert 'models_created_total{model_type="mesh"}' in om
    assert 'endpoint="/api/v1/projects/{project_id}"' in om
    # The exemplar label Grafana turns into a Jaeger link (datasources.yml).
    assert re.search(
        r'http_request_duration_seconds_bucket\{[^}]*\} \d+ # \{[^}]*trace_id="[0-9a-f]{32}"', om
    )
