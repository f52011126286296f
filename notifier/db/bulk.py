"""Set-based batch writes for PostgreSQL: one statement per batch, its values as one array per column.

An executemany makes SQLAlchemy work in Python per parameter set (each set is bound, processed and sent on
its own); the per-batch executemany UPDATEs and INSERTs of ``notifier.db.deliveries`` were among the most
expensive statements of the local dispatcher. The raw baseline (bench/raw_app.py) does the same durable work
with one statement per batch over ``unnest()`` of typed arrays; these builders make such statements, once:

* ``ArrayUpdate``: ``UPDATE t SET c = v.c, ... FROM unnest(:v_k, :v_c, ...) AS v(k, c, ...) WHERE t.k = v.k``;
* ``ArrayInsert``: ``INSERT INTO t (...) SELECT v.k, v.c, ... FROM unnest(...) AS v(...)``, the columns the
  rows leave out filled with their Python defaults as an executemany would.

The statements run on the asyncpg connection directly (``notifier.db.driver``), past SQLAlchemy's execution
layer, which made them pay off from one row (``MIN_ROWS``); SQLite (no arrays) keeps the executemany statements
of ``deliveries``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping, Sequence, Sized
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncSession

from notifier.db import driver
from notifier.db.sql import dialect_of

# From how many rows a batch is written with arrays. Through SQLAlchemy's execution layer arrays cost 3-20% more
# than an executemany below 16 rows (their fixed cost per column); sent on the driver (``notifier.db.driver``)
# they cost no more at one row and less from a few on (the outcome write, client CPU per call, executemany
# against arrays on the driver: 140 against 146 us at 1 row, 172 against 150 at 4, 324 against 220 at 16,
# 1,564 against 928 at 64; bench/README.md).
MIN_ROWS = 1


def pays_off(session: driver.Target, rows: Sized) -> bool:
    """Whether to write ``rows`` with this module's statements: on PostgreSQL, ``MIN_ROWS`` of them or more."""
    return len(rows) >= MIN_ROWS and dialect_of(session) == "postgresql"


def without_arrays(session: driver.Target, rows: Sized) -> AsyncSession | None:
    """The session to write ``rows`` in with SQLAlchemy's own statements, where this module's do not pay off
    (``pays_off``); None: write them with arrays (always so on a connection lent without a session)."""
    return session if isinstance(session, AsyncSession) and not pays_off(session, rows) else None


def _array_parameter(column: sa.Column[Any]) -> sa.ColumnElement[Any]:
    """The typed array parameter for ``column``'s values, named ``v_<column>``.

    Only the array of a type whose values SQLAlchemy processes in Python (``UTCDateTime``, which refuses naive
    datetimes) is processed, element by element; any other goes to asyncpg as given, under a ``CAST`` that
    types it for the server. Strings go as unbounded ``VARCHAR[]``: a cast to ``VARCHAR(n)[]`` would cut a too
    long value silently, where the column refuses it (SQLAlchemy casts scalar strings to ``VARCHAR`` too). JSON
    documents go as ``TEXT[]`` of their serialized form (``array_values``), cast to the column's type where
    they are written (``insert_select``).
    """
    name = parameter(column.name)
    if _is_json(column):
        return sa.cast(sa.bindparam(name), postgresql.ARRAY(sa.Text(), dimensions=1))
    if column.type.dialect_impl(driver.DIALECT).bind_processor(driver.DIALECT) is not None:
        return sa.bindparam(name, type_=postgresql.ARRAY(column.type, dimensions=1))
    impl = column.type.impl_instance if isinstance(column.type, sa.types.TypeDecorator) else column.type
    string = isinstance(impl, sa.String) and not isinstance(impl, sa.Enum)
    return sa.cast(sa.bindparam(name), postgresql.ARRAY(sa.String() if string else impl, dimensions=1))


def _is_json(column: sa.Column[Any]) -> bool:
    return isinstance(column.type.dialect_impl(driver.DIALECT), sa.JSON)


def insert_select(table: sa.Table, columns: Sequence[str]) -> postgresql.Insert:
    """``INSERT INTO table (columns) SELECT ... FROM unnest(:v_<column>, ...)``: rows given as one array per
    column (``array_values``); PostgreSQL's INSERT, to add ``ON CONFLICT`` and ``RETURNING`` to."""
    given = [table.c[name] for name in columns]
    values = arrays(given)
    select = sa.select(*(sa.cast(values.c[c.name], c.type) if _is_json(c) else values.c[c.name] for c in given))
    return postgresql.insert(table).from_select(list(columns), select)


