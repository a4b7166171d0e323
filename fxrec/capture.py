"""Capture a user's model as a `torch.fx.GraphModule` with shapes and provenance.

`capture` first traces symbolically with `FxrecTracer`, which keeps embedding modules
(nn.Embedding, nn.EmbeddingBag, fxrec's EmbeddingBagCollection / EmbeddingCollection)
as call_module leaves so later passes see each lookup whole; fxrec's KeyedJaggedTensor
arguments become ordinary placeholders and their methods call_method nodes. Where
symbolic tracing cannot follow the Python (control flow on a traced value, iterating a
traced tensor), it falls back to `torch.export` (non-strict, every dimension
`Dim.AUTO`), whose graph is aten-level: lookups then appear as aten embedding ops on
the tables' parameters. If both fail, `CaptureError` names the module and source line.

Every node of the result carries (keys from fxrec.passes.lookup): PASS = "capture",
MODULE (innermost user module path, "" for the root), SOURCE (`SourceLoc` of the
user's line or None), SHAPE (`TensorSpec`, `SparseSpec`, or a tuple/dict of them; the
type name otherwise) and, for tensor values, torch's own ``tensor_meta``.
"""
from __future__ import annotations

import contextlib
import inspect
import io
import itertools
import linecache
import logging
import os
import re
import sys
import traceback
import warnings
from typing import Any, Iterable, NamedTuple, Optional, Union

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn
from torch.fx._symbolic_trace import PH

from fxrec.input_spec import checked
from fxrec.passes import lookup as L
from fxrec.passes.shapes import ExampleIdError, run_example
from fxrec.trace_ops import SetItemProxy, checkpoints_traced_through, sizes_as_nodes

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
# fxrec's own tracing and interpreting code, never the "user's line"
_INTERNAL_FILES = (os.path.abspath(__file__),
                   os.path.join(os.path.dirname(os.path.abspath(__file__)), "trace_ops.py"))
_INTERNAL_DIR = os.path.dirname(os.path.abspath(L.__file__)) + os.sep  # fxrec/passes/


class CaptureError(RuntimeError):
    """The model could not be captured; the message is one line naming the module path
    and source line of the offending operation and what to do about it."""


class SourceLoc(NamedTuple):
    file: str
    line: int
    code: str

    def __str__(self) -> str:
        return f"{os.path.basename(self.file)}:{self.line} {self.code}".rstrip()


# ------------------------------------------------------------------ symbolic tracing
def _embedding_leaf_types() -> tuple[type, ...]:
    from fxrec.modules import EmbeddingBagCollection, EmbeddingCollection
    return (nn.Embedding, nn.EmbeddingBag, EmbeddingBagCollection, EmbeddingCollection)


