"""`monoscope serve PATH`: every feature, search and steering of a run folder in a local web app.

    from monoscope.serve import create_app
    app = create_app("runs/small")            # FastAPI; `monoscope serve runs/small` runs it with uvicorn

`site.py` finds the SAEs and files, `views.py` builds each page's data, `live.py` runs the model for the
live panels, `app.py` holds the routes and the safety rules, `cli.py` the command.
"""

from __future__ import annotations

from typing import Any

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    """`create_app` imported on first use: every other command (train on a GPU node, say) builds the CLI,
    which names `serve`, without importing FastAPI."""
    if name == "create_app":
        from monoscope.serve.app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
