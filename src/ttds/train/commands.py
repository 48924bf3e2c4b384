"""`ttds train`, `ttds eval`, `ttds bench`: filled in by the training/evaluation layer."""
from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    pass
