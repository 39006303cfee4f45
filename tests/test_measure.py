import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ranksearch import count_macs, decompose, set_ranks, vgg16_cifar
from ranksearch.decompose import decomposed_from_state_dict
from ranksearch.measure import count_params

VGG16_CHANNELS = [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]]


def expected_macs(ranks, width=1.0, num_classes=10):
    """Tucker-2 MACs written out from the method's definition, independently of the package."""
    total, cin, side = 0, 3, 32
    for r, block in zip(ranks, VGG16_CHANNELS, strict=True):
        for channels in block:
            cout = max(1, round(channels * width))
            plain = side * side * cin * cout * 9
            big_r = max(1, round(r * cout))
            r_in, r_out = min(big_r, cin), min(big_r, cout)
            tucker = side * side * (cin * r_in + r_in * r_out * 9 + r_out * cout)
            total += min(plain, tucker)  # a layer that would not get cheaper stays as it is
            cin = cout
        side //= 2
    return total + cin * num_classes


def test_baseline_macs_match_formula_and_flop_counter():
    model = vgg16_cifar()
    macs, params = count_macs(model)
    assert macs == expected_macs([1.0] * 5) == 313_201_664
    with FlopCounterMode(display=False) as counter:
        model.eval()(torch.zeros(1, 3, 32, 32))
    assert counter.get_total_flops() == 2 * macs
    assert params == sum(p.numel() for n, p in model.named_parameters() if "features" not in n or p.dim() == 4)


@pytest.mark.parametrize(
    "ranks",
    [[1.0] * 5, [0.25] * 5, [1 / 32] * 5, [1.0, 0.5, 0.25, 2 / 32, 1 / 32], [3 / 32, 1.0, 17 / 32, 1.0, 5 / 32]],
)
def test_decomposed_macs_match_tucker2_formula(ranks):
    model = decompose(set_ranks(vgg16_cifar(width=0.25), ranks), factorize=False)
    macs, _ = count_macs(model)
    assert macs == expected_macs(ranks, width=0.25)
    with FlopCounterMode(display=False) as counter:
        model.eval()(torch.zeros(1, 3, 32, 32))
    assert counter.get_total_flops() == 2 * macs


def test_all_ranks_at_most_a_quarter_cut_macs_at_least_5x():
    base_macs, base_params = count_macs(vgg16_cifar())
    for ranks in ([0.25] * 5, [0.25, 0.125, 0.25, 1 / 32, 0.25]):
        macs, params = count_macs(decompose(set_ranks(vgg16_cifar(), ranks), factorize=False))
        assert base_macs / macs >= 5, ranks
        assert params < base_params


def test_params_count_convs_and_linear_only():
    model = vgg16_cifar(width=0.25)
    convs_and_linear = sum(
        p.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) for p in m.parameters()
    )
    assert count_params(model) == convs_and_linear < sum(p.numel() for p in model.parameters())


def test_counting_leaves_the_model_untouched():
    model = decompose(set_ranks(vgg16_cifar(width=0.25), [0.5] * 5)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    count_macs(model)
    after = model.state_dict()
    assert model.training and before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    decomposed_from_state_dict(vgg16_cifar(width=0.25), after)  # still loads strictly
