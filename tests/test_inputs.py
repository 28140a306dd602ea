"""Where example inputs come from: those given, those ``insert`` recorded (token ids stay integers, in the
range seen), the input size a model declares (``image_size`` / ``img_size``, timm's ``patch_embed.img_size``,
a Hugging Face ``config.image_size``), timm's ``pretrained_cfg``. And which tensor an adapter goes on where a
scope receives several (Llama's attention: hidden states, cos, sin)."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from conftest import fold_checked, randomize_adapters, rel_err
from torch import nn

import repfold
from repfold.frontends import trace as _trace

# --- token-id models: insert records what the inputs are, fold(gm) needs none -------------------------------


def _bert():
    transformers = pytest.importorskip("transformers")
    return transformers.BertModel(transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100))


def _llama():
    transformers = pytest.importorskip("transformers")
    return transformers.LlamaModel(transformers.LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
        vocab_size=100, use_cache=False))  # (torch.export cannot return transformers' DynamicCache)


TOKEN_MODELS = {  # model, the scopes adapters go before
    "bert": (_bert, ["self", "intermediate"]),
    "llama": (_llama, ["self_attn", "mlp"]),  # self_attn receives (hidden_states, cos, sin)
}


def _hidden(model, ids):
    return model(ids).last_hidden_state


@pytest.mark.parametrize("name", list(TOKEN_MODELS))
def test_token_id_models_fold_without_example_inputs(name):
    make, before = TOKEN_MODELS[name]
    torch.manual_seed(0)
    model = make().eval()
    ids = torch.randint(5, 90, (2, 7), generator=torch.Generator().manual_seed(1))
    gm = repfold.insert(model, before=before, example_inputs=(ids,))
    assert len(gm.meta["repfold"]["adapters"]) == 2 * len(before)  # two layers, one adapter per scope each
    randomize_adapters(gm)
    gm.eval()
    folded, report = repfold.fold(gm, return_report=True)  # no example_inputs: made like the recorded ones
    assert gm.meta["repfold"]["inputs"] == [{"shape": [2, 7], "dtype": "int64", "device": "cpu",
                                             "low": int(ids.min()), "high": int(ids.max())}]
    with torch.no_grad():
        y = _hidden(gm, ids)
        assert rel_err(y, _hidden(model, ids)) > 1e-3
        assert rel_err(_hidden(folded, ids), y) < 1e-5
    adapters = [r for r in report.layered if any(op.startswith("repfold_adapters.") for op in r.ops)]
    assert len(adapters) == len(gm.meta["repfold"]["adapters"]), str(report)
    assert all(r.folded for r in report.regions), str(report)


def test_llama_attention_adapter_goes_on_the_hidden_states():
    """The scope receives the hidden states and the rotary cos and sin; q/k/v read only the first."""
    gm = repfold.insert(_llama().eval(), before="layers.0.self_attn", example_inputs=(torch.arange(6)[None],))
    (node,) = [n for n in gm.graph.nodes if n.op == "call_module" and n.target.startswith("repfold_adapters.")]
    readers = {u.target for u in node.users}
    assert readers == {f"layers.0.self_attn.{p}_proj" for p in "qkv"}
    assert gm.get_submodule(node.target).channels == 32


def test_recorded_inputs_keep_dtype_integer_range_and_bools():
    ids = torch.tensor([[3, 9, 4, 7]])
    mask = torch.tensor([[True, False, True, True]])
    record = _trace.record_inputs((torch.zeros(1, 3, 4, 4), ids, mask, None, 2))
    json.dumps(record)  # saved with the adapters
    model = nn.Linear(2, 2).to(torch.float64)
    x, ids2, mask2, none, two = _trace.recorded_inputs({"inputs": record}, model)
    assert x.shape == (1, 3, 4, 4) and x.dtype == torch.float64  # floats: the model's own dtype
    assert ids2.dtype == torch.int64 and ids2.shape == ids.shape
    assert 3 <= int(ids2.min()) and int(ids2.max()) <= 9
    assert torch.equal(mask2, mask) and none is None and two == 2
    many = _trace.recorded_inputs({"inputs": [{"shape": [4000], "dtype": "int32", "low": 3, "high": 9}]}, model)[0]
    assert many.dtype == torch.int32 and set(many.tolist()) == set(range(3, 10))  # [low, high], both ends
    old = _trace.recorded_inputs({"input_shapes": [[1, 3, 8, 8]]}, model)  # what earlier versions wrote
    assert old[0].shape == (1, 3, 8, 8) and old[0].dtype == torch.float64


def test_load_adapters_of_a_token_id_model(tmp_path):
    torch.manual_seed(0)
    model = _bert().eval()
    ids = torch.randint(0, 100, (1, 6))
    gm = repfold.insert(model, before=["self", "intermediate"], example_inputs=(ids,))
    randomize_adapters(gm)
    gm.eval()
    path = tmp_path / "task.safetensors"
    repfold.save_adapters(gm, path)
    again = repfold.load_adapters(model, path).eval()  # inserted with inputs like the recorded ones
    assert again.meta["repfold"]["inputs"] == gm.meta["repfold"]["inputs"]
    with torch.no_grad():
        assert torch.equal(_hidden(again, ids), _hidden(gm, ids))
        assert rel_err(_hidden(repfold.fold(again), ids), _hidden(gm, ids)) < 1e-5


def test_load_adapters_reads_files_that_record_input_shapes(tmp_path):
    from conftest import image, make_vit
    from safetensors.torch import load_file, save_file

    gm = repfold.insert(make_vit(), before="attn", example_inputs=image())
    randomize_adapters(gm)
    gm.eval()
    path = tmp_path / "old.safetensors"
    repfold.save_adapters(gm, path)
    meta = {k: v for k, v in gm.meta["repfold"].items() if k not in ("inputs", "frozen")}
    meta["input_shapes"] = [[2, 3, 32, 32]]  # the form files saved before the input record have
    save_file(load_file(path), str(path), metadata={"repfold": json.dumps(meta)})
    again = repfold.load_adapters(make_vit(), path).eval()
    assert again.meta["repfold"]["inputs"][0]["shape"] == [2, 3, 32, 32]
    assert torch.equal(again(image()), gm(image()))


# --- models that say their input size -----------------------------------------------------------------------


class _Visual(nn.Module):
    """Like open_clip's visual tower: ``image_size`` a tuple, a conv patch embedding, then a Linear."""

    def __init__(self, image_size=(32, 48), channels=1):
        super().__init__()
        self.image_size = image_size
        self.conv1 = nn.Conv2d(channels, 16, 8, stride=8)
        self.ln = nn.LayerNorm(16)
        self.proj = nn.Linear(16, 16)

    def forward(self, x):
        return self.proj(self.ln(self.conv1(x).flatten(2).transpose(1, 2)))