def array_values(table: sa.Table, columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
    """The parameters of ``insert_select(table, columns)`` for ``rows``: one array per column, a JSON column's
    documents serialized (as SQLAlchemy serializes them by default)."""
    return {
        parameter(name): [json.dumps(row[name]) for row in rows]
        if _is_json(table.c[name])
        else [row[name] for row in rows]
        for name in columns
    }


def parameter(name: str) -> str:
    # Not the column's own name: SQLAlchemy would take a parameter named like a column for a value to SET.
    return f"v_{name}"


def _plain(columns: Sequence[sa.Column[Any]]) -> Sequence[sa.Column[Any]]:
    """``columns``, none of them JSON (which ``ArrayUpdate`` and ``ArrayInsert`` would have to cast)."""
    if json_columns := [str(c) for c in columns if _is_json(c)]:
        raise TypeError(f"{json_columns} are JSON: write them with insert_select, which casts them")
    return columns


def arrays(columns: Sequence[sa.Column[Any]]) -> sa.TableValuedAlias:
    """``unnest(:v_a, :v_b, ...) AS v(a, b, ...)``: one typed array parameter per column."""
    return (
        sa.func.unnest(*(_array_parameter(c) for c in columns))
        .table_valued(*(sa.column(c.name, sa.Text() if _is_json(c) else c.type) for c in columns))
        .render_derived(name="v")
    )


class ArrayUpdate:
    """Set ``columns`` of the rows of ``table`` matched by ``keys``, one UPDATE for the whole batch."""

    def __init__(self, table: sa.Table, *, keys: Sequence[str], columns: Sequence[str]) -> None:
        names = (*keys, *columns)
        self._parameters = [parameter(name) for name in names]
        self._keys = len(keys)
        values = arrays(_plain([table.c[name] for name in names]))
        self.statement = driver.Prepared(
            sa.update(table)
            .values({name: values.c[name] for name in columns})
            .where(*(table.c[key] == values.c[key] for key in keys))
        )

    async def execute(self, session: driver.Target, rows: Sequence[Sequence[Any]]) -> None:
        """``rows``: one tuple per row, its keys then its columns, in the order given to the constructor.

        A row given twice takes its last values, as with an executemany (``UPDATE ... FROM`` would apply just
        one of them, whichever the join met first).
        """
        if not rows:
            return
        count = self._keys
        latest = {row[0] if count == 1 else tuple(row[:count]): row for row in rows}
        arrays = zip(*latest.values(), strict=True)
        await driver.execute(session, self.statement, dict(zip(self._parameters, map(list, arrays), strict=True)))


class _Shape(NamedTuple):
    """The INSERT for rows with one set of keys, and how to fill the columns computed per row."""

    statement: driver.Prepared
    given: list[tuple[str, str]]  # (key, parameter)
    computed: list[tuple[str, Callable[[], Any]]]  # (parameter, the column's default function)


class ArrayInsert:
    """Insert rows into ``table``, one INSERT for the whole batch.

    As with an executemany, a column the rows leave out gets its Python default: one value per row from a
    function (``uuid4``, ``utcnow``: an array, like the given columns), a constant (one parameter), or, with
    none, NULL or the server's default (the column is left out). The statement for each set of keys is built on
    first use and kept: the callers pass a few fixed sets.
    """

    def __init__(self, table: sa.Table) -> None:
        self._table = table
        self._shapes: dict[tuple[str, ...], _Shape] = {}

    async def execute(self, session: driver.Target, rows: Sequence[Mapping[str, Any]]) -> None:
        """``rows``: mappings with the same keys, as for an executemany."""
        if not rows:
            return
        keys = tuple(rows[0])
        shape = self._shapes.get(keys) or self._shapes.setdefault(keys, self._shape(keys))
        arrays = {parameter: [row[key] for row in rows] for key, parameter in shape.given}
        for parameter, default in shape.computed:
            arrays[parameter] = [default() for _ in rows]
        await driver.execute(session, shape.statement, arrays)

    def _shape(self, keys: tuple[str, ...]) -> _Shape:
        unknown = set(keys) - set(self._table.c.keys())
        if unknown:
            raise sa.exc.ArgumentError(f"not columns of {self._table.name}: {sorted(unknown)}")
        given = [c for c in self._table.c if c.name in keys]
        computed: list[sa.Column[Any]] = []
        constants: dict[str, sa.ColumnElement[Any]] = {}
        for column in self._table.c:
            default = column.default
            if column.name in keys or default is None:
                continue
            if not isinstance(default, sa.ColumnDefault) or default.is_sequence:
                raise TypeError(f"{column} has a default the bulk insert cannot compute: {default!r}")
            if default.is_callable:
                computed.append(column)
            elif default.is_clause_element:
                constants[column.name] = default.arg
            else:
                constants[column.name] = sa.literal(default.arg, column.type)
        values = arrays(_plain([*given, *computed]))
        names = [*(c.name for c in given), *(c.name for c in computed), *constants]
        select = sa.select(*(values.c[c.name] for c in [*given, *computed]), *constants.values())
        return _Shape(
            driver.Prepared(sa.insert(self._table).from_select(names, select)),
            [(c.name, parameter(c.name)) for c in given],
            # SQLAlchemy wraps a default function that takes no execution context (all of these) in one that does.
            [(parameter(c.name), functools.partial(_call_default, c.default)) for c in computed],
        )


def _call_default(default: Any) -> Any:
    return default.arg(None)
