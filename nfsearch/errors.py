"""The one error type users can cause. The CLI prints its message on one line and exits 2."""


class NfsearchError(Exception):
    """A problem with the user's input or environment (bad file, unknown name, infeasible request)."""
