"""Text -> image codes -> images: the pipeline behind sample.py and task previews.

  pipe = Pipeline.load("demo/dalle")                       # workdir or imported checkpoint
  images = pipe.generate(["a red circle on a blue background"], num_images=4, seed=0,
                         sp=SamplingParams(top_k=64, guidance_scale=3.0))
  # uint8 (P, num_images, H, W, 3)

The VQGAN that decodes the codes is the one recorded in the AR config
(`config.vqgan`, relative paths resolved against the AR checkpoint directory,
then the working directory), or an explicit override.
"""
import argparse
import logging
import os

import jax
import ml_collections
import numpy as np
from PIL import Image

from dalle_jax import cli
from dalle_jax import parallel
from dalle_jax import paths
from dalle_jax.data import images as images_lib
from dalle_jax.data.tokenizers import get_tokenizer
from dalle_jax.models import loader
from dalle_jax.sampling import decode
from dalle_jax.sampling import rerank as rerank_lib
from dalle_jax.sampling.decode import SamplingParams

log = logging.getLogger(__name__)


class PromptError(ValueError):
  pass


def resolve_path(path, base_dir):
  """A path as given, or relative to base_dir (checkpoint dir) when that exists."""
  if not path:
    return ""
  path = os.path.expanduser(path)
  if not os.path.isabs(path) and base_dir:
    candidate = os.path.join(base_dir, path)
    if os.path.exists(candidate):
      return candidate
  return path


def codes_to_images(vq_config, vq_variables, codes_bn, grid, batch_size=16, mesh=None):
  """Codes (B, N = grid * grid) -> uint8 images (B, H, W, 3) through the VQGAN,
  `batch_size` rows per call.

  mesh: decode on that mesh (e.g. inside a training run's mesh context), the
  VQGAN replicated (`replicate`, place it once) and each call's rows split
  over the batch axes; every process passes the same codes and gets all images.
  """
  codes = np.asarray(codes_bn, np.int32).reshape(-1, grid, grid)
  if mesh is not None:
    vq_variables = replicate(vq_variables, mesh)
    step = parallel.batch_axis_size(mesh)
    batch_size = -(-batch_size // step) * step
  out = []
  for i in range(0, len(codes), batch_size):
    chunk = codes[i:i + batch_size]
    if mesh is not None:  # rows over the batch axes, padded to split evenly
      n = len(chunk)
      chunk = np.concatenate([chunk, np.zeros((-n % step,) + chunk.shape[1:], chunk.dtype)])
      chunk = jax.make_array_from_callback(chunk.shape, parallel.batch_sharding(mesh, 3),
                                           lambda idx, c=chunk: c[idx])
      out.append(images_lib.to_uint8(parallel.to_host(
          loader.vqgan_decode(vq_config, vq_variables, chunk)))[:n])
    else:
      out.append(images_lib.to_uint8(loader.vqgan_decode(vq_config, vq_variables, chunk)))
  return np.concatenate(out)


def replicate(tree, mesh):
  """Arrays placed whole on every device of `mesh` (multi-process too: each
  process fills its own devices from its copy); already replicated ones kept."""
  sharding = parallel.replicated(mesh)

  def put(x):
    if isinstance(x, jax.Array) and x.sharding == sharding:
      return x
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])
  return jax.tree.map(put, tree)


