"""Mesh, logical-axis rules and sharding helpers — the one place for parallelism.

Models annotate parameters and activations with logical names ('embed',
'heads', 'batch', ...); `config.logical_axis_rules` maps them onto mesh axes
('data', 'fsdp', 'tensor'). Everything else (trainer, tools, sampling) gets its
shardings from here.
"""
import logging
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")  # the mesh axes a global batch is split over


def initialize_distributed(coordinator_address=None, num_processes=None, process_id=None,
                           local_device_ids=None):
  """Multi-process start-up from arguments or environment.

  Explicit arguments win; then DALLE_JAX_COORDINATOR / DALLE_JAX_NUM_PROCESSES /
  DALLE_JAX_PROCESS_ID; on Cloud TPU (TPU_WORKER_HOSTNAMES / MEGASCALE vars) JAX
  auto-detects everything. Single-process runs skip initialisation.
  """
  env = os.environ
  coordinator_address = coordinator_address or env.get("DALLE_JAX_COORDINATOR")
  num_processes = num_processes or (int(env["DALLE_JAX_NUM_PROCESSES"]) if "DALLE_JAX_NUM_PROCESSES" in env else None)
  if process_id is None and "DALLE_JAX_PROCESS_ID" in env:
    process_id = int(env["DALLE_JAX_PROCESS_ID"])
  on_tpu_pod = "TPU_WORKER_HOSTNAMES" in env and "," in env.get("TPU_WORKER_HOSTNAMES", "")
  if coordinator_address and (num_processes or 1) > 1:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id,
                               local_device_ids=local_device_ids)
  elif on_tpu_pod:
    jax.distributed.initialize()  # auto-detected on Cloud TPU
  if jax.process_count() > 1:
    logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())


def mesh_shape(mesh_cfg, num_devices):
  """Resolves `config.mesh` (ordered axis -> size, one may be -1) for N devices."""
  names = tuple(mesh_cfg.keys())
  sizes = [int(mesh_cfg[n]) for n in names]
  unknown = [n for n, s in zip(names, sizes) if s == -1]
  if len(unknown) > 1:
    raise ValueError(f"config.mesh: only one axis may be -1, got {dict(zip(names, sizes))}")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"config.mesh: axis sizes must be positive or -1, got {dict(zip(names, sizes))}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if unknown:
    if num_devices % known:
      raise ValueError(f"config.mesh {dict(zip(names, sizes))}: the fixed axes multiply to {known}, "
                       f"which does not divide the {num_devices} available devices")
    sizes = [num_devices // known if s == -1 else s for s in sizes]
  if int(np.prod(sizes)) != num_devices:
    raise ValueError(f"config.mesh {dict(zip(names, sizes))} has {int(np.prod(sizes))} devices but "
                     f"{num_devices} are available; set one axis to -1 or make the product match")
  return names, tuple(sizes)


def make_mesh(mesh_cfg, devices=None):
  devices = jax.devices() if devices is None else devices
  names, sizes = mesh_shape(mesh_cfg, len(devices))
  if devices is None or len(devices) == jax.device_count():
    return jax.make_mesh(sizes, names, axis_types=(AxisType.Auto,) * len(names), devices=devices)
  return Mesh(np.asarray(devices).reshape(sizes), names, axis_types=(AxisType.Auto,) * len(names))


def rules_from_config(config):
  return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in config.logical_axis_rules)


def unbox(tree):
  """Strips flax's LogicallyPartitioned boxes, leaving plain arrays."""
  return nn.meta.unbox(tree)


def _fit_spec(spec, shape, mesh):
  """Drops mesh axes from dims they don't divide (tiny models on big meshes)."""
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is None:
      out.append(None)
      continue
    axes_t = axes if isinstance(axes, tuple) else (axes,)
    kept = tuple(a for a in axes_t if a in mesh.shape)
    size = int(np.prod([mesh.shape[a] for a in kept])) if kept else 1
    if size > 1 and dim % size:
      # Try the longest prefix that divides before giving up on the dim.
      while kept and dim % int(np.prod([mesh.shape[a] for a in kept])):
        kept = kept[:-1]
    out.append(None if not kept else (kept if len(kept) > 1 else kept[0]))
  return P(*out)


def logical_shardings(abstract_boxed, mesh, rules):
  """NamedShardings for a (possibly boxed) variables tree, from logical names.

  Boxed leaves (nn.LogicallyPartitioned) map through `rules`; plain leaves
  (step counters, RNG keys) are replicated.
  """
  def to_sharding(x):
    if isinstance(x, nn.LogicallyPartitioned) and not hasattr(x.value, "shape"):
      return x.value  # e.g. optax's MaskedNode (another group's slot): an empty subtree
    if isinstance(x, nn.LogicallyPartitioned):
      spec = nn.logical_to_mesh_axes(x.names, rules)
      shape = x.value.shape
    else:
      spec, shape = P(), x.shape
    return NamedSharding(mesh, _fit_spec(spec, shape, mesh))

  return jax.tree.map(to_sharding, abstract_boxed,
                      is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def named_sharding(names, shape, mesh, rules):
  """NamedSharding for one array with logical axis `names` (None = replicated dim)."""
  return NamedSharding(mesh, _fit_spec(nn.logical_to_mesh_axes(tuple(names), rules), shape, mesh))


def replicated(mesh):
  return NamedSharding(mesh, P())


def batch_sharding(mesh, ndim=1):
  axes = tuple(a for a in BATCH_AXES if a in mesh.shape)
  return NamedSharding(mesh, P(axes, *([None] * (ndim - 1))))


def batch_axis_size(mesh):
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES if a in mesh.shape]))


def shard_batch(batch, mesh):
  """Process-local numpy batch -> global jax.Arrays split over the batch axes.

  Non-numeric fields (captions as str) stay on the host and are dropped here.
  """
  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)
  return {k: put(v) for k, v in batch.items()
          if isinstance(v, (np.ndarray, jax.Array)) and np.asarray(v).dtype.kind in "biuf"}


def host_local(x):
  """A globally sharded array -> this process's rows as numpy."""
  if jax.process_count() == 1:
    return np.asarray(x)
  return np.asarray(jax.experimental.multihost_utils.global_array_to_host_local_array(
      x, x.sharding.mesh, x.sharding.spec))


def constrain(x, names):
  return nn.with_logical_constraint(x, names)


def axis_rules_context(config):
  """Context manager making the config's rules active for logical constraints."""
  return nn.logical_axis_rules(rules_from_config(config))


class mesh_context:
  """`with mesh_context(mesh, config):` — the mesh and the logical rules, active together."""

  def __init__(self, mesh, config=None):
    self._ctxs = [jax.set_mesh(mesh)]
    if config is not None:
      self._ctxs.append(axis_rules_context(config))

  def __enter__(self):
    for c in self._ctxs:
      c.__enter__()
    return self

  def __exit__(self, *exc):
    for c in reversed(self._ctxs):
      c.__exit__(*exc)
