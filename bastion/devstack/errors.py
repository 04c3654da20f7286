"""Errors the devstack reports to a person: each says what went wrong and what to do about it."""


class DevstackError(Exception):
    """A failure the `bastion` command prints as one clear message, without a stack trace."""

    def __init__(self, problem: str, remedy: str) -> None:
        super().__init__(f"{problem}\n  -> {remedy}")
        self.problem = problem
        self.remedy = remedy


class PrerequisiteError(DevstackError):
    """Something the machine must provide is missing: a tool, a free port, a download."""


class ComponentStartError(DevstackError):
    """A component was started but did not become healthy in time."""
