"""Uniform views of the three kinds of FX graph awqfx reads.

A torch.export graph (aten ops, weights as ``get_attr``), a torch.compile/dynamo graph (torch
functions and methods, weights as placeholders) and a user's ``symbolic_trace`` graph
(``call_module`` leaves) spell the same computation differently. The passes never look at the
spelling: they ask this module what *kind* of op a node is (``op_name``), what parameter an
operand is (``param_of``), and what the concrete example values of its arguments are
(``concrete``). Everything here is a rule over ops and shapes, never over model or module names.
"""
from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensor

# -- op names -------------------------------------------------------------------------------

_MODULE_OPS: dict[type, str] = {
    nn.Linear: "linear",
    nn.LayerNorm: "layer_norm",
    nn.Dropout: "dropout",
    nn.Identity: "identity",
    nn.ReLU: "relu",
    nn.GELU: "gelu",
    nn.SiLU: "silu",
    nn.Tanh: "tanh",
    nn.Sigmoid: "sigmoid",
    nn.Embedding: "embedding",
}
if hasattr(nn, "RMSNorm"):
    _MODULE_OPS[nn.RMSNorm] = "rms_norm"

_BUILTIN_NAMES = {
    operator.mul: "mul", operator.imul: "mul", operator.truediv: "div", operator.itruediv: "div",
    operator.add: "add", operator.iadd: "add", operator.sub: "sub", operator.isub: "sub",
    operator.neg: "neg", operator.getitem: "getitem", operator.matmul: "matmul",
    operator.floordiv: "floordiv",
}


def op_name(gm: fx.GraphModule, node: fx.Node) -> str:
    """A spelling-independent op name: ``linear``, ``mul``, ``view``, ``scaled_dot_product_attention``...

    aten overloads lose their overload suffix (``aten.mul.Tensor`` -> ``mul``), custom ops keep
    only their op name (``transformers.grouped_mm_fallback`` -> ``grouped_mm_fallback``), methods
    and torch functions use their Python name, and ``call_module`` leaves map by module type.
    """
    if node.op == "call_method":
        return str(node.target)
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        for cls, name in _MODULE_OPS.items():
            if type(mod) is cls:
                return name
        return f"module:{type(mod).__name__}"
    if node.op != "call_function":
        return node.op
    target = node.target
    if target in _BUILTIN_NAMES:
        return _BUILTIN_NAMES[target]
    if isinstance(target, torch._ops.OpOverload):
        return target.overloadpacket.__name__.split("::")[-1]
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target.__name__.split("::")[-1]
    name = getattr(target, "__name__", str(target))
    return name.split(".")[-1]


# Ops that only move, copy or re-view data: applying them to a tensor of channel ids gives the
# channel map of their output. They may be applied to an int64 index tensor verbatim.
DATA_MOVEMENT = frozenset({
    "view", "reshape", "_unsafe_view", "flatten", "unflatten", "squeeze", "unsqueeze", "expand",
    "permute", "transpose", "t", "numpy_T", "swapaxes", "movedim", "slice", "narrow", "select",
    "split", "split_with_sizes", "chunk", "unbind", "getitem", "index", "index_select",
    "repeat", "repeat_interleave", "alias", "clone", "contiguous", "lift_fresh_copy", "detach",
    "view_as", "reshape_as", "expand_as", "T", "mT",
})
# Value-preserving casts and no-ops: the channel map passes through unchanged.
IDENTITY = frozenset({
    "to", "_to_copy", "type_as", "float", "double", "half", "bfloat16", "type", "dropout",
    "identity", "feature_dropout", "alpha_dropout", "_assert_tensor_metadata",
})
# Positively homogeneous elementwise ops: f(s*x) = s*f(x) for s > 0.
HOMOGENEOUS = frozenset({"relu", "neg", "leaky_relu", "relu_"})
# Ops whose result is metadata, not data: a channel flow into them changes nothing.
METADATA = frozenset({
    "sym_size", "size", "dim", "sym_numel", "numel", "sym_stride", "stride", "_assert_tensor_metadata",
    "_assert_scalar", "sym_constrain_range_for_size", "_log_api_usage_once", "is_floating_point",
    "is_contiguous", "get_device",
})
# Ops whose output feeds a discrete routing decision (MoE top-k): the linear before them is
# scaled with its group but not quantized.
ROUTING = frozenset({"topk", "sort", "argsort", "argmax", "argmin", "multinomial", "kthvalue"})
# Elementwise activations after which a scale node may be inserted.
ACTIVATIONS = frozenset({
    "gelu", "silu", "relu", "tanh", "sigmoid", "mish", "hardswish", "elu", "selu", "softplus",
    "gelu_", "silu_", "leaky_relu", "mul",  # mul: the last op of a composite GELU (GPT-2, Bloom)
})
# Ops that map each element on its own (given constant other operands): logit post-processing
# such as softcapping ``tanh(x / c) * c`` or logit scaling ``x * s`` keeps a linear an LM head.
ELEMENTWISE = ACTIVATIONS | HOMOGENEOUS | frozenset({
    "mul", "multiply", "div", "divide", "true_divide", "add", "sub", "rsub", "pow", "maximum", "minimum",
    "exp", "log", "abs", "sqrt", "rsqrt", "reciprocal", "square", "erf", "softcap", "clamp", "clamp_min",
    "clamp_max", "clip", "hardtanh", "nan_to_num",
})
ELEMENTWISE_LINEAR = frozenset({"linear"})
MATMULS = frozenset({"matmul", "mm", "bmm"})


