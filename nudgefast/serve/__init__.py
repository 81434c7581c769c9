"""`nudgefast serve`: an OpenAI-compatible HTTP server over the request-level engine.

app.py (the FastAPI application), protocol.py (the wire format, validation, stop strings and
provenance), metrics.py (Prometheus text), cli.py (the command). Needs the `serve` extra
(fastapi, uvicorn); importing this package alone does not.
"""


def create_app(engine, **kwargs):
    """The ASGI application over a loaded nf.NudgingEngine (see app.create_app)."""
    from .app import create_app as _create

    return _create(engine, **kwargs)
