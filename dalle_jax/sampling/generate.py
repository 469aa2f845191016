"""Text -> image codes -> images: the pipeline behind sample.py and task previews.

  pipe = Pipeline.load("demo/dalle")                       # workdir or imported checkpoint
  images = pipe.generate(["a red circle on a blue background"], num_images=4, seed=0,
                         sp=SamplingParams(top_k=64, guidance_scale=3.0))
  # uint8 (P, num_images, H, W, 3)

The VQGAN that decodes the codes is the one recorded in the AR config
(`config.vqgan`, relative paths resolved against the AR checkpoint directory,
then the working directory), or an explicit override.
"""
import logging
import os

import jax
import numpy as np

from dalle_jax.sampling import decode
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


def load_vqgan(path):
  """(config, variables) of a VQGAN workdir or imported checkpoint."""
  from dalle_jax.train import checkpoint  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(path):
    raise FileNotFoundError(f"VQGAN not found: {path} (pass --vqgan DIR: a VQGAN training "
                            "workdir or imported checkpoint)")
  return checkpoint.load_model(path)


def vqgan_decode(vq_config, vq_variables, codes_bn, grid, batch_size=16):
  """Codes (B, N) -> uint8 images (B, H, W, 3) via the VQGAN task's decode API."""
  from dalle_jax.tasks import vqgan as vq_task  # pylint: disable=g-import-not-at-top
  from dalle_jax.tasks.base import to_uint8  # pylint: disable=g-import-not-at-top
  codes = np.asarray(codes_bn, np.int32).reshape(-1, grid, grid)
  out = []
  for i in range(0, len(codes), batch_size):
    out.append(to_uint8(vq_task.decode_codes(vq_config, vq_variables, codes[i:i + batch_size])))
  return np.concatenate(out)


def _to_host(x):
  """A (possibly multi-process, sharded) array as one numpy array on every process."""
  if getattr(x, "is_fully_addressable", True):
    return np.asarray(x)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


class Pipeline:
  """Tokenizer + AR model + (optional) VQGAN."""

  def __init__(self, config, variables, *, tokenizer, vqgan=None, mesh=None):
    self.config = config
    self.decoder = decode.make_decoder(config)
    self.mesh = mesh  # sharded sampling: parameters placed once, rows and cache split
    self.rules = None
    self.params = variables["params"]
    if mesh is not None:
      from dalle_jax import parallel  # pylint: disable=g-import-not-at-top
      self.rules = parallel.rules_from_config(config)
      self.params = self.decoder.shard_params(self.params, mesh, self.rules)
    self.tokenizer = tokenizer
    self.vqgan = vqgan  # (config, variables) or None
    self.grid = int(config.model.image_grid)
    if vqgan is not None:
      n_embed = vqgan[0].model.get("n_embed")
      if n_embed is not None and int(n_embed) != int(config.model.image_vocab_size):
        raise ValueError(f"VQGAN has {n_embed} codes but the transformer was trained on "
                         f"{config.model.image_vocab_size}: wrong --vqgan?")

  @classmethod
  def load(cls, path, vqgan_path=None, require_vqgan=True, mesh=None):
    from dalle_jax.data.tokenizers import get_tokenizer  # pylint: disable=g-import-not-at-top
    from dalle_jax.train import checkpoint  # pylint: disable=g-import-not-at-top
    path = os.path.abspath(os.path.expanduser(path))
    config = checkpoint.read_config(path)
    if config.get("family") != "dalle":
      raise ValueError(f"{path}: config.family={config.get('family')!r}, expected 'dalle' "
                       "(an autoregressive text->image checkpoint)")
    target = None
    if mesh is not None:  # each parameter read straight into its shards
      from dalle_jax import parallel  # pylint: disable=g-import-not-at-top
      target = decode.make_decoder(config).abstract_params(mesh, parallel.rules_from_config(config))
    _, variables = checkpoint.load_model(path, params_target=target)
    tokenizer = get_tokenizer(config.text, data_cfg=config.get("data"), base_dir=path)
    vq = vqgan_path or resolve_path(config.get("vqgan", ""), path)
    vqgan = None
    if vq:
      vqgan = load_vqgan(vq)
    elif require_vqgan:
      raise ValueError(f"{path}: the config records no VQGAN (config.vqgan is empty); "
                       "pass --vqgan DIR")
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
      out.append(_to_host(codes))
    return np.concatenate(out).reshape(len(ids), num_images, -1)

  def decode_images(self, codes):
    """Codes (..., N) -> uint8 images (..., H, W, 3)."""
    if self.vqgan is None:
      raise ValueError("no VQGAN loaded: cannot turn codes into images (pass --vqgan)")
    codes = np.asarray(codes)
    flat = codes.reshape(-1, codes.shape[-1])
    images = vqgan_decode(self.vqgan[0], self.vqgan[1], flat, self.grid)
    return images.reshape(codes.shape[:-1] + images.shape[1:])

  def generate(self, prompts, num_images=1, seed=0, sp=SamplingParams(), **kw):
    return self.decode_images(self.generate_codes(prompts, num_images, seed, sp, **kw))


