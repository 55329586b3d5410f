"""Every public error the project defines derives from ``ASTError``, and the CLI and the flows
treat exactly those as bad input (one line + exit 2; no Prefect retry)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

from ast_core.errors import ASTError

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("ast_core", "tasks", "flows")


def _public_errors() -> list[type]:
    found = []
    for pkg in PACKAGES:
        for info in pkgutil.iter_modules([str(REPO / pkg)]):
            module = importlib.import_module(f"{pkg}.{info.name}")
            for name, obj in vars(module).items():
                if (inspect.isclass(obj) and issubclass(obj, Exception) and obj.__module__ == module.__name__
                        and not name.startswith("_")):
                    found.append(obj)
    return found


def test_every_public_error_derives_from_the_one_base() -> None:
    errors = _public_errors()
    assert len(errors) >= 14  # the walk found the modules' errors (ConfigError, StageError, CacheMismatch, ...)
    stray = sorted(f"{e.__module__}.{e.__name__}" for e in errors if not issubclass(e, ASTError))
    assert stray == [], f"errors outside ASTError: {stray}"


def test_cli_reports_a_project_error_in_one_line(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    from tasks.cli import main
    bad = tmp_path / "p.yaml"
    bad.write_text("name: x\ntrain:\n  method: no-such-method\n")
    assert main(["check", "--params", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.method" in err[0]


def test_flows_do_not_retry_project_errors() -> None:
    from ast_core.teacher_cache import CacheMismatch
    from flows.ast_pipeline import is_retryable
    assert not is_retryable(CacheMismatch("cache built for other inputs"))
    assert is_retryable(OSError("disk hiccup"))
