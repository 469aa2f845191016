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

from dalle_jax.models import layers

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


def replace_rule(rules, name, axes):
  """`rules` with logical `name` mapped to `axes` (e.g. the stacked layer-norm
  scales of a scanned pod-size model, 'norm' -> 'fsdp', instead of replicated)."""
  if name not in [n for n, _ in rules]:
    raise ValueError(f"replace_rule: no rule for logical axis {name!r}")
  return tuple((n, axes if n == name else a) for n, a in rules)


def fsdp_2d_rules(rules, over="data", dims=("kv", "mlp", "vocab")):
  """`rules` with weights also split over mesh axis `over` on their `dims`.

  FSDP shards each weight over 'fsdp' on its 'embed' dim, which caps 'fsdp' at
  the largest divisor of the model width (DALL·E's 3968 = 2^7 * 31: 128). Here
  the weights' other dim (head dim, MLP, vocabulary) also takes `over`, so
  parameters and optimizer state are divided by fsdp x `over` devices (2-D
  FSDP). Activations are unchanged: their 'batch' rule comes first and takes
  `over`, so their 'kv' / 'mlp' / 'vocab' fall back to the original rule.
  """
  names = [n for n, _ in rules]
  if "batch" not in names or any(names.index("batch") > names.index(d) for d in dims if d in names):
    raise ValueError("fsdp_2d_rules: the 'batch' rule must come before "
                     f"{dims} (activations must claim {over!r} for the batch first)")
  out = []
  for name, axes in rules:
    if name in dims:
      axes_t = () if axes is None else (tuple(axes) if isinstance(axes, (tuple, list)) else (axes,))
      out.append((name, axes_t + (over,)))
      if axes is not None:  # what activations (batch already on `over`) keep
        out.append((name, axes))
    else:
      out.append((name, axes))
  return tuple(out)


def unbox(tree):
  """Strips flax's LogicallyPartitioned boxes, leaving plain arrays."""
  return nn.meta.unbox(tree)


# Parameters smaller than this may lose a mesh axis that does not divide their
# dimension (kept whole along it, i.e. replicated there); anything larger is an
# error. `config.allow_replication_below` sets it for a run (see mesh_context).
DEFAULT_REPLICATION_LIMIT = 1 << 20  # bytes
_replication_limit = [DEFAULT_REPLICATION_LIMIT]  # innermost mesh_context's value last


class ReplicationError(ValueError):
  """A large array would be silently replicated along a mesh axis."""


def _fit_spec(spec, shape, mesh):
  """Keeps on each dim the longest prefix of its mesh axes whose product divides it.

  Returns (PartitionSpec, dropped): dropped lists (dim, [(axis, size), ...]) for
  the axes of size > 1 that had to go (the array is replicated along them).
  Axes the mesh does not have are ignored (a rule for a mesh without 'tensor').
  """
  out, dropped = [], []
  for i, (dim, axes) in enumerate(zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)))):
    if axes is None:
      out.append(None)
      continue
    axes_t = axes if isinstance(axes, tuple) else (axes,)
    kept = tuple(a for a in axes_t if a in mesh.shape)
    wanted = kept
    while kept and dim % int(np.prod([mesh.shape[a] for a in kept])):
      kept = kept[:-1]
    lost = [(a, mesh.shape[a]) for a in wanted[len(kept):] if mesh.shape[a] > 1]
    if lost:
      dropped.append((i, lost))
    out.append(None if not kept else (kept if len(kept) > 1 else kept[0]))
  return P(*out), dropped


def _replication_message(what, shape, names, dropped, nbytes, limit):
  i, lost = dropped[0]
  name = f" ({names[i]!r})" if names and i < len(names) and names[i] else ""
  axes = " x ".join(f"{a!r} ({n})" for a, n in lost)
  size = int(np.prod([n for _, n in lost]))
  return (f"{what} {tuple(shape)}: dim {i}{name} of size {shape[i]} is not divisible by mesh "
          f"axis {axes}, so its {nbytes / 2**20:.1f} MiB would be replicated along it "
          f"(largest dividing size: {int(np.gcd(shape[i], size))}). Change config.mesh or "
          f"config.logical_axis_rules so a dividing dim takes the axis, or raise "
          f"config.allow_replication_below above {nbytes} bytes (now {limit})")


def _spec_checked(spec, shape, dtype, mesh, what, names, limit, replicated_bytes):
  spec, dropped = _fit_spec(spec, shape, mesh)
  if dropped:
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if nbytes >= limit:
      raise ReplicationError(_replication_message(what, shape, names, dropped, nbytes, limit))
    replicated_bytes.append(nbytes)
  return spec


