"""A grpcio caller instrumented with the OpenTelemetry SDK, for the tracing
tests: it makes one call to the demo Agent at TARGET inside a span of its
own, puts that span's W3C `traceparent` on the call (as the SDK's
propagator does for any instrumented client), exports its span over
OTLP/gRPC to RECEIVER, and prints one JSON object: its trace and span id,
the traceparent it sent, and the one the agent says it received.

With `unsampled`, it sends a traceparent whose sampled flag is off, made by
hand, and exports nothing.

usage: traced_client.py TARGET RECEIVER sampled|unsampled
"""

import json
import os
import secrets
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from client import load_stubs  # noqa: E402


def main():
    target, receiver, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    import grpc
    from opentelemetry import propagate, trace
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    agent_pb2, agent_pb2_grpc = load_stubs()
    stub = agent_pb2_grpc.AgentStub(grpc.insecure_channel(target))
    request = agent_pb2.InvokeRequest(payload=b"traced")
    out = {}
    if mode == "sampled":
        provider = TracerProvider(resource=Resource.create({"service.name": "python-caller"}))
        provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=receiver, insecure=True)))
        tracer = provider.get_tracer("traced_client")
        with tracer.start_as_current_span("call the planner", kind=trace.SpanKind.CLIENT) as span:
            carrier = {}
            propagate.inject(carrier)
            ctx = span.get_span_context()
            out["trace_id"] = format(ctx.trace_id, "032x")
            out["span_id"] = format(ctx.span_id, "016x")
            out["sent"] = carrier["traceparent"]
            _, call = stub.Invoke.with_call(request, metadata=list(carrier.items()), timeout=10)
        provider.shutdown()
    else:
        trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
        sent = f"00-{trace_id}-{span_id}-00"
        out.update(trace_id=trace_id, span_id=span_id, sent=sent)
        _, call = stub.Invoke.with_call(request, metadata=[("traceparent", sent)], timeout=10)
    received = dict(call.initial_metadata()).get("x-traceparent-received")
    out["received"] = received
    print(json.dumps(out))


if __name__ == "__main__":
    main()
