"""Pass registry: built-ins (lazy importers), ``register_pass`` and the ``passes.plugins`` entry-point group.

Built-ins map a name to ``module:Class`` and are imported on first use, so listing passes stays cheap and a
broken optional pass cannot break the others. A test checks every key equals its class's ``name``.
"""

from __future__ import annotations

import importlib
import logging
from importlib.metadata import entry_points

from passes.core.pass_base import Pass, PassError

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "passes.plugins"

BUILTIN_PASSES: dict[str, str] = {
    "infer-shapes": "passes.transforms.infer_shapes:InferShapes",
    "fold-constants": "passes.transforms.fold_constants:FoldConstants",
    "eliminate-dead-nodes": "passes.transforms.eliminate_dead_nodes:EliminateDeadNodes",
    "eliminate-common-subexpressions":
        "passes.transforms.eliminate_common_subexpressions:EliminateCommonSubexpressions",
    "remove-identities": "passes.transforms.remove_identities:RemoveIdentities",
    "fold-batch-norm": "passes.transforms.fold_batch_norm:FoldBatchNorm",
    "fold-conv-avg-pool": "passes.transforms.fold_conv_avg_pool:FoldConvAvgPool",
    "fuse-conv-activation": "passes.transforms.fuse_conv_activation:FuseConvActivation",
    "fuse-conv-pool": "passes.transforms.fuse_conv_pool:FuseConvPool",
    "fuse-conv-add": "passes.transforms.fuse_conv_add:FuseConvAdd",
    "fuse-qconv-add": "passes.transforms.fuse_qconv_add:FuseQConvAdd",
    "prune-weights": "passes.transforms.prune_weights:PruneWeights",
    "quantize": "passes.transforms.quantize:Quantize",
    "fold-qdq": "passes.transforms.fold_qdq:FoldQdq",
    "integer-max-pool": "passes.transforms.integer_max_pool:IntegerMaxPool",
    "prune-channels": "passes.transforms.prune_channels:PruneChannels",
    "distill": "passes.transforms.distill:Distill",
    "mixed-precision": "passes.transforms.mixed_precision:MixedPrecision",
    "alter-layout": "passes.transforms.alter_layout:AlterLayout",
    "fold-channel-scale": "passes.transforms.fold_channel_scale:FoldChannelScale",
    "fuse-expand-depthwise": "passes.transforms.fuse_expand_depthwise:FuseExpandDepthwise",
}

# Named pipelines usable wherever a pass name is: ``optimize(passes=["default"])``, ``--passes default``.
PRESETS: dict[str, tuple[str, ...]] = {
    "default": ("fold-qdq", "integer-max-pool", "remove-identities", "fold-constants",
                "eliminate-common-subexpressions", "fold-batch-norm", "fold-conv-avg-pool", "fuse-conv-activation",
                "fuse-conv-add", "fuse-qconv-add", "fuse-conv-pool", "eliminate-dead-nodes"),
}

_registered: dict[str, type[Pass]] = {}
_plugins_loaded = False


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Register a ``Pass`` subclass under its ``name`` (usable as a class decorator). Duplicates are errors."""
    if not (isinstance(cls, type) and issubclass(cls, Pass)):
        raise PassError(f"register_pass expects a Pass subclass, got {cls!r}")
    name = cls.name
    if not name or name != name.lower() or " " in name or "_" in name:
        raise PassError(f"pass {cls.__name__} needs a kebab-case `name`, got {name!r}")
    existing = _registered.get(name)
    if (existing is not None and existing is not cls) or (name in BUILTIN_PASSES and existing is None):
        raise PassError(f"a pass named {name!r} is already registered; choose another name")
    _registered[name] = cls
    return cls


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        cls = ep.load()
        if _registered.get(cls.name) is cls:
            continue
        register_pass(cls)
        log.debug("loaded plug-in pass %s from %s", cls.name, ep.value)


def get_pass_class(name: str) -> type[Pass]:
    if name in _registered:
        return _registered[name]
    if name in BUILTIN_PASSES:
        module, cls_name = BUILTIN_PASSES[name].split(":")
        cls = getattr(importlib.import_module(module), cls_name)
        _registered[name] = cls
        return cls
    _load_plugins()
    if name in _registered:
        return _registered[name]
    raise PassError(f"unknown pass {name!r}; available: {', '.join(pass_names()) or 'none'}")


def preset(name: str) -> tuple[str, ...] | None:
    return PRESETS.get(name)


def pass_names() -> list[str]:
    _load_plugins()
    return sorted(set(BUILTIN_PASSES) | set(_registered))
