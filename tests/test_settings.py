"""The settings table: precedence, parsing, and errors that say what to fix."""

from __future__ import annotations

import logging

import pytest

from otelkit.settings import SETTINGS, ConfigurationError, resolve_settings


def test_argument_beats_environment_beats_default() -> None:
    environ = {"LOG_FORMAT": "console", "LOG_LEVEL": "debug"}
    settings = resolve_settings({"log_format": "json"}, environ)
    assert settings.log_format == "json"
    assert settings.sources["log_format"] == "argument"
    assert settings.log_level == logging.DEBUG
    assert settings.sources["log_level"] == "environment"
    assert settings.request_id_header == "X-Request-ID"
    assert settings.sources["request_id_header"] == "default"


def test_every_setting_resolves_with_an_empty_environment() -> None:
    settings = resolve_settings({}, {})
    assert set(settings.values) == {setting.name for setting in SETTINGS}
    assert set(settings.sources.values()) == {"default"}


@pytest.mark.parametrize(
    ("variable", "value", "accepted"),
    [
        ("LOG_LEVEL", "LOUD", "DEBUG, INFO, WARNING, ERROR, CRITICAL"),
        ("LOG_FORMAT", "xml", "json, console"),
        ("OTEL_TRACES_SAMPLER", "sometimes", "always_on"),
        ("OTEL_TRACES_SAMPLER_ARG", "1.5", "from 0 to 1"),
        ("OTEL_TRACES_SAMPLER_ARG", "half", "from 0 to 1"),
        ("OTEL_EXPORTER_OTLP_HEADERS", "no-equals-sign", "key=value"),
        ("OTEL_TRACES_EXPORTER", "zipkin", "otlp, console, none"),
        ("OTEL_METRICS_EXPORTER", "statsd", "prometheus, otlp, console, none"),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json", "grpc, http/protobuf"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4317", "http:// or https:// URL"),
        ("OTEL_EXPORTER_PROMETHEUS_PORT", "99999", "port number"),
        ("OTELKIT_EXCLUDED_PATHS", "health", "starting with /"),
        ("OTEL_METRIC_EXPORT_INTERVAL", "-5", "positive number"),
        ("OTELKIT_ACCESS_LOG", "maybe", "true or false"),
    ],
)
def test_bad_values_name_the_variable_the_value_and_what_is_accepted(
    variable: str, value: str, accepted: str
) -> None:
    with pytest.raises(ConfigurationError) as caught:
        resolve_settings({}, {variable: value})
    message = str(caught.value)
    assert variable in message
    assert repr(value) in message
    assert accepted in message


def test_bad_otlp_headers_never_echo_their_secrets() -> None:
    with pytest.raises(ConfigurationError) as caught:
        resolve_settings({}, {"OTEL_EXPORTER_OTLP_HEADERS": "api-key=s3cr3t,bad key=also-secret"})
    message = str(caught.value)
    assert "OTEL_EXPORTER_OTLP_HEADERS='api-key=...,bad key=...'" in message
    assert "s3cr3t" not in message
    assert "also-secret" not in message


def test_bad_argument_names_the_keyword() -> None:
    with pytest.raises(ConfigurationError, match=r"log_format \(or LOG_FORMAT\)='yaml'"):
        resolve_settings({"log_format": "yaml"}, {})


def test_unknown_setting_is_refused_with_the_known_ones() -> None:
    with pytest.raises(ConfigurationError, match=r"unknown setting.*log_fromat.*log_format"):
        resolve_settings({"log_fromat": "json"}, {})


def test_instrument_fails_at_start_up_on_bad_configuration(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from fastapi import FastAPI

    import otelkit

    monkeypatch.setenv("LOG_LEVEL", "verbose")
    with pytest.raises(ConfigurationError, match="LOG_LEVEL"):
        otelkit.instrument(FastAPI())


def test_headers_and_resource_attributes_are_url_decoded() -> None:
    settings = resolve_settings(
        {},
        {
            "OTEL_EXPORTER_OTLP_HEADERS": "Authorization=Bearer%20abc, x-team = core",
            "OTEL_RESOURCE_ATTRIBUTES": "service.version=1.0,team=a%2Cb",
        },
    )
    assert settings.otlp_headers == {"authorization": "Bearer abc", "x-team": "core"}
    assert settings.resource_attributes == {"service.version": "1.0", "team": "a,b"}


def test_exporter_lists() -> None:
    assert resolve_settings({}, {"OTEL_METRICS_EXPORTER": "otlp,prometheus"}).metrics_exporter == (
        "otlp",
        "prometheus",
    )
    assert resolve_settings({}, {"OTEL_TRACES_EXPORTER": "none"}).traces_exporter == ()
