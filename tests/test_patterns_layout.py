"""Rule: layout ops move positions and the channel axis, and are recognised when they cancel."""

import numpy as np
import pytest
from repfold.patterns.layout import Concat, Permute, Reshape, Roll, Same, Slice, swap

from repfold.core.affine import Affine, Channels, NotAffine

SHAPE = (2, 8, 8, 4)  # a channels-last feature map: batch, height, width, channels


def source(axis: int | None = None) -> tuple[Affine, Channels]:
    ch = Channels()
    v = ch.source("x", SHAPE)
    if axis is not None:
        ch.axis["x"] = axis
    return v, ch


def test_transpose_moves_the_channel_axis_and_cancels():
    x, ch = source(3)
    out = Permute(swap(4, 1, -1)).transfer([x], ch)
    assert ch.channel_position(out) == 1 and not out.is_identity
    assert Permute(swap(4, 1, 3)).transfer([out], ch).is_identity


def test_channel_axis_binds_through_a_transpose():
    x, ch = source()  # unbound: the first channel op decides
    out = Permute(swap(4, 1, 3)).transfer([x], ch)
    ch.require(out, 1, "a conv")
    assert ch.axis["x"] == 3


def window_partition(v, ch, ws=4):
    """Swin's window partition: view, permute, view, as layout ops."""
    B, H, W, C = v.shape
    v = Reshape((B, H // ws, ws, W // ws, ws, C)).transfer([v], ch)
    v = Permute((0, 1, 3, 2, 4, 5)).transfer([v], ch)
    return Reshape((B * (H // ws) * (W // ws), ws * ws, C)).transfer([v], ch)


def test_window_partition_keeps_the_channel_axis_whole():
    x, ch = source(3)
    w = window_partition(Roll((-2, -2), (1, 2)).transfer([x], ch), ch)
    assert w.shape == (8, 16, 4) and ch.channel_position(w) == 2 and w.pos is not None
    back = Reshape(SHAPE).transfer([w], ch)
    assert back.pos is not None  # same shape, positions moved: not the identity


def test_reshape_that_splits_channels_is_not_affine():
    x, ch = source(3)
    with pytest.raises(NotAffine, match="splits or merges the channel axis"):
        Reshape((2, 8, 8, 2, 2)).transfer([x], ch)


def test_roll_along_channels_is_not_affine():
    x, ch = source(3)
    with pytest.raises(NotAffine, match="rolls along the channel axis"):
        Roll((1,), (3,)).transfer([x], ch)


def test_slice_of_positions_and_concat_back_is_the_identity():
    x, ch = source(3)
    top = Slice((slice(None), slice(0, 3))).transfer([x], ch)
    rest = Slice((slice(None), slice(3, None))).transfer([x], ch)
    assert Concat(1).transfer([top, rest], ch).is_identity
    with pytest.raises(NotAffine, match="slices the channel axis"):
        Slice((slice(None), slice(None), slice(None), slice(0, 2))).transfer([x], ch)


def test_concat_of_different_maps_is_not_affine():
    x, ch = source(3)
    y = x.with_map(2.0, 0.0)
    with pytest.raises(NotAffine, match="different channel maps"):
        Concat(1).transfer([x, y], ch)


def test_bad_permutation_is_not_affine():
    x, ch = source()
    with pytest.raises(NotAffine, match="does not fit"):
        Permute((0, 0, 1, 2)).transfer([x], ch)


def test_same_is_the_identity():
    x, ch = source()
    assert Same().transfer([x], ch) is x


def test_layouts_compare_by_positions():
    x, ch = source(3)
    a = Permute((0, 2, 1, 3)).transfer([x], ch)
    b = Reshape(SHAPE).transfer([Permute((0, 2, 1, 3)).transfer([x], ch)], ch)
    assert ch.same_layout(a, b) and not ch.same_layout(a, x)
    assert np.array_equal(a.pos, b.pos)


class _PatchRotation:
    """OFT's rotation of a conv's input as PEFT writes it: the input cut into ``k``x``k`` patches (stride 1, no
    padding), each patch's ``C·k·k`` values rotated by a block-diagonal ``R`` computed from a parameter, the
    patches summed back (``F.fold``), then the conv."""

    @staticmethod
    def make(k: int):
        import torch
        import torch.nn.functional as F
        from torch import nn

        class M(nn.Module):
            def __init__(self):
                super().__init__()
                n = 4 * k * k  # two blocks of half the patch
                self.skew = nn.Parameter(torch.randn(2, n // 2, n // 2) * 0.3)
                self.conv = nn.Conv2d(4, 6, k, padding=k // 2)

            def forward(self, x):
                b, c, h, w = 2, 4, 6, 6  # (as torch.export specialises PEFT's reads of x.shape)
                S = self.skew - self.skew.transpose(1, 2)
                R = torch.eye(S.shape[1], dtype=S.dtype) + S + S @ S / 2  # computed from the parameter alone
                p = x.unfold(2, k, 1).unfold(3, k, 1).permute(0, 2, 3, 1, 4, 5).contiguous()
                ho, wo = h - k + 1, w - k + 1
                p = p.view(b * ho * wo, -1)
                p = torch.einsum("...rk,rkc->...rc", p.reshape(b * ho * wo, 2, -1), R).reshape(b * ho * wo, -1)
                p = p.view(b, ho, wo, c, k, k).permute(0, 3, 1, 2, 4, 5).contiguous()
                x = F.fold(p.view(b, c * k * k, ho * wo), output_size=(h, w), kernel_size=(k, k), stride=(1, 1))
                return torch.relu(self.conv(x))

        return M()


def test_one_pixel_patches_are_a_reshape_and_ofts_rotation_of_a_1x1_conv_folds():
    """``x.unfold(d, 1, 1)`` and ``F.fold`` of 1x1 patches only reshape: OFT's rotation before a 1x1 conv is a
    channel map, folded into the conv (nothing of the patches or the rotation runs)."""
    import torch

    import repfold
    from repfold.frontends.fx import op_counts

    torch.manual_seed(0)
    model = _PatchRotation.make(1).double().eval()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        want = model(x)
        assert (want - torch.relu(model.conv(x))).abs().max() > 1e-2
    folded, report = repfold.fold(model, example_inputs=(x,), return_report=True, graph=True)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), want, atol=1e-12, rtol=0)
    assert [r.folded for r in report.regions] == [True], report
    counts = op_counts(folded)
    assert not {"unfold", "fold", "einsum", "permute"} & set(counts) and counts["Conv2d"] == 1, counts


def test_ofts_rotation_of_a_kxk_conv_is_reported_kept():
    """With 3x3 patches the rotated patches overlap when summed back: no weight of the conv holds that map
    (PEFT's own merge_and_unload changes the outputs there). The rotation stays, and the report says so."""
    import torch

    import repfold

    torch.manual_seed(0)
    model = _PatchRotation.make(3).double().eval()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        want = model(x)
        assert (want - torch.relu(model.conv(x))).abs().max() > 1e-2  # the rotation matters
    folded, report = repfold.fold(model, example_inputs=(x,), return_report=True, graph=True)
    with torch.no_grad():
        assert torch.equal(folded(x), want)
    assert [r.folded for r in report.regions] == [False] and "einsum" in report.regions[0].reason, report


@pytest.mark.parametrize("dynamo", [False, True])
def test_ofts_rotation_of_a_1x1_conv_folds_in_onnx(dynamo):
    """The same in ONNX, run in onnxruntime against the eager model: the dynamo exporter writes
    ``x.unfold(d, 1, 1)`` as a Gather of positions by a constant index (a layout op: ``Take``) and a
    Transpose, ``F.fold`` as Col2Im, and the patch split and the rotation's way back each as one Reshape
    from and to another rank, which the fold reads as a merge to ``(..., r·k)`` and the split."""
    from collections import Counter

    import onnx
    import torch
    from conftest import export

    import repfold

    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = _PatchRotation.make(1).eval()
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        want = model(x).numpy()
        assert np.abs(want - torch.relu(model.conv(x)).numpy()).max() > 1e-2  # the rotation matters
    proto = export(model, x, dynamo=dynamo, opset=18)
    folded, report = repfold.fold(proto, return_report=True)
    onnx.checker.check_model(folded, full_check=True)
    got = ort.InferenceSession(folded.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {folded.graph.input[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert [r.folded for r in report.regions if not r.scale] == [True], report
    counts = Counter(n.op_type for n in folded.graph.node)
    assert not {"Einsum", "Col2Im", "Gather"} & set(counts) and counts["Conv"] == 1, counts