class Pipeline:
  """Tokenizer + AR model + (optional) VQGAN."""

  def __init__(self, config, variables, *, tokenizer, vqgan=None, mesh=None):
    self.config = config
    self.decoder = decode.make_decoder(config)
    self.mesh = mesh  # sharded sampling: parameters placed once, rows and cache split
    self.rules = None
    if mesh is not None:
      self.rules = parallel.rules_from_config(config)
    # scanned (scan_layers=True) or per-layer: the decoder's per-layer tree, placed once
    self.params = self.decoder.shard_params(variables["params"], mesh, self.rules)
    self.tokenizer = tokenizer
    self.vqgan = vqgan  # (config, variables) or None
    self.grid = int(config.model.image_grid)
    if vqgan is not None:
      _check_vqgan_fits(vqgan[0], config, "--vqgan")

  @classmethod
  def load(cls, path, vqgan_path=None, require_vqgan=True, mesh=None):
    """A Pipeline from an AR workdir / imported checkpoint; the VQGAN from
    `vqgan_path` or the one config.vqgan records. Paths and families are checked
    before any weights are read (`loader.ModelPathError`)."""
    path = os.path.abspath(os.path.expanduser(path))
    config = loader.check(path, "dalle")
    vq = vqgan_path or resolve_path(config.get("vqgan", ""), path)
    if vq:
      _check_vqgan_fits(loader.check(vq, "vqgan", "--vqgan"), config, "--vqgan")
    elif require_vqgan:
      raise ValueError(f"{path}: the config records no VQGAN (config.vqgan is empty); "
                       "pass --vqgan DIR")
    tokenizer = get_tokenizer(config.text, data_cfg=config.get("data"), base_dir=path)
    target = None
    if mesh is not None:  # each parameter read straight into its shards
      target = decode.make_decoder(config).abstract_params(
          mesh, parallel.rules_from_config(config), scan=bool(config.get("scan_layers", False)))
    _, variables = loader.load(path, "dalle", params_target=target)
    vqgan = loader.load_vqgan(vq) if vq else None
    return cls(config, variables, tokenizer=tokenizer, vqgan=vqgan, mesh=mesh)

  # --- text ---------------------------------------------------------------------
  def encode_prompts(self, prompts, unconditional=False):
    """Prompts -> (ids (P, L), mask (P, L)); empty prompts only when unconditional."""
    prompts = list(prompts)
    if not prompts:
      raise PromptError("no prompt given (use --prompt TEXT, or --unconditional)")
    for i, p in enumerate(prompts):
      if not p.strip() and not unconditional:
        raise PromptError(f"prompt {i} is empty; pass --unconditional to sample without text")
    L = self.decoder.text_len
    for i, seq in enumerate(self.tokenizer.tokenize(prompts)):
      if len(seq) > L:
        log.warning("prompt %d is %d tokens long: truncated to the model's %d (%r)",
                    i, len(seq), L, prompts[i][:60])
    return self.tokenizer.encode(prompts, L)

  def blank(self):
    """The unconditional text (blank caption), one (L,) row + mask."""
    ids, mask = self.tokenizer.encode([""], self.decoder.text_len)
    return ids[0], mask[0]

  # --- codes / images -------------------------------------------------------------
  def generate_codes(self, prompts, num_images=1, seed=0, sp=SamplingParams(),
                     unconditional=False, batch_size=0, progress=False, chunk=None):
    """Codes int32 (P, num_images, N). Rows go through in batches of `batch_size`."""
    if unconditional:
      prompts = [""] * max(1, len(list(prompts)))
      sp = SamplingParams(sp.temperature, sp.top_k, sp.top_p, 1.0)
    ids, mask = self.encode_prompts(prompts, unconditional)
    uncond = self.blank()
    rows_ids = np.repeat(ids, num_images, 0)
    rows_mask = np.repeat(mask, num_images, 0)
    n = len(rows_ids)
    bs = batch_size or n
    chunk = chunk or int(self.config.get("sampling", {}).get("chunk", 64))
    rng = jax.random.PRNGKey(seed)
    out = []
    for k, i in enumerate(range(0, n, bs)):
      codes = decode.generate(
          self.decoder, self.params, rows_ids[i:i + bs], rows_mask[i:i + bs],
          rng=jax.random.fold_in(rng, k), sp=sp, uncond_text=uncond[0], uncond_mask=uncond[1],
          chunk=chunk, progress=progress, mesh=self.mesh, rules=self.rules,
          desc=f"decoding {min(bs, n - i)} images" + (f" ({k + 1}/{-(-n // bs)})" if bs < n else ""))
      out.append(parallel.to_host(codes))
    return np.concatenate(out).reshape(len(ids), num_images, -1)

  def decode_images(self, codes):
    """Codes (..., N) -> uint8 images (..., H, W, 3)."""
    if self.vqgan is None:
      raise ValueError("no VQGAN loaded: cannot turn codes into images (pass --vqgan)")
    codes = np.asarray(codes)
    flat = codes.reshape(-1, codes.shape[-1])
    images = codes_to_images(self.vqgan[0], self.vqgan[1], flat, self.grid)
    return images.reshape(codes.shape[:-1] + images.shape[1:])

  def generate(self, prompts, num_images=1, seed=0, sp=SamplingParams(), **kw):
    return self.decode_images(self.generate_codes(prompts, num_images, seed, sp, **kw))


# --- command line (sample.py) -----------------------------------------------------------

