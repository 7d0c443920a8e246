"""The domain's exceptions; the HTTP layer maps each class to a status code once."""


class ApiError(Exception):
    """An error a client can act on; ``status`` is the HTTP status it maps to."""

    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(ApiError):
    status = 400


class NotFound(ApiError):
    status = 404


class NoSuchServer(NotFound):
    def __init__(self, name: str) -> None:
        super().__init__(f"server '{name}' is not in the Barman configuration")


class NoSuchOperation(NotFound):
    def __init__(self, op_id: str) -> None:
        super().__init__(f"operation '{op_id}' does not exist")


class NoSuchBackup(NotFound):
    pass


class NoSuchModel(NotFound):
    def __init__(self, name: str, known: "list[str]") -> None:
        super().__init__(f"model '{name}' is not in the Barman configuration "
                         f"(models: {', '.join(known) or 'none'})")


class Conflict(ApiError):
    status = 409


class Unprocessable(ApiError):
    status = 422


class TooBusy(ApiError):
    """The same slow read runs for another request elsewhere; retry after ``retry_after`` seconds."""

    status = 429

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ConfigurationError(ApiError):
    """Barman's configuration cannot be read: nothing can be served until it is fixed."""

    status = 503


class BarmanUnavailable(ApiError):
    """A barman command the request needed failed or timed out."""

    status = 502


class BarmanNoDocument(ApiError):
    """A barman command whose whole answer is a document (`diagnose`) printed none: it failed or did not end."""

    status = 503


class CorruptState(ApiError):
    """A state file (job, output, claim, worker identity) exists but cannot be read or makes no sense."""

    status = 500

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path} cannot be read: {reason}; `pg-backup-api doctor` lists it and "
                         "`pg-backup-api doctor --fix` moves it aside")
        self.path = path
        self.reason = reason


class InsufficientStorage(ApiError):
    """Barman's home is full: nothing was stored."""

    status = 507


class StorageUnavailable(ApiError):
    """Barman's home cannot be written (read-only, permissions): nothing was stored."""

    status = 503


class CancelFailed(ApiError):
    """Processes of an operation survived SIGKILL: it stays claimed until they are gone."""

    status = 500
