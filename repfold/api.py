"""The public entry points: ``fold``, ``save_adapters`` and ``load_adapters``."""

from __future__ import annotations

import copy
import json
import logging
import os
import warnings
from collections import Counter
from pathlib import Path
from typing import TypeVar

import torch
from torch import fx, nn

from repfold.adapters.insert import PREFIX, insert
from repfold.frontends.trace import META_KEY, has_submodule, recorded_inputs, set_module, to_graph_module

log = logging.getLogger("repfold")

Model = TypeVar("Model")


def fold(
    model: Model,
    *,
    example_inputs=None,
    scales: bool = True,
    leaf_modules=(),
    leaf_functions=(),
    return_report: bool = False,
    into: nn.Module | None = None,
    graph: bool = False,
    inplace: bool = False,
):
    """Fold every adapter region into its neighbouring layer; returns a new model of the same kind.

    ``model`` may be an ``nn.Module``, an ``fx.GraphModule`` (what ``insert``
    returns), a ``torch.export.ExportedProgram``, an ``onnx.ModelProto``, or
    the path of an ``.onnx`` file (the result is an ``onnx.ModelProto``). The
    input is never modified. Regions are found by algebra; those that cannot
    fold exactly and at no extra cost are kept and explained in the report,
    which ``return_report=True`` returns as ``(model, report)``.

    An ``nn.Module`` of the user's class (a PEFT or Hugging Face model, a timm
    or ultralytics model, one with adapter modules of its own) is folded into
    a copy of its own class, as PEFT's ``merge_and_unload`` and timm's
    ``reparameterize_model`` do: layers re-weighted, submodules whose ops all
    folded replaced by identities, a scope left with a chain of its own layers
    (a PEFT tuner layer, a RepVGG block) replaced by them, a PEFT model
    unwrapped to its ``get_base_model()``; the copy is run once on the example
    inputs against the folded graph (``report.into_error``). An op written in
    a forward's own code (``x * self.gamma``, an adapter spelled inline)
    cannot be removed by module edits: it stays, cut off from every region
    (what is around it still folds); a region that then does not fold is
    reported kept with that reason, and warned about when it is an adapter.
    ``graph=True`` returns the folded ``torch.fx.GraphModule`` instead, with
    every region that folds folded, forward code included.

    ``example_inputs`` shapes the fx graph; it defaults to inputs like those
    ``insert`` recorded (shapes and dtypes: token ids stay integers), then to
    the input size the model declares (``image_size`` / ``img_size``, timm's
    ``patch_embed.img_size``, a Hugging Face ``config.image_size``), then to
    timm's ``pretrained_cfg['input_size']``.
    Regions made only of per-channel scales and shifts (SSF, IA3, LayerScale,
    eval-mode BatchNorm) fold too, into a neighbouring layer, wherever that is
    exact: so the folded model may have fewer operators than the model had
    before its adapters, never more. ``scales=False`` takes those as the
    model's own and leaves them alone (folding only regions with layers).
    ``leaf_modules`` (classes) and ``leaf_functions`` are kept whole when
    tracing a model torch.fx cannot trace through.

    A module that holds graphs ``insert`` made (``model.backbone =
    insert(model.backbone, ...)``, for a detector whose post-processing
    neither tracer takes) is folded part by part: each such graph with the
    inputs ``insert`` recorded, put back into a copy of the model, of its own
    class, the rest of the model as it is; the report names the parts.

    ``into``: the module ``model`` was made from (``gm = insert(model, ...)``,
    then ``fold(gm, into=model)`` after training): the result is then a copy
    of ``into``, of its own class, holding the fold as module edits (layers
    re-weighted, submodules whose ops all folded replaced by ``nn.Identity``,
    a wrapper left with one layer replaced by that layer), run once on the
    example inputs against the folded graph. Where an adapter did not fold,
    or the class cannot hold the fold, it raises ``ValueError`` with the reason.

    ``inplace=True`` (as timm's ``reparameterize_model(model, inplace=True)``;
    what PEFT's ``merge_and_unload`` always does) edits the given module and
    returns it: each re-weighted layer's new values are written into its own
    tensors a block of rows at a time, so the fold adds one layer's working
    set to the memory the model holds, not a copy of it (a 6B-parameter model
    folds where two copies would not fit). A GraphModule stays one (its graph
    and modules replaced by the folded ones), a module of the user's class is
    edited as its copy would be (``into=model``: ``model`` itself). The graph
    ``insert`` returns shares the frozen weights of the model it was made
    from, so an in-place fold writes the folded values into that model's
    tensors too: fold into it (``fold(gm, into=model, inplace=True)``), or do
    not use it unfolded afterwards.
    """
    if inplace and not isinstance(model, nn.Module):
        raise TypeError("inplace=True edits an nn.Module (a GraphModule insert made, or a model of its own "
                        f"class); a {type(model).__name__} folds into a new one")
    if inplace and graph and not isinstance(model, fx.GraphModule):
        raise TypeError("inplace=True keeps the model's own class: graph=True would need a new GraphModule")
    own = isinstance(model, (str, os.PathLike))
    if own:  # read a field at a time (the file is never held twice), then its external data
        from onnx.external_data_helper import load_external_data_for_model

        from repfold.frontends.onnx_io import read_model

        path = os.fspath(model)
        model = read_model(path)
        load_external_data_for_model(model, os.path.dirname(os.path.abspath(path)))
    if into is not None and not (isinstance(model, nn.Module) and isinstance(into, nn.Module)):
        raise TypeError("into= takes the nn.Module a module or GraphModule was made from (fold(gm, into=model))")
    if isinstance(model, torch.export.ExportedProgram):
        from repfold.frontends.export import fold_export

        out, report = fold_export(model, scales=scales)
    elif isinstance(model, nn.Module) and (parts := _parts(model)):
        if inplace:
            raise TypeError("inplace=True folds a module traced whole; this one holds graphs made by insert, "
                            "folded part by part into a copy of the model")
        if into is not None:
            raise TypeError("into= takes a module folded whole; this one holds graphs made by insert, folded part "
                            "by part into the model itself")
        out, report = _fold_parts(model, parts, scales=scales)
    elif isinstance(model, nn.Module):
        from repfold.frontends.fx import fold_fx

        if model.training:
            warnings.warn(
                "repfold.fold: the model is in training mode; it is folded as if in eval mode (dropout off, "
                "BatchNorm running statistics)", UserWarning, stacklevel=2,
            )
        out, report = fold_fx(model, example_inputs, scales=scales, leaf_modules=leaf_modules,
                              leaf_functions=leaf_functions, into=into, inplace=inplace,
                              own_class=into is None and not graph and not isinstance(model, fx.GraphModule))
        out.train(False)
    elif type(model).__name__ == "ModelProto":
        from repfold.frontends.onnx import fold_onnx

        out, report = fold_onnx(model, scales=scales, own=own)
    else:
        raise TypeError(f"fold takes an nn.Module, a torch.export.ExportedProgram, an onnx.ModelProto or a path, "
                        f"not {type(model).__name__}")
    log.info("%s", report)
    return (out, report) if return_report else out