def _parser():
  p = argparse.ArgumentParser(
      prog="sample.py", description="Text -> images with a dalle_jax autoregressive model.")
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--workdir", help="training workdir (latest checkpoint, EMA params if kept)")
  src.add_argument("--checkpoint", help="imported checkpoint directory (e.g. convert min_dalle)")
  p.add_argument("--prompt", action="append", default=[], help="repeatable")
  p.add_argument("--unconditional", action="store_true", help="sample without text")
  p.add_argument("--num_images", type=int, default=4, help="samples per prompt")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--temperature", type=float, default=None)
  p.add_argument("--top_k", type=int, default=None, help="0 = off, 1 = greedy")
  p.add_argument("--top_p", type=float, default=None, help="1 = off")
  p.add_argument("--guidance_scale", type=float, default=None,
                 help="classifier-free (super-condition) scale; 1 = off")
  p.add_argument("--batch_size", type=int, default=0, help="rows per decode batch (0 = all)")
  p.add_argument("--mesh", default=None, metavar="DATA,FSDP,TENSOR",
                 help="sample sharded over a device mesh, e.g. 1,-1,1 (FSDP over all devices) "
                      "or 2,1,4; default: one device")
  p.add_argument("--coordinator_address", default=None,
                 help="multi-process sampling over one --mesh: host:port of process 0 (or env "
                      "DALLE_JAX_COORDINATOR; auto-detected on Cloud TPU pods)")
  p.add_argument("--num_processes", type=int, default=None, help="(or env DALLE_JAX_NUM_PROCESSES)")
  p.add_argument("--process_id", type=int, default=None, help="(or env DALLE_JAX_PROCESS_ID)")
  p.add_argument("--vqgan", default=None, help="VQGAN workdir/checkpoint (default: config.vqgan)")
  p.add_argument("--rerank_with", default=None, help="CLIP workdir/checkpoint for reranking")
  p.add_argument("--rerank_top", type=int, default=0, help="keep the K best per prompt")
  p.add_argument("--out", default="samples.png", help="grid PNG; images go to OUT_STEM/")
  return p


def _mesh_sizes(flag):
  try:
    sizes = [int(v) for v in flag.split(",")]
  except ValueError:
    sizes = []
  if len(sizes) != 3 or any(v == 0 or v < -1 for v in sizes) or sizes.count(-1) > 1:
    raise ValueError(f"--mesh {flag!r}: expected three comma-separated sizes DATA,FSDP,TENSOR "
                     "(positive, at most one -1)")
  return sizes


def mesh_from_flag(flag):
  """--mesh DATA,FSDP,TENSOR -> Mesh (None when unset); shared by every sampling CLI."""
  if not flag:
    return None
  sizes = _mesh_sizes(flag)
  try:
    return parallel.make_mesh(ml_collections.ConfigDict(dict(zip(("data", "fsdp", "tensor"), sizes))))
  except ValueError as e:
    raise ValueError(f"--mesh {flag}: {e}") from None


def _rerank(clip_path, prompts, images, top):
  """dalle_jax.sampling.rerank.rerank -> (uint8 (P, K, H, W, 3), CLIP scores (P, K))."""
  kept, scores = rerank_lib.rerank(clip_path, list(prompts), [images[i] for i in range(len(prompts))],
                                   top)
  return np.stack([np.asarray(k) for k in kept]), np.stack([np.asarray(s) for s in scores])


def _out_format(out):
  """The PIL format that writes `out` (from its extension), or None."""
  fmt = Image.registered_extensions().get(os.path.splitext(out)[1].lower())
  return fmt if fmt in Image.SAVE else None


def check_args(args):
  """Every sample.py input checked before any weights are read or any program is
  compiled: raises ValueError (ModelPathError for model paths) with one line
  naming the flag. Returns (AR config, VQGAN path)."""
  if args.num_images < 1:
    raise ValueError(f"--num_images {args.num_images}: must be >= 1")
  if args.batch_size < 0:
    raise ValueError(f"--batch_size {args.batch_size}: must be >= 0 (0 = all rows at once)")
  if args.top_k is not None and args.top_k < 0:
    raise ValueError(f"--top_k {args.top_k}: must be >= 0 (0 = off, 1 = greedy)")
  if args.top_p is not None and not 0.0 < args.top_p <= 1.0:
    raise ValueError(f"--top_p {args.top_p}: must be in (0, 1] (1 = off)")
  if args.temperature is not None and not (np.isfinite(args.temperature) and
                                           args.temperature >= 0):
    raise ValueError(f"--temperature {args.temperature}: must be >= 0 (0 = greedy)")
  if args.guidance_scale is not None and not np.isfinite(args.guidance_scale):
    raise ValueError(f"--guidance_scale {args.guidance_scale}: must be a finite number")
  if args.rerank_top and not args.rerank_with:
    raise ValueError("--rerank_top needs --rerank_with CLIP_DIR")
  if not 0 <= args.rerank_top <= args.num_images:
    raise ValueError(f"--rerank_top {args.rerank_top}: must be in [0, --num_images "
                     f"{args.num_images}] (0 = keep all)")
  if not args.prompt and not args.unconditional:
    raise ValueError("give at least one --prompt TEXT (or --unconditional)")
  for i, p in enumerate(args.prompt):
    if not p.strip() and not args.unconditional:
      raise ValueError(f"--prompt number {i + 1} is empty (pass --unconditional to sample "
                       "without text)")
  if _out_format(args.out) is None:
    raise ValueError(f"--out {args.out}: unknown image extension (use .png or .jpg)")
  if args.mesh:
    _mesh_sizes(args.mesh)
  flag = "--workdir" if args.workdir else "--checkpoint"
  path = os.path.abspath(os.path.expanduser(args.workdir or args.checkpoint))
  config = loader.check(path, "dalle", flag)
  if args.vqgan:
    vq_path = args.vqgan
    vq_config = loader.check(vq_path, "vqgan", "--vqgan")
    _check_vqgan_fits(vq_config, config, "--vqgan")
  elif config.get("vqgan"):
    vq_path = resolve_path(config.vqgan, path)
    try:
      vq_config = loader.check(vq_path, "vqgan", "config.vqgan")
      _check_vqgan_fits(vq_config, config, "config.vqgan")
    except loader.ModelPathError as e:
      raise loader.ModelPathError(f"{e} (recorded in {flag} {path}; override with --vqgan DIR)")
  else:
    raise ValueError(f"{flag} {path}: the config records no VQGAN (config.vqgan is empty); "
                     "pass --vqgan DIR")
  if args.rerank_with:
    loader.check(args.rerank_with, "clip", "--rerank_with")
  return config, vq_path


