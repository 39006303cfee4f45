import pytest
import torch
from torch import nn

from ranksearch import decompose, set_ranks, vgg16_cifar
from ranksearch.decompose import (
    TUCKER2_METHODS,
    Tucker2Conv,
    channel_bases,
    decomposed_from_state_dict,
    model_bases,
    reconstruction_error,
    should_decompose,
    tucker2_factors,
)
from ranksearch.models import ranked_conv


def conv_weights(layer: nn.Module) -> int:
    return sum(m.weight.numel() for m in layer.modules() if isinstance(m, nn.Conv2d))


@pytest.mark.parametrize("stride,bias", [(1, False), (2, True)])
def test_full_rank_tucker2_reproduces_the_conv(stride, bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 24, 3, stride=stride, padding=1, bias=bias)
    layer = Tucker2Conv.from_conv(conv, rank=1.0)
    x = torch.randn(2, 16, 9, 9)
    torch.testing.assert_close(layer(x), conv(x), atol=1e-4, rtol=1e-4)
    assert layer.core.stride == (stride, stride) and layer.core.padding == (1, 1)
    assert (layer.last.bias is not None) == bias


def test_factor_shapes_and_clamping():
    weight = torch.randn(128, 64, 3, 3)
    first, core, last = tucker2_factors(weight, rank_in=32, rank_out=32)
    assert first.shape == (32, 64) and core.shape == (32, 32, 3, 3) and last.shape == (128, 32)
    first, core, last = tucker2_factors(torch.randn(8, 3, 3, 3), rank_in=100, rank_out=100)
    assert first.shape == (3, 3) and core.shape == (8, 3, 3, 3) and last.shape == (8, 8)


def test_64_to_128_conv_at_r32_has_15360_weights():
    conv = nn.Conv2d(64, 128, 3, padding=1, bias=False)
    assert conv_weights(conv) == 73_728
    layer = Tucker2Conv.from_conv(conv, rank=32 / 128)  # R = round(0.25 * 128) = 32
    assert (layer.first.out_channels, layer.core.out_channels) == (32, 32)
    assert conv_weights(layer) == 15_360


def test_reconstruction_error_falls_as_rank_grows():
    torch.manual_seed(0)
    conv = nn.Conv2d(32, 64, 3, padding=1, bias=False)
    errors = [reconstruction_error(conv, Tucker2Conv.from_conv(conv, k / 32)) for k in (2, 4, 8, 16, 32)]
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < 1e-5


def test_layers_that_would_not_get_cheaper_stay():
    first_conv = ranked_conv(3, 64)
    assert not should_decompose(first_conv, 1.0)  # 3*3 + 9*3*64 + 64*64 > 9*3*64
    assert should_decompose(first_conv, 1 / 32)
    assert not should_decompose(ranked_conv(64, 64), 1.0)
    model = decompose(set_ranks(vgg16_cifar(width=0.25), [1.0, 1.0, 0.25, 1 / 32, 1.0]))
    kinds = {name: type(layers[0][1]) for name, layers in _modules(model).items()}
    assert kinds == {
        "block1": nn.Conv2d, "block2": nn.Conv2d, "block3": Tucker2Conv, "block4": Tucker2Conv, "block5": nn.Conv2d
    }  # fmt: skip


def _modules(model):
    from ranksearch.models import rank_modules

    return rank_modules(model)


def test_decompose_returns_a_copy_and_keeps_every_rank_buffer():
    model = set_ranks(vgg16_cifar(width=0.25), [0.5, 0.25, 0.125, 1 / 16, 1 / 32])
    decomposed = decompose(model)
    assert all(isinstance(m, nn.Conv2d) for m in model.features.block3 if hasattr(m, "rank"))  # untouched
    ranks = {k: float(v) for k, v in decomposed.state_dict().items() if k.endswith(".rank")}
    assert len(ranks) == 13 and ranks["features.block5.0.rank"] == 1 / 32


def test_decomposed_model_rebuilds_from_its_state_dict(tmp_path):
    torch.manual_seed(0)
    model = decompose(set_ranks(vgg16_cifar(width=0.25), [1.0, 0.5, 0.25, 2 / 32, 1 / 32])).eval()
    torch.save(model.state_dict(), tmp_path / "decomposed.pt")
    state = torch.load(tmp_path / "decomposed.pt", weights_only=True)
    rebuilt = decomposed_from_state_dict(vgg16_cifar(width=0.25), state).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(rebuilt(x), model(x))


def test_rebuild_refuses_a_state_dict_without_rank_buffers():
    state = {k: v for k, v in vgg16_cifar(width=0.25).state_dict().items() if not k.endswith(".rank")}
    with pytest.raises(ValueError, match="no rank buffer"):
        decomposed_from_state_dict(vgg16_cifar(width=0.25), state)


def test_cached_bases_are_the_singular_vectors_of_a_fresh_svd():
    torch.manual_seed(0)
    weight = torch.randn(48, 32, 3, 3)
    u_out, u_in = channel_bases(weight)
    fresh_out = torch.linalg.svd(weight.double().flatten(1), full_matrices=False).U
    fresh_in = torch.linalg.svd(weight.double().transpose(0, 1).flatten(1), full_matrices=False).U
    for cached, fresh in ((u_out, fresh_out), (u_in, fresh_in)):
        signs = torch.sign((cached * fresh).sum(0))  # singular vectors are defined up to sign
        torch.testing.assert_close(cached * signs, fresh, atol=1e-8, rtol=0)


