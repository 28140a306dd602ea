"""torch.export's graphs as torch graphs: the ATen ops the fold rules know, rewritten into their torch forms.

``ep.module()`` gives an ExportedProgram back as a GraphModule whose weights
are attributes again, under their state-dict names. :func:`as_torch` rewrites,
in that copy, the ATen ops the fold rules know into the torch forms the fx
matchers read:

* a Linear or convolution whose weights no other op reads becomes a call of
  a real ``nn.Linear`` / ``nn.ConvNd`` holding the same parameters, at the
  path the weights had (``blocks.0.attn.qkv``), so a folded weight keeps its
  name; any other (a weight read twice, or computed: PEFT's LoHa ``ΔW``)
  becomes ``F.linear`` / ``F.convNd``;
* elementwise arithmetic, views and reshapes, permutes, slices, cat, pads,
  rolls, dropout, clone and same-dtype casts become the functions and
  methods they stand for; core ATen's spellings (``addmm(b, x, t(W))``,
  ``convolution``, ``_native_batch_norm_legit_no_training``) too;
* an in-place ``add_`` / ``sub_`` / ``mul_`` / ``div_`` into a new value that
  nothing else reads (timm's ``out += branch(x)``) becomes the out-of-place
  op it computes, as torch.fx traces ``+=`` on a proxy;
* the exporter's own dtype checks of casts (``_assert_tensor_metadata``) are
  dropped: exporting again writes them for the casts that stay.

Both forms compute the same thing. The fold then runs on that graph as on
any fx graph (``repfold.frontends.export`` exports the result again). An op
the table does not know is left as it is: it ends a region, as any op the
rules do not know does. :func:`training_ops` finds the ops of an exported
graph that run in training mode.
"""

from __future__ import annotations

import functools
import operator

import torch
from torch import fx, nn
from torch.nn import functional as F

from repfold.core import graph as _graph
from repfold.frontends.writes import ALIAS, as_method, aten_writes_self, index_assignments


@functools.cache
def _functions() -> dict:
    aten = torch.ops.aten
    return {
        aten.add.Tensor: operator.add, aten.sub.Tensor: operator.sub, aten.mul.Tensor: operator.mul,
        aten.div.Tensor: operator.truediv, aten.add.Scalar: operator.add, aten.sub.Scalar: operator.sub,
        aten.mul.Scalar: operator.mul, aten.div.Scalar: operator.truediv, aten.neg.default: operator.neg,
        aten.cat.default: torch.cat, aten.flatten.using_ints: torch.flatten, aten.dropout.default: F.dropout,
        aten.pad.default: F.pad, aten.constant_pad_nd.default: F.pad, aten.roll.default: torch.roll,
        aten.matmul.default: torch.matmul,
    }


_SCALED = {torch.ops.aten.add.Scalar, torch.ops.aten.sub.Scalar}  # ``alpha`` is positional there


@functools.cache
def _methods() -> dict:
    aten = torch.ops.aten
    return {
        aten.view.default: "view", aten.reshape.default: "reshape", aten._unsafe_view.default: "reshape",
        aten.permute.default: "permute", aten.transpose.int: "transpose", aten.clone.default: "clone",
        aten.alias.default: "clone", aten.expand.default: "expand", aten.unsqueeze.default: "unsqueeze",
        aten.squeeze.dim: "squeeze", aten.t.default: "t", aten.contiguous.default: "contiguous",
        aten.reshape_as.default: "reshape_as", aten.view_as.default: "view_as",
        # reads of a value's shape, dtype and device only (Swin's attention mask: ``x.new_zeros``)
        aten.sym_size.int: "size", aten.new_zeros.default: "new_zeros", aten.new_ones.default: "new_ones",
        aten.new_empty.default: "new_empty",
    }


# methods whose ATen keyword arguments the Tensor method takes as they are (``expand``'s ``implicit`` it does not)
_METHOD_KWARGS = {"clone", "contiguous", "new_zeros", "new_ones", "new_empty"}


@functools.cache
def _layers() -> dict:
    aten = torch.ops.aten
    return {aten.linear.default: 0, aten.conv1d.default: 1, aten.conv2d.default: 2, aten.conv3d.default: 3,
            aten.conv1d.padding: 1, aten.conv2d.padding: 2, aten.conv3d.padding: 3}


