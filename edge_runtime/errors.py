"""Error types the CLIs turn into one-line messages and exit codes (DESIGN §9)."""


class BadInput(Exception):
    """Input we refuse: a file, value or bundle that is unusable. CLI exit code 2."""

    exit_code = 2


class BundleError(BadInput):
    """A bundle that is missing, incomplete, tampered or wrongly signed."""


class Refused(BadInput):
    """A well-formed request we refuse: privacy budget spent, nothing to roll back. CLI exit code 1."""

    exit_code = 1


class BudgetSpent(Refused):
    """No fine-tuning round fits what is left of the privacy budget (sync goes on without one)."""
