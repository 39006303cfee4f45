import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ranksearch import count_macs, decompose, set_ranks, vgg16_cifar
from ranksearch.decompose import decomposed_from_state_dict
from ranksearch.models import build_model, module_names
from ranksearch.models.measure import count_params, flop_counter_macs

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


# ----- count_macs equals PyTorch's FlopCounterMode / 2 ---------------------------------------------------------------

REGISTERED = [
    ("vgg11", 0.25), ("vgg16", 0.25), ("resnet20", 1.0), ("resnet56", 1.0), ("resnet18", 0.25),
    ("torchvision:resnet18", 1.0), ("torchvision:mobilenet_v2", 1.0),
]  # fmt: skip


@pytest.mark.parametrize("name,width", REGISTERED)
def test_registered_models_macs_equal_flop_counter(name, width):
    model = build_model(name, num_classes=10, width=width).eval()
    assert count_macs(model)[0] == flop_counter_macs(model, (1, 3, 32, 32)) > 0


@pytest.mark.parametrize("name,width", [("vgg16", 0.25), ("resnet20", 1.0)])
def test_decomposed_models_macs_equal_flop_counter(name, width):
    model = build_model(name, num_classes=10, width=width)
    model = decompose(set_ranks(model, [4 / 32] * len(module_names(model))), factorize=False).eval()
    macs = count_macs(model)[0]
    assert macs == flop_counter_macs(model) < count_macs(build_model(name, num_classes=10, width=width))[0]


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(6, 8, 3, padding=1),  # with bias
        nn.Conv2d(6, 8, 3, stride=2, padding=1, bias=False),  # strided
        nn.Conv2d(6, 9, (3, 5), stride=(2, 1), padding=(0, 2), bias=True),  # strided, rectangular, no padding rows
        nn.Conv2d(6, 12, 3, padding=1, groups=3, bias=False),  # grouped
        nn.Conv2d(6, 6, 3, stride=2, padding=2, dilation=2, groups=6, bias=True),  # depthwise, dilated
        nn.Conv2d(6, 4, 1, bias=True),  # 1x1 with bias
        nn.Linear(6 * 15 * 15, 7),  # linear with bias (on the flattened input)
    ],
    ids=["bias", "strided", "rect", "grouped", "depthwise", "1x1-bias", "linear"],
)
def test_layer_rules_equal_flop_counter_and_the_written_out_formula(conv):
    model = conv if isinstance(conv, nn.Conv2d) else nn.Sequential(nn.Flatten(), conv)
    size = (2, 6, 15, 15)  # a batch of 2, odd sides: MACs scale with the batch, strides do not divide evenly
    with torch.no_grad():
        out = model(torch.zeros(size))
    if isinstance(conv, nn.Conv2d):  # every output element: one MAC per input channel of its group per tap
        formula = out.numel() * conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1]
    else:
        formula = out.numel() * conv.in_features
    assert count_macs(model, size)[0] == flop_counter_macs(model, size) == formula


def test_other_convs_count_as_flop_counter_counts_them():
    """Conv1d and transposed convs count too (none in the registered models): FlopCounterMode counts them."""
    model = nn.Sequential(nn.ConvTranspose2d(6, 4, 3, stride=2, groups=2), nn.Flatten(2), nn.Conv1d(4, 5, 3))
    macs, params = count_macs(model, (2, 6, 7, 7))
    assert macs == flop_counter_macs(model, (2, 6, 7, 7)) == 2 * (7 * 7 * 6 * 2 * 9 + 5 * 4 * 3 * (15 * 15 - 2))
    assert params == sum(p.numel() for p in model.parameters())


class EveryKindOfLayer(nn.Module):
    """Convs of every sort and one Linear among layers thop has MAC rules for (norms, pooling, PReLU, softmax,
    upsampling) and layers it has none for, all of which FlopCounterMode counts as 0."""

    def __init__(self):
        super().__init__()
        self.strided = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.Hardswish()
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.gn = nn.GroupNorm(2, 8)
        self.prelu = nn.PReLU()
        self.pointwise = nn.Conv2d(8, 16, 1, bias=True)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.silu = nn.SiLU()
        self.avg = nn.AvgPool2d(2)
        self.up = nn.Upsample(scale_factor=2, mode="bilinear")
        self.relu6 = nn.ReLU6()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(0.2)
        self.ln = nn.LayerNorm(16)
        self.fc = nn.Linear(16, 10)
        self.softmax = nn.Softmax(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn(self.strided(x)))
        x = self.prelu(self.gn(self.depthwise(x))) + x  # a residual add
        x = self.silu(self.grouped(self.pointwise(x)))
        x = self.relu6(self.up(self.avg(x)))
        x = self.ln(torch.flatten(self.pool(x), 1))
        return self.softmax(self.fc(self.drop(x)))


def test_a_model_with_every_kind_of_layer_counts_its_convs_and_linear_only():
    model = EveryKindOfLayer().eval()
    convs = 16 * 16 * (8 * 3 * 9 + 8 * 9 + 16 * 8 + 16 * 4 * 9)  # strided, depthwise, 1x1, grouped at 16x16
    assert count_macs(model)[0] == flop_counter_macs(model) == convs + 16 * 10
    assert count_macs(model, (3, 3, 32, 32))[0] == flop_counter_macs(model, (3, 3, 32, 32)) == 3 * (convs + 160)


def test_flop_counter_macs_leaves_the_model_untouched():
    model = build_model("resnet20", width=0.25).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flop_counter_macs(model)
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
