"""The models as a mermaid `erDiagram`, rendered from the metadata so the picture cannot drift.

`python -m dblayer.models.diagram` prints it; the ORM page shows it, and a test fails when the
page's copy differs from what the current models render.
"""

from __future__ import annotations

from sqlalchemy import Column, Enum, MetaData, Table, UniqueConstraint
from sqlalchemy.dialects import postgresql

from dblayer.models import Base

_DIALECT = postgresql.dialect()  # type: ignore[no-untyped-call]


# --8<-- [start:er_diagram]
def er_diagram(metadata: MetaData = Base.metadata) -> str:
    """Tables with their columns (type, PK/FK/UK), and one line per foreign key."""
    lines = ["erDiagram"]
    for table in metadata.sorted_tables:
        lines.append(f"    {table.name} {{")
        lines.extend(f"        {_attribute(table, column)}" for column in table.columns)
        lines.append("    }")
    for table in metadata.sorted_tables:
        for fk in sorted(table.foreign_keys, key=lambda fk: fk.parent.name):
            one = "|o" if fk.parent.nullable else "||"  # a nullable key may point at nothing
            referred = fk.column.table.name
            lines.append(f'    {referred} {one}--o{{ {table.name} : "{fk.parent.name}"')
    return "\n".join(lines) + "\n"
    # --8<-- [end:er_diagram]


def _attribute(table: Table, column: Column[object]) -> str:
    if isinstance(column.type, Enum) and column.type.name:
        kind = column.type.name
    else:
        kind = column.type.compile(dialect=_DIALECT).lower()
        kind = kind.replace("timestamp with time zone", "timestamptz").replace(" ", "_")
    keys = []
    if column.primary_key:
        keys.append("PK")
    if column.foreign_keys:
        keys.append("FK")
    if _unique(table, column):
        keys.append("UK")
    nullable = ' "nullable"' if column.nullable and not column.primary_key else ""
    return f"{kind} {column.name}{' ' + ', '.join(keys) if keys else ''}{nullable}"


def _unique(table: Table, column: Column[object]) -> bool:
    """Unique alone, by a constraint or a (possibly partial) unique index."""
    singles = [list(i.columns) for i in table.indexes if i.unique]
    singles += [list(c.columns) for c in table.constraints if isinstance(c, UniqueConstraint)]
    return column.unique is True or any(cols == [column] for cols in singles)


if __name__ == "__main__":
    print(er_diagram(), end="")
