"""The one base class of every error this project raises on bad input.

Each module keeps its own error type (it names what went wrong: a config key, a
cache built for other inputs, a checkpoint that does not fit), and every one of
them derives from :class:`ASTError`, so a caller catches the project's errors
in one place: the CLI turns them into one line and exit status 2, the Prefect
flows do not retry them (running the same inputs again cannot help).
``tests/test_errors.py`` checks that no public error class is left out.
"""

from __future__ import annotations


class ASTError(Exception):
    """A failure caused by the inputs (params, files, artifacts, hardware); ``str()`` says what to do."""
