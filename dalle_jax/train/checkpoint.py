"""Orbax checkpoints: atomic, asynchronous, resumable, reshardable.

A training checkpoint holds the whole TrainState (params, optimizer, EMA, step,
RNG) and the data iterator position, saved together under
WORKDIR/checkpoints/<step>/. An imported checkpoint (public weights converted by
`dalle_jax.convert`) is a directory with config.json and variables/.
`load_model` accepts either.
"""
import json
import logging
import os
import re

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from dalle_jax import paths


class CheckpointMismatchError(ValueError):
  pass


class DamagedCheckpointError(RuntimeError):
  """Every checkpoint of a workdir failed to read back."""


def _keystr(path):
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _meta_shapes(meta_tree):
  out = {}
  for path, m in jax.tree_util.tree_flatten_with_path(meta_tree)[0]:
    if hasattr(m, "shape"):
      out[_keystr(path)] = (tuple(m.shape), str(getattr(m, "dtype", "")))
  return out


def check_compatible(saved_meta, abstract_target, where):
  """Raises naming every parameter whose presence or shape differs."""
  saved = _meta_shapes(saved_meta)
  want = {k: (tuple(v.shape), str(v.dtype)) for k, v in
          ((_keystr(p), x) for p, x in jax.tree_util.tree_flatten_with_path(abstract_target)[0])}
  problems = []
  for k, (shape, _) in want.items():
    if k not in saved:
      problems.append(f"  {k}: in the model {shape}, missing in the checkpoint")
    elif saved[k][0] != shape:
      problems.append(f"  {k}: checkpoint has shape {saved[k][0]}, the config builds {shape}")
  for k in saved:
    if k not in want:
      problems.append(f"  {k}: in the checkpoint {saved[k][0]}, not in the model")
  if problems:
    head = f"checkpoint {where} does not fit the config ({len(problems)} differences):\n"
    raise CheckpointMismatchError(head + "\n".join(problems[:20]) +
                                  ("\n  ..." if len(problems) > 20 else ""))


class Checkpointer:
  """Saves TrainState + data-iterator state; restores the newest readable step."""

  def __init__(self, workdir, keep=3, async_save=True):
    self.directory = paths.resolve(workdir) / "checkpoints"
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": ocp.JsonCheckpointHandler()})

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, step, state, data_state):
    """Saves `step` (the caller decides when; a step already saved is an error)."""
    return self.manager.save(
        int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                           data=ocp.args.JsonSave(data_state or {})),
        force=True)

  def wait(self):
    self.manager.wait_until_finished()

  def restore(self, abstract_state):
    """Newest step that reads back; damaged ones are reported and skipped.

    Returns (step, state, data_state) or (None, None, None) when there is none.
    A config/checkpoint mismatch is raised, never skipped; so is a workdir whose
    checkpoints are all damaged (starting afresh would silently discard them).
    """
    steps = sorted(self.manager.all_steps(), reverse=True)
    damaged = []
    for step in steps:
      where = self.directory / str(step)
      try:
        meta = self.manager.item_metadata(step)
        state_meta = meta["state"] if meta is not None and "state" in meta else None
      except Exception as e:  # unreadable metadata = damaged checkpoint
        logging.error("checkpoint %s is damaged (%s); trying the previous one", where, e)
        damaged.append(step)
        continue
      if state_meta is None:
        logging.error("checkpoint %s has no readable state; trying the previous one", where)
        damaged.append(step)
        continue
      check_compatible(state_meta, abstract_state, where)
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
      except Exception as e:
        logging.error("checkpoint %s could not be restored (%s: %s); trying the previous one",
                      where, type(e).__name__, str(e)[:300])
        damaged.append(step)
        continue
      return step, restored["state"], restored["data"]
    if damaged:
      raise DamagedCheckpointError(
          f"all {len(damaged)} checkpoints in {self.directory} are damaged (steps "
          f"{', '.join(map(str, sorted(damaged)))}; details logged above): move them away to "
          f"start afresh, or restore a backup")
    return None, None, None

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


# --- inference loading --------------------------------------------------------