def _log_replicated(replicated_bytes, mesh):
  if replicated_bytes:
    logging.info("%d small arrays (%.3f MiB in all) replicated along mesh axes of %s that do "
                 "not divide them", len(replicated_bytes), sum(replicated_bytes) / 2**20,
                 dict(mesh.shape))


def logical_shardings(abstract_boxed, mesh, rules, allow_replication_below=None):
  """NamedShardings for a (possibly boxed) variables tree, from logical names.

  Boxed leaves (nn.LogicallyPartitioned) map through `rules`; plain leaves
  (step counters, RNG keys) are replicated. A mesh axis that does not divide
  its dimension is dropped only for arrays under `allow_replication_below`
  bytes (default: the innermost mesh_context's config, else
  DEFAULT_REPLICATION_LIMIT), with their total logged; a larger one raises
  ReplicationError naming its path, dimension and mesh axis. `mesh` may be an
  AbstractMesh (shardings only, nothing placed).
  """
  limit = _replication_limit[-1] if allow_replication_below is None else allow_replication_below
  replicated_bytes = []

  def to_sharding(path, x):
    if isinstance(x, nn.LogicallyPartitioned) and not hasattr(x.value, "shape"):
      return x.value  # e.g. optax's MaskedNode (another group's slot): an empty subtree
    names = None
    if isinstance(x, nn.LogicallyPartitioned):
      names = tuple(x.names)
      spec = nn.logical_to_mesh_axes(names, rules)
      x = x.value
    else:
      spec = P()
    what = jax.tree_util.keystr(path, simple=True, separator="/") or "array"
    return NamedSharding(mesh, _spec_checked(spec, x.shape, x.dtype, mesh, what, names, limit,
                                             replicated_bytes))

  out = jax.tree_util.tree_map_with_path(to_sharding, abstract_boxed,
                                         is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
  _log_replicated(replicated_bytes, mesh)
  return out


def named_sharding(names, shape, mesh, rules, dtype=jnp.float32, what="array",
                   allow_replication_below=None):
  """NamedSharding for one array with logical axis `names` (None = replicated
  dim), under the same divisibility check as logical_shardings."""
  limit = _replication_limit[-1] if allow_replication_below is None else allow_replication_below
  names = tuple(names)
  replicated_bytes = []
  spec = _spec_checked(nn.logical_to_mesh_axes(names, rules), shape, dtype, mesh, what, names,
                       limit, replicated_bytes)
  return NamedSharding(mesh, spec)


def per_device_bytes(shardings, abstract):
  """Bytes each device holds of `abstract` (ShapeDtypeStructs or arrays) laid out by
  `shardings` (same tree): the largest shard of every leaf, summed. Works on an
  AbstractMesh, so a pod's layout is checked without the pod."""
  sizes = jax.tree.map(lambda s, a: int(np.prod(s.shard_shape(a.shape))) * np.dtype(a.dtype).itemsize,
                       shardings, abstract)
  return sum(jax.tree.leaves(sizes))


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


def to_host(x):
  """A jax.Array, sharded over any processes, as one whole numpy array on every
  process (numpy passes through)."""
  if getattr(x, "is_fully_addressable", True):
    return np.asarray(x)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def constrain(x, names):
  return nn.with_logical_constraint(x, names)


def axis_rules_context(config):
  """Context manager making the config's rules active for logical constraints."""
  return nn.logical_axis_rules(rules_from_config(config))


class _replication_limit_context:
  def __init__(self, limit):
    self.limit = int(limit)

  def __enter__(self):
    _replication_limit.append(self.limit)

  def __exit__(self, *exc):
    _replication_limit.pop()


class mesh_context:
  """`with mesh_context(mesh, config):` — the mesh, the logical rules, the config's
  `allow_replication_below` (for logical_shardings) and its `attention_impl`
  (layers.attention_impl, read while tracing), active together.
  An AbstractMesh (a pod's shape, no devices) serves tracing: eval_shape, shardings."""

  def __init__(self, mesh, config=None):
    abstract = isinstance(mesh, jax.sharding.AbstractMesh)
    self._ctxs = [jax.sharding.use_abstract_mesh(mesh) if abstract else jax.set_mesh(mesh)]
    if config is not None:
      self._ctxs.append(axis_rules_context(config))
      if config.get("allow_replication_below") is not None:
        self._ctxs.append(_replication_limit_context(config.allow_replication_below))
      if config.get("attention_impl"):
        self._ctxs.append(layers.attention_impl(config.attention_impl))

  def __enter__(self):
    for c in self._ctxs:
      c.__enter__()
    return self

  def __exit__(self, *exc):
    for c in reversed(self._ctxs):
      c.__exit__(*exc)
