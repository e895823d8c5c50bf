"""Errors of the driver's own layers, each naming what went wrong and what to do.
The CSI surface maps them to gRPC codes in one place (csi/errors.py)."""


class DriverError(Exception):
    pass


class InvalidArgument(DriverError):
    pass


class NotFound(DriverError):
    pass


class AlreadyExists(DriverError):
    pass


class FailedPrecondition(DriverError):
    pass


class OutOfRange(DriverError):
    pass


class ResourceExhausted(DriverError):
    pass


class Aborted(DriverError):
    pass


class Unavailable(DriverError):
    pass