def _parts(model: nn.Module) -> list[str]:
    """The paths of the outermost graphs ``insert`` made inside ``model`` (``model.backbone =
    insert(model.backbone, ...)``), when ``model`` is not one itself; else none."""
    if _inserted(model):
        return []
    found: list[str] = []
    for path, m in model.named_modules():
        if path and _inserted(m) and not any(path.startswith(p + ".") for p in found):
            found.append(path)
    return found


def _inserted(m: nn.Module) -> bool:
    return isinstance(m, fx.GraphModule) and META_KEY in getattr(m, "meta", {})


def _fold_parts(model: nn.Module, parts: list[str], *, scales: bool):
    """A model that holds graphs made by ``insert`` at ``parts`` (a detector whose backbone alone traces): each
    such graph folded with the inputs ``insert`` recorded and put back into a copy of the model, of its own
    class; the rest of the model is left as it is. One report for all, its regions named by part."""
    from repfold.frontends.fx import fold_fx, n_params
    from repfold.report import FoldReport

    # the copy takes the folded parts in place of the adapted ones: those are not copied first
    own = copy.deepcopy(model, {id(model.get_submodule(p)): nn.Identity() for p in parts})
    report = FoldReport("fx, in parts", params_before=n_params(model), parts=parts)
    before, after = Counter(), Counter()
    for path in parts:
        folded, sub = fold_fx(model.get_submodule(path), None, scales=scales)
        folded.train(False)
        set_module(own, path, folded)
        for r in sub.regions:
            r.source = f"{path}: {r.source}"
            report.regions.append(r)
        report.unseen += [f"{path}: {u}" for u in sub.unseen]
        before.update(sub.ops_before)
        after.update(sub.ops_after)
    report.ops_before, report.ops_after = dict(before), dict(after)
    own.train(False)
    report.params_after = n_params(own)
    return own, report