def _read_config(path):
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def _resolve_text_path(config, root):
  text = config.get("text")
  if text is not None and text.get("path") and not (os.path.isabs(text.path) or
                                                    paths.is_remote(text.path)):
    candidate = root / text.path
    if candidate.exists():  # tokenizer libraries read local files only
      with config.unlocked():
        config.text.path = paths.local_copy(candidate)
  return config


def _item_metadata(directory):
  meta = ocp.StandardCheckpointer().metadata(directory)
  return meta.item_metadata if hasattr(meta, "item_metadata") else meta


def _restore_entries(directory, keys, targets=None):
  """Restores only the top-level entries `keys` of a saved tree (the others, e.g.
  the optimizer state, are never read).

  targets: {key: pytree of jax.ShapeDtypeStruct (or arrays) with shardings} for
  entries to restore straight into their shards (each process reads only its
  part; shapes are checked, with every difference named); other entries go to
  one device. Returns {key: tree} for the keys the checkpoint holds (None entries
  skipped).
  """
  tree = _item_metadata(directory)
  dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = {}
  for key in keys:
    saved = tree.get(key)
    if saved is None or (isinstance(saved, dict) and not saved):
      continue
    target = (targets or {}).get(key)
    if target is not None:
      check_compatible(saved, target, f"{directory} ({key})")
      abstract[key] = jax.tree.map(
          lambda m, t: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=t.sharding),
          saved, target)
    else:
      abstract[key] = jax.tree.map(
          lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=dev), saved)
  if not abstract:
    return {}
  restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
  return ocp.PyTreeCheckpointer().restore(
      directory, args=ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args,
                                             partial_restore=True))


def _saved_steps(ckpt_root):
  """Step numbers under a workdir's checkpoints/, newest first."""
  if not ckpt_root.is_dir():
    return []
  return sorted((int(d.name) for d in ckpt_root.iterdir() if d.name.isdigit()), reverse=True)


def read_config(path):
  """The config.json of a training workdir or imported checkpoint directory."""
  path = paths.resolve(path)
  cfg_file = path / "config.json"
  if not cfg_file.is_file():
    raise FileNotFoundError(f"{path}: not a training workdir or imported checkpoint (no config.json)")
  return _resolve_text_path(_read_config(cfg_file), path)


def load_model(path, use_ema=True, params_target=None):
  """(config, variables) from a training workdir or an imported checkpoint dir.

  variables = {'params': ..., other collections}. From a workdir the latest
  readable checkpoint is used, with EMA parameters when the run kept them; only
  the parameters (and model state) are read, never the optimizer state.
  params_target: None (one device) or the parameters' abstract tree
  (jax.ShapeDtypeStruct or arrays, with shardings): each parameter is then
  restored straight into its shards on the mesh, so a model larger than one
  device (or, across processes, one host's memory) loads for sampling.
  """
  path = paths.resolve(path)
  config = read_config(path)
  if (path / "variables").is_dir():  # imported checkpoint
    directory = path / "variables"
    keys = list(_item_metadata(directory).keys())
    return config, _restore_entries(directory, keys, {"params": params_target})
  ckpt_root = path / "checkpoints"
  steps = _saved_steps(ckpt_root)
  if not steps:
    raise FileNotFoundError(f"{path}: training workdir without checkpoints under {ckpt_root}")
  last_error = None
  for step in steps:
    directory = ckpt_root / str(step) / "state"
    try:
      saved = _item_metadata(directory)
      key = "ema_params" if use_ema and saved.get("ema_params") is not None else "params"
      state = _restore_entries(directory, [key, "model_state"], {key: params_target})
    except CheckpointMismatchError:
      raise
    except Exception as e:  # damaged: fall back to the previous one
      logging.error("checkpoint %s/%d unreadable (%s); trying the previous one", ckpt_root, step, e)
      last_error = e
      continue
    variables = {"params": state[key]}
    variables.update(state.get("model_state") or {})
    logging.info("loaded %s step %d%s", path, step, " (EMA params)" if key == "ema_params" else "")
    return config, variables
  raise RuntimeError(f"{path}: no readable checkpoint ({last_error})")


