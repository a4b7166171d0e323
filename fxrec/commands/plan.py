"""`fxrec plan`: plan a model's (or a CSV's) tables on a topology and print why."""
from __future__ import annotations

import argparse
import csv
import math
import sys

from fxrec.commands._topology import add_topology_arguments, given_topology, topology_from_args

HELP = "Plan where each embedding table goes: sharding type, kernel, ranks; per-rank time and memory."

# fxrec.planner.cost.OPTIMIZER_STATE's names (not imported: it loads sympy); rowwise_adagrad is
# fxrec's exact one, rowwise_adagrad_per_shard TorchRec's (exact_column_wise=False)
OPTIMIZERS = ("sgd", "rowwise_adagrad", "rowwise_adagrad_per_shard", "adagrad", "adam")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", nargs="?", help="FILE.py:FUNC returning (model, example_inputs)")
    p.add_argument("--tables", metavar="CSV",
                   help="plan without a model: columns name, num_embeddings, embedding_dim, pooling_factor "
                        "(optional: dtype, pooling, uses)")
    add_topology_arguments(p)
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd",
                   help="sparse optimizer whose state (and exact column_wise row sync) counts")
    p.add_argument("--table-optimizer", action="append", default=[], metavar="TABLE=OPTIMIZER",
                   help="this table's own sparse optimizer (fxrec.optim.PerTable; repeatable); "
                        "--optimizer serves the others")
    p.add_argument("--search", choices=("auto", "heuristic", "exact"), default="auto",
                   help="exact: branch and bound from the heuristic's plan, within a budget of steps (small "
                        "instances); auto: exact where the instance is small (default: %(default)s)")
    p.add_argument("--hedge", type=float, default=0.005, metavar="FRACTION",
                   help="on several nodes, the share of the busiest rank's time the plan may give up to stay "
                        "balanced if intra-node links were as slow as the NIC (0: off; default 0.005)")
    p.add_argument("--comm-dtype", metavar="DTYPE", default=None,
                   help="the dtype fxrec.shard(..., comm_dtype=) will send the sharded tables' outputs in "
                        "(bf16, fp16, fp32): the output exchange is costed at its bytes")
    p.add_argument("-o", "--output", metavar="PLAN.json", help="write the plan as JSON")


class UsageError(Exception):
    pass


_CSV_COLUMNS = ("name", "num_embeddings", "embedding_dim", "pooling_factor", "dtype", "pooling", "uses")


def read_tables_csv(path: str) -> list:
    """TableInfo per row of a CSV; errors name the file, line, table and value."""
    from fxrec.types import TableInfo

    try:
        f = open(path, newline="", encoding="utf-8-sig")  # utf-8-sig: the BOM spreadsheets write
    except OSError as e:
        raise UsageError(f"cannot read {path!r}: {e.strerror}") from None
    with f:
        try:
            return _read_tables(csv.DictReader(f), path, TableInfo)
        except UnicodeDecodeError as e:
            raise UsageError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x}: {e.reason})") from None


def _read_tables(reader, path: str, TableInfo) -> list:
    cols = [c.strip() for c in reader.fieldnames or []]
    # a header cell left empty ("a,b,," from a spreadsheet) names no column: its own key, so
    # that two of them are not "given twice" and a value under one is caught below
    reader.fieldnames = [c if c else _unnamed(i) for i, c in enumerate(cols)]
    missing = [c for c in ("name", "num_embeddings", "embedding_dim") if c not in cols]
    if missing and not any(cols) and reader.line_num:  # (a file with nothing in it: the message below)
        raise UsageError(f"{path} line 1: empty; the header (name,num_embeddings,embedding_dim,...) must be the "
                         f"first line")
    if missing:
        raise UsageError(f"{path}: missing column(s) {', '.join(map(repr, missing))}; have {[c for c in cols if c]}")
    # an optional column misspelt (pooling_factr) would drop its values without a word
    unknown = [c for c in cols if c and c not in _CSV_COLUMNS]
    if unknown:
        raise UsageError(f"{path} line 1: unknown column(s) {', '.join(map(repr, unknown))}; the columns are "
                         f"{', '.join(_CSV_COLUMNS)}")
    twice = sorted({c for c in cols if c and cols.count(c) > 1})
    if twice:
        raise UsageError(f"{path} line 1: column(s) {', '.join(map(repr, twice))} given twice")
    tables, first = [], {}
    for row in reader:
        line = reader.line_num  # the file's line (csv skips blank lines; a quoted field may span lines)
        if None in row:  # DictReader's key for fields past the header's
            raise UsageError(f"{path} line {line}: {len(cols) + len(row[None])} fields for the header's "
                             f"{len(cols)}: {row[None]!r} past the last column")
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
        for i, c in enumerate(cols):
            value = "" if c else row.pop(_unnamed(i))
            if value:
                raise UsageError(f"{path} line {line}: {value!r} in column {i + 1}, which has no name in the header")
        if row["name"] in first:  # fxrec.plan would refuse it too, without saying where
            raise UsageError(f"{path} line {line}: table {row['name']!r} again (first on line {first[row['name']]})")
        first[row["name"]] = line
        try:  # TableInfo checks the dtype's name
            tables.append(TableInfo(
                name=row["name"], num_embeddings=_number(row, "num_embeddings", int),
                embedding_dim=_number(row, "embedding_dim", int),
                pooling_factor=_number(row, "pooling_factor", float, 1.0),
                dtype=row.get("dtype") or "float32", pooling=row.get("pooling") or "sum",
                uses=_number(row, "uses", int, 1)))
        except (ValueError, AttributeError) as e:
            raise UsageError(f"{path} line {line}: {e}") from None
    if not tables:
        raise UsageError(f"{path}: no tables")
    return tables


