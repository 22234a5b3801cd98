"""A stock, non-Rust gRPC client against a Tern node.

Usage: stock_client.py HOST:PORT CERT.pem

Connects over TLS without a client certificate, as any stock tool would,
trusting the node's own self-signed certificate (CERT.pem) under the name
the certificate carries ("tern-node").

Calls grpc.health.v1 Check and Watch, lists services by server reflection
in both grpc.reflection.v1alpha and grpc.reflection.v1, resolves a Tern
service's schema, and checks that an anonymous call to a Tern service is
refused. Prints progress lines the Rust test reads; the line
"WATCH SERVING" asks the test to mark the node NOT_SERVING. Exits non-zero
on any mismatch.
"""

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

TIMEOUT = 30

EXPECTED_SERVICES = {
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
    "tern.v1.Health",
    "tern.v1.Status",
    "tern.v1.Vm",
    "tern.v1.Monitoring",
    "tern.v1.Cluster",
    "tern.v1.Raft",
}


def say(line):
    print(line, flush=True)


def fail(message):
    print("FAIL " + message, flush=True)
    sys.exit(1)


def check_health(channel):
    stub = health_pb2_grpc.HealthStub(channel)
    for name in ["", "tern.transport.grpc", "tern.v1.Raft"]:
        answer = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=TIMEOUT)
        if answer.status != health_pb2.HealthCheckResponse.SERVING:
            fail("Check(%r) answered %s" % (name, answer.status))
    say("CHECK OK")
    try:
        stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=TIMEOUT)
        fail("Check of an unknown service succeeded")
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.NOT_FOUND:
            fail("Check of an unknown service: %s" % e.code())
    watch = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT)
    first = next(watch)
    if first.status != health_pb2.HealthCheckResponse.SERVING:
        fail("Watch first answered %s" % first.status)
    say("WATCH SERVING")
    second = next(watch)
    if second.status != health_pb2.HealthCheckResponse.NOT_SERVING:
        fail("Watch then answered %s" % second.status)
    watch.cancel()
    say("WATCH NOT_SERVING")


def reflect(channel, path):
    call = channel.stream_stream(
        path,
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="tern.v1.Raft"),
    ]
    answers = list(call(iter(requests), timeout=TIMEOUT))
    if len(answers) != 2:
        fail("%s gave %d answers" % (path, len(answers)))
    listed = {s.name for s in answers[0].list_services_response.service}
    missing = EXPECTED_SERVICES - listed
    if missing:
        fail("%s does not list %s (listed %s)" % (path, sorted(missing), sorted(listed)))
    files = answers[1].file_descriptor_response.file_descriptor_proto
    if not files:
        fail("%s found no file for tern.v1.Raft" % path)
    return listed


def check_reflection(channel):
    # The typed stub is v1alpha; v1 has the same messages under another name.
    reflection_pb2_grpc.ServerReflectionStub(channel)
    alpha = reflect(channel, "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
    say("REFLECTION V1ALPHA " + ",".join(sorted(alpha)))
    v1 = reflect(channel, "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo")
    say("REFLECTION V1 " + ",".join(sorted(v1)))


def check_anonymous_refused(channel):
    call = channel.unary_unary(
        "/tern.v1.Status/Get",
        request_serializer=lambda _: b"",
        response_deserializer=lambda b: b,
    )
    try:
        call(None, timeout=TIMEOUT)
        fail("an anonymous call to tern.v1.Status/Get succeeded")
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.UNAUTHENTICATED:
            fail("anonymous call answered %s" % e.code())
    say("ANONYMOUS REFUSED")


def check_cleartext_refused(target):
    # The node serves no cleartext HTTP/2: a plaintext client gets nothing.
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            fail("a cleartext health check succeeded")
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.OK:
                fail("a cleartext health check answered OK")
    say("CLEARTEXT REFUSED")


def main():
    target = sys.argv[1]
    with open(sys.argv[2], "rb") as f:
        root = f.read()
    credentials = grpc.ssl_channel_credentials(root_certificates=root)
    options = [("grpc.ssl_target_name_override", "tern-node")]
    check_cleartext_refused(target)
    with grpc.secure_channel(target, credentials, options=options) as channel:
        check_reflection(channel)
        check_anonymous_refused(channel)
        check_health(channel)
    say("OK")


if __name__ == "__main__":
    main()
