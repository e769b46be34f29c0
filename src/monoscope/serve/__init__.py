"""`monoscope serve PATH`: every feature, search and steering of a run folder in a local web app.

    from monoscope.serve import create_app
    app = create_app("runs/small")            # FastAPI; `monoscope serve runs/small` runs it with uvicorn

`site.py` finds the SAEs and files, `views.py` builds each page's data, `live.py` runs the model for the
live panels, `app.py` holds the routes and the safety rules, `cli.py` the command.
"""

from monoscope.serve.app import create_app

__all__ = ["create_app"]
