"""The one exception type a user sees: a one-line message that names the problem and what to do."""


class QexportError(Exception):
    """A user-facing error. The CLI prints ``error: <message>`` and exits with code 2, no traceback.

    Args:
        message: one line naming the problem and, where possible, what to do about it.
    """

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(message.strip().replace("\n", " "))


class MissingDependencyError(QexportError):
    """An optional dependency (a runtime such as TensorRT or OpenVINO) is not installed."""
