"""An OTLP/gRPC trace receiver that keeps nothing: it answers every export
and counts the spans, for the benchmarks' tracing rows (the sidecar's cost
of exporting is what they measure, not a backend's).

usage: otlp_sink.py PORT   (prints the spans received when stopped)
"""

import signal
import sys
from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

spans = 0


class Sink(trace_service_pb2_grpc.TraceServiceServicer):
    def Export(self, request, context):
        global spans
        for rs in request.resource_spans:
            for ss in rs.scope_spans:
                spans += len(ss.spans)
        return trace_service_pb2.ExportTraceServiceResponse()


def main():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Sink(), server)
    server.add_insecure_port(f"127.0.0.1:{sys.argv[1]}")
    server.start()

    def stop(*_):
        print(f"spans received: {spans}", flush=True)
        server.stop(0)
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