def as_torch(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite, in place, the ATen ops of ``gm`` that the fold rules know into their torch forms; first drop
    an attention mask that masks nothing (:func:`_drop_trivial_masks`) and the ATen ops that write nothing
    and whose results nobody reads (:func:`_drop_dead`)."""
    aten = torch.ops.aten
    aten_calls = [n for n in gm.graph.nodes if n.op == "call_function" and hasattr(n.target, "_schema")]
    if not aten_calls:
        return gm  # a torch.fx trace: nothing to rewrite (and no code to generate again)
    _drop_trivial_masks(gm)
    _drop_dead(gm)
    alive = set(gm.graph.nodes)
    aten_calls = [n for n in aten_calls if n in alive]
    readers = {n.target: len(n.users) for n in gm.graph.nodes if n.op == "get_attr"}
    fresh = {n for n in gm.graph.nodes if _makes_new(n)}  # (before any target is rewritten)
    for n in aten_calls:
        t = n.target
        if t in (aten.addmm.default, aten.mm.default, aten.convolution.default):  # core ATen's spellings
            t = _as_layer_call(gm, n)
        if t in _layers():
            rank = _layers()[t]
            if not _to_module(gm, n, rank, readers) and not n.kwargs:
                # weights read elsewhere too (tied, or one module called twice), or computed (PEFT's LoHa ΔW)
                n.target = (F.linear, F.conv1d, F.conv2d, F.conv3d)[rank]
        elif t in (aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default):
            _batch_norm_module(gm, n, readers)
        elif t in _functions() and not n.kwargs and not (t in _SCALED and len(n.args) > 2):
            if t is aten.constant_pad_nd.default:  # (x, pad, value=0)
                n.args = (n.args[0], n.args[1], "constant", n.args[2] if len(n.args) > 2 else 0.0)
            n.target = _functions()[t]
        elif t in _methods() and (not n.kwargs or _methods()[t] in _METHOD_KWARGS):
            if t is aten.alias.default:  # read as the identity it is; written back as a view after a fold
                n.meta[ALIAS] = True
            n.op, n.target = "call_method", _methods()[t]
        elif t is aten._assert_tensor_metadata.default and not n.users:
            gm.graph.erase_node(n)  # the exporter's check of a ``.to()``: exporting again writes it where one stays
        elif t in (aten.to.dtype, aten._to_copy.default) and _same_dtype(n):
            n.op, n.target, n.args, n.kwargs = "call_method", "to", (n.args[0], n.meta["val"].dtype), {}
        elif t in (aten.zeros_like.default, aten.ones_like.default, aten.empty_like.default):
            n.target = getattr(torch, t.__name__.partition(".")[0])
        elif t in (aten.slice.Tensor, aten.select.int):
            _to_getitem(n)
        elif t in _in_place() and _private_write(n, fresh):
            n.target = _in_place()[t]  # ``out += y`` into a value nothing else reads: the sum it computes
            fresh.add(n)
        elif aten_writes_self(t):
            as_method(n)
    index_assignments(gm)  # (after every slice is an index: a chain's links are all rewritten)
    for n in list(gm.graph.nodes):  # reads nothing uses (``ep.module()`` reads each num_batches_tracked so)
        if n.op == "get_attr" and not n.users:  # would keep a folded BatchNorm's tensors in the program
            gm.graph.erase_node(n)
    _rename_lifted(gm)
    gm.graph.lint()
    gm.recompile()
    return gm


def _pure(n: fx.Node) -> bool:
    """An ATen call whose schema writes nothing, that draws no random numbers and that fx does not count as
    a side effect (asserts), or an item of one's results."""
    t = n.target
    if n.op != "call_function":
        return False
    if t is operator.getitem:
        return isinstance(n.args[0], fx.Node) and _pure(n.args[0])
    if not isinstance(t, torch._ops.OpOverload) or t._schema.is_mutable:
        return False
    return torch.Tag.nondeterministic_seeded not in t.tags and not n.is_impure()


def _drop_trivial_masks(gm: fx.GraphModule) -> None:
    """An attention mask that masks nothing, computed from constants alone, as no mask (and the ops that
    computed it, which nothing else reads, gone).

    Under torch.export Hugging Face models build a bidirectional mask even when they are given none
    (``arange(n) >= 0``, expanded: every position allowed), which they skip when traced by ``jit.trace``:
    exported again, that mask cost 2 IsNaN, 2 Add and 2 Where over the base model's own export. A boolean
    mask all True, or an additive one all zeros, gives every score its weight as no mask does: exact."""
    sdpa = torch.ops.aten.scaled_dot_product_attention.default
    calls = [n for n in gm.graph.nodes if n.target is sdpa]
    order = {n: k for k, n in enumerate(gm.graph.nodes)} if calls else {}
    for n in calls:
        mask = n.args[3] if len(n.args) > 3 else n.kwargs.get("attn_mask")
        if not isinstance(mask, fx.Node):
            continue
        made = sorted(_graph.upstream(mask, lambda m: m.all_input_nodes), key=order.__getitem__)
        value = _constant(made)
        if not isinstance(value, torch.Tensor) or not (
                value.dtype == torch.bool and bool(value.all()) or value.is_floating_point() and not bool(value.any())):
            continue
        if len(n.args) > 3:
            n.args = (*n.args[:3], None, *n.args[4:])
        else:
            n.kwargs = {**n.kwargs, "attn_mask": None}
        for m in reversed(made):  # what computed it, where nothing else reads it now
            if not m.users:
                gm.graph.erase_node(m)


def _constant(made: list[fx.Node], limit: int = 64):
    """The value of the last of ``made`` (a node and all it reads, in graph order) where :func:`_pure` ATen
    ops compute it from no input, parameter or buffer (at most ``limit`` of them); else None."""
    if len(made) > limit or not all(_pure(m) for m in made):
        return None
    env: dict[fx.Node, object] = {}
    try:
        with torch.no_grad():
            for m in made:
                env[m] = m.target(*fx.node.map_arg(m.args, env.__getitem__), **fx.node.map_arg(m.kwargs, env.__getitem__))
    except Exception:  # noqa: BLE001 (not computable here: not a constant)
        return None
    return env[made[-1]]


def _drop_dead(gm: fx.GraphModule) -> None:
    """Erase the ATen ops that write nothing and whose results nobody reads, and the weights only they read.

    torch.export keeps such ops (YOLOv10's one-to-many head, which its export mode no longer returns:
    24 convs), while the model's own merge (ultralytics' ``fuse()``) drops them and so do torch's compilers.
    Only ATen operators go, and only those :func:`_pure` clears: their schema says whether they write. A
    Python-level op or a module call may write without saying so (``x[..., 1:] += y``), so a torch.fx trace
    is never pruned (DESIGN: no dead-code pass on a user's graph)."""
    read_before = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for n in reversed(list(gm.graph.nodes)):
        if not n.users and (_pure(n) or n.op == "get_attr"):
            gm.graph.erase_node(n)
    read_now = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for target in read_before - read_now:
        owner, _, name = target.rpartition(".")
        holder = gm.get_submodule(owner) if owner else gm
        if name in holder._parameters or name in holder._buffers:
            holder._parameters.pop(name, None)
            holder._buffers.pop(name, None)


def _rename_lifted(gm: fx.GraphModule) -> None:
    """The constants torch.export lifted (``attn.lifted_tensor_9``: a ``torch.tensor([1, 3])`` in a forward)
    under names of their own (``attn.repfold_const_9``). Exported again under the old names, they clash with
    the constants the new export lifts (``ep.module()`` of it raises "`lifted_tensor_9` is not a buffer", so
    the dynamo ONNX exporter and ``run_decompositions()`` fail on the graph insert returns)."""
    renamed: dict[str, str] = {}
    for n in gm.graph.nodes:
        owner, _, name = n.target.rpartition(".") if n.op == "get_attr" else ("", "", "")
        if n.target in renamed:  # another read of one already renamed
            n.target = renamed[n.target]
        if not name.startswith("lifted_tensor_") or n.target in renamed.values():
            continue
        holder = gm.get_submodule(owner) if owner else gm
        if isinstance(holder._buffers.get(name), torch.Tensor) or name not in holder.__dict__:
            continue  # a buffer, or an attribute of another kind: left as it is
        new = name.replace("lifted_tensor_", "repfold_const_", 1)
        while hasattr(holder, new):
            new += "_"
        setattr(holder, new, holder.__dict__.pop(name))
        path = f"{owner}.{new}" if owner else new
        renamed[n.target] = path
        n.target = path


def _as_layer_call(gm: fx.GraphModule, n: fx.Node):
    """Core ATen's ``addmm(b, x, t(W))`` / ``mm(x, t(W))`` as ``aten.linear(x, W, b)``, and its
    ``convolution`` (not transposed) as ``aten.convNd``; the new target, or the old one if neither."""
    aten = torch.ops.aten
    if n.target is aten.convolution.default:
        x, w, b, stride, padding, dilation, transposed, _, groups = n.args
        rank = len(w.meta["val"].shape) - 2 if isinstance(w, fx.Node) and "val" in w.meta else None
        if transposed or rank not in (1, 2, 3) or n.kwargs:
            return n.target
        n.target = (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default)[rank - 1]
        n.args = (x, w, b, stride, padding, dilation, groups)
        return n.target
    b, x, wt = n.args if n.target is aten.addmm.default else (None, *n.args)
    transposed = isinstance(wt, fx.Node) and len(wt.users) == 1 and (  # (already rewritten as a method, or not)
        wt.target in (aten.t.default, "t") and len(wt.args) == 1
        or wt.target in (aten.permute.default, "permute") and len(wt.args) == 2 and list(wt.args[1]) == [1, 0])
    if n.kwargs or not transposed or not isinstance(wt.args[0], fx.Node) or wt.args[0].op != "get_attr":
        return n.target
    n.target, n.args = aten.linear.default, (x, wt.args[0], b)
    gm.graph.erase_node(wt)
    return n.target


def _batch_norm_module(gm: fx.GraphModule, n: fx.Node, readers: dict[str, int]) -> None:
    """An eval-mode batch norm whose statistics and affine only it reads, as a call of a real
    ``nn.BatchNormNd`` at their path (its output node, for the tuple form, replaces the first item)."""
    aten = torch.ops.aten
    if n.target is aten.batch_norm.default:
        x, w, b, mean, var, training, momentum, eps = n.args[:8]
        out = n
    else:
        x, w, b, mean, var, momentum, eps = n.args
        training = False
        firsts = [u for u in n.users if u.target is operator.getitem and u.args[1] == 0]
        if len(firsts) != len(n.users) or not firsts:
            return
        out = firsts[0]
    attrs = (w, b, mean, var)
    if training or not all(isinstance(a, fx.Node) and a.op == "get_attr" and readers.get(a.target) == 1
                            for a in attrs) or "val" not in x.meta:
        return
    path = w.target.rpartition(".")[0]
    if [a.target for a in attrs] != [f"{path}.{k}" for k in ("weight", "bias", "running_mean", "running_var")]:
        return
    holder = gm.get_submodule(path)
    if type(holder) is not nn.Module or set(holder._parameters) != {"weight", "bias"} or holder._modules:
        return
    rank = x.meta["val"].dim()
    cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}.get(rank)
    if cls is None:
        return
    if not {"running_mean", "running_var"} <= set(holder._buffers):
        return
    layer = cls(holder.weight.shape[0], eps=eps, momentum=momentum, device=holder.weight.device).eval()
    layer.weight, layer.bias = holder.weight, holder.bias
    for k in ("running_mean", "running_var", "num_batches_tracked"):
        if k in holder._buffers:
            layer._buffers[k] = holder._buffers[k]
    parent, _, last = path.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, last, layer)
    with gm.graph.inserting_after(out):
        new = gm.graph.call_module(path, (x,))
    new.meta = dict(out.meta)
    out.replace_all_uses_with(new)
    for dead in [*([u for u in n.users] if out is not n else []), n, *attrs]:
        if not dead.users:
            gm.graph.erase_node(dead)


