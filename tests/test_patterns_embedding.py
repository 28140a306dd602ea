"""Rule: an embedding's lookup is a Linear on one-hot token ids; a region of those ids folds into the table.

PEFT's LoRA on an embedding (``T[ids] + s·(A[ids] @ B)``), DoRA's scaled branches and OFT's rotation of the
looked-up rows are affine in the ids' one-hot vectors: they fold into one lookup of a new table, on every
path (fx, torch.export, ONNX run in onnxruntime), judged against the eager model.
"""

import copy
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from repfold.patterns.embedding import Lookup, table
from torch import nn

import repfold
from repfold.core.affine import Affine, Channels, NotAffine
from repfold.frontends.fx import op_counts

VOCAB, DIM = 40, 12


class LoraEmbedding(nn.Module):
    """What PEFT's LoRA ``Embedding`` layer computes (``lora_embedding_A`` r×V, ``lora_embedding_B`` C×r)."""

    def __init__(self, base: nn.Embedding, r: int = 3, scaling: float = 0.5) -> None:
        super().__init__()
        self.base, self.scaling = base, scaling
        self.lora_embedding_A = nn.Parameter(torch.randn(r, base.num_embeddings))
        self.lora_embedding_B = nn.Parameter(torch.randn(base.embedding_dim, r))

    def forward(self, ids):
        result = self.base(ids)
        dtype = result.dtype  # (PEFT casts the sum back to it: a Cast in the TorchScript file)
        after_a = F.embedding(ids, self.lora_embedding_A.T)
        return (result + (after_a @ self.lora_embedding_B.T) * self.scaling).to(dtype)


class Toy(nn.Module):
    """Token ids -> embedding -> a bias on every row -> LayerNorm -> Linear head that reads the same table."""

    def __init__(self, lora: bool, shift: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.lookup = LoraEmbedding(self.embed) if lora else self.embed
        self.shift = nn.Parameter(torch.randn(DIM)) if shift else None
        self.norm = nn.LayerNorm(DIM)

    def forward(self, ids):
        h = self.lookup(ids)
        if self.shift is not None:
            h = h + self.shift
        return F.linear(self.norm(h), self.embed.weight)  # a tied head: the table stays as it is for it


def _ids():
    return torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))


def _lookups(counts: dict) -> int:
    return sum(v for k, v in counts.items() if k.lower().partition(".")[0] in ("embedding", "gather"))


@pytest.fixture
def models():
    torch.manual_seed(0)
    adapted = Toy(lora=True, shift=True).double().eval()
    base = copy.deepcopy(adapted)
    base.lookup = base.embed
    ids = _ids()
    with torch.no_grad():
        assert (adapted(ids) - base(ids)).abs().max() > 1e-2  # the adapter changes the output
    return adapted, base, ids


@pytest.mark.parametrize("path", ["fx", "export", "onnx"])
def test_lora_on_an_embedding_folds_into_one_lookup(models, path):
    adapted, base, ids = models
    with torch.no_grad():
        want = adapted(ids)
    if path == "onnx":
        ort = pytest.importorskip("onnxruntime")
        import onnx

        from repfold.frontends.onnx import op_counts as onnx_counts

        buf = io.BytesIO()
        torch.onnx.export(adapted.float(), (ids,), buf, dynamo=False)
        folded, report = repfold.fold(onnx.load_from_string(buf.getvalue()), return_report=True)
        session = ort.InferenceSession(folded.SerializeToString(), providers=["CPUExecutionProvider"])
        got = session.run(None, {folded.graph.input[0].name: ids.numpy()})[0]
        np.testing.assert_allclose(got, want.float().numpy(), atol=1e-5)
        counts = onnx_counts(folded)
        assert counts.get("MatMul", 0) == 1 and counts.get("Mul", 0) == 0, counts  # the head's MatMul only
    else:
        model = torch.export.export(adapted, (ids,)) if path == "export" else adapted
        folded, report = repfold.fold(model, example_inputs=(ids,), return_report=True, graph=True) if path == "fx" \
            else repfold.fold(model, return_report=True, graph=True)
        runnable = folded.module() if path == "export" else folded
        with torch.no_grad():
            torch.testing.assert_close(runnable(ids), want, atol=1e-12, rtol=0)
        graph = folded.graph_module if path == "export" else folded
        counts = op_counts(graph)
        assert not {"matmul", "mul", "numpy_T", "t"} & {k.rpartition(".")[2].partition(".")[0] for k in counts}, counts
    assert _lookups(counts) == 1, counts
    assert [r.folded for r in report.regions if not r.scale] == [True], report
    assert sum(p.numel() for p in base.parameters()) + VOCAB * DIM >= report.params_after  # a table of its own
    # (the tied head still reads the trained table; the fold's lookup reads a new one)