# --- command line (sample.py) -----------------------------------------------------------

def _parser():
  import argparse  # pylint: disable=g-import-not-at-top
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


def _mesh_from_flag(flag):
  if not flag:
    return None
  import ml_collections  # pylint: disable=g-import-not-at-top
  from dalle_jax import parallel  # pylint: disable=g-import-not-at-top
  try:
    sizes = [int(v) for v in flag.split(",")]
  except ValueError:
    sizes = []
  if len(sizes) != 3:
    raise ValueError(f"--mesh {flag!r}: expected three comma-separated sizes DATA,FSDP,TENSOR")
  return parallel.make_mesh(ml_collections.ConfigDict(dict(zip(("data", "fsdp", "tensor"), sizes))))


def _rerank(clip_path, prompts, images, top):
  """dalle_jax.sampling.rerank.rerank -> (uint8 (P, K, H, W, 3), CLIP scores (P, K))."""
  from dalle_jax.sampling import rerank as rerank_lib  # pylint: disable=g-import-not-at-top
  kept, scores = rerank_lib.rerank(clip_path, list(prompts), [images[i] for i in range(len(prompts))],
                                   top)
  return np.stack([np.asarray(k) for k in kept]), np.stack([np.asarray(s) for s in scores])


def sample_main(argv=None):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  from dalle_jax.tasks.base import image_grid  # pylint: disable=g-import-not-at-top
  args = _parser().parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  if not args.prompt and not args.unconditional:
    raise SystemExit("error: give at least one --prompt TEXT (or --unconditional)")
  if args.rerank_top and not args.rerank_with:
    raise SystemExit("error: --rerank_top needs --rerank_with CLIP_DIR")
  from dalle_jax import cli, parallel  # pylint: disable=g-import-not-at-top
  cli.enable_compilation_cache()
  parallel.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
  try:
    pipe = Pipeline.load(args.workdir or args.checkpoint, vqgan_path=args.vqgan,
                         mesh=_mesh_from_flag(args.mesh))
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
    raise SystemExit(f"error: {e}")
  scores = None
  if args.rerank_with:
    images, scores = _rerank(args.rerank_with, prompts, images, args.rerank_top or args.num_images)
  out = os.path.abspath(args.out)
  if jax.process_index() != 0:  # every process holds all the images; one writes them
    return out
  stem = os.path.splitext(out)[0]
  os.makedirs(stem, exist_ok=True)
  rows = []
  for p, prompt in enumerate(prompts):
    for i, img in enumerate(images[p]):
      name = f"p{p:02d}_{i:03d}.png"
      Image.fromarray(img).save(os.path.join(stem, name))
      rows.append({"file": name, "prompt": prompt, "prompt_index": p, "sample": i})
      if scores is not None:
        rows[-1]["clip_score"] = float(scores[p, i])
  with open(os.path.join(stem, "samples.json"), "w") as f:
    json.dump({"images": rows, "seed": args.seed, "sampling": sp.__dict__}, f, indent=2)
  n = images.shape[1]
  Image.fromarray(image_grid(images.reshape((-1,) + images.shape[2:]), ncols=n)).save(out)
  print(f"wrote {out} ({len(prompts)} prompts x {n} images) and {len(rows)} images in {stem}/")
  return out
