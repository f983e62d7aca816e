"""The exception tree. Each branch tells the caller what to do, not what went wrong:

    SegreplayError            anything segreplay raises on purpose
    ├── UsageError            the command line is wrong; fix it and run again (exit 2)
    └── FatalError            the run cannot go on; state keeps every acknowledged request,
        │                     so the same command resumes once the cause is fixed (exit 1)
        ├── AuthError         Braze refused the key (401/403)
        ├── DeliveryError     Braze stayed unreachable or failing after every retry
        └── StateError        the state file is unusable, locked by another run, or newer

Problems with single lines or objects are not exceptions: they become dead-letter records
and counts, and the run goes on. (ObjectUnreadable only carries one object's problem from
the object store up to the line reader, which reports it.)
"""


class SegreplayError(Exception):
    """Base class. `hint` says what to do next, in one sentence."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class UsageError(SegreplayError):
    pass


class FatalError(SegreplayError):
    pass


class AuthError(FatalError):
    pass


class DeliveryError(FatalError):
    pass


class StateError(FatalError):
    pass


class ObjectUnreadable(Exception):
    """One archive object could not be read (deleted, or rewritten while it was read)."""
