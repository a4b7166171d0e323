"""The captured program's arguments: checked against the structure they were captured with.

fx flattens a container argument (DLRM's list of id tensors, a dict of features) into one
placeholder per element, so a loop over it unrolls; the generated ``forward`` takes each
call's containers apart along the structure of ``example_inputs`` (torch's
``_PyTreeCodeGen`` and ``tree_flatten_spec``). That walk reads the first N items of a list
however long it is and only the captured keys of a dict: a call with four id lists where
three were captured, or with a dict key the example lacked, ran on part of its input and
gave a silently different result. `CheckedCodeGen` makes the generated ``forward`` check the
structure first (`flatten_inputs`) and raise a ValueError naming the argument; it also
keeps the defaults of the arguments capture fixed (``extra=None`` left out of
``example_inputs``), which torch's pytree codegen writes into the unpacking instead of the
signature.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import torch.fx._pytree as fx_pytree
import torch.utils._pytree as pytree
from torch.fx import Proxy
from torch.fx.graph import _PyTreeCodeGen

__all__ = ["CheckedCodeGen", "flatten_inputs", "check_structure"]


def _children(spec: pytree.TreeSpec) -> list:
    return [spec.child(i) for i in range(spec.num_children)]


def _sequence_type(spec: pytree.TreeSpec):
    """The list, tuple or NamedTuple class `spec` stands for, or None (pytree keeps a
    NamedTuple's class in its context, under a `namedtuple` marker type)."""
    if spec.type in (list, tuple):
        return spec.type
    if isinstance(spec.context, type) and pytree.is_namedtuple_class(spec.context):
        return spec.context
    return None


def _keys(keys) -> str:
    return "[" + ", ".join(sorted(map(repr, keys))) + "]"


def _describe(spec: pytree.TreeSpec) -> str:
    if spec.type is dict:
        return f"a dict with keys {_keys(spec.context)}"
    return f"a {_sequence_type(spec).__name__} of {spec.num_children}"


def check_structure(value: Any, spec: pytree.TreeSpec, path: str) -> None:
    """Raise ValueError when `value`'s lists, tuples and dicts are not those of `spec`
    (leaves, and containers of other kinds, such as a KeyedJaggedTensor, are not compared)."""
    if spec.is_leaf() or isinstance(value, Proxy):  # (torch.load re-traces the forward with proxies)
        return
    if _sequence_type(spec) is not None:
        if not isinstance(value, (list, tuple)) or len(value) != spec.num_children:
            got = f"a {type(value).__name__} of {len(value)}" if isinstance(value, (list, tuple)) \
                else f"a {type(value).__name__}"
            raise ValueError(f"{path} is {got}, but the model was captured with {_describe(spec)} there "
                             f"(from example_inputs): capture traces each item of a list, so call it with "
                             f"the structure of example_inputs, or capture it with this one")
        fields = getattr(_sequence_type(spec), "_fields", None)
        for i, (item, child) in enumerate(zip(value, _children(spec))):
            check_structure(item, child, f"{path}.{fields[i]}" if fields else f"{path}[{i}]")
    elif spec.type is dict:
        if not isinstance(value, dict) or set(value) != set(spec.context):
            if isinstance(value, dict):
                extra, missing = set(value) - set(spec.context), set(spec.context) - set(value)
                got = "a dict" + (f" with key(s) {_keys(extra)} that example_inputs lacked" if extra else "") + \
                      (" and" if extra and missing else "") + (f" without key(s) {_keys(missing)}" if missing else "")
            else:
                got = f"a {type(value).__name__}"
            raise ValueError(f"{path} is {got}, but the model was captured with {_describe(spec)} there "
                             f"(from example_inputs): the captured forward reads only those keys, so call it "
                             f"with them, or capture it with example_inputs holding these")
        for key, child in zip(spec.context, _children(spec)):
            check_structure(value[key], child, f"{path}[{key!r}]")


def flatten_inputs(names: Sequence[str], args: Any, spec: pytree.TreeSpec) -> list:
    """The generated forward's unpacking of its arguments (``tree_flatten_spec``), after
    `check_structure` of each argument, named as forward names it."""
    if isinstance(args, tuple) and len(args) == 2 and isinstance(args[1], dict) and spec.num_children == 2 \
            and spec.child(1).type is dict:  # ([positional], {keyword: value})
        named = list(zip(names, args[0], _children(spec.child(0))))
        named += [(k, args[1][k], c) for k, c in zip(spec.child(1).context,
                                                      _children(spec.child(1)))]
    else:
        named = list(zip(names[len(names) - len(args):], args, _children(spec)))
    for name, value, child in named:
        check_structure(value, child, f"argument {name!r}")
    return fx_pytree.tree_flatten_spec(args, spec)


_DEFAULT = re.compile(r"^([A-Za-z_]\w*)(\s*:[^=]*)?\s*=\s*(.+)$")


class CheckedCodeGen(_PyTreeCodeGen):
    """torch's pytree codegen, whose forward checks its arguments' structure (module doc)
    and keeps the defaults of fixed arguments in its signature."""

    def gen_fn_def(self, free_vars: list[str], maybe_return_annotation: str, *, expanded_def: bool = False) -> str:
        if self.pytree_info is None:
            return super().gen_fn_def(free_vars, maybe_return_annotation, expanded_def=expanded_def)
        defaults = {}
        for i, var in enumerate(free_vars):
            found = _DEFAULT.match(var)
            if found:  # a fixed argument's placeholder: `extra = None`
                defaults[found.group(1)] = found.group(3)
                free_vars[i] = found.group(1) + (found.group(2) or "")
        text = super().gen_fn_def(free_vars, maybe_return_annotation, expanded_def=expanded_def)
        text = text.replace("fx_pytree.tree_flatten_spec(",
                            f"fxrec_flatten_inputs({tuple(self.pytree_info.orig_args)!r}, ", 1)
        if defaults:  # `def forward(self, ids, extra):` -> `def forward(self, ids, extra = None):`
            head, sep, rest = text.partition(")")
            params = [p.strip() for p in head[head.index("(") + 1:].split(",")]
            # only a trailing run keeps its defaults: a parameter with a default before one
            # without (`forward(self, ids, extra=None, pair=None)` given `pair`, a container
            # fx unpacks and names without its default) would be a SyntaxError
            last = max((i for i, p in enumerate(params) if p not in defaults), default=-1)
            params = [f"{p} = {defaults[p]}" if p in defaults and i > last else p for i, p in enumerate(params)]
            text = head[:head.index("(") + 1] + ", ".join(params) + sep + rest
        return text

    def additional_globals(self) -> list[tuple[str, Any]]:
        return [*super().additional_globals(), ("fxrec_flatten_inputs", flatten_inputs)]

    def process_inputs(self, *inputs: Any) -> Any:
        """An Interpreter's unpacking of the arguments (`fxrec.passes.shapes.run_example`), along
        the captured structure as the generated forward's. torch's takes every pytree leaf,
        and a KeyedJaggedTensor is a pytree node: beside a container argument (which gives the
        graph this codegen) a KJT argument, one placeholder, came apart into its tensors.
        Arguments left out (fixed at their defaults) are left to the placeholders' defaults."""
        info = self.pytree_info
        spec = info.in_spec
        if spec.type is tuple and spec.num_children == 2 and spec.child(0).type is list \
                and spec.child(1).type is dict:  # ([positional], {keyword})
            specs = _children(spec.child(0)) + _children(spec.child(1))
        else:
            specs = _children(spec)
        if len(info.orig_args) > 0 and info.orig_args[0] == "self":
            specs = specs[1:]
        flat: list = []
        for value, child in zip(inputs, specs):
            flat += fx_pytree.tree_flatten_spec(value, child)
        return flat + list(inputs[len(specs):])


def checked(graph) -> None:
    """Give `graph` the checking codegen where fx flattened its arguments."""
    codegen = graph._codegen
    if type(codegen) is _PyTreeCodeGen:
        graph._codegen = CheckedCodeGen(codegen.pytree_info)
