import pytest
import torch
from conftest import image, make_vit, randomize_adapters, rel_err

import repfold


def test_identity_at_insertion_and_only_adapters_train():
    model, x = make_vit(), image()
    gm = repfold.insert(model, before=["attn", "mlp"], example_inputs=x)
    assert torch.equal(gm(x), model(x))
    trainable = {n for n, p in gm.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("repfold_adapters.") for n in trainable)
    # two blocks, attn and mlp each: four adapters of 192 channels
    assert sum(isinstance(m, repfold.RepAdapter) for m in gm.modules()) == 4
    assert all(m.channels == 192 for m in gm.modules() if isinstance(m, repfold.RepAdapter))


@pytest.mark.parametrize("training", [False, True])
def test_adapters_join_in_the_models_mode(training):
    """An eval model gets eval adapters: no dropout leaking into outputs (a bug found by test_trace)."""
    gm = repfold.insert(make_vit().train(training), before="attn", example_inputs=image())
    assert {m.training for m in gm.modules()} == {training}


def test_insert_leaves_the_callers_model_alone():
    model = make_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    repfold.insert(model, before="attn", example_inputs=image())
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_random_adapters_change_the_output():
    model, x = make_vit(), image()
    gm = repfold.insert(model, before=["attn", "mlp"], example_inputs=x)
    randomize_adapters(gm)
    assert rel_err(gm(x), model(x)) > 1e-2


def test_dotted_glob_selects_full_paths():
    gm = repfold.insert(make_vit(), before="blocks.?.attn", example_inputs=image())
    assert set(gm.meta["repfold"]["adapters"]) == {"blocks.0.attn", "blocks.1.attn"}


def test_unknown_scope_is_an_error_that_lists_names():
    with pytest.raises(ValueError, match=r"matches no module scope.*attn.*mlp"):
        repfold.insert(make_vit(), before="atention", example_inputs=image())


def test_groups_must_divide_widths():
    with pytest.raises(ValueError, match="must divide"):
        repfold.insert(make_vit(), before="attn", hidden_dim=8, groups=3, example_inputs=image())


@pytest.mark.parametrize("bias", [True, False])
def test_adapters_save_and_load_alone(tmp_path, bias):
    model, x = make_vit(), image()
    gm = repfold.insert(model, before=["attn", "mlp"], example_inputs=x, bias=bias)  # (the file says which)
    randomize_adapters(gm)
    gm.eval()
    path = tmp_path / "task.safetensors"
    repfold.save_adapters(gm, path)
    full = sum(p.numel() * p.element_size() for p in model.parameters())
    assert path.stat().st_size < 0.05 * full
    again = repfold.load_adapters(make_vit(), path).eval()  # a fresh backbone
    assert torch.equal(again(x), gm(x))
