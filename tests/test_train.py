import torch
from torch import nn

from ranksearch.config import Config
from ranksearch.train import distillation_loss


def test_distillation_loss_is_zero_for_identical_logits_and_positive_otherwise():
    logits = torch.randn(8, 10)
    assert float(distillation_loss(logits, logits, 4.0)) < 1e-6
    assert float(distillation_loss(logits, torch.randn(8, 10), 4.0)) > 0


def test_distillation_loss_is_finite_and_decreases_on_a_tiny_model():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    student = nn.Linear(16, 10)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.5)
    inputs = torch.randn(256, 16)
    with torch.no_grad():
        targets = teacher(inputs)
    losses = []
    for _ in range(100):
        loss = distillation_loss(student(inputs), targets, Config().distill_temperature)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0]
