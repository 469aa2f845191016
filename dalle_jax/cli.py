"""Shared command-line plumbing for train.py / sample.py / tools."""
import difflib
import importlib.util
import logging
import os
import sys

from absl import flags

FLAGS = flags.FLAGS


def define_distributed_flags():
  flags.DEFINE_string("coordinator_address", None,
                      "host:port of process 0 for multi-process runs (or env DALLE_JAX_COORDINATOR).")
  flags.DEFINE_integer("num_processes", None, "Number of processes (or env DALLE_JAX_NUM_PROCESSES).")
  flags.DEFINE_integer("process_id", None, "This process's index (or env DALLE_JAX_PROCESS_ID).")


def load_config_file(spec):
  """'configs/x.py:preset' -> ConfigDict (the same thing config_flags builds)."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise SystemExit(f"error: config file {path!r} not found")
  mod_spec = importlib.util.spec_from_file_location("_dalle_jax_config", path)
  module = importlib.util.module_from_spec(mod_spec)
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(path))))
  try:
    mod_spec.loader.exec_module(module)
  finally:
    sys.path.pop(0)
  return module.get_config(arg or None)


def flat_keys(config, prefix=""):
  out = []
  for k, v in config.items():
    name = f"{prefix}{k}"
    out.append(name)
    if hasattr(v, "items") and not isinstance(v, dict):
      out.extend(flat_keys(v, name + "."))
  return out


def check_override_keys(argv):
  """Unknown `--config.key` overrides -> an error naming the nearest valid keys."""
  spec = None
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      spec = a.split("=", 1)[1]
    elif a == "--config" and i + 1 < len(argv):
      spec = argv[i + 1]
  if spec is None:
    return
  try:
    config = load_config_file(spec)
  except ValueError as e:  # unknown preset
    raise SystemExit(f"error: --config {spec}: {e}")
  valid = flat_keys(config)
  for a in argv:
    if a.startswith("--config.") or a.startswith("--noconfig."):
      key = a.split("=", 1)[0].split("config.", 1)[1]
      if key not in valid:
        near = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(near)}?" if near else ""
        raise SystemExit(f"error: unknown config key {key!r} for {spec}{hint}")


def parse_flags_with_suggestions(argv):
  check_override_keys(argv[1:])
  try:
    return FLAGS(argv)
  except flags.Error as e:
    raise SystemExit(f"error: {e}")


def setup_logging():
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                      datefmt="%H:%M:%S", force=True)
  for noisy in ("absl", "orbax", "jax._src", "tensorflow_datasets", "grain"):
    logging.getLogger(noisy).setLevel(logging.WARNING)


def enable_compilation_cache():
  """Persistent XLA compilation cache for the command-line tools, so a second
  `sample.py` (or a resumed `train.py`) reuses the first run's compiled programs.

  DALLE_JAX_CACHE_DIR picks the directory (default ~/.cache/dalle_jax/xla); set it
  to an empty string to turn the cache off. Returns the directory or None.
  """
  import jax  # pylint: disable=g-import-not-at-top
  path = os.environ.get("DALLE_JAX_CACHE_DIR",
                        os.path.join(os.path.expanduser("~"), ".cache", "dalle_jax", "xla"))
  if not path:
    return None
  jax.config.update("jax_compilation_cache_dir", path)
  # the sampler's loops compile in 0.2-2 s each on CPU: worth keeping
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
  return path


def train_main(argv, config_flag):
  del argv
  from dalle_jax import parallel
  setup_logging()
  enable_compilation_cache()
  parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  from dalle_jax.train import checkpoint, loop, validation
  try:
    loop.train(config_flag.value, FLAGS.workdir)
  except (validation.ConfigError, checkpoint.CheckpointMismatchError,
          checkpoint.DamagedCheckpointError, loop.NonFiniteLossError) as e:
    # A problem with the run's inputs, not a bug: the message, no traceback.
    raise SystemExit(f"error: {e}") from None