def _adapter_state(gm: nn.Module) -> dict[str, torch.Tensor]:
    return {
        k: v.detach().cpu().contiguous()
        for k, v in gm.state_dict().items()
        if k.startswith(PREFIX + ".")
    }


def save_adapters(model: nn.Module, path: str | os.PathLike) -> None:
    """Write only the adapters' weights (and how they were inserted) to a safetensors file.

    ``model`` is what ``insert`` returned: a GraphModule, or the user's model with adapted parts (a
    detector whose backbone took them); the file then names the parts (``backbone.repfold_adapters...``).
    """
    from safetensors.torch import save_file

    parts = _parts(model)
    if parts:
        state = {f"{p}.{k}": v for p in parts for k, v in _adapter_state(model.get_submodule(p)).items()}
        meta = {"parts": {p: _insert_record(model.get_submodule(p)) for p in parts}}
    else:
        state, meta = _adapter_state(model), _insert_record(model)
    if not state:
        raise ValueError("this model has no repfold adapters to save")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(state, str(tmp), metadata={META_KEY: json.dumps(meta)})
    os.replace(tmp, path)


def _insert_record(gm: nn.Module) -> dict:
    """How ``insert`` made ``gm``; which weights it froze is about this live model, not the file."""
    return {k: v for k, v in getattr(gm, "meta", {}).get(META_KEY, {}).items() if k != "frozen"}


def load_adapters(model: nn.Module, path: str | os.PathLike, *, example_inputs=None) -> nn.Module:
    """``model`` with the adapters saved at ``path``, as ``insert`` returned it: a new GraphModule, or, for
    a file saved from a model with adapted parts, a copy of ``model`` with those parts.

    A model (or part) that has no adapters yet gets them inserted first, with
    the settings recorded in the file; ``model`` itself is not modified.
    """
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get(META_KEY, "{}"))
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    if "parts" not in meta:
        return _with_adapters(model, state, meta, example_inputs, path)
    missing = [p for p in meta["parts"] if not has_submodule(model, p)]
    if missing:
        raise ValueError(f"adapters in {path} are for parts this model does not have: {missing[:3]}")
    own = copy.deepcopy(model, {id(model.get_submodule(p)): nn.Identity() for p in meta["parts"]})
    for p, record in meta["parts"].items():
        mine = {k[len(p) + 1:]: v for k, v in state.items() if k.startswith(p + ".")}
        set_module(own, p, _with_adapters(model.get_submodule(p), mine, record, None, path))
    own.train(model.training)
    return own


def _with_adapters(model: nn.Module, state: dict, meta: dict, example_inputs, path) -> fx.GraphModule:
    """``model`` (a whole model or a part) as a GraphModule holding the adapters of ``state``."""
    if any(name.startswith(PREFIX + ".") for name, _ in model.named_modules()):
        gm = to_graph_module(model)
    else:
        settings = meta.get("insert")
        if settings is None:
            raise ValueError(f"{path} does not say how its adapters were inserted")
        made = example_inputs is None and meta.get("inputs") is not None
        if example_inputs is None:  # inputs like those insert had (integer token ids too); files of
            example_inputs = recorded_inputs(meta, model)  # earlier versions record float shapes
        gm = insert(model, example_inputs=example_inputs, **settings)
        if made:  # the file's record itself, not one of inputs drawn from it (its integer range would narrow)
            gm.meta[META_KEY]["inputs"] = meta["inputs"]
    missing = sorted(set(_adapter_state(gm)) - set(state))
    unexpected = sorted(set(state) - set(_adapter_state(gm)))
    if missing or unexpected:
        raise ValueError(f"adapters in {path} do not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    gm.load_state_dict(state, strict=False)
    return gm