def test_the_table_takes_the_regions_constant_in_every_row():
    W = np.arange(12.0).reshape(4, 3)  # (V, C)
    op = Lookup(W)
    ch = Channels()
    v = op.transfer([ch.source("ids", (2, 5))], ch)
    assert v.shape == (2, 5, 3) and ch.tokens == {"ids": 4}
    shifted = v.with_map(np.asarray(v.M), np.array([1.0, 2.0, 3.0]))
    M, b = op.absorb(shifted, ch)
    np.testing.assert_allclose(np.asarray(M), W.T)
    np.testing.assert_allclose(b, [1.0, 2.0, 3.0])
    big = np.full((4, 3), 1000.0) + 1e-3  # float16: the row and the constant summed in float64, cast once
    half = table(big.T, np.full(3, 0.3), np.float16)
    assert half.dtype == np.float16 and np.array_equal(half, (big + 0.3).astype(np.float16))


def test_a_lookup_reads_ids_not_a_region():
    ch = Channels()
    ch.source("x", (2, 5, 4))
    ch.axis["x"] = 2
    moved = Affine("x", (2, 5, 4), np.eye(4), 0.0)
    with pytest.raises(NotAffine, match="token ids"):
        Lookup(np.ones((4, 3))).transfer([moved], ch)


def test_an_embedding_that_renormalises_rows_is_left_alone():
    """``max_norm`` rewrites the table's rows on every lookup: not a linear map, not matched."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(VOCAB, DIM, max_norm=1.0), nn.Linear(DIM, 5)).eval()
    ids = _ids()
    with torch.no_grad():
        want = model(ids)
    folded, report = repfold.fold(copy.deepcopy(model), example_inputs=(ids,), return_report=True, graph=True)
    with torch.no_grad():
        assert torch.equal(folded(ids), want)
    assert not report.regions


def test_a_model_with_embeddings_and_nothing_to_fold_is_bitwise_unchanged():
    torch.manual_seed(0)
    model = Toy(lora=False, shift=True).eval()
    ids = _ids()
    for target in (model, torch.export.export(model, (ids,))):
        folded = repfold.fold(target, example_inputs=(ids,), graph=True) if isinstance(target, nn.Module) \
            else repfold.fold(target)
        run = folded.module() if hasattr(folded, "module") and not isinstance(folded, nn.Module) else folded
        with torch.no_grad():
            assert torch.equal(run(ids), model(ids))


class _IntoConv(nn.Module):
    """An adapted lookup (cast to its own dtype, as PEFT's wrapper does) laid out channels-first for a 1x1
    conv: the conv is the model's own layer after the lookups, which takes no token ids."""

    def __init__(self, lora: bool) -> None:
        super().__init__()
        embed = nn.Embedding(VOCAB, DIM)
        self.lookup = LoraEmbedding(embed) if lora else embed
        self.conv = nn.Conv2d(DIM, 6, 1)

    def forward(self, ids):
        h = self.lookup(ids).transpose(1, 2).unflatten(2, (7, 1))
        return torch.relu(self.conv(h))


@pytest.mark.parametrize("dynamo", [False, True])
def test_an_adapted_lookup_before_the_models_own_layer_folds_to_the_base_models_operators(dynamo):
    pytest.importorskip("onnxruntime")
    from collections import Counter

    import onnx
    import onnxruntime as ort
    from conftest import export

    torch.manual_seed(0)
    model = _IntoConv(lora=True).eval()
    base = copy.deepcopy(model)
    base.lookup = base.lookup.base
    ids = _ids()
    with torch.no_grad():
        want = model(ids)
        assert (want - base(ids)).abs().max() > 1e-3
    folded, report = repfold.fold(export(model, ids, dynamo=dynamo), return_report=True)
    onnx.checker.check_model(folded, full_check=True)
    got = ort.InferenceSession(folded.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {folded.graph.input[0].name: ids.numpy()})[0]
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5)
    assert [r.folded for r in report.regions if not r.scale] == [True], report
    ours, theirs = (Counter(n.op_type for n in m.graph.node if n.op_type != "Constant")
                    for m in (folded, export(base, ids, dynamo=dynamo)))
    assert all(n <= theirs[k] for k, n in ours.items()), (ours, theirs)
