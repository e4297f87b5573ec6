"""The one way of putting an update onto a module: merged from W0, hooked per sample, attached for training."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from studio.adapters.lora import LoraAdapter, LoraLayer
from studio.engine import NonFiniteUpdateError
from studio.engine.live import prepare
from studio.engine.patch import Attachment, MergedWeights, NonFiniteMerge, UpdateHooks, component_modules, group_terms, merged
from tests.engine.conftest import attention_layers, random_lora


def small_modules(dtype=torch.float32) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    modules = {"unet.a": nn.Linear(6, 5), "unet.b": nn.Linear(6, 5), "unet.c": nn.Linear(4, 3), "unet.conv": nn.Conv2d(3, 4, 3, padding=1)}
    return {name: module.to(dtype).requires_grad_(False) for name, module in modules.items()}


def lora_for(modules: dict[str, nn.Module], rank: int = 2, alpha: float = 2.0, seed: int = 0) -> LoraAdapter:
    generator = torch.Generator().manual_seed(seed)
    layers = {}
    for name, module in modules.items():
        weight = module.weight
        down = torch.randn(rank, *weight.shape[1:], generator=generator)
        up = torch.randn(weight.shape[0], rank, *([1, 1] if weight.dim() == 4 else []), generator=generator)
        layers[name] = LoraLayer(down, up, alpha)
    return LoraAdapter("small", layers)


def test_merged_context_writes_w0_plus_weighted_delta_and_restores_own_storage():
    modules = small_modules()
    adapter = lora_for(modules)
    before = {name: m.weight.detach().clone() for name, m in modules.items()}
    with merged(modules, adapter, 0.5) as weights:
        assert len(weights.groups) == 3  # a and b share one (5, 6) stack
        for name, module in modules.items():
            want = before[name] + 0.5 * adapter.delta(name).reshape(before[name].shape)
            torch.testing.assert_close(module.weight, want, rtol=1e-5, atol=1e-5)
    pointers = {m.weight.untyped_storage().data_ptr() for m in modules.values()}
    assert len(pointers) == len(modules)  # each module its own storage again
    assert all(torch.equal(modules[name].weight, before[name]) for name in modules)


def test_non_finite_merge_is_undone_and_names_the_groups():
    modules = small_modules(torch.float16)
    adapter = lora_for(modules, alpha=2.0)
    weights = MergedWeights(modules)
    plan = {group: [(term, 6e4, "small") for term in terms] for group, terms in group_terms(adapter, weights).items()}
    before = {name: m.weight.detach().clone() for name, m in modules.items()}
    with pytest.raises(NonFiniteMerge) as failure:
        weights.write(plan)  # 6e4 * dW overflows float16 (max 65504)
    assert failure.value.groups and not weights.touched
    assert all(torch.equal(modules[name].weight, before[name]) for name in modules)


def test_update_not_finite_in_the_weights_dtype_is_refused_at_prepare():
    modules = small_modules(torch.float16)
    huge = lora_for(modules, alpha=1e30)  # finite in fp32, inf once cast to fp16
    with pytest.raises(NonFiniteUpdateError, match="'huge'.*not finite in torch.float16"):
        prepare(huge, MergedWeights(modules), label="huge")


def test_engine_refuses_a_merge_that_overflows_and_keeps_w0(engine):
    a = random_lora(engine, "a", 40)
    engine.register("bright", a)
    layer = a.layers()[0]
    w0 = engine.live.modules[layer].weight.detach().clone()
    with pytest.raises(NonFiniteUpdateError, match="'bright' at weight 1e\\+38"):
        engine.activate("bright", 1e38)  # a finite float32, but W0 + 1e38 * dW is not
    with pytest.raises(NonFiniteUpdateError, match="'bright' at weight 1e\\+39"):
        engine.activate("bright", 1e39)  # beyond float32 itself
    assert torch.equal(engine.live.modules[layer].weight, w0) and not engine.live.touched
    engine.unregister("bright")


def test_weights_moved_behind_the_engine_are_regrouped_from_w0(engine):
    a, b = random_lora(engine, "a", 41), random_lora(engine, "b", 42)
    layer = a.layers()[0]
    engine.activate(a)
    w0 = engine.live.pristine2d(layer).clone()
    module = engine.live.modules[layer]
    module.weight.data = module.weight.data.clone()  # what .to(...) does: new storage, merged values
    assert not engine.live.intact()
    engine.activate(b)
    expected = w0 + b.delta(layer).reshape(w0.shape)
    torch.testing.assert_close(engine.live.live2d(layer), expected, rtol=1e-5, atol=1e-5)
    engine.restore()
    torch.testing.assert_close(module.weight.detach().reshape(w0.shape), w0, rtol=0, atol=0)


def test_release_gives_modules_their_own_pristine_storage(engine):
    a = random_lora(engine, "a", 43)
    engine.activate(a)
    layer = a.layers()[0]
    w0 = engine.live.pristine2d(layer).clone()
    engine.release()
    weight = engine.live.modules[layer].weight
    assert torch.equal(weight.detach().reshape(w0.shape), w0) and not engine.live.groups
    assert weight.untyped_storage().nbytes() == weight.numel() * weight.element_size()


def test_per_sample_chain_gives_row_b_entry_b_mod_n():
    torch.manual_seed(1)
    linear = nn.Linear(6, 5)
    downs, ups = torch.randn(3, 2, 6), torch.randn(3, 5, 2)
    x = torch.randn(6, 4, 6)  # 2 x 3 rows (a CFG-doubled batch of 3 samples)
    expected = linear(x) + torch.stack([F.linear(F.linear(x[b], downs[b % 3]), ups[b % 3]) for b in range(6)])
    hooks = UpdateHooks({"l": linear}, lambda layer: (downs, ups))
    got = linear(x)
    hooks.remove()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        inference = UpdateHooks({"l": linear}, lambda layer: (downs, ups), inference=True)
        fused = linear(x)
        inference.remove()
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)
    assert not linear._forward_hooks


def test_per_sample_conv_chain_equals_dense_kernels():
    torch.manual_seed(2)
    conv = nn.Conv2d(3, 4, 3, padding=1, stride=2)
    downs, ups = torch.randn(2, 2, 27), torch.randn(2, 4, 2)
    ups[1] = 0  # sample 1 has no update here (skipped in inference)
    x = torch.randn(4, 3, 8, 8)
    dense = [(ups[j] @ downs[j]).reshape(4, 3, 3, 3) for j in range(2)]
    expected = conv(x) + torch.cat([F.conv2d(x[b:b + 1], dense[b % 2], None, 2, 1) for b in range(4)])
    for inference in (False, True):
        with torch.set_grad_enabled(not inference):
            hooks = UpdateHooks({"c": conv}, lambda layer: (downs, ups), inference=inference)
            got = conv(x)
            hooks.remove()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_zoo_style_per_sample_training_gets_each_samples_own_gradient():
    """The world's multi-LoRA zoo: factors (styles, r, in) gathered by each sample's style index."""
    torch.manual_seed(3)
    linear = nn.Linear(6, 5).requires_grad_(False)
    down = nn.Parameter(torch.randn(4, 2, 6))
    up = nn.Parameter(torch.randn(4, 5, 2))
    index = torch.tensor([2, 0, 2])
    hooks = UpdateHooks({"l": linear}, lambda layer: (down[index], up[index] * 0.5))
    x = torch.randn(3, 7, 6)
    linear(x).square().sum().backward()
    hooks.remove()
    assert down.grad[1].abs().sum() == 0 and down.grad[3].abs().sum() == 0  # styles no sample used
    reference_down = down.detach().clone().requires_grad_(True)
    total = sum((linear(x[b]) + 0.5 * F.linear(F.linear(x[b], reference_down[index[b]]), up.detach()[index[b]])).square().sum()
                for b in range(3))
    total.backward()
    torch.testing.assert_close(down.grad, reference_down.grad, rtol=1e-4, atol=1e-4)


def test_exact_sources_run_outside_autocast():
    linear = nn.Linear(6, 5)
    seen = []

    def source(layer):
        seen.append(torch.is_autocast_enabled("cpu"))
        return (torch.ones(1, 6), torch.ones(5, 1))

    hooks = UpdateHooks({"l": linear}, source, exact=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        linear(torch.randn(2, 6))
    hooks.remove()
    assert seen == [False]


@pytest.mark.parametrize("family", ["lora", "unilora", "delta_only"])
def test_attachment_equals_weights_plus_delta(family, tiny_pipeline_dir):
    """Forward and gradients of the trainer's ``Attachment`` (hooks) equal the model whose weights
    are W0 + dW (an oracle built here with a weight parametrization)."""
    from diffusers import UNet2DConditionModel
    from torch.nn.utils import parametrize

    from studio.adapters import lora_train, unilora
    from studio.bases import module_tree

    class AddDelta(nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.layer = layer

        def forward(self, weight):
            return weight + adapter.delta(self.layer).reshape(weight.shape)

    class Oracle:
        def __init__(self, model, adapter):
            self.modules = [model.get_submodule(layer.partition(".")[2]) for layer in adapter.layers()]
            for layer, module in zip(adapter.layers(), self.modules):
                parametrize.register_parametrization(module, "weight", AddDelta(layer), unsafe=True)

        def detach(self):
            for module in self.modules:
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)

    unet = UNet2DConditionModel.from_pretrained(tiny_pipeline_dir / "unet").eval().requires_grad_(False)
    tree = module_tree(str(tiny_pipeline_dir))
    targets = ("to_q", "to_v", "proj_in", "conv1")
    if family == "unilora":
        adapter = unilora.build(unilora.Config(d=64, rank=2, targets=targets), tree)
    else:
        adapter = lora_train.build(lora_train.Config(rank=2, targets=targets), tree)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.2)
    if family == "delta_only":
        adapter = DeltaOnly(adapter)
    inputs = (torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([10, 500]),
              torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(2)))
    results = []
    for attach in (Oracle, lambda model, adapter: Attachment({"unet": model}, adapter)):
        model = copy.deepcopy(unet)
        attached = attach(model, adapter)
        out = model(inputs[0], inputs[1], encoder_hidden_states=inputs[2]).sample
        grads = torch.autograd.grad(out.square().mean(), list(adapter.parameters()))
        attached.detach()
        results.append((out.detach(), grads))
        assert not any(m._forward_hooks for m in model.modules())
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


class DeltaOnly(nn.Module):
    """A family that only follows the Adapter protocol (as SuperLoRA does today): delta per layer."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def layers(self):
        return self.inner.layers()

    def delta(self, layer):
        return self.inner.delta(layer)


