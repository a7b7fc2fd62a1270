"""A plain grpcio client of the demo Agent service.

It knows nothing of agentmesh: it dials the target it is given, and reaches
the sidecar only because the environment sets grpc_proxy. It prints one JSON
object: how many calls each agent answered, and any failures.

usage: client.py TARGET CALLS
"""

import json
import os
import sys
import tempfile

from grpc_tools import protoc

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_stubs():
    out = tempfile.mkdtemp(prefix="agentmesh-py-")
    proto_dir = os.path.join(ROOT, "proto")
    rc = protoc.main([
        "grpc_tools.protoc",
        f"-I{proto_dir}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        os.path.join(proto_dir, "agentmesh/demo/v1/agent.proto"),
    ])
    if rc != 0:
        sys.exit(f"protoc failed with {rc}")
    sys.path.insert(0, out)
    from agentmesh.demo.v1 import agent_pb2, agent_pb2_grpc  # noqa: E402
    return agent_pb2, agent_pb2_grpc


def main():
    target, calls = sys.argv[1], int(sys.argv[2])
    import grpc

    pb, rpc = load_stubs()
    counts, failures = {}, []
    with grpc.insecure_channel(target) as channel:
        stub = rpc.AgentStub(channel)
        for i in range(calls):
            try:
                reply = stub.Invoke(pb.InvokeRequest(payload=b"py-%d" % i), timeout=10)
                assert reply.payload == b"py-%d" % i, reply.payload
                counts[reply.agent] = counts.get(reply.agent, 0) + 1
            except grpc.RpcError as e:
                failures.append(f"{e.code().name}: {e.details()}")
        # A status from the agent passes through unchanged, too.
        try:
            stub.Invoke(pb.InvokeRequest(fail_code=5, fail_message="no such plan"), timeout=10)
            status = "OK"
        except grpc.RpcError as e:
            status = f"{e.code().name}: {e.details()}"
    print(json.dumps({"counts": counts, "failures": failures, "status": status}))


if __name__ == "__main__":
    main()
