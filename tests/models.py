"""The domain every behaviour test uses: users, their orders, tags (many-to-many), typed columns."""

from __future__ import annotations

import datetime
import decimal
import enum
import uuid

from sqlalchemy import Column, ForeignKey, Integer, Numeric, String, Table, Text, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, column_property, deferred, mapped_column, relationship


class Base(DeclarativeBase):
    pass


class Status(enum.Enum):
    active = "active"
    banned = "banned"


user_tags = Table(
    "user_tags",
    Base.metadata,
    Column("user_id", ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
    Column("tag_id", ForeignKey("tags.id", ondelete="CASCADE"), primary_key=True),
)


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    active: Mapped[bool] = mapped_column(default=True)
    status: Mapped[Status] = mapped_column(default=Status.active)
    balance: Mapped[decimal.Decimal] = mapped_column(Numeric(12, 2), default=decimal.Decimal("0.00"))
    joined: Mapped[datetime.datetime] = mapped_column(default=lambda: datetime.datetime(2024, 1, 2, 3, 4, 5))
    token: Mapped[uuid.UUID] = mapped_column(default=uuid.uuid4)
    bio: Mapped[str | None] = deferred(mapped_column(Text, nullable=True))
    orders: Mapped[list[Order]] = relationship(
        back_populates="user", order_by="Order.id", cascade="all, delete-orphan"
    )
    tags: Mapped[list[Tag]] = relationship(secondary=user_tags, order_by="Tag.id")


class Order(Base):
    __tablename__ = "orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    total: Mapped[int] = mapped_column(Integer, default=0)
    user: Mapped[User] = relationship(back_populates="orders")


class Tag(Base):
    __tablename__ = "tags"
    id: Mapped[int] = mapped_column(primary_key=True)
    label: Mapped[str] = mapped_column(String(30))


# A column computed from another table: reading it must depend on that table too.
User.order_count = column_property(
    select(func.count(Order.id)).where(Order.user_id == User.id).correlate_except(Order).scalar_subquery(),
    deferred=True,
)
