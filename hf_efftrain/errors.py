"""User-facing errors: one message naming the field path and what is allowed (docs/ARCHITECTURE.md, "Errors"),
and the exit codes the CLI answers them with."""

from __future__ import annotations

EXIT_USER_ERROR = 2  # a RecipeError: bad field, value, file, column, ...
EXIT_DIVERGED = 3  # divergence_guard gave up
EXIT_IO_ERROR = 74  # EX_IOERR: a checkpoint or the run report could not be written
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: SIGTERM/SIGINT, a checkpoint was saved; rerun with --resume


class RecipeError(ValueError):
    """A user error in a recipe or its inputs. The CLI prints it without a traceback and exits with 2."""

    def __init__(self, path: str, message: str):
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)


class MissingDependencyError(RecipeError):
    """An optional dependency is not installed; the message names the extra that provides it."""

    def __init__(self, path: str, package: str, extra: str):
        super().__init__(path, f"needs the '{package}' package: pip install 'hf_efftrain[{extra}]'")
