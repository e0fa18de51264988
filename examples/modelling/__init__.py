"""The modelling backend: the example service instrumented with otelkit."""