def _unnamed(i: int) -> str:
    return f"\0column {i + 1}"  # a key no (stripped) header cell of a real file holds


def _number(row: dict, key: str, kind, default=None):
    from fxrec.types import whole

    text = row.get(key, "")
    if text == "" and default is not None:
        return default
    try:
        if kind is int:  # digits exactly (float() would round past 2**53); "1e6" is a whole number too
            count = int(text) if text.lstrip("+-").isdigit() else whole(float(text))
            if count is None:
                raise ValueError
            return count
        value = float(text)
        if not math.isfinite(value):
            raise ValueError
        return value
    except ValueError:
        raise ValueError(f"table {row.get('name')!r}: {key} must be {'an integer' if kind is int else 'a number'}, "
                         f"got {text!r}") from None


def constraints_from_specs(specs: list[str]) -> dict:
    """{table: Constraint} from repeated TABLE=TYPE[,TYPE] options (also used by fxrec dump)."""
    out = {}
    for spec in specs:
        name, sep, types = spec.partition("=")
        name = name.strip()  # "item = row_wise": the table is 'item', not 'item '
        if not sep or not name or not types:
            raise UsageError(f"--constraint expects TABLE=TYPE[,TYPE], got {spec!r}")
        if name in out:  # the second would silently win: say so instead
            raise UsageError(f"--constraint {spec!r}: table {name!r} is constrained twice; give its types once, "
                             f"comma-separated")
        from fxrec.planner.spec import Constraint

        try:
            out[name] = Constraint(sharding_types=tuple(t.strip() for t in types.split(",")))
        except ValueError as e:
            raise UsageError(f"--constraint {spec!r}: {e}") from None
    return out


def sparse_optimizer_from_args(args):
    """--optimizer, or with --table-optimizer a `fxrec.optim.PerTable` of configs of those
    kinds (the planner reads their kinds; the learning rates do not matter to it)."""
    if not args.table_optimizer:
        return args.optimizer
    from fxrec.optim import SGD, Adam, PerTable, RowWiseAdagrad

    config = {"sgd": SGD(0.01), "rowwise_adagrad": RowWiseAdagrad(0.01), "adam": Adam(0.01),
              "rowwise_adagrad_per_shard": RowWiseAdagrad(0.01, exact_column_wise=False)}
    tables = {}
    for spec in args.table_optimizer:
        name, sep, kind = (part.strip() for part in spec.partition("="))
        if not sep or not name or kind not in config:
            raise UsageError(f"--table-optimizer expects TABLE=OPTIMIZER with OPTIMIZER one of {OPTIMIZERS}, "
                             f"got {spec!r}")
        if name in tables:  # the second would silently win, as with --constraint
            raise UsageError(f"--table-optimizer {spec!r}: table {name!r} is given an optimizer twice")
        tables[name] = config[kind]
    return PerTable(tables, default=config[args.optimizer])


def _topology(args):
    if args.world_size is None and not args.topology:
        raise UsageError("--world-size is required (or --topology PROFILE)")
    return topology_from_args(args, given_topology(args))


def run(args) -> int:
    import fxrec
    from fxrec.capture import CaptureError
    from fxrec.commands._load import LoadError, load_target

    try:
        if bool(args.target) == bool(args.tables):
            raise UsageError("give either FILE.py:FUNC or --tables CSV")
        topology = _topology(args)
        constraints = constraints_from_specs(args.constraint)
        if args.tables:
            source, example_inputs = read_tables_csv(args.tables), None
        else:
            source, example_inputs = load_target(args.target)
        plan = fxrec.plan(source, topology, example_inputs, constraints, batch_size=args.batch_size,
                          sparse_optimizer=sparse_optimizer_from_args(args), search=args.search, hedge=args.hedge,
                          comm_dtype=args.comm_dtype)
    except fxrec.PlanError as e:
        print(f"fxrec plan: no plan fits:\n{e}", file=sys.stderr)
        return 1
    except (UsageError, LoadError, CaptureError, ValueError, ImportError) as e:
        print(f"fxrec plan: error: {_first_part(e)}", file=sys.stderr)
        return 2
    print(plan.explain())
    if args.output:
        try:
            with open(args.output, "w") as f:
                f.write(plan.to_json(indent=1))
        except OSError as e:
            print(f"fxrec plan: error: cannot write {args.output!r}: {e.strerror}", file=sys.stderr)
            return 2
        print(f"wrote {args.output}")
    return 0


def _first_part(e: Exception) -> str:
    """The error without the text torch.fx appends while interpreting ("While executing ...")."""
    return str(e).split("\n\nWhile executing")[0]
