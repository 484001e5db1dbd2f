"""Pure analysis: which rows of each table a SELECT's result can depend on.

A statement is analysed once per shape into an :class:`Analysis`: its FROM occurrences (tables and
aliases of tables, with whether an outer join can null-extend them) and a disjunction of
conjunctions of equality atoms whose values are references to the statement's bind parameters.
:func:`resolve` then substitutes one execution's values and projects the disjunction onto each
table: either "any row" (``None``) or a list of conjunctions ``{column name: value token}`` that
every row of that table appearing in the result satisfies.

Soundness is the only hard rule; precision is a bonus. Every simplification below moves towards
"more rows": an atom we cannot prove (ranges, LIKE, functions, negations, subqueries, casts, a value
whose token is unknown) is dropped from its conjunction, which can only widen it; a conjunction
left with nothing on a table widens that table to every row.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.engine import Dialect
from sqlalchemy.sql import operators, visitors
from sqlalchemy.sql.elements import (
    BinaryExpression,
    BindParameter,
    BooleanClauseList,
    ClauseList,
    False_,
    Grouping,
    Null,
    True_,
    Tuple,
)
from sqlalchemy.sql.schema import Column, Table
from sqlalchemy.sql.selectable import Alias, Join, Select, Subquery
from sqlalchemy.sql.sqltypes import NullType

from sqlacache import _sa
from sqlacache.analysis.canon import NULL_TOKEN, token
from sqlacache.analysis.dependencies import column_nameable

# Static limit on the disjunction before any IN list is expanded: beyond it, the statement's
# conditions are not worth the bookkeeping and every table it reads is read whole.
_MAX_STATIC_CONJUNCTIONS = 64


@dataclass(frozen=True, slots=True)
class Occurrence:
    """A table as it appears in FROM (aliases and self-joins are separate occurrences)."""

    table: Table
    name: str  # dependency name of the table
    nullable: bool  # on the optional side of an outer join


# What an atom compares a column with: a bind parameter (by position in the cache key's bind
# list), an expanding IN bind, or a constant.
@dataclass(frozen=True, slots=True)
class Bind:
    index: int  # -1 in a DML analysis: values are looked up by key
    key: str


@dataclass(frozen=True, slots=True)
class InList:
    index: int
    key: str


@dataclass(frozen=True, slots=True)
class Const:
    value: Any  # None for NULL


Source = Bind | InList | Const


@dataclass(frozen=True, slots=True)
class Atom:
    occurrence: int
    column: Column[Any]
    source: Source


Conjunction = tuple[Atom, ...]


@dataclass(slots=True)
class Analysis:
    occurrences: list[Occurrence] = field(default_factory=list)
    dnf: list[Conjunction] = field(default_factory=list)  # empty list with rows_possible=False: no rows
    # Tables of occurrences we could not analyse at all (derived tables we could not follow…).
    whole: set[str] = field(default_factory=set)

    def tables(self) -> set[str]:
        return {o.name for o in self.occurrences} | self.whole


class _Unprovable(Exception):
    pass


_EAGER = -1


def analyse(statement: Any, bindparams: Sequence[BindParameter[Any]], table_name: Any) -> Analysis:
    """The analysis of one statement shape; ``bindparams`` is its cache key's bind list (positions
    are stable for every statement of the shape), ``table_name`` names a Table for dependencies."""
    positions = {id(b): i for i, b in enumerate(bindparams)}
    out = Analysis()
    if not isinstance(statement, Select):
        return out
    analyser = _Analyser(out, positions, table_name)
    # FROM elements the statement itself names; joinedload()'s aliases appear only once the ORM
    # compiles it (see _occurrence).
    analyser.named = {id(_plain(e)) for e in visitors.iterate(statement) if isinstance(e, Alias)}
    out.dnf = analyser.select(statement)
    # Tables read somewhere the analysis did not follow (subqueries in WHERE or in the columns…).
    seen = {o.name for o in out.occurrences}
    out.whole |= {table_name(t) for t in visitors.iterate(statement) if isinstance(t, Table)} - seen
    return out


def analyse_where(table: Table, whereclause: Any, table_name: Any) -> Analysis:
    """The rows of ``table`` an UPDATE/DELETE with this WHERE can touch; bind values are looked up
    by bind key (the execution's compiled parameters) in :func:`resolve`."""
    out = Analysis()
    analyser = _Analyser(out, None, table_name)
    analyser._occurrence(table, False)
    out.dnf = [()] if whereclause is None else analyser._dnf(whereclause)
    return out


class _Analyser:
    def __init__(self, out: Analysis, positions: dict[int, int] | None, table_name: Any) -> None:
        self.out = out
        self.positions = positions
        self.table_name = table_name
        self.by_from: dict[int, int] = {}  # id(deannotated FROM element) → occurrence index
        self.named: set[int] | None = None

    # -- FROM -----------------------------------------------------------------------------------

    def select(self, statement: Select[Any]) -> list[Conjunction]:
        """Register a (sub)select's occurrences; returns the disjunction its rows satisfy."""
        edges_inner: list[tuple[Column[Any], Column[Any]]] = []
        outer: list[tuple[set[int], Any]] = []  # (right-side occurrences, ON clause)
        conjunctive: list[list[Conjunction]] = []
        try:
            froms = statement.get_final_froms()
        except Exception:  # an ORM construct we don't know how to resolve: every table is whole
            froms = []
            self.out.whole.add("*")
        for element in froms:
            self._from(element, False, edges_inner, outer, conjunctive)
        where = statement.whereclause
        dnf: list[Conjunction] = [()]
        for part in conjunctive:
            dnf = _and(dnf, part)
        if where is not None:
            dnf = _and(dnf, self._dnf(where))
            edges_inner.extend(self._equalities(where))
        return [self._propagate(c, edges_inner, outer) for c in dnf]

    def _occurrence(self, element: Any, nullable: bool) -> int | None:
        plain = _sa.deannotate(element)
        table = plain.element if isinstance(plain, Alias) and not isinstance(plain, Subquery) else plain
        if not isinstance(table, Table):
            return None
        if nullable and isinstance(plain, Alias) and self.named is not None and id(plain) not in self.named:
            # An eager LEFT OUTER JOIN the ORM added (joinedload): it can't filter the statement's
            # rows, and the rows it loads are accounted for by the loaded relationships.
            return _EAGER
        name = self.table_name(table)
        index = len(self.out.occurrences)
        self.out.occurrences.append(Occurrence(table, name, nullable))
        self.by_from[id(plain)] = index
        return index

    def _from(
        self,
        element: Any,
        nullable: bool,
        edges: list[tuple[Column[Any], Column[Any]]],
        outer: list[tuple[set[int], Any]],
        conjunctive: list[list[Conjunction]],
    ) -> set[int]:
        """Register the occurrences under a FROM element; returns their indexes."""
        if isinstance(element, Join):
            left = self._from(element.left, nullable or element.full, edges, outer, conjunctive)
            optional = nullable or element.isouter or element.full
            right = self._from(element.right, optional, edges, outer, conjunctive)
            if element.full:
                return left | right  # ON restricts neither side of a FULL join
            if element.isouter:
                outer.append((right, element.onclause))
            elif element.onclause is not None:
                conjunctive.append(self._dnf(element.onclause))
                edges.extend(self._equalities(element.onclause))
            return left | right
        index = self._occurrence(element, nullable)
        if index == _EAGER:
            return set()
        if index is not None:
            return {index}
        plain = _sa.deannotate(element)
        inner = getattr(plain, "element", None)
        if isinstance(plain, Subquery) and isinstance(inner, Select) and not nullable:
            # A derived table: its rows come from its own FROM under its own WHERE.
            before = len(self.out.occurrences)
            conjunctive.append(self.select(inner))
            return set(range(before, len(self.out.occurrences)))
        self._whole_under(element)
        return set()

    def _whole_under(self, element: Any) -> None:
        for found in visitors.iterate(element):
            if isinstance(found, Table):
                self.out.whole.add(self.table_name(found))

    # -- WHERE ----------------------------------------------------------------------------------

    def _dnf(self, clause: Any) -> list[Conjunction]:
        """The clause as a disjunction of conjunctions of atoms; unprovable parts become TRUE."""
        while isinstance(clause, Grouping):
            clause = clause.element
        if isinstance(clause, BooleanClauseList) or (
            isinstance(clause, ClauseList) and clause.operator in (operators.and_, operators.or_)
        ):
            parts = [self._dnf(c) for c in clause.clauses]
            if clause.operator is operators.and_:
                out: list[Conjunction] = [()]
                for p in parts:
                    out = _and(out, p)
                return out
            if clause.operator is operators.or_:
                return _dedupe([c for p in parts for c in p])
            return [()]
        if isinstance(clause, True_):
            return [()]
        if isinstance(clause, False_):
            return []
        try:
            return self._atoms(clause)
        except _Unprovable:
            return [()]

    def _atoms(self, clause: Any) -> list[Conjunction]:
        if not isinstance(clause, BinaryExpression):
            raise _Unprovable
        op = clause.operator
        left, right = _plain(clause.left), _plain(clause.right)
        if not isinstance(left, Column) and isinstance(right, Column) and op is operators.eq:
            left, right = right, left
        column = self._column(left)
        if op is operators.eq:
            if isinstance(right, Column):
                return [()]  # column = column: used for propagation (see _equalities)
            return [(Atom(column[0], column[1], self._value(right, column[1])),)]
        if op is operators.is_:
            if isinstance(right, Null):
                if self.out.occurrences[column[0]].nullable:
                    raise _Unprovable  # NULL-extended rows of an outer join also satisfy it
                return [(Atom(column[0], column[1], Const(None)),)]
            if isinstance(right, (True_, False_)):
                return [(Atom(column[0], column[1], Const(isinstance(right, True_))),)]
            raise _Unprovable
        if op is operators.in_op:
            if isinstance(right, BindParameter) and right.expanding:
                index = self._bind_index(right, column[1])
                return [(Atom(column[0], column[1], InList(index, right.key)),)]
            if isinstance(right, (Tuple, ClauseList, Grouping)):
                elements = getattr(_plain(right), "clauses", None)
                if elements is None:
                    raise _Unprovable
                return _dedupe(
                    [(Atom(column[0], column[1], self._value(_plain(e), column[1])),) for e in elements]
                )
        raise _Unprovable

    def _column(self, element: Any) -> tuple[int, Column[Any]]:
        if not isinstance(element, Column) or not column_nameable(element.name):
            raise _Unprovable
        table = element.table
        plain = _sa.deannotate(table)
        index = self.by_from.get(id(plain))
        if index is None:
            raise _Unprovable  # a column of an outer query (correlation) or of something unanalysed
        return index, element

    def _bind_index(self, bind: BindParameter[Any], column: Column[Any]) -> int:
        index = -1 if self.positions is None else self.positions.get(id(bind))
        if index is None:
            raise _Unprovable  # not in the cache key: we cannot know its value per execution
        bind_type = bind.type
        if not isinstance(bind_type, NullType) and (
            _sa.type_affinity(bind_type) is not _sa.type_affinity(column.type)
        ):
            raise _Unprovable  # the database may compare after a conversion we don't model
        return index

    def _value(self, element: Any, column: Column[Any]) -> Source:
        if isinstance(element, BindParameter):
            if element.expanding:
                raise _Unprovable
            return Bind(self._bind_index(element, column), element.key)
        if isinstance(element, (True_, False_)):
            return Const(isinstance(element, True_))
        raise _Unprovable

    def _equalities(self, clause: Any) -> list[tuple[Column[Any], Column[Any]]]:
        """``a.x = b.y`` pairs at the top level (ANDed) of a clause."""
        clause = _plain(clause)
        if isinstance(clause, BooleanClauseList) and clause.operator is operators.and_:
            return [e for c in clause.clauses for e in self._equalities(c)]
        if isinstance(clause, BinaryExpression) and clause.operator is operators.eq:
            left, right = _plain(clause.left), _plain(clause.right)
            if isinstance(left, Column) and isinstance(right, Column):
                return [(left, right)]
        return []

    def _propagate(
        self,
        conjunction: Conjunction,
        edges: list[tuple[Column[Any], Column[Any]]],
        outer: list[tuple[set[int], Any]],
    ) -> Conjunction:
        """Carry values across ``a.x = b.y``: both ways for inner joins and WHERE, only towards the
        optional side for an outer join's ON (its conditions never restrict the preserved side)."""
        atoms = list(conjunction)
        known = {(a.occurrence, a.column.name): a for a in atoms if not isinstance(a.source, InList)}
        pairs: list[tuple[tuple[int, Column[Any]], tuple[int, Column[Any]], bool]] = []
        for a, b in edges:
            ends = self._ends(a, b)
            if ends is not None:
                pairs.append((ends[0], ends[1], True))
        for right_side, onclause in outer:
            for a, b in self._equalities(onclause):
                ends = self._ends(a, b)
                if ends is None:
                    continue
                (ia, ca), (ib, cb) = ends
                if ib in right_side and ia not in right_side:
                    pairs.append(((ia, ca), (ib, cb), False))
                elif ia in right_side and ib not in right_side:
                    pairs.append(((ib, cb), (ia, ca), False))
        changed = True
        while changed:
            changed = False
            for (ia, ca), (ib, cb), both in pairs:
                directions = [((ia, ca), (ib, cb)), ((ib, cb), (ia, ca))] if both else [((ia, ca), (ib, cb))]
                for (src_i, src_c), (dst_i, dst_c) in directions:
                    source = known.get((src_i, src_c.name))
                    if source is None or (dst_i, dst_c.name) in known:
                        continue
                    if isinstance(source.source, Const) and source.source.value is None:
                        continue  # x IS NULL AND x = y holds for no row: nothing to carry
                    atom = Atom(dst_i, dst_c, source.source)
                    known[(dst_i, dst_c.name)] = atom
                    atoms.append(atom)
                    changed = True
        # Value atoms of an outer join's ON (top level only) hold for the optional side's rows.
        for right_side, onclause in outer:
            for part in self._top_level(onclause):
                try:
                    found = self._atoms(part)
                except _Unprovable:
                    continue
                if len(found) == 1 and len(found[0]) == 1 and found[0][0].occurrence in right_side:
                    atoms.append(found[0][0])
        return tuple(atoms)

    def _top_level(self, clause: Any) -> list[Any]:
        clause = _plain(clause)
        if isinstance(clause, BooleanClauseList) and clause.operator is operators.and_:
            return [p for c in clause.clauses for p in self._top_level(c)]
        return [clause]

    def _ends(
        self, a: Column[Any], b: Column[Any]
    ) -> tuple[tuple[int, Column[Any]], tuple[int, Column[Any]]] | None:
        try:
            return self._column(a), self._column(b)
        except _Unprovable:
            return None


def _plain(element: Any) -> Any:
    while isinstance(element, Grouping):
        element = element.element
    return _sa.deannotate(element)


def _dedupe(dnf: list[Conjunction]) -> list[Conjunction]:
    out = _dedupe_and(dnf)
    if len(out) > _MAX_STATIC_CONJUNCTIONS or any(not c for c in out):
        # Too many to track, or one branch admits any row: a single TRUE conjunction.
        return [()]
    return out


def _and(left: list[Conjunction], right: list[Conjunction]) -> list[Conjunction]:
    if len(left) * len(right) > _MAX_STATIC_CONJUNCTIONS:
        # Dropping a whole side keeps the other: a conjunction with fewer atoms admits more rows.
        return left if len(left) <= len(right) else right
    return _dedupe_and([a + b for a, b in itertools.product(left, right)])


def _dedupe_and(dnf: list[Conjunction]) -> list[Conjunction]:
    return list(dict.fromkeys(dnf))


# -- per execution ---------------------------------------------------------------------------------

Resolved = dict[str, list[dict[str, str]] | None]  # table → conjunctions {column: token}, None: any row


def resolve(
    analysis: Analysis,
    bindparams: Sequence[BindParameter[Any]],
    parameters: Mapping[str, Any] | None,
    dialect: Dialect,
    max_in: int = 32,
    max_conjunctions: int = 64,
) -> Resolved:
    """One execution's conditions per table, with values canonicalised to tokens."""
    out: Resolved = {name: None for name in analysis.whole if name != "*"}
    if "*" in analysis.whole:
        return {o.name: None for o in analysis.occurrences} | out
    per_occ: list[list[dict[str, str]] | None] = [[] for _ in analysis.occurrences]
    for conjunction in analysis.dnf:
        for expanded in _expand(conjunction, bindparams, parameters, dialect, max_in, max_conjunctions):
            if expanded is None:
                continue  # contradictory: matches no row
            for i in range(len(analysis.occurrences)):
                current = per_occ[i]
                if current is None:
                    continue
                projected = expanded.get(i)
                if not projected:
                    per_occ[i] = None
                elif projected not in current:
                    if len(current) >= max_conjunctions:
                        per_occ[i] = None
                    else:
                        current.append(projected)
    for occurrence, conditions in zip(analysis.occurrences, per_occ):
        name = occurrence.name
        if name in out and out[name] is None:
            continue
        if conditions is None:
            out[name] = None
            continue
        merged = out.get(name) or []
        merged.extend(c for c in conditions if c not in merged)
        out[name] = merged
    return out


def _expand(
    conjunction: Conjunction,
    bindparams: Sequence[BindParameter[Any]],
    parameters: Mapping[str, Any] | None,
    dialect: Dialect,
    max_in: int,
    max_conjunctions: int,
) -> list[dict[int, dict[str, str]] | None]:
    """A conjunction with this execution's values: one per combination of IN-list members."""
    choices: list[list[tuple[int, str, str]]] = []
    for atom in conjunction:
        values = _values(atom.source, bindparams, parameters)
        if values is None or len(values) > max_in:
            continue  # unknown or too long: drop the atom (admits more rows)
        tokens: list[str] = []
        for v in values:
            if v is None and not (isinstance(atom.source, Const) and atom.source.value is None):
                continue  # "= NULL" and NULL in an IN list match nothing
            t = NULL_TOKEN if v is None else token(atom.column.type, v, dialect)
            if t is None:
                break
            tokens.append(t)
        else:
            choices.append([(atom.occurrence, atom.column.name, t) for t in dict.fromkeys(tokens)])
            continue
        # A value without a token: drop the atom.
    size = 1
    for c in choices:
        size *= max(1, len(c))
    if size > max_conjunctions:
        choices = [c for c in choices if len(c) <= 1]
    out: list[dict[int, dict[str, str]] | None] = []
    for combination in itertools.product(*choices):
        by_occ: dict[int, dict[str, str]] | None = {}
        for occ, column, tok in combination:
            assert by_occ is not None
            existing = by_occ.setdefault(occ, {}).get(column)
            if existing is not None and existing != tok:
                by_occ = None  # x = 1 AND x = 2: no row
                break
            by_occ[occ][column] = tok
        out.append(by_occ)
    return out


def _values(
    source: Source, bindparams: Sequence[BindParameter[Any]], parameters: Mapping[str, Any] | None
) -> list[Any] | None:
    if isinstance(source, Const):
        return [source.value]
    if source.index < 0:
        if parameters is None or source.key not in parameters:
            return None
        value = parameters[source.key]
        return (
            list(value)
            if isinstance(source, InList) and isinstance(value, (list, tuple))
            else (None if isinstance(source, InList) else [value])
        )
    bind = bindparams[source.index]
    if parameters is not None and bind.key in parameters:
        value = parameters[bind.key]
    elif bind.callable is not None or bind.value is not None:
        value = bind.effective_value
    else:
        return None  # a required parameter given some way we don't see
    if isinstance(source, InList):
        if not isinstance(value, (list, tuple, set, frozenset)):
            return None
        return list(value)
    return [value]
