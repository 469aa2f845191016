"""Pod layouts: every big array divided by every device, no silent replication.

Pod meshes are jax.sharding.AbstractMesh (shapes and shardings only, nothing
allocated): the trainer's own abstract_state runs on them as on real devices.
"""
import logging

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType, PartitionSpec as P

from dalle_jax.configs import common
from dalle_jax.configs import dalle as dalle_cfg
from dalle_jax.configs import dalle_mini as dalle_mini_cfg
from dalle_jax import parallel
from dalle_jax.tasks.base import get_task
from dalle_jax.train import loop
from dalle_jax.train.optimizers import make_optimizer

BIG = 16 << 20  # bytes: the weight matrices, embeddings and their optimizer slots


def _abstract_mesh(config, n):
  names, sizes = parallel.mesh_shape(config.mesh, n)
  return AbstractMesh(sizes, names, axis_types=(AxisType.Auto,) * len(names))


def _pod_state(config, n):
  """The trainer's abstract TrainState and shardings on an n-device pod."""
  task = get_task(config)
  tx, _ = make_optimizer(task.optimizer_groups(), task.param_labels, config.total_steps)
  return loop.abstract_state(task, tx, config, _abstract_mesh(config, n), task.dummy_batch(n))


def _nbytes(a):
  return int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize


@pytest.mark.parametrize("n", [256, 512])
@pytest.mark.parametrize("family,preset", [(dalle_cfg, "paper"), (dalle_mini_cfg, "mega")])
def test_pod_presets_divide_params_and_optimizer_state_by_every_device(family, preset, n):
  config = family.get_config(preset)
  abstract, shardings = _pod_state(config, n)
  leaves, specs = jax.tree.leaves(abstract), jax.tree.leaves(shardings)
  assert sum(_nbytes(a) for a in leaves) > (100e9 if preset == "paper" else 10e9)  # 12B / 2.6B
  shard_bytes = lambda a, s: _nbytes(a) // a.size * int(np.prod(s.shard_shape(a.shape)))
  assert parallel.per_device_bytes(shardings, abstract) == sum(
      shard_bytes(a, s) for a, s in zip(leaves, specs))
  # the arrays that may not replicate (>= 1 MiB): params and optimizer slots
  large = [(a, s) for a, s in zip(leaves, specs) if _nbytes(a) >= 1 << 20]
  total = sum(_nbytes(a) for a, _ in large)
  per_device = sum(shard_bytes(a, s) for a, s in large)
  assert per_device <= 1.1 * total / n, (per_device / (total / n))
  big = [(a, s) for a, s in large if _nbytes(a) >= BIG]
  assert len(big) >= 6
  for a, s in big:  # each one split into exactly n pieces
    assert int(np.prod(s.shard_shape(a.shape))) * n == a.size, (a.shape, s.spec)


def test_clip_vit_l14_beyond_256_devices_with_the_documented_2d_mesh():
  """configs/clip.py: widths 768 = 2^8 * 3 cap 'fsdp' at 256; the preset's 2-D rules
  then split the weights over 'data' as well (--config.mesh.fsdp=256 --config.mesh.data=-1)."""
  from dalle_jax.configs import clip as clip_cfg  # pylint: disable=g-import-not-at-top
  config = clip_cfg.get_config("vit_l14")
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=256, tensor=1))
  abstract, shardings = _pod_state(config, 512)
  big = [(a, s) for a, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings))
         if _nbytes(a) >= 4 << 20]
  assert len(big) >= 3 * 24 * 4  # ViT-L/14: 24 vision blocks' weights x params, mu, nu
  for a, s in big:
    assert int(np.prod(s.shard_shape(a.shape))) * 512 == a.size, (a.shape, s.spec)