def _check_vqgan_fits(vq_config, config, flag):
  n_embed = vq_config.model.get("n_embed")
  if n_embed is not None and int(n_embed) != int(config.model.image_vocab_size):
    raise loader.ModelPathError(
        f"{flag}: the VQGAN has {n_embed} codes but the transformer was trained on "
        f"{config.model.image_vocab_size}")


def sample_main(argv=None):
  args = _parser().parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  try:
    _, vq_path = check_args(args)
  except ValueError as e:
    raise SystemExit(f"error: {e}") from None
  cli.enable_compilation_cache()
  parallel.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
  try:
    mesh = mesh_from_flag(args.mesh)
    pipe = Pipeline.load(args.workdir or args.checkpoint, vqgan_path=vq_path, mesh=mesh)
    s = pipe.config.get("sampling") or {}
    pick = lambda v, k, d: v if v is not None else s.get(k, d)
    sp = SamplingParams(temperature=pick(args.temperature, "temperature", 1.0),
                        top_k=int(pick(args.top_k, "top_k", 0)),
                        top_p=pick(args.top_p, "top_p", 1.0),
                        guidance_scale=pick(args.guidance_scale, "guidance_scale", 1.0))
    prompts = args.prompt or [""]
    codes = pipe.generate_codes(prompts, args.num_images, args.seed, sp,
                                unconditional=args.unconditional, batch_size=args.batch_size,
                                progress=True)
    images = pipe.decode_images(codes)  # (P, n, H, W, 3)
  except (PromptError, FileNotFoundError, ValueError) as e:
    raise SystemExit(f"error: {e}") from None
  scores = None
  if args.rerank_with:
    images, scores = _rerank(args.rerank_with, prompts, images, args.rerank_top or args.num_images)
  out = os.path.abspath(args.out)
  if jax.process_index() != 0:  # every process holds all the images; one writes them
    return out
  return write_samples(out, prompts, images, {"seed": args.seed, "sampling": sp.__dict__}, scores)


def write_samples(out, prompts, images, settings, scores=None):
  """Every method's output contract: the grid PNG OUT (one row per prompt), the images as
  OUT_STEM/pXX_YYY.png and OUT_STEM/samples.json (settings + one row per image).

  images: uint8 (P, N, H, W, 3); scores: optional (P, N) CLIP scores.
  """
  out = os.path.abspath(out)
  stem = os.path.splitext(out)[0]
  os.makedirs(stem, exist_ok=True)
  rows = []
  for p, prompt in enumerate(prompts):
    for i, img in enumerate(images[p]):
      name = f"p{p:02d}_{i:03d}.png"
      Image.fromarray(img).save(os.path.join(stem, name))
      rows.append({"file": name, "prompt": prompt, "prompt_index": p, "sample": i})
      if scores is not None:
        rows[-1]["clip_score"] = float(scores[p][i])
  with open(os.path.join(stem, "samples.json"), "w") as f:
    f.write(paths.json_text(dict(settings, images=rows)))
  n = images.shape[1]
  Image.fromarray(images_lib.image_grid(images.reshape((-1,) + images.shape[2:]), ncols=n)).save(out)
  print(f"wrote {out} ({len(prompts)} prompts x {n} images) and {len(rows)} images in {stem}/")
  return out