class FxrecTracer(torch.fx.Tracer):
    """Symbolic tracer that keeps embedding modules and the user's `leaf_modules`
    (types or qualified names) as call_module leaves, and records in ``meta[SOURCE]``
    the user's line that created each node."""

    def __init__(self, leaf_modules: Iterable[Union[type, str]] = (), training_flag: bool = False):
        super().__init__()
        self._trace_frame = None
        self._training_flag = training_flag
        leaves = list(leaf_modules)
        self._leaf_types = _embedding_leaf_types() + tuple(t for t in leaves if isinstance(t, type))
        self._leaf_names = {t for t in leaves if isinstance(t, str)}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, self._leaf_types + (TrainingFlag,)) or module_qualified_name in self._leaf_names:
            return True
        if getattr(type(m), "fxrec_leaf", False):  # a module that asks to stay whole (managed collisions)
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def trace(self, root, concrete_args=None):
        self._trace_frame = sys._getframe()
        try:
            with _recording_grad_switches(self), sizes_as_nodes(self), checkpoints_traced_through():
                return super().trace(root, concrete_args)
        finally:
            self._trace_frame = None

    # grad-mode switches as graph nodes (fxrec/passes/grad_mode.py): fx alone would switch
    # the mode while tracing and record nothing, and the graph would train what forward
    # computed with gradients off
    def grad_switch(self, mode) -> tuple:
        """Record ``prev = is_grad_enabled(); _set_grad_enabled(mode)``; returns what
        `grad_restore` needs. Tracing itself goes on in the mode a constant asks for."""
        prev = self.create_proxy("call_function", torch.is_grad_enabled, (), {})
        self.create_proxy("call_function", torch._C._set_grad_enabled, (mode,), {})
        was = torch.is_grad_enabled()
        torch._C._set_grad_enabled(mode if isinstance(mode, bool) else was)
        return prev, was

    def grad_restore(self, saved: tuple) -> None:
        prev, was = saved
        self.create_proxy("call_function", torch._C._set_grad_enabled, (prev,), {})
        torch._C._set_grad_enabled(was)

    def create_args_for_root(self, root_fn, is_module, concrete_args=None):
        out = super().create_args_for_root(root_fn, is_module, concrete_args)
        if self._training_flag:  # after the placeholders: every module's `training` reads one node
            flag = self.create_proxy("call_module", L.TRAINING_FLAG, (), {})
            # a submodule in the other mode (model.train(); model.encoder.eval()) reads its own,
            # fixed: one flag following the root would run it in the root's mode
            fixed = self.create_proxy("call_module", L.FIXED_TRAINING_FLAG, (), {})
            modes = {m: m.training for m in self.root.modules() if "training" in m.__dict__}
            for m, mode in modes.items():
                if not isinstance(m, TrainingFlag):
                    m.__dict__["training"] = flag if mode == modes[self.root] else fixed
        return out

    def proxy(self, node: torch.fx.Node) -> SetItemProxy:
        return SetItemProxy(node, self)  # records `x[mask] = 0` (fxrec/trace_ops.py)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        proxy.node.meta[L.SOURCE] = self._user_frame()
        return proxy

    def _user_frame(self) -> Optional[SourceLoc]:
        # The innermost frame of user code between here and trace(): torch's own
        # stack-trace recording symbolizes every frame, which costs seconds on first use.
        frame = sys._getframe(2)
        while frame is not None and frame is not self._trace_frame:
            path = frame.f_code.co_filename
            if _is_user_file(path):
                return SourceLoc(path, frame.f_lineno, linecache.getline(path, frame.f_lineno).strip())
            frame = frame.f_back
        return None

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as e:
            # Remember the innermost module whose forward failed; the scope is gone by
            # the time the exception reaches capture().
            if not hasattr(e, "_fxrec_module"):
                e._fxrec_module = (self.path_of_module(m), type(m).__name__)
            raise


