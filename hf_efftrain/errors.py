"""User-facing errors: one message naming the field path and what is allowed (DESIGN.md, "Recipes")."""

from __future__ import annotations


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
