"""Detached ORM objects made from plain rows, as ``session.execute(select(Model))`` and ``expunge`` made them.

The dispatcher's claim and lock queries read their rows on the driver (``notifier.db.driver``); loading them
through the ORM (the session's execution layer, its loading and identity map, then expunging each object) cost
~30 us per row more on top of that layer's own cost (bench/README.md). A ``Loader`` puts a row's values, already
processed as SQLAlchemy's result processes them, into a new instance's ``__dict__`` and marks it detached and
clean: its attributes read as the ORM's would, and changes to it are written back explicitly (``write``).

It gives the new instance its identity key itself, which is all ``make_transient_to_detached`` does that a
fresh instance with every column loaded needs: that function also derives the key through the mapper, clears
history the instance cannot have yet and expires attributes it does not lack, ~13 us per row where the whole
``load`` now costs ~5 us; the dispatcher loads two to three objects per delivery it claims.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Generic, TypeVar

import sqlalchemy as sa
from sqlalchemy.orm import attributes
from sqlmodel import SQLModel

Model = TypeVar("Model", bound=SQLModel)


class Loader(Generic[Model]):
    """Instances of ``model`` from rows holding its table's columns in the table's order (``columns``)."""

    def __init__(self, model: type[Model]) -> None:
        # The ORM sets up its attributes' loaders when mappers are configured, which constructing or querying a
        # model does first; making instances without either needs them configured already.
        sa.orm.configure_mappers()
        mapper = sa.inspect(model)
        table = mapper.local_table
        assert isinstance(table, sa.Table)
        assert len(table.primary_key.columns) == 1, f"{model} needs a one-column primary key"
        self.columns: list[sa.Column[Any]] = list(table.c)
        self.width = len(self.columns)
        self.key_position = self.columns.index(next(iter(table.primary_key.columns)))
        self._attributes = [mapper.get_property_by_column(column).key for column in self.columns]
        self._new = mapper.class_manager.new_instance
        self._identity_key = mapper.identity_key_from_primary_key

    def load(self, values: Sequence[Any]) -> Model:
        """A detached, unmodified instance holding ``values`` (one per column of ``columns``)."""
        instance: Model = self._new()
        instance.__dict__.update(zip(self._attributes, values, strict=True))
        attributes.instance_state(instance).key = self._identity_key((values[self.key_position],))
        return instance

    def copy(self, instance: Model) -> Model:
        """A detached, unmodified instance with the column values of ``instance`` (which must have them all loaded)."""
        values = instance.__dict__
        return self.load([values[name] for name in self._attributes])
