"""Test-support code shared by the test suite (in-process OTLP receiver, fault servers)."""