@pytest.mark.parametrize("method", ["hosvd", "hosvd+refine"])
def test_truncated_hosvd_at_full_rank_reproduces_the_conv(method):
    torch.manual_seed(0)
    for conv in (nn.Conv2d(3, 64, 3, padding=1), nn.Conv2d(16, 24, 3, stride=2, padding=1)):  # R_in = Cin
        layer = Tucker2Conv.from_conv(conv, 1.0, method, channel_bases(conv.weight))
        x = torch.randn(2, conv.in_channels, 8, 8)
        torch.testing.assert_close(layer(x), conv(x), atol=1e-4, rtol=1e-4)


def test_refinement_lowers_the_hosvd_error_towards_hooi():
    torch.manual_seed(0)
    conv = nn.Conv2d(32, 64, 3, padding=1, bias=False)
    with torch.no_grad():  # a decaying channel spectrum, like a trained layer's
        conv.weight.mul_(torch.logspace(0, -2, 64)[:, None, None, None])
    bases = channel_bases(conv.weight)
    weight_fits = [m for m in TUCKER2_METHODS if m != "activation"]  # activation fits outputs (test_activation)
    errors = {m: reconstruction_error(conv, Tucker2Conv.from_conv(conv, 4 / 32, m, bases)) for m in weight_fits}
    assert errors["hooi"] <= errors["hosvd+refine"] + 1e-6 <= errors["hosvd"] + 2e-6
    assert errors["hosvd+refine"] < errors["hosvd"]


def test_decompose_with_cached_bases_equals_decompose_without():
    torch.manual_seed(0)
    model = set_ranks(vgg16_cifar(width=0.25), [0.5, 0.25, 0.125, 2 / 32, 1 / 32])
    with_cache = decompose(model, method="hosvd", bases=model_bases(model)).eval()
    without = decompose(model, method="hosvd").eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(with_cache(x), without(x))


def test_bases_are_cached_on_disk_for_exactly_the_baseline_weights(tmp_path):
    from ranksearch.train.baseline import cached_bases

    model = vgg16_cifar(width=0.125)
    checkpoint = tmp_path / "baseline.pt"
    first = cached_bases(model, checkpoint)
    assert (tmp_path / "baseline.bases.pt").is_file()
    saved = torch.load(tmp_path / "baseline.bases.pt", weights_only=True)
    assert set(saved["bases"]) == set(first)
    again = cached_bases(model, checkpoint)
    assert all(torch.equal(again[k][0], first[k][0]) for k in first)
    with torch.no_grad():
        model.features.block1[0].weight.add_(1.0)  # other weights: the cache must not be used
    changed = cached_bases(model, checkpoint)
    assert not torch.equal(changed["features.block1.0"][1], first["features.block1.0"][1])


def _with_ranks(state: dict, value: float) -> dict:
    return {k: torch.tensor(value) if k.endswith(".rank") else v for k, v in state.items()}


def test_rebuild_follows_the_saved_tensors_not_todays_rule():
    torch.manual_seed(0)
    model = decompose(set_ranks(vgg16_cifar(width=0.25), [1.0, 0.5, 0.25, 2 / 32, 1 / 32])).eval()
    # Rank buffers of 1.0 everywhere: today's rule would keep every conv plain and give R = Cout.
    rebuilt = decomposed_from_state_dict(vgg16_cifar(width=0.25), _with_ranks(model.state_dict(), 1.0)).eval()
    for (name, saved), (_, layer) in zip(_layers(model), _layers(rebuilt), strict=True):
        assert type(layer) is type(saved), name
        if isinstance(saved, Tucker2Conv):
            assert (layer.first.out_channels, layer.core.out_channels) == (saved.first.out_channels,
                                                                           saved.core.out_channels)  # fmt: skip
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(rebuilt(x), model(x))


def test_rebuild_keeps_plain_convs_plain_whatever_their_rank_buffer_says():
    model = set_ranks(vgg16_cifar(width=0.25), [1 / 32] * 5).eval()  # ranks at which all convs would decompose
    rebuilt = decomposed_from_state_dict(vgg16_cifar(width=0.25), model.state_dict()).eval()
    assert all(isinstance(layer, nn.Conv2d) for _, layer in _layers(rebuilt))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(rebuilt(x), model(x))


@pytest.mark.parametrize("change,message", [
    (lambda s: s.pop("features.block2.1.running_var"), "missing 'features.block2.1.running_var'"),
    (lambda s: s.pop("features.block2.0.core.weight"), "missing 'features.block2.0.weight'; unexpected"),
    (lambda s: s.update({"extra.weight": torch.zeros(1)}), "unexpected 'extra.weight'"),
    (lambda s: s.update({"classifier.weight": torch.zeros(3, 3)}), "wrong shape of 'classifier.weight'"),
])  # fmt: skip
def test_a_state_dict_that_does_not_fit_is_one_clear_line(change, message):
    state = decompose(set_ranks(vgg16_cifar(width=0.25), [1.0, 0.5, 0.25, 2 / 32, 1 / 32])).state_dict()
    change(state)
    with pytest.raises(ValueError, match=f"state_dict does not fit the VGG: .*{message}") as error:
        decomposed_from_state_dict(vgg16_cifar(width=0.25), state)
    assert "\n" not in str(error.value)


def _layers(model):
    from ranksearch.models import rank_modules

    return [pair for layers in rank_modules(model).values() for pair in layers]