def test_engine_per_image_uses_the_patch_hooks(engine):
    layers = attention_layers(engine, text_encoder=False)[:4]
    a = random_lora(engine, "a", 44, layers=layers)
    with engine.per_image([a, None]):
        hooked = [name for name in layers if engine.live.modules[name]._forward_hooks]
    assert hooked == layers and not any(engine.live.modules[name]._forward_hooks for name in layers)


def test_merged_on_a_unet_by_component_names_equals_its_merged_forward(tiny_pipeline_dir):
    """The world's evaluation form: ``merged(component_modules(unet), lora, strength)``."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_pipeline_dir / "unet").eval().requires_grad_(False)
    modules = component_modules(unet)
    names = [n for n in modules if n.endswith(("to_q", "to_v"))]
    adapter = lora_for({n: modules[n] for n in names}, rank=2, alpha=1.0, seed=5)
    inputs = (torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 16, 32))
    reference = copy.deepcopy(unet)
    with torch.no_grad():
        for name in names:
            reference.get_submodule(name.partition(".")[2]).weight += 0.7 * adapter.delta(name).reshape_as(modules[name].weight)
        expected = reference(*inputs[:2], encoder_hidden_states=inputs[2]).sample
        before = unet(*inputs[:2], encoder_hidden_states=inputs[2]).sample
        with merged(modules, adapter, 0.7):
            got = unet(*inputs[:2], encoder_hidden_states=inputs[2]).sample
        after = unet(*inputs[:2], encoder_hidden_states=inputs[2]).sample
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(before, after)
