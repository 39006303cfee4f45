"""BatchNorm folded into the conv before it, for deployable exports: the same function with one layer less.

In eval mode a BatchNorm2d is a per-channel affine map, so ``bn(conv(x))`` is one conv with scaled weights and
a shifted bias. ``fold_batchnorm`` traces the model with torch.fx, which sees through a ``Tucker2Conv``: the
BatchNorm after it folds into its last 1x1 conv.
"""

import copy
from collections import Counter

from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ..utils.errors import first_line


def fold_batchnorm(model: nn.Module) -> fx.GraphModule:
    """A new eval-mode module in which every BatchNorm2d fed only by a conv (used by nothing else) is folded into
    that conv and gone; ``model`` is left untouched. Raises ValueError when torch.fx cannot trace ``model``."""
    try:
        traced = fx.symbolic_trace(copy.deepcopy(model).eval())
    except Exception as error:  # fx raises TraceError, TypeError, NotImplementedError... for code it cannot follow
        raise ValueError(f"cannot fold the BatchNorm layers of {type(model).__name__}: torch.fx cannot trace it "
                         f"({first_line(error)})") from error  # fmt: skip
    modules = dict(traced.named_modules())
    calls = Counter(node.target for node in traced.graph.nodes if node.op == "call_module")
    for node in list(traced.graph.nodes):
        conv = node.args[0] if node.op == "call_module" and node.args else None
        if not (_is_call(node, nn.BatchNorm2d, modules) and _is_call(conv, nn.Conv2d, modules)):
            continue
        bn = modules[node.target]
        if len(conv.users) > 1 or calls[conv.target] > 1 or calls[node.target] > 1 or not bn.track_running_stats:
            continue  # the conv's output or weights are used elsewhere, or the BN has no running statistics
        traced.set_submodule(conv.target, fuse_conv_bn_eval(modules[conv.target], bn))
        node.replace_all_uses_with(conv)
        traced.graph.erase_node(node)
    traced.delete_all_unused_submodules()
    traced.recompile()
    return traced


def _is_call(node: object, kind: type[nn.Module], modules: dict[str, nn.Module]) -> bool:
    """True when ``node`` is a graph node calling a submodule of exactly type ``kind`` (not a subclass)."""
    return isinstance(node, fx.Node) and node.op == "call_module" and type(modules.get(node.target)) is kind
