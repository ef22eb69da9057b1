"""The gRPC error map: every error a client can cause has its own gRPC code; INTERNAL is a bug."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import __version__ as protobuf_version
from tritonclient.grpc import service_pb2

from timmserve import errors
from timmserve.http import oip
from timmserve.http.grpc import status_code


def request_errors() -> list[type[errors.RequestError]]:
    found, todo = [], [errors.RequestError]
    while todo:
        kind = todo.pop()
        found.append(kind)
        todo.extend(kind.__subclasses__())
    return found


def test_every_request_error_but_a_bug_has_a_code_of_its_own():
    for kind in request_errors():
        code = status_code(kind.__new__(kind))  # only its class's status is read
        if kind is errors.InternalError:
            assert code == grpc.StatusCode.INTERNAL
        else:
            assert code != grpc.StatusCode.INTERNAL, kind


def test_the_http_statuses_map_as_the_grpc_codes_mean():
    assert status_code(errors.OverloadedError("full", retry_after=1)) == grpc.StatusCode.UNAVAILABLE
    assert status_code(errors.AnswerTimeoutError("late")) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert status_code(errors.PayloadTooLargeError("big")) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status_code(errors.UnauthorizedError("key")) == grpc.StatusCode.UNAUTHENTICATED
    assert status_code(errors.UnknownModelError("who")) == grpc.StatusCode.NOT_FOUND
    assert status_code(errors.InvalidImageError("bad")) == grpc.StatusCode.INVALID_ARGUMENT


def test_the_stubs_are_older_gencode_under_a_newer_protobuf_runtime():
    """tritonclient's stubs say the protobuf that generated them; the runtime may be newer, never older."""
    generated = open(service_pb2.__file__).read().split("# Protobuf Python Version: ", 1)[1].split()[0]
    as_tuple = lambda version: tuple(int(part) for part in version.split(".")[:3])  # noqa: E731
    assert as_tuple(generated) <= as_tuple(protobuf_version)


def test_a_negative_dimension_is_refused_whatever_the_transport():
    """REST's schema refuses a negative dimension; gRPC's shape is any int64, so the shared check
    must: [-2, -3] multiplies to 6 images."""
    with pytest.raises(errors.InvalidRequestError, match="negative"):
        oip.check_input("image", "BYTES", [-2, -3], max_images=8)
