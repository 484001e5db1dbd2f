"""Flask-SQLAlchemy integration: ``sqlacache.flask.init_app(app, db)`` (see
``sqlacache.integrations.flask``; needs ``pip install "sqlacache[flask]"``)."""

from sqlacache.integrations.flask import CachingFlaskSession, init_app

__all__ = ["CachingFlaskSession", "init_app"]