def _newest_params(path, use_ema=True):
  """(directory, key) of the saved tree holding a model's parameters: an imported
  checkpoint's variables/ ('params'), or a workdir's newest checkpoint whose
  metadata reads back ('ema_params' when the run kept them and use_ema)."""
  if (path / "variables").is_dir():
    return path / "variables", "params"
  ckpt_root = path / "checkpoints"
  steps = _saved_steps(ckpt_root)
  if not steps:
    raise FileNotFoundError(f"{path}: training workdir without checkpoints under {ckpt_root}")
  for step in steps:
    directory = ckpt_root / str(step) / "state"
    try:
      saved = _item_metadata(directory)
    except Exception as e:  # damaged: fall back to the previous one
      logging.error("checkpoint %s unreadable (%s); trying the previous one", directory, e)
      continue
    return directory, "ema_params" if use_ema and saved.get("ema_params") is not None else "params"
  raise DamagedCheckpointError(f"{path}: no readable checkpoint under {ckpt_root}")


def params_metadata(path, use_ema=True):
  """The saved parameter tree of a workdir or imported checkpoint: shapes and
  dtypes (orbax ArrayMetadata leaves), no array read."""
  directory, key = _newest_params(paths.resolve(path), use_ema)
  return _item_metadata(directory).get(key) or {}


def load_params(path, target, include="", exclude="", use_ema=True):
  """Parameters for fine-tuning from a workdir or an imported checkpoint.

  target: the new run's parameter tree (arrays, or ShapeDtypeStructs with
  shardings). Returns it with every parameter whose path ("decoder/layers/0/...")
  matches the regex `include` ("" = all) and not `exclude` ("" = none) replaced
  by the checkpoint's, each restored straight into its target's shards. A
  selected parameter missing from the checkpoint or of another shape, or a
  checkpoint parameter that passes the filter but is not in the model, is an
  error naming it; the others keep their target values.
  """
  path = paths.resolve(path)
  directory, key = _newest_params(path, use_ema)
  inc = re.compile(include) if include else None
  exc = re.compile(exclude) if exclude else None
  selected = lambda name: (inc is None or inc.search(name)) and not (exc and exc.search(name))

  flat_target = {_keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(target)[0]}
  saved = _item_metadata(directory).get(key) or {}
  saved_flat = _meta_shapes(saved)
  want = {k: x for k, x in flat_target.items() if selected(k)}
  if not want:
    raise CheckpointMismatchError(f"init_from {path}: no model parameter matches include="
                                  f"{include!r} / exclude={exclude!r}")
  extra = {k: v for k, v in saved_flat.items() if selected(k) and k not in flat_target}
  # The checkpoint's tree cut down to the selected entries, checked shape by shape.
  check_compatible({k: _Shape(*saved_flat[k]) for k in want if k in saved_flat}
                   | {k: _Shape(*v) for k, v in extra.items()}, want, f"{path} ({key})")
  nested = {}
  for name, x in want.items():
    node = nested
    *parents, leaf = name.split("/")
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
  restored = ocp.PyTreeCheckpointer().restore(directory, args=ocp.args.PyTreeRestore(
      item={key: nested}, restore_args=ocp.checkpoint_utils.construct_restore_args({key: nested}),
      partial_restore=True))[key]
  flat_restored = {_keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(restored)[0]}
  logging.info("init_from %s: %d of %d parameter arrays loaded", path, len(want), len(flat_target))
  return jax.tree_util.tree_map_with_path(
      lambda p, x: flat_restored.get(_keystr(p), x), target)


class _Shape:
  """A (shape, dtype) record that check_compatible reads like array metadata."""

  def __init__(self, shape, dtype):
    self.shape, self.dtype = shape, dtype


def save_imported(out_dir, config, variables):
  """Writes an imported checkpoint: out_dir/config.json + out_dir/variables/."""
  out_dir = paths.resolve(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  target = out_dir / "variables"
  if target.exists():
    target.rmtree()
  variables = jax.tree.map(np.asarray, variables)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(target, variables)
  ckptr.wait_until_finished()
  paths.write_text(out_dir / "config.json", config.to_json_best_effort(indent=2))
  return os.fspath(out_dir)
