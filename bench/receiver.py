"""OTLP receivers in a process of their own, for the real-export table.

Why a separate process: a collector never shares the application's GIL. Run
in the benchmark's process, the receiver's gRPC threads would compete with the
request path and bill the variant for the collector's work.

Protocol (line-oriented JSON on stdio, driven by ``bench/run.py``): on start,
prints ``{"endpoints": [...]}`` (one OTLP/gRPC endpoint per receiver, in order);
when its standard input closes, prints ``{"spans": [...]}`` (spans accepted by
each receiver) and exits.

Usage: ``python bench/receiver.py COUNT``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.support.otlp import OtlpReceiver  # noqa: E402


def _span_count(receiver: OtlpReceiver) -> int:
    """Spans in every accepted trace export (counted from the raw protobuf: cheap)."""
    total = 0
    for request in receiver.requests("traces"):
        message: object = request.message
        for resource_spans in getattr(message, "resource_spans", ()):
            for scope_spans in resource_spans.scope_spans:
                total += len(scope_spans.spans)
    return total


def main(argv: list[str]) -> int:
    """Serve ``argv[0]`` receivers until stdin closes, then report their span counts."""
    count = int(argv[0]) if argv else 1
    receivers = [OtlpReceiver().start() for _ in range(count)]
    try:
        print(json.dumps({"endpoints": [r.grpc_endpoint for r in receivers]}), flush=True)
        sys.stdin.read()  # until run.py closes our stdin
        print(json.dumps({"spans": [_span_count(r) for r in receivers]}), flush=True)
    finally:
        for receiver in receivers:
            receiver.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