def is_grouped_mm(name: str) -> bool:
    """MoE expert matmuls over 3-D weights (torch._grouped_mm, transformers' fallbacks)."""
    return "grouped_mm" in name or name in {"batched_mm"}


# -- parameters -----------------------------------------------------------------------------

_DYNAMO_PARAM = re.compile(r"^[Ll]_(?:self|args_0)_(.*)_$")


def dynamo_param_name(placeholder: str) -> str | None:
    """FQN of a parameter lifted by dynamo, parsed from its placeholder name (fallback only).

    ``L_self_modules_model_modules_layers_modules_0_modules_q_proj_parameters_weight_`` ->
    ``model.layers.0.q_proj.weight``. Ambiguous when a module name itself contains ``_modules_``;
    ``dynamo_param`` reads dynamo's source record instead whenever the graph carries it.
    """
    m = _DYNAMO_PARAM.match(placeholder)
    if not m:
        return None
    parts = re.split(r"(?:^|_)(?:modules|parameters|buffers)_", m.group(1))
    parts = [p for p in parts if p]
    return ".".join(parts) if parts else None


_MODULE_DICTS = frozenset({"_modules", "_parameters", "_buffers"})


def dynamo_source(node: fx.Node) -> Any | None:
    """Dynamo's record of where a placeholder's value comes from (a chain of attribute/item sources).

    ``node.meta["grapharg"]`` while dynamo builds the graph; dynamo drops it before calling a
    backend and leaves the same source on ``node._dynamo_source`` (pytorch/pytorch#141640).
    """
    grapharg = node.meta.get("grapharg")
    if grapharg is not None and getattr(grapharg, "source", None) is not None:
        return grapharg.source
    return getattr(node, "_dynamo_source", None)


def _source_steps(source: Any) -> list[str] | None:
    """Attribute/item steps from the compiled module down to ``source``; None if no module is on the chain.

    The chain runs leaf to root through ``.base``. Attribute sources give ``member``, item sources
    (``_modules['layers']``, ``ModuleList[0]``, ``_parameters['weight']``) give ``index``; the
    compiled module is what the root-most ``NNModuleSource`` wraps, so steps below it (``L['self']``,
    ``L['args'][0]``) are not part of the name.
    """
    from torch._dynamo.source import NNModuleSource  # loaded already when a graph has sources; costly otherwise

    chain = []
    while source is not None:
        chain.append(source)
        source = getattr(source, "base", None)
    roots = [i for i, s in enumerate(chain) if isinstance(s, NNModuleSource)]
    if not roots:
        return None
    steps = []
    for s in reversed(chain[:roots[-1]]):
        step = getattr(s, "member", None)
        if step is None:
            step = getattr(s, "index", None)
        if isinstance(step, (str, int)) and not isinstance(step, bool):
            steps.append(str(step))
    return steps


def dynamo_param(node: fx.Node) -> str | None:
    """FQN of the parameter a dynamo placeholder holds (None: an input, a buffer, or no source record).

    Parameter-ness comes from the example value dynamo recorded (an ``nn.Parameter``) when present,
    otherwise from the source reading the module's ``_parameters``.
    """
    steps = _source_steps(dynamo_source(node))
    if not steps:
        return None
    grapharg = node.meta.get("grapharg")
    example = getattr(grapharg, "example", None)
    is_param = isinstance(example, nn.Parameter) if example is not None else "_parameters" in steps
    if not is_param:
        return None
    return ".".join(s for s in steps if s not in _MODULE_DICTS)


@dataclass(frozen=True)
class ParamRef:
    """A parameter operand: its fully qualified name, the node that reads it, and how the op sees it.

    ``perm`` maps the op-side dims to the parameter's own dims (the operand may be a transpose
    of the parameter, as in ``x @ W.T`` or the MoE ``W.transpose(-2, -1)``).
    """

    name: str
    node: fx.Node
    perm: tuple[int, ...]
    offset: float = 0.0  # the operand is ``param + offset`` (Gemma's ``1 + w`` norms)


