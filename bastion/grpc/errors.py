"""The one table that maps errors to gRPC status codes. Services subclass these errors; nothing else
chooses a status. Messages name the problem and never carry a token, a secret or a stack trace."""

import grpc


class RequestError(Exception):
    """An error the caller should see, with its status; the message is safe to return."""

    status = grpc.StatusCode.INTERNAL


class UnauthenticatedError(RequestError):
    status = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(RequestError):
    status = grpc.StatusCode.PERMISSION_DENIED


class InvalidArgumentError(RequestError):
    status = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(RequestError):
    status = grpc.StatusCode.NOT_FOUND


class FailedPreconditionError(RequestError):
    status = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhaustedError(RequestError):
    status = grpc.StatusCode.RESOURCE_EXHAUSTED


class UnavailableError(RequestError):
    status = grpc.StatusCode.UNAVAILABLE


def status_for(error: BaseException, correlation_id: str) -> tuple[grpc.StatusCode, str]:
    """The status and message for ERROR; anything unexpected is INTERNAL with only the correlation id."""
    if isinstance(error, RequestError):
        return error.status, str(error)
    return grpc.StatusCode.INTERNAL, f"internal error (correlation id {correlation_id})"
