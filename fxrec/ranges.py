"""Half-open ``(start, end)`` index ranges, as shards and routes store their rows and columns.

One definition of a range's length, so that every block type (`fxrec.planner.spec.Shard`,
`fxrec.runtime.dist_lookup.LocalShard`) counts its rows and columns the same way.
"""
from __future__ import annotations

__all__ = ["span", "span_property"]


def span(bounds: tuple[int, int]) -> int:
    """The number of indices in the half-open range ``bounds = (start, end)``: end - start."""
    return bounds[1] - bounds[0]


def span_property(field: str) -> property:
    """A read-only property giving ``span(self.<field>)``.

    Written as a class attribute (``num_rows = span_property("rows")``); because it carries
    no annotation, a dataclass does not take it for a field.
    """

    def get(self) -> int:
        return span(getattr(self, field))

    get.__name__ = f"num_{field}"
    return property(get, doc=f"Length of the half-open range ``{field}``.")