def _placeholders(value: Any) -> Any:
    if isinstance(value, (list, tuple, dict)):
        if isinstance(value, dict):
            return {k: _placeholders(v) for k, v in value.items()}
        items = [_placeholders(v) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    return None if value is None else PH


def _concrete_args(model: nn.Module, inputs: tuple) -> Optional[dict]:
    """Containers of tensors (DLRM's lists of offsets and indices) are flattened into one
    placeholder per leaf so a loop over them unrolls; plain scalars are specialised."""
    params = list(inspect.signature(model.forward).parameters.values())
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        return None
    concrete = {}
    for p, v in zip(params, inputs):
        if isinstance(v, (list, tuple, dict)):
            concrete[p.name] = _placeholders(v)
        elif v is None or isinstance(v, (bool, int, float, str)):
            concrete[p.name] = v
    # Left out: None, a flag or a string (`extra=None` ... `if extra is not None:`) is fixed at
    # its default, as a passed one is; numbers stay graph inputs (`* scale`).
    for p in params[len(inputs):]:
        if p.default is None or isinstance(p.default, (bool, str)):
            concrete[p.name] = p.default
    return concrete or None


_SPECIALIZED = re.compile(r"(\w+) has been specialized to have value (.*) but got another value")


def _named_as_forward(graph: torch.fx.Graph, concrete: Optional[dict]) -> None:
    """fx names a fixed argument's placeholder ``extra_1``; name it as forward does, so that
    a keyword call (``model(ids, extra=None)``) still binds it; and say in fx's check of the
    fixed value where the value came from."""
    if not concrete:
        return
    targets = {n.target for n in graph.nodes if n.op == "placeholder"}
    for n in graph.nodes:
        if n.op == "placeholder" and n.target.endswith("_1"):
            name = n.target[:-2]
            # (a container's items are `ids_1`, `ids_2`...: placeholders of their own)
            if name in concrete and not isinstance(concrete[name], (list, tuple, dict)) and name not in targets:
                n.target = name
        elif n.op == "call_function" and len(n.args) == 2 and isinstance(n.args[1], str):
            found = _SPECIALIZED.fullmatch(n.args[1])
            if found:
                arg, value = found.groups()
                n.args = (n.args[0], f"argument {arg!r} was captured as {value} (its value in example_inputs, "
                                     f"or its default where they leave it out) and this call passes another; "
                                     f"capture the model with example_inputs that pass the value you call it with")


class TrainingFlag(nn.Module):
    """``forward() -> self.training``: what traced code reads where the model's own code read
    ``self.training`` (``F.dropout(x, p, self.training)``), so that ``train()`` / ``eval()``
    of the captured module (or of a ShardedModel around it) reach that code at run time
    instead of the mode it was captured in."""

    def forward(self) -> bool:
        return self.training


class FixedTrainingFlag(TrainingFlag):
    """What traced code reads where a submodule captured in the other mode than the model's
    read ``self.training``: that mode, which ``train()`` / ``eval()`` do not change (there is
    no submodule left to set apart; a warning at capture names them)."""

    def train(self, mode: bool = True):
        return self


@contextlib.contextmanager
def modes_kept(model: nn.Module):
    """Every module of `model` back in the mode it had, after a block that switches the model's
    mode (`model.train(not was)` to capture the other mode): ``model.train(was)`` would set every
    submodule to the root's mode, undoing a submodule the user put in eval mode apart."""
    saved = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, mode in saved:
            m.training = mode


@contextlib.contextmanager
def _recording_grad_switches(tracer: FxrecTracer):
    """While `tracer` traces, torch's grad-mode context managers (whatever name the model
    imported them by: their methods are patched) record their switches in its graph."""
    from torch.autograd import grad_mode as G

    def switching(mode_of):
        def enter(self):
            self._fxrec_saved = tracer.grad_switch(mode_of(self))
        return enter

    def restore(self, *exc):
        saved = self.__dict__.pop("_fxrec_saved", None)
        if saved is not None:
            tracer.grad_restore(saved)

    def set_init(self, mode):  # set_grad_enabled switches when built, usable without `with`
        self.mode = mode
        self._fxrec_saved = tracer.grad_switch(mode)

    def inference_enter(self):  # inference mode: gradients off, as far as the graph can say
        if self.mode:
            self._fxrec_saved = tracer.grad_switch(False)

    patches = [(G.no_grad, "__enter__", switching(lambda self: False)), (G.no_grad, "__exit__", restore),
               (G.enable_grad, "__enter__", switching(lambda self: True)), (G.enable_grad, "__exit__", restore),
               (G.set_grad_enabled, "__init__", set_init), (G.set_grad_enabled, "__exit__", restore),
               (G.inference_mode, "__enter__", inference_enter), (G.inference_mode, "__exit__", restore)]
    saved = [(cls, name, cls.__dict__[name]) for cls, name, _ in patches]
    try:
        for cls, name, fn in patches:
            setattr(cls, name, fn)
        yield
    finally:
        for cls, name, fn in saved:
            setattr(cls, name, fn)


def _fx_trace(model: nn.Module, inputs: tuple, leaf_modules, flag: bool) -> torch.fx.GraphModule:
    tracer = FxrecTracer(leaf_modules, training_flag=flag)
    concrete = _concrete_args(model, inputs)
    if not flag:
        graph = tracer.trace(model, concrete)
        _named_as_forward(graph, concrete)
        checked(graph)
        return torch.fx.GraphModule(model, graph, type(model).__name__)
    saved = {m: m.__dict__["training"] for m in model.modules() if "training" in m.__dict__}
    model.add_module(L.TRAINING_FLAG, TrainingFlag().train(model.training))
    fixed = FixedTrainingFlag()
    fixed.training = not model.training
    model.add_module(L.FIXED_TRAINING_FLAG, fixed)
    try:
        graph = tracer.trace(model, concrete)
        _named_as_forward(graph, concrete)
        checked(graph)
        for m, mode in saved.items():  # before the GraphModule copies the root's mode
            m.__dict__["training"] = mode
        for target in (L.TRAINING_FLAG, L.FIXED_TRAINING_FLAG):
            node = next(n for n in graph.nodes if n.op == "call_module" and n.target == target)
            if not node.users:
                graph.erase_node(node)
            elif target == L.FIXED_TRAINING_FLAG:
                _warn_fixed_modes(model, tracer)
        return torch.fx.GraphModule(model, graph, type(model).__name__)
    finally:
        for m, mode in saved.items():
            m.__dict__["training"] = mode
        delattr(model, L.TRAINING_FLAG)
        delattr(model, L.FIXED_TRAINING_FLAG)


def _warn_fixed_modes(model: nn.Module, tracer: FxrecTracer) -> None:
    """Name the submodules whose ``self.training`` reads were fixed at capture (`FixedTrainingFlag`)."""
    other = [path for path, m in model.named_modules() if path and m.training != model.training
             and not isinstance(m, TrainingFlag) and not tracer.is_leaf_module(m, path)]
    mode, theirs = ("training", "eval") if model.training else ("eval", "training")
    warnings.warn(f"fxrec.capture: the model is in {mode} mode, submodule(s) {other} in {theirs} mode: where their "
                  f"code reads self.training, the captured program keeps {theirs} mode, which train() / eval() of "
                  f"the captured or sharded model do not change", stacklevel=4)


def _fx_capture(model: nn.Module, inputs: tuple, leaf_modules) -> torch.fx.GraphModule:
    """fx's trace, with every ``self.training`` a graph value (`TrainingFlag`). Code that
    branches on it cannot trace so; it is traced again with the mode as a constant, and
    ``gm.meta[TRAINING_BAKED]`` says which mode and where (ShardedModel warns when switched)."""
    if hasattr(model, L.TRAINING_FLAG):
        return _fx_trace(model, inputs, leaf_modules, flag=False)
    try:
        return _fx_trace(model, inputs, leaf_modules, flag=True)
    except Exception as first:  # noqa: BLE001 - the trace with the mode fixed says whether it was the flag
        gm = _fx_trace(model, inputs, leaf_modules, flag=False)  # raises on any other control flow
        where = _user_location(first)
        gm.meta[L.TRAINING_BAKED] = (model.training, f"{type(model).__name__}.forward branches on self.training"
                                                     + (f" at {where}" if where else ""))
        return gm


# ------------------------------------------------------------------ torch.export fallback
def _auto_dims(value: Any) -> Any:
    """A dynamic_shapes tree marking every tensor dimension Dim.AUTO (export keeps a
    dimension dynamic where it can): fresh batches with other id counts still run."""
    if isinstance(value, Tensor):
        return {i: torch.export.Dim.AUTO for i in range(value.dim())}
    if isinstance(value, dict):
        return {k: _auto_dims(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        dims = [_auto_dims(v) for v in value]
        return dims if isinstance(value, list) or hasattr(value, "_fields") else tuple(dims)
    node_def = pytree.SUPPORTED_NODES.get(type(value))
    if node_def is not None:  # custom pytree nodes (KJT...): export wants a list of children
        children, _ = node_def.flatten_fn(value)
        return [_auto_dims(c) for c in children]
    return None


@contextlib.contextmanager
def _quiet():
    # export prints graphs and warnings to stderr while it fails; its first error line
    # goes into CaptureError instead.
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logging.disable(previous)


def _is_mixed(model: nn.Module) -> bool:
    devices = {t.is_meta for t in itertools.chain(model.parameters(), model.buffers())}
    return devices == {True, False}


@contextlib.contextmanager
def _real_tensors_on_meta(model: nn.Module):
    """Swap every real parameter and buffer of `model` for a meta stand-in, restoring the
    originals on exit; yields {id(stand-in): original}. export traces a model whose tables
    are on meta but whose dense layers are real only this way: traced as is, a lookup's
    meta output meets a real weight in the first dense op. Tied tensors share one stand-in."""
    swapped, shadows = [], {}
    for mod in model.modules():
        for store in (mod._parameters, mod._buffers):
            for name, t in list(store.items()):
                if t is None or t.is_meta:
                    continue
                if id(t) not in shadows:
                    meta = t.detach().to("meta")
                    shadows[id(t)] = (nn.Parameter(meta, t.requires_grad) if isinstance(t, nn.Parameter) else meta, t)
                swapped.append((store, name, t))
                store[name] = shadows[id(t)][0]
    try:
        yield {id(shadow): original for shadow, original in shadows.values()}
    finally:
        for store, name, t in swapped:
            store[name] = t


def _put_back(gm: nn.Module, originals: dict) -> None:
    # ep.module() holds the very tensors it was traced with (the stand-ins): the graph
    # must share the user's real parameters, as an fx capture does.
    for mod in gm.modules():
        for store in (mod._parameters, mod._buffers):
            for name, t in list(store.items()):
                if t is not None and id(t) in originals:
                    store[name] = originals[id(t)]


def _export_capture(model: nn.Module, inputs: tuple) -> torch.fx.GraphModule:
    mixed = _is_mixed(model)
    with _quiet(), (_real_tensors_on_meta(model) if mixed else contextlib.nullcontext({})) as originals:
        ep = torch.export.export(model, inputs, dynamic_shapes=_auto_dims(inputs), strict=False)
        gm = ep.module()
    _put_back(gm, originals)
    return gm


# ------------------------------------------------------------------ provenance
_FRAME = re.compile(r'File "([^"]+)", line (\d+), in [^\n]*\n[ \t]*([^\n]*)')


def _is_user_file(path: str) -> bool:
    if path.startswith("<"):  # fx-generated code, <string>, <frozen ...>
        return False
    path = os.path.abspath(path)
    return not (path.startswith(_TORCH_DIR) or path in _INTERNAL_FILES or path.startswith(_INTERNAL_DIR))


def _user_frame_from_trace(stack_trace: Optional[str]) -> Optional[SourceLoc]:
    frames = [SourceLoc(f, int(n), code.strip()) for f, n, code in _FRAME.findall(stack_trace or "")]
    user = [f for f in frames if _is_user_file(f.file)]
    return user[-1] if user else None


def _innermost_module(node: torch.fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    paths = [v[0] for v in stack.values() if isinstance(v, tuple) and not str(v[0]).startswith("_empty")]
    return str(paths[-1]) if paths else ""


def _stamp(gm: torch.fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        node.meta[L.PASS] = "capture"
        node.meta[L.MODULE] = _innermost_module(node)
        if L.SOURCE not in node.meta:  # fx tracing records it; export leaves a stack_trace
            node.meta[L.SOURCE] = _user_frame_from_trace(node.meta.get("stack_trace"))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__).strip()


def _meta_dense(model: nn.Module) -> bool:
    # Meta tables alone are fine: their lookups yield real zeros on the ids' device
    # (fxrec.passes.shapes), so dense code after them can read data; meta dense layers cannot.
    tables = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))}
    return any(t.is_meta and id(t) not in tables for t in itertools.chain(model.parameters(), model.buffers()))


def _user_location(error: Exception) -> str:
    """``file:line `code``` of the innermost user frame in `error`'s traceback, or ""."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if _is_user_file(f.filename)]
    if not frames:
        return ""
    f = frames[-1]  # the innermost user frame is the offending operation
    return f"{os.path.basename(f.filename)}:{f.lineno} `{(f.line or '').strip()}`"


def _failure(model: nn.Module, fx_error: Exception, export_error: Optional[Exception],
             traced: bool = False) -> CaptureError:
    """One line: where (module path, file:line, code), what, and the advice. `traced`: fx
    traced forward and the failure came from running the example through the graph (a
    shape that does not fit, not control flow: the advice says so)."""
    where = _user_location(fx_error)
    where = f" at {where}" if where else ""
    path, type_name = getattr(fx_error, "_fxrec_module", ("", type(model).__name__))
    module = f"module '{path}' ({type_name})" if path else f"the root module ({type_name})"
    if traced:
        advice = ("check that the model runs on example_inputs as given (their shapes and dtypes: "
                  "model(*example_inputs))")
    else:
        advice = (f"mark it a leaf (fxrec.capture(..., leaf_modules=['{path}'])) or move the data-dependent "
                  f"control flow out of its forward (e.g. torch.where)" if path else
                  "move the data-dependent control flow out of forward (e.g. torch.where), or into a "
                  "submodule passed in fxrec.capture(..., leaf_modules=[...])")
    also = f"; torch.export fallback failed too: {_first_line(export_error)}" if export_error else ""
    if _meta_dense(model):
        advice += ("; the model is on the meta device, where operations that read tensor data "
                   "(after the lookups) cannot run: capture it on cpu")
    place = f"example_inputs do not run through {module}" if traced else f"in {module}"
    return CaptureError(f"cannot capture {type(model).__name__}: {place}{where}: "
                        f"{type(fx_error).__name__}: {_first_line(fx_error)}{also}".rstrip(".") + f". Fix: {advice}")


# ------------------------------------------------------------------ public API
def _warn_lost_backward_hooks(model: nn.Module, gm: torch.fx.GraphModule) -> None:
    """fx runs a traced-through submodule's forward hooks inline but cannot keep its backward
    hooks (they wrap the module call's tensors, and the call is gone): say which are lost.
    A module the program still calls (a leaf, a lookup module left dense) keeps its hooks."""
    called = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    lost = [path for path, m in model.named_modules() if path and path not in called
            and any(kind.startswith("backward") for kind in L.hooks_of(m))]
    if lost:
        warnings.warn(f"fxrec.capture: the backward hooks of module(s) {lost} do not run in the captured program "
                      f"(it traces through their forward, so there is no module call for them to wrap); register "
                      f"them on a leaf module, on the model itself, or on the tensors (Tensor.register_hook)",
                      stacklevel=3)


def _check_arguments(model: nn.Module, inputs: tuple, given) -> None:
    """Raise a CaptureError naming forward's parameters when `inputs` cannot be its arguments
    (before tracing, whose own error would be some tensor op failing on the wrong value)."""
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):  # a builtin or C++ forward: nothing to check against
        return
    try:
        signature.bind(*inputs)
    except TypeError as e:
        hint = ""
        if not isinstance(given, tuple):
            hint = (f"; example_inputs is one {type(given).__name__}, taken as forward's only argument: give a "
                    f"tuple of forward's arguments")
        raise CaptureError(f"example_inputs do not fit {type(model).__name__}.forward{signature}: {e}{hint}") \
            from None


def capture(model: nn.Module, example_inputs, *, leaf_modules: Iterable[Union[type, str]] = (),
            fallback: bool = True) -> torch.fx.GraphModule:
    """Capture `model` as a GraphModule computing what ``model(*example_inputs)`` does.

    The result takes the model's own arguments (lists and dicts included), shares the
    model's parameters, has every node stamped with provenance and shapes (module
    docstring), and ``gm.meta`` holds CAPTURED_BY ("fx" or "export"), CAPTURE_NOTE (why
    fx failed, when export was used) and PARAM_TABLES (parameter path -> table name).
    The model itself is left unchanged (buffers, RNG and autograd state). A model whose
    tables are on the meta device is captured too, no table being materialised: with its
    dense layers on a real device, each meta lookup yields zeros of the right shape on
    its ids' device (fxrec.passes.shapes), so the dense code runs for real; with them on
    meta as well, that code must read no tensor data.

    Raises CaptureError when neither fx nor (with `fallback`) torch.export captures it.
    """
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    _check_arguments(model, inputs, example_inputs)
    traced = False
    try:
        gm, note = _fx_capture(model, inputs, leaf_modules), None
        traced = True
        run_example(gm, inputs)  # a graph that cannot run its own example is not a capture
        by = "fx"
    except (CaptureError, ExampleIdError):  # a bad example is no reason to try torch.export
        raise
    except Exception as fx_error:
        if not fallback:
            raise _failure(model, fx_error, None, traced) from fx_error
        try:
            gm = _export_capture(model, inputs)
            run_example(gm, inputs)
        except Exception as export_error:
            raise _failure(model, fx_error, export_error, traced) from fx_error
        by, note = "export", f"{type(fx_error).__name__}: {_first_line(fx_error)}"
    _stamp(gm)
    L.carry_hooks(model, gm)  # fx traced forward, not __call__: the model's own hooks run around the program
    _warn_lost_backward_hooks(model, gm)
    gm.meta[L.CAPTURED_BY] = by
    gm.meta[L.CAPTURE_NOTE] = note
    gm.meta[L.PARAM_TABLES] = L.table_names_by_param(model)
    return gm


def find_tables(model: nn.Module, example_inputs, dense: dict | None = None) -> list:
    """The embedding tables `model` reads on `example_inputs`, as TableInfo in graph
    order (capture + detect_embeddings); ``dense``, when given, receives the looked-up
    tables left dense, with the reason (``gm.meta[DENSE_TABLES]``)."""
    from fxrec.passes.detect_embeddings import detect_embeddings_pass
    from fxrec.passes.lookup import DENSE_TABLES
    from fxrec.passes.runner import PassContext
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    ctx = PassContext(example_inputs=inputs)
    gm = capture(model, inputs)
    detect_embeddings_pass(gm, ctx)
    if dense is not None:
        dense.update(gm.meta.get(DENSE_TABLES, {}))
    return list(ctx.tables.values())