@functools.cache
def _in_place() -> dict:
    aten = torch.ops.aten
    return {aten.add_.Tensor: operator.add, aten.sub_.Tensor: operator.sub, aten.mul_.Tensor: operator.mul,
            aten.div_.Tensor: operator.truediv}


def _makes_new(n: fx.Node) -> bool:
    """Whether ``n`` is an ATen call whose results are new tensors (no view or in-place write of an input),
    or an item of such a call's tuple (BatchNorm's ``_native_batch_norm_legit_no_training``)."""
    if n.op != "call_function":
        return False
    if n.target is operator.getitem and isinstance(n.args[0], fx.Node):
        n = n.args[0]
    schema = getattr(n.target, "_schema", None)
    return schema is not None and bool(schema.returns) and all(r.alias_info is None for r in schema.returns)


def _private_write(n: fx.Node, fresh: set[fx.Node]) -> bool:
    """Whether the in-place ``aten.add_(a, b)`` (``sub_``, ``mul_``, ``div_``) writes into a new tensor ``a``
    that nothing else reads, with the dtype and shape ``a + b`` has: timm's ``out += conv(x)`` (FastViT's
    MobileOne branches, as torch.export writes them). The write is then the out-of-place op it computes,
    which the fold rules know (torch.fx traces ``+=`` on a proxy so); another write (into an input, a
    weight, a view, a value read again) stays as it is."""
    if len(n.args) != 2 or n.kwargs:
        return False
    a, b = n.args
    if not isinstance(a, fx.Node) or a not in fresh or len(a.users) != 1:
        return False
    va, vn = a.meta.get("val"), n.meta.get("val")
    vb = b.meta.get("val") if isinstance(b, fx.Node) else b
    if not isinstance(va, torch.Tensor) or not isinstance(vn, torch.Tensor) or vb is None:
        return False
    try:
        out = torch.result_type(va, vb)
    except (TypeError, RuntimeError):
        return False
    return out == va.dtype == vn.dtype and tuple(va.shape) == tuple(vn.shape) and (
        not isinstance(vb, torch.Tensor) or vb.dim() <= va.dim())


