"""A Flask app whose ``db.session`` reads go through sqlacache (Flask-SQLAlchemy).

Run it with ``flask --app examples.flask_app run`` (from the repository root), then::

    curl -X POST localhost:5000/items -H 'content-type: application/json' -d '{"name": "pen", "price": 3}'
    curl localhost:5000/items/1              # a miss, then hits: no SQL
    curl 'localhost:5000/items?max_price=5'
    curl -X PATCH localhost:5000/items/1 -H 'content-type: application/json' -d '{"price": 4}'
    curl localhost:5000/items/1              # the commit evicted the old entry: the new price
    curl localhost:5000/stats

Configuration: ``DATABASE_URL`` (default ``sqlite:///flask_example.db``) and ``CACHE_URL``
(default ``memory://``). With several worker processes (gunicorn -w 4) use Redis
(``redis://localhost:6379/0``): ``memory://`` is private to each process, so one worker's commit
would not evict what another cached.
"""

from __future__ import annotations

import os
from typing import Any

from flask import Flask, abort, request
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import ForeignKey, String, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

import sqlacache.flask


class Base(DeclarativeBase):
    pass


db = SQLAlchemy(model_class=Base)


class Shelf(db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "flask_example_shelf"
    id: Mapped[int] = mapped_column(primary_key=True)
    label: Mapped[str] = mapped_column(String(50))


class Item(db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "flask_example_item"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    price: Mapped[int]
    shelf_id: Mapped[int | None] = mapped_column(ForeignKey("flask_example_shelf.id"))
    shelf: Mapped[Shelf | None] = relationship()


def _out(item: Item) -> dict[str, Any]:
    return {
        "id": item.id,
        "name": item.name,
        "price": item.price,
        "shelf": item.shelf.label if item.shelf is not None else None,
    }


def create_app(config: dict[str, Any] | None = None) -> Flask:
    """The app; ``config`` overrides ``SQLALCHEMY_DATABASE_URI`` / ``SQLACACHE_BACKEND``…"""
    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = os.environ.get("DATABASE_URL", "sqlite:///flask_example.db")
    app.config["SQLACACHE_BACKEND"] = os.environ.get("CACHE_URL", "memory://")
    app.config.update(config or {})
    db.init_app(app)
    # Every engine of db (and of SQLALCHEMY_BINDS) is given to the cache: db.session's reads are
    # served from it, its commits evict what they changed. The cache is app.extensions["sqlacache"].
    cache = sqlacache.flask.init_app(app, db)
    with app.app_context():
        db.create_all()

    @app.get("/items/<int:item_id>")
    def get_item(item_id: int) -> Any:
        item = db.session.get(Item, item_id)  # cached, "not found" included
        if item is None:
            abort(404)
        return _out(item)  # item.shelf: a relationship load, cached too

    @app.get("/items")
    def list_items() -> Any:
        stmt = select(Item).order_by(Item.id)
        if "max_price" in request.args:
            stmt = stmt.where(Item.price <= int(request.args["max_price"]))
        return [_out(i) for i in db.session.scalars(stmt)]

    @app.post("/items")
    def create_item() -> Any:
        body = request.get_json()
        shelf = None
        if body.get("shelf"):
            shelf = db.session.scalars(select(Shelf).where(Shelf.label == body["shelf"])).first()
            shelf = shelf or Shelf(label=body["shelf"])
        item = Item(name=body["name"], price=body["price"], shelf=shelf)
        db.session.add(item)
        db.session.commit()  # evicts the cached lists of items
        return _out(item), 201

    @app.patch("/items/<int:item_id>")
    def update_item(item_id: int) -> Any:
        item = db.get_or_404(Item, item_id)
        for field in ("name", "price"):
            if field in request.json:
                setattr(item, field, request.json[field])
        db.session.commit()  # evicts every cached read of this item
        return _out(item)

    @app.delete("/items/<int:item_id>")
    def delete_item(item_id: int) -> Any:
        db.session.delete(db.get_or_404(Item, item_id))
        db.session.commit()
        return "", 204

    @app.get("/stats")
    def stats() -> Any:
        return cache.stats()

    return app