_TRANSPOSES = {"t", "numpy_T", "transpose", "permute", "T", "mT"}


def param_name(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """FQN if ``node`` reads a parameter (buffers and constants are not weights AWQ may rescale)."""
    if node.op == "get_attr":
        obj = fetch_attr(gm, node.target)
        return node.target if isinstance(obj, nn.Parameter) else None
    if node.op == "placeholder":
        if "awqfx_param" in node.meta:
            return node.meta["awqfx_param"]
        if dynamo_source(node) is not None:
            return dynamo_param(node)
        name = str(node.target)
        return dynamo_param_name(name) if "_parameters_" in name else None
    return None


def param_of(gm: fx.GraphModule, node: Any, allow_offset: bool = False) -> ParamRef | None:
    """If ``node`` is a parameter, possibly cast / transposed / offset by a constant, describe it."""
    if not isinstance(node, fx.Node):
        return None
    perm: list[int] | None = None
    offset = 0.0
    cur = node
    for _ in range(8):
        name = param_name(gm, cur)
        if name is not None:
            nd = len(shape_of(cur))
            p = tuple(range(nd)) if perm is None else tuple(perm)
            return ParamRef(name, cur, p, offset)
        if cur.op not in ("call_function", "call_method"):
            return None
        op = op_name(gm, cur)
        if op == "getattr" and len(cur.args) == 2 and cur.args[1] in ("T", "mT"):
            op = cur.args[1]  # dynamo spells ``W.T`` as getattr(W, "T")
        nd = len(shape_of(cur))
        if op in IDENTITY or op in {"alias", "clone", "contiguous", "lift_fresh_copy", "detach"}:
            cur = cur.args[0]
        elif op in _TRANSPOSES:
            src = cur.args[0]
            snd = len(shape_of(src))
            if op in {"t", "numpy_T", "T"}:
                step = list(reversed(range(snd)))
            elif op == "mT":
                step = list(range(snd - 2)) + [snd - 1, snd - 2]
            elif op == "transpose":
                d0, d1 = (int(concrete(a)) % snd for a in cur.args[1:3])
                step = list(range(snd))
                step[d0], step[d1] = step[d1], step[d0]
            else:
                dims = cur.args[1] if len(cur.args) == 2 and isinstance(cur.args[1], (list, tuple)) else cur.args[1:]
                step = [int(concrete(d)) % snd for d in dims]
            # op dim i of cur = src dim step[i]; compose with what we have so far
            perm = step if perm is None else [step[i] for i in perm]
            cur = src
        elif allow_offset and op in {"add", "sub"} and len(cur.args) == 2:
            a, b = cur.args
            const = b if not isinstance(b, fx.Node) else a if not isinstance(a, fx.Node) else None
            if not isinstance(const, (int, float)):
                return None
            if op == "sub" and const is a:
                return None  # c - w is not w + c
            offset += float(const) if op == "add" else -float(const)
            cur = b if const is a else a
        else:
            return None
        del nd
    return None


def fetch_attr(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


# -- shapes and example values --------------------------------------------------------------

def _hint(v: Any) -> Any:
    if isinstance(v, torch.SymInt):
        node = v.node
        hint = getattr(node, "hint", None)
        if hint is not None:
            return int(hint)
        # a data-dependent size (the tokens routed to one expert, from nonzero) has no example
        # value: the shape env's own stand-in for it, or 1
        return int(node.shape_env.optimization_hint(node.expr, fallback=1))
    if isinstance(v, torch.SymFloat):
        return float(v.node.hint) if v.node.hint is not None else float(v.node.shape_env.size_hint(v.node.expr))
    if isinstance(v, torch.SymBool):
        return bool(v.node.hint)
    return v


def example_value(node: fx.Node) -> Any:
    for key in ("val", "example_value"):
        if key in node.meta:
            return node.meta[key]
    tm = node.meta.get("tensor_meta")
    if tm is not None:
        return tm
    return None


def shape_of(node: Any) -> tuple[int, ...]:
    """Concrete shape of a node's example value (symbolic sizes replaced by their hints)."""
    if not isinstance(node, fx.Node):
        return tuple(torch.as_tensor(node).shape) if isinstance(node, torch.Tensor) else ()
    v = example_value(node)
    if v is None or not hasattr(v, "shape"):
        return ()
    return tuple(int(_hint(s)) for s in v.shape)


def traced_input_shape(node: fx.Node) -> tuple[int | None, ...] | None:
    """The shape a tracer fixed for a graph input: sizes of static dims, None for dynamic ones.

    None when the graph is shape-generic: its input has no traced (fake) value, e.g. a
    ``symbolic_trace`` graph whose example values were recorded by running it.
    """
    v = node.meta.get("val")
    if not isinstance(v, FakeTensor):
        return None
    return tuple(None if isinstance(s, torch.SymInt) else int(s) for s in v.shape)


def has_shapes(gm: fx.GraphModule) -> bool:
    """Whether the nodes carry example values (export/dynamo record them; symbolic_trace does not)."""
    calls = [n for n in gm.graph.nodes if n.op in ("call_function", "call_module", "call_method")]
    return bool(calls) and any(example_value(n) is not None for n in calls)


def concrete(arg: Any) -> Any:
    """An argument with every node replaced by its concrete example value (SymInts by hints)."""
    if isinstance(arg, fx.Node):
        v = example_value(arg)
        if isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            return _hint(v)
        return v
    if isinstance(arg, (list, tuple)):
        return type(arg)(concrete(a) for a in arg)
    if isinstance(arg, dict):
        return {k: concrete(v) for k, v in arg.items()}
    return _hint(arg)


def propagate_shapes(gm: fx.GraphModule, example_inputs: tuple) -> None:
    """Record example values on every node by running the graph once (for graphs without meta)."""

    class _Recorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            n.meta["val"] = out
            return out

    with torch.no_grad():
        _Recorder(gm).run(*example_inputs)


_DYNAMO_ROOT = re.compile(r"^L(?:\[[^\]]*\])+\.")  # dynamo's root of the compiled module: L['self']. or L['args'][0].


def node_path(gm: fx.GraphModule, node: fx.Node) -> str:
    """The owning module path of a node (from nn_module_stack), for display only."""
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        return _DYNAMO_ROOT.sub("", path.replace("L__self__.", ""))
    return node.name


def float_dtype(gm: nn.Module) -> torch.dtype | None:
    """The dtype of the module's first floating-point parameter (None: it has none)."""
    for p in gm.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


# -- linear-like ops ------------------------------------------------------------------------

@dataclass(frozen=True)
class LinearOp:
    """A linear-like op with a parameter weight: ``linear``, GPT-2 ``addmm``, ``x @ W.T``, MoE grouped mm."""

    node: fx.Node
    data: fx.Node  # the activation operand
    weight: ParamRef
    in_dim: int  # parameter dim contracted with the activation's last dim
    out_dim: int  # parameter dim that becomes the output's last dim
    bias: ParamRef | None


def linear_op(gm: fx.GraphModule, node: fx.Node) -> LinearOp | None:
    if node.op not in ("call_function", "call_method"):
        return None
    name = op_name(gm, node)
    args = list(node.args)
    if name == "linear" and len(args) >= 2:
        w = param_of(gm, args[1])
        b = args[2] if len(args) > 2 else node.kwargs.get("bias")
        if w is None or len(w.perm) != 2:
            return None
        bias = param_of(gm, b) if isinstance(b, fx.Node) else None
        if isinstance(b, fx.Node) and bias is None:
            return None
        return LinearOp(node, args[0], w, w.perm[1], w.perm[0], bias)
    if name == "addmm" and len(args) >= 3:
        w = param_of(gm, args[2])
        bias = param_of(gm, args[0])
        if w is None or bias is None or len(w.perm) != 2:
            return None
        return LinearOp(node, args[1], w, w.perm[0], w.perm[1], bias)
    if (name in MATMULS or is_grouped_mm(name)) and len(args) >= 2:
        w = param_of(gm, args[1])
        if w is None or len(w.perm) < 2 or not isinstance(args[0], fx.Node):
            return None
        if param_name(gm, args[0]) is not None:
            return None
        nd = len(w.perm)
        return LinearOp(node, args[0], w, w.perm[nd - 2], w.perm[nd - 1], None)
    return None


def linear_table(gm: fx.GraphModule) -> tuple[dict[str, tuple[str, str, int]], dict[str, str]]:
    """``(weight -> (node, data node, in_dim), linear node -> data node)`` for every linear-like op."""
    linears: dict[str, tuple[str, str, int]] = {}
    data_of: dict[str, str] = {}
    for n in gm.graph.nodes:
        lin = linear_op(gm, n)
        if lin is None:
            continue
        data_of[n.name] = lin.data.name
        linears.setdefault(lin.weight.name, (n.name, lin.data.name, int(lin.in_dim)))
    return linears, data_of


def shallow_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule with its own graph and module containers whose tensors are *shared* with
    ``gm`` (read-only use, or replaced via ``awqfx.params.set_param``: never written into)."""
    g = fx.Graph()
    out = g.graph_copy(gm.graph, {})
    g.output(out)
    return fx.GraphModule(gm, g)
