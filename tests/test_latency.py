"""Latency: a settled median of timed forward passes, with the model's mode and torch's threads restored."""

import math
import time

import torch
from torch import nn

from ranksearch.objectives.latency import latency_device, measure_latency


class Sleeps(nn.Module):
    """A forward pass of a known duration; records the shape of its input."""

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds, self.shapes = seconds, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(x.shape))
        time.sleep(self.seconds)
        return x


def tiny_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4096, 10)
    )


def test_a_tiny_model_gets_a_positive_median_from_enough_runs():
    result = measure_latency(tiny_model(), min_rounds=3, round_size=5)
    assert math.isfinite(result.median_ms) and result.median_ms > 0
    assert result.runs >= 3 * 5 and result.runs % 5 == 0
    assert result.batch == 1 and result.threads == torch.get_num_threads()


def test_training_flag_and_threads_are_restored():
    model, before = tiny_model().train(), torch.get_num_threads()
    result = measure_latency(model, threads=before + 1, round_size=3, max_seconds=1.0)
    assert result.threads == before + 1
    assert model.training and torch.get_num_threads() == before
    model.eval()
    measure_latency(model, round_size=3, max_seconds=1.0)
    assert not model.training


def test_a_forward_pass_that_sleeps_2_ms_measures_about_2_ms():
    result = measure_latency(Sleeps(0.002), min_rounds=2, round_size=5, max_seconds=2.0, warmup=1)
    assert 2.0 <= result.median_ms < 20.0


def test_running_out_of_time_returns_an_unstable_result():
    result = measure_latency(Sleeps(0.001), min_rounds=5, round_size=3, max_seconds=1e-6, warmup=0)
    assert not result.stable and result.runs == 3


def test_batch_is_the_leading_dimension_of_the_input():
    model = Sleeps(0.0)
    result = measure_latency(model, batch=4, round_size=2, max_seconds=1.0, warmup=1)
    assert result.batch == 4 and set(model.shapes) == {(4, 3, 32, 32)}
    assert len(model.shapes) == 1 + result.runs  # warm-up, then the timed runs


def test_latency_device_names_the_cpu():
    where = latency_device(torch.device("cpu"), 2)
    assert where["device"] == "cpu" and where["threads"] == 2 and where["gpu"] is None and where["cpu"]
