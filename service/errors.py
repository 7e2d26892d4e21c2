"""The service's error tree, mapped to HTTP in one place (:func:`install_handlers`).

::

    ServiceError                       {"error": {"code": ..., "message": ...}}
    +-- BadRequest            400      malformed JSON, base64, form data
    +-- Unauthorized          401      admin token missing or wrong
    +-- Forbidden             403      an operation turned off on this server (the :attack check)
    +-- NotFound              404      unknown route, model or audit  (ModelNotServed)
    +-- Conflict              409      audit queue full; cancelling a finished audit
    +-- PayloadTooLarge       413      body, batch, pixel limits  (LimitExceeded)
    +-- UnsupportedMediaType  415      a Content-Type we do not read
    +-- InvalidInput          422      not an image, corrupt image, bad tensor values or shape
    +-- CapabilityMissing     422      the model lacks what was asked for: an embedding, input
                                       gradients (white-box attacks on a black-box model)
    +-- TooManyRequests       429      the :attack queue is full (with Retry-After)
    +-- ServiceUnavailable    503      model not ready, queue full (with Retry-After), audit
                                       store unreachable (AuditStoreUnavailable, admin routes only)

Every response of an error carries ``{"error": {"code", "message"}}``; the message names what
was wrong, never a stack trace. The tree has no web-framework dependency (the TorchServe handler
raises the same errors); :mod:`service.http` maps it to HTTP responses.
"""

from __future__ import annotations


class ServiceError(Exception):
    status: int = 500
    code: str = "internal_error"

    def __init__(
        self, message: str, *, code: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, dict[str, str]]:
        """The JSON error body every interface answers with."""
        return {"error": {"code": self.code, "message": self.message}}


class BadRequest(ServiceError):
    status, code = 400, "bad_request"


class Unauthorized(ServiceError):
    status, code = 401, "unauthorized"


class Forbidden(ServiceError):
    status, code = 403, "forbidden"


class NotFound(ServiceError):
    status, code = 404, "not_found"


class ModelNotServed(NotFound):
    """No served model by the name requested (the code keeps its wire name). Not
    :class:`training.card.ModelNotFound`, the library's error for a name that is in no model
    store or run directory: a model may be in the store and still not be served (``ERC_MODELS``)."""

    code = "model_not_found"


class Conflict(ServiceError):
    status, code = 409, "conflict"


class PayloadTooLarge(ServiceError):
    status, code = 413, "payload_too_large"


class LimitExceeded(PayloadTooLarge):
    code = "limit_exceeded"


class UnsupportedMediaType(ServiceError):
    status, code = 415, "unsupported_media_type"


class InvalidInput(ServiceError):
    status, code = 422, "invalid_input"


class CapabilityMissing(ServiceError):
    status, code = 422, "capability_missing"


class InvalidImage(InvalidInput):
    code = "invalid_image"


class TooManyRequests(ServiceError):
    """A bounded side queue (the :attack check's) is full: this client should slow down, while the
    prediction queue, which has its own limit, keeps serving."""

    status, code = 429, "too_many_requests"

    def __init__(self, message: str, retry_after_s: int = 1, *, code: str | None = None) -> None:
        super().__init__(message, code=code, headers={"Retry-After": str(retry_after_s)})


class ServiceUnavailable(ServiceError):
    status, code = 503, "unavailable"


class ModelNotReady(ServiceUnavailable):
    code = "model_not_ready"


class QueueFull(ServiceUnavailable):
    code = "queue_full"

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})


class AuditStoreUnavailable(ServiceUnavailable):
    """The audit job store (database) cannot be reached: the admin audit routes answer this, the
    prediction routes keep serving."""

    code = "audit_store_unavailable"

    def __init__(self, message: str, retry_after_s: int = 5) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})