@pytest.mark.parametrize("mesh,match", [
    # the paper preset's former mesh: fsdp over all 256 devices, d_model 3968 = 2^7 * 31
    (dict(data=1, fsdp=-1, tensor=1),
     r"params/\S+ \([0-9, ]+\): dim \d \('embed'\) of size 3968 is not divisible by mesh "
     r"axis 'fsdp' \(256\).*largest dividing size: 128"),
    # tensor parallelism over 62 heads
    (dict(data=-1, fsdp=64, tensor=4),
     r"params/layers/layers/block/attn/\w+/dense/kernel \(64, 3968, 62, 64\): dim 2 \('heads'\) "
     r"of size 62 is not divisible by mesh axis 'tensor' \(4\)"),
])
def test_a_non_dividing_mesh_axis_names_the_parameter(mesh, match):
  config = dalle_cfg.get_config("paper")
  config.mesh = ml_collections.ConfigDict(mesh)
  with pytest.raises(parallel.ReplicationError, match=match):
    _pod_state(config, 256)


def _tiny_tree():
  init = lambda names: nn.with_logical_partitioning(nn.initializers.zeros, names)
  return {"params": {
      "proj": {"kernel": init(("embed", "mlp"))(None, (6, 16))},  # 6 rows: not over fsdp 4
      "emb": {"embedding": init(("vocab", "embed"))(None, (10, 8))}}}


def test_small_arrays_replicate_below_the_limit_and_are_logged(caplog):
  mesh = AbstractMesh((1, 4, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
  tree = jax.eval_shape(_tiny_tree)
  with caplog.at_level(logging.INFO):
    sh = parallel.logical_shardings(tree, mesh, common.DEFAULT_RULES)
  assert sh["params"]["proj"]["kernel"].spec == P(None, "tensor")  # 'fsdp' left the 6 rows
  assert sh["params"]["emb"]["embedding"].spec == P("tensor", "fsdp")
  assert "1 small arrays (0.000 MiB in all) replicated" in caplog.text
  with pytest.raises(parallel.ReplicationError,
                     match=r"params/proj/kernel \(6, 16\): dim 0 \('embed'\) of size 6 .* "
                           r"'fsdp' \(4\).*largest dividing size: 2"):
    parallel.logical_shardings(tree, mesh, common.DEFAULT_RULES, allow_replication_below=384)
  # the run's config sets the limit for everything inside its mesh_context
  config = ml_collections.ConfigDict(dict(logical_axis_rules=common.DEFAULT_RULES,
                                          allow_replication_below=0))
  with parallel.mesh_context(mesh, config), pytest.raises(parallel.ReplicationError):
    parallel.logical_shardings(tree, mesh, common.DEFAULT_RULES)
  with pytest.raises(parallel.ReplicationError, match=r"cache \(3, 8\): dim 0 \('batch'\)"):
    parallel.named_sharding(("batch", None), (3, 8), mesh, common.DEFAULT_RULES, what="cache",
                            allow_replication_below=0)


def test_fsdp_2d_rules_split_weights_twice_and_leave_activations_alone():
  rules = parallel.fsdp_2d_rules(common.DEFAULT_RULES)
  to_mesh = lambda *names: nn.logical_to_mesh_axes(names, rules)
  assert to_mesh("embed", "mlp") == P("fsdp", ("tensor", "data"))
  assert to_mesh("embed", "heads", "kv") == P("fsdp", "tensor", "data")
  assert to_mesh("vocab", "embed") == P(("tensor", "data"), "fsdp")
  # activations: the batch claims data first, the rest as in the 1-D rules
  assert to_mesh("batch", "length", "mlp") == P(("data", "fsdp"), None, "tensor")
  assert to_mesh("batch", "length", "heads", "kv") == P(("data", "fsdp"), None, "tensor", None)
  assert to_mesh("batch", "length", "vocab") == P(("data", "fsdp"), None, "tensor")
  with pytest.raises(ValueError, match="'batch' rule must come before"):
    parallel.fsdp_2d_rules((("mlp", "tensor"), ("batch", "data")))
  assert dict(parallel.replace_rule(common.DEFAULT_RULES, "norm", "fsdp"))["norm"] == "fsdp"