def test_a_declared_tuple_image_size_and_conv_channels_make_the_inputs():
    model = _Visual().eval()
    gm = repfold.insert(model, before="proj")
    assert gm.meta["repfold"]["inputs"][0]["shape"] == [1, 1, 32, 48]
    x = torch.randn(2, 1, 32, 48)
    fold_checked(gm, model, x)


def test_torchvision_vit_image_size_makes_the_inputs():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64).eval()
    nn.init.normal_(model.heads.head.weight)  # (zero when made)
    gm = repfold.insert(model, before="mlp")
    assert gm.meta["repfold"]["inputs"][0]["shape"] == [1, 3, 32, 32]
    fold_checked(gm, model, torch.randn(2, 3, 32, 32))


def test_timm_patch_embed_size_wins_over_the_registered_config():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2).eval()
    assert model.pretrained_cfg["input_size"] == (3, 224, 224)
    gm = repfold.insert(model, before=["attn", "mlp"])
    assert gm.meta["repfold"]["inputs"][0]["shape"] == [1, 3, 32, 32]
    fold_checked(gm, model, torch.randn(2, 3, 32, 32))
    base = repfold.fold(model)  # a plain module: its own size too
    with torch.no_grad():
        x = torch.randn(1, 3, 32, 32)
        assert rel_err(base(x), model(x)) < 1e-5


def test_declared_input_sizes_and_their_order():
    assert _trace.declared_input_size(_Visual((32, 32), channels=3)) == (3, 32, 32)

    class Square(_Visual):
        pass

    m = Square(channels=4)
    m.image_size = 24  # an int: square
    assert _trace.declared_input_size(m) == (4, 24, 24)
    m.pretrained_cfg = {"input_size": (4, 224, 224)}
    assert _trace.example_inputs(m)[0].shape == (1, 4, 24, 24)  # the model's own size wins over the config
    del m.image_size
    assert _trace.example_inputs(m)[0].shape == (1, 4, 224, 224)
    m.meta = {"repfold": {"inputs": [{"shape": [2, 4, 16, 16], "dtype": "float32"}]}}
    m.image_size = 24
    assert _trace.example_inputs(m)[0].shape == (2, 4, 16, 16)  # recorded by insert: wins over declared
    given = torch.zeros(1, 4, 8, 8)
    assert _trace.example_inputs(m, given)[0] is given
    assert _trace.declared_input_size(nn.Linear(2, 2)) is None
    with pytest.raises(ValueError, match="cannot tell the input shape of Linear"):
        _trace.example_inputs(nn.Linear(2, 2))


def test_hugging_face_config_image_size_and_channels():
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                                    image_size=16, patch_size=8, num_channels=2)
    model = transformers.ViTModel(config).eval()
    assert _trace.declared_input_size(model) == (2, 16, 16)
    gm = repfold.insert(model, before="mlp")
    assert gm.meta["repfold"]["inputs"][0]["shape"] == [1, 2, 16, 16]


# --- which tensor entering a scope the adapter takes --------------------------------------------------------


class _TwoInputs(nn.Module):
    def __init__(self, both_linear: bool):
        super().__init__()
        self.q = nn.Linear(8, 8)
        self.k = nn.Linear(8, 8) if both_linear else None

    def forward(self, x, y):
        q = self.q(x.transpose(1, 2).contiguous())  # through layout ops
        return q + (self.k(y) if self.k is not None else y)


class _Outer(nn.Module):
    def __init__(self, both_linear: bool):
        super().__init__()
        self.pre = nn.Linear(8, 8)
        self.attn = _TwoInputs(both_linear)

    def forward(self, x):
        h = self.pre(x)
        return self.attn(h.transpose(1, 2), h * 2)


def test_an_adapter_goes_on_the_one_tensor_a_scope_feeds_its_layers():
    model = _Outer(both_linear=False).eval()
    x = torch.randn(2, 5, 8)
    gm = repfold.insert(model, before="attn", example_inputs=x)
    (node,) = [n for n in gm.graph.nodes if n.op == "call_module" and n.target.startswith("repfold_adapters.")]
    assert node.args[0].name == "transpose" and gm.get_submodule(node.target).axis == 1
    fold_checked(gm, model, x)


def test_a_scope_whose_layers_read_several_tensors_is_refused():
    with pytest.raises(ValueError, match=r"'attn' receives 2 tensors \(transpose, mul\) and 2 of them .* are the "
                                         r"input of a Linear or convolution in it; an adapter needs exactly one"):
        repfold.insert(_Outer(both_linear=True).eval(), before="attn", example_inputs=torch.randn(2, 5, 8))