def _same_dtype(n: fx.Node) -> bool:
    """A cast to the dtype, device and layout its input has already (PEFT casts each LoRA input so)."""
    x, val = n.args[0], n.meta.get("val")
    src = x.meta.get("val") if isinstance(x, fx.Node) else None
    keys = set(n.kwargs) - {"dtype", "non_blocking", "copy", "memory_format"}
    return src is not None and val is not None and not keys and (val.dtype, val.device, val.shape) == (
        src.dtype, src.device, src.shape)


def _to_getitem(n: fx.Node) -> None:
    """``aten.slice`` / ``aten.select`` as the indexing they stand for."""
    x = n.args[0]
    val = x.meta.get("val") if isinstance(x, fx.Node) else None
    if val is None:
        return
    if n.target is torch.ops.aten.select.int:
        dim, index = n.args[1], n.args[2]
        key = index
    else:
        dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
        start = n.args[2] if len(n.args) > 2 else n.kwargs.get("start")
        end = n.args[3] if len(n.args) > 3 else n.kwargs.get("end")
        step = n.args[4] if len(n.args) > 4 else n.kwargs.get("step", 1)
        key = slice(start, end, step)
    bounds = (key.start, key.stop, key.step) if isinstance(key, slice) else (key,)
    if any(isinstance(a, fx.Node) for a in (dim, *bounds)):  # symbolic: left to fx as the op it is
        return
    dim %= val.dim()
    n.target, n.args, n.kwargs = operator.getitem, (x, (slice(None),) * dim + (key,)), {}


def _to_module(gm: fx.GraphModule, n: fx.Node, rank: int, readers: dict[str, int]) -> bool:
    """A Linear / convolution call whose weights only it reads, as a call of a real layer at their path;
    whether it became one."""
    args = list(n.args) + [None] * (7 - len(n.args))
    x, w, b = args[0], args[1], args[2]
    if not all(a is None or isinstance(a, fx.Node) and a.op == "get_attr" and readers.get(a.target) == 1
               for a in (w, b)) or w is None:
        return False
    path, _, wname = w.target.rpartition(".")
    if b is not None and b.target != f"{path}.bias" or wname != "weight" or not path:
        return False
    holder = gm.get_submodule(path)
    if type(holder) is not nn.Module or set(holder._parameters) != ({"weight", "bias"} if b is not None
                                                                     else {"weight"}) \
            or holder._buffers or holder._modules:
        return False
    weight = holder.weight
    if rank == 0:
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=b is not None, device="meta")
    else:
        stride, padding, dilation, groups = (args[3] or 1), (args[4] if args[4] is not None else 0), \
            (args[5] or 1), (args[6] or 1)
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[rank - 1]
        layer = conv(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]), stride=stride,
                     padding=padding, dilation=dilation, groups=groups, bias=b is not None, device="meta")
    layer.weight = weight
    if b is not None:
        layer.bias = holder.bias
    parent, _, last = path.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, last, layer)
    n.op, n.target, n.args, n.kwargs = "call_module", path, (x,), {}
    for a in (w, b):
        if a is not None and not a.users:
            gm.graph.erase_node(a)
    return True


def training_ops(graph: fx.Graph) -> list[str]:
    """The ops of an exported graph that behave as in training mode (dropout on, batch statistics)."""
    aten = torch.ops.aten
    flag = {  # op -> the position of its "training" argument (None: random whatever the mode)
        aten.dropout.default: 2, aten.feature_dropout.default: 2, aten.native_dropout.default: 2,
        aten.batch_norm.default: 5, aten._native_batch_norm_legit.default: 5,
        aten._native_batch_norm_legit_functional.default: 5, aten.bernoulli.p: None, aten.bernoulli.default: None,
    }
    found = []
    for n in graph.nodes:
        if n.op == "call_function" and n.target in flag:
            at = flag[n.target]
            if at is None or len(n.args) > at and n.args[at]:
                found.append(n.name)
    return found
