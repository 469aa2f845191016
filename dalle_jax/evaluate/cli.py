"""`python -m dalle_jax.evaluate SUBCOMMAND ...`: sample-quality metrics, one entry point.

  fid        --real SRC --fake SRC --inception PTH [--mode legacy_pytorch|clean]
  stats      --real SRC --inception PTH --out STATS.npz          (mu, sigma float64; pytorch-fid format)
  kid        --real SRC --fake SRC --inception PTH [--subsets 100 --subset_size 1000]
  is         --fake SRC --inception PTH [--splits 10]
  prd        --real SRC --fake SRC --inception PTH [--k 3]       (precision / recall)
  clip_score --fake SRC --clip CLIP (--captions FILE | a DATASET:SPLIT source with captions)
  rfid       --real SRC --vqgan VQGAN --inception PTH            (FID of VQGAN reconstructions)
  zero_shot  --clip CLIP --data_dir D --dataset shapes ...       (dalle_jax.tools.zero_shot's metrics)
  generate   --family ar|diffusion|cascade|unclip (--workdir W | --checkpoint C) --captions FILE
             (cascade: W or C lists the stages, base first: W1,W2[,W3])
             --num N [sampler flags] --score fid,clip_score --real REF [--clip CLIP]
             (samples the captions with the family's pipeline, scores the images in memory)

SRC: an image folder, an .npz sample batch (arr_0 uint8 NxHxWx3), a statistics .npz (mu, sigma;
fid only) or DATASET:SPLIT in --data_dir. PTH: pytorch-fid's pt_inception-2015-12-05-*.pth, a
local file (never downloaded). Every subcommand writes --out (JSON) and a Markdown table beside
it (.md); `fid` prints `FID <value>` as its last line. Bad inputs fail with one line before any
model is loaded. Multi-process runs (TPU pods, or DALLE_JAX_COORDINATOR / _NUM_PROCESSES /
_PROCESS_ID) shard Inception features and CLIP cosines over every device of every process
(float64 sums merged); process 0 writes the results.
"""
import argparse
import logging
import os
import sys
import time

import numpy as np

from dalle_jax import paths
from dalle_jax.evaluate import clip_cosines as clip_lib
from dalle_jax.evaluate import features as feat_lib
from dalle_jax.evaluate import generate as gen_lib
from dalle_jax.evaluate import metrics
from dalle_jax.evaluate import sources as src_lib
from dalle_jax.evaluate import stats as stats_lib

INCEPTION_CMDS = ("fid", "stats", "kid", "is", "prd", "rfid")


class UsageError(ValueError):
  pass


# --------------------------------------------------------------------------- arguments

def _common(p, inception=True, num=True):
  if inception:
    p.add_argument("--inception", default=os.environ.get("DALLE_JAX_INCEPTION"),
                   help="pytorch-fid's pt_inception-2015-12-05-*.pth (default $DALLE_JAX_INCEPTION)")
    p.add_argument("--mode", default="legacy_pytorch", choices=feat_lib.MODES,
                   help="resize to 299: pytorch-fid's bilinear or clean-fid's bicubic")
  p.add_argument("--batch_size", type=int, default=64, help="global images per network call")
  p.add_argument("--data_dir", default="data", help="TFDS data_dir for DATASET:SPLIT sources")
  if num:
    p.add_argument("--num", type=int, default=0,
                   help="use only the first N images of each source")
  p.add_argument("--out", default=None, help="result JSON (default ./evaluate_CMD.json); "
                                               "a Markdown table is written beside it")


def build_parser():
  p = argparse.ArgumentParser(prog="python -m dalle_jax.evaluate", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="cmd", required=True)
  s = sub.add_parser("fid", help="Fréchet Inception Distance")
  s.add_argument("--real", required=True)
  s.add_argument("--fake", required=True)
  _common(s)
  s = sub.add_parser("stats", help="reference statistics (mu, sigma) of a source")
  s.add_argument("--real", required=True)
  _common(s)
  s = sub.add_parser("kid", help="Kernel Inception Distance")
  s.add_argument("--real", required=True)
  s.add_argument("--fake", required=True)
  s.add_argument("--subsets", type=int, default=100)
  s.add_argument("--subset_size", type=int, default=1000)
  s.add_argument("--seed", type=int, default=0)
  _common(s)
  s = sub.add_parser("is", help="Inception Score")
  s.add_argument("--fake", required=True)
  s.add_argument("--splits", type=int, default=10)
  _common(s)
  s = sub.add_parser("prd", help="improved precision / recall (k-NN manifolds)")
  s.add_argument("--real", required=True)
  s.add_argument("--fake", required=True)
  s.add_argument("--k", type=int, default=3)
  _common(s)
  s = sub.add_parser("clip_score", help="CLIP score (torchmetrics and Hessel et al.)")
  s.add_argument("--fake", required=True)
  s.add_argument("--clip", required=True, help="CLIP workdir, imported checkpoint or HF dir")
  s.add_argument("--captions", default=None,
                 help="one caption per line, in the images' order (default: a dataset's captions)")
  _common(s, inception=False)
  s = sub.add_parser("rfid", help="FID of VQGAN reconstructions against their inputs")
  s.add_argument("--real", required=True)
  s.add_argument("--vqgan", required=True, help="VQGAN workdir or imported checkpoint")
  s.add_argument("--image_size", type=int, default=0, help="default: the VQGAN's data.image_size")
  _common(s)
  s = sub.add_parser("generate", help="sample captions with a family, score the images in memory")
  s.add_argument("--family", required=True, choices=gen_lib.FAMILIES)
  src = s.add_mutually_exclusive_group(required=True)
  src.add_argument("--workdir", help="training workdir (its latest checkpoint); cascade: the "
                   "stages, base first, comma-separated; unclip: PRIOR,DECODER[,SUPER_RES]")
  src.add_argument("--checkpoint", help="imported checkpoint directory")
  s.add_argument("--captions", required=True, help="one caption per line (cycled when --num "
                                                     "exceeds their count)")
  s.add_argument("--num", type=int, required=True, help="images to sample (one per caption)")
  s.add_argument("--seed", type=int, default=0, help="sampling call k uses seed + k")
  s.add_argument("--sample_batch_size", type=int, default=16, help="images per sampling call")
  s.add_argument("--mesh", default="-1,1,1", metavar="DATA,FSDP,TENSOR",
                 help="the samplers' device mesh (default: data-parallel over all devices)")
  s.add_argument("--vqgan", default=None, help="ar: VQGAN override (default: config.vqgan)")
  for flag in gen_lib.ALL_SAMPLER_FLAGS:
    owners = "|".join(f for f, fl in gen_lib.SAMPLER_FLAGS.items() if flag in fl)
    s.add_argument(f"--{flag}", default=None, help=f"{owners} (default: the checkpoint's "
                   "config.sampling; cascade: one value or one per stage, comma-separated)")
  s.add_argument("--score", default="fid,clip_score", help="comma-separated: fid, clip_score")
  s.add_argument("--real", default=None, help="FID reference: statistics .npz, folder, .npz "
                                              "batch or DATASET:SPLIT")
  s.add_argument("--clip", default=None, help="clip_score: CLIP workdir, checkpoint or HF dir")
  s.add_argument("--save_samples", default=None,
                 help="also write the images as FILE.npz (arr_0 uint8, lossless)")
  _common(s, num=False)
  s = sub.add_parser("zero_shot", help="zero-shot classification + retrieval with CLIP")
  s.add_argument("--clip", required=True)
  s.add_argument("--dataset", default="shapes")
  s.add_argument("--split", default="test")
  s.add_argument("--label", action="append", default=None)
  s.add_argument("--classnames", default=None)
  s.add_argument("--templates", default=None)
  s.add_argument("--ensemble", default="mean", choices=["mean", "logsumexp"])
  s.add_argument("--max_examples", type=int, default=None)
  _common(s, inception=False)
  return p


# --------------------------------------------------------------------------- output

def markdown_table(result):
  rows = [(k, v) for k, v in _flatten(result) if not isinstance(v, (list, dict))]
  lines = ["| key | value |", "|---|---|"]
  for k, v in rows:
    v = f"{v:.6g}" if isinstance(v, float) else str(v)
    lines.append(f"| {k} | {v.replace('|', '/')} |")
  return "\n".join(lines) + "\n"


def _flatten(d, prefix=""):
  for k, v in d.items():
    if isinstance(v, dict):
      yield from _flatten(v, f"{prefix}{k}.")
    else:
      yield f"{prefix}{k}", v


def write_results(out, result):
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() != 0:
    return
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w") as f:
    f.write(paths.json_text(result) + "\n")
  md = os.path.splitext(out)[0] + ".md"
  with open(md, "w") as f:
    f.write(f"# {result.get('metric', 'evaluation')}\n\n" + markdown_table(result))


def _source_info(spec, src, extracted=None):
  info = {"spec": spec, "kind": src.kind, "description": src.description}
  if extracted is not None:
    info["n"] = extracted.n
    info["skipped_unreadable"] = extracted.skipped
  elif src.kind == "stats":
    info["n"] = src.n
  return info


# --------------------------------------------------------------------------- commands

def _open(args, flag, allow_stats=False):
  spec = getattr(args, flag.lstrip("-"))
  return src_lib.open_source(spec, flag, args.data_dir, allow_stats=allow_stats,
                             limit=args.num or None)


_LOADED = {}  # in-process reuse (tests, notebooks): (path, mtime, mode, batch) -> (ext, info)


def _extractor(args):
  from dalle_jax.convert import inception as conv  # pylint: disable=g-import-not-at-top
  key = (os.path.abspath(args.inception), os.path.getmtime(args.inception), args.mode,
         args.batch_size)
  if key not in _LOADED:
    params = conv.load_inception_params(args.inception)
    ext = feat_lib.InceptionExtractor(params, args.mode, args.batch_size)
    info = {"path": key[0], "sha256": conv.file_sha256(args.inception),
            "feature_checksum": feat_lib.feature_checksum(ext), "mode": args.mode}
    _LOADED.clear()  # one network's parameters on the devices at a time
    _LOADED[key] = (ext, info)
  return _LOADED[key]


def cmd_fid(args):
  real, fake = _open(args, "--real", True), _open(args, "--fake", True)
  ext, info = _extractor(args)
  result = {"metric": "fid", "mode": args.mode, "inception": info}
  mus = []
  for side, src in (("real", real), ("fake", fake)):
    if src.kind == "stats":
      mus.append((src.mu, src.sigma))
      result[side] = _source_info(getattr(args, side), src)
    else:
      ex = src_lib.extract(src, ext, progress=f"{side} features")
      mus.append((ex.stats.mu, ex.stats.sigma))
      result[side] = _source_info(getattr(args, side), src, ex)
  result["value"] = stats_lib.frechet_distance(*mus[0], *mus[1])
  return result, f"FID {result['value']:.6f}"


def cmd_stats(args):
  if not args.out or not args.out.endswith(".npz"):
    raise UsageError("stats: --out STATS.npz is required (mu, sigma in pytorch-fid's format)")
  real = _open(args, "--real")
  ext, info = _extractor(args)
  ex = src_lib.extract(real, ext, progress="features")
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    ex.stats.save(args.out)
  result = {"metric": "stats", "out": args.out, "mode": args.mode, "inception": info,
            "real": _source_info(args.real, real, ex)}
  args.out = os.path.splitext(args.out)[0] + ".json"
  return result, f"wrote {result['out']} (N={ex.n})"


def _features_pair(args):
  real, fake = _open(args, "--real"), _open(args, "--fake")
  ext, info = _extractor(args)
  exr = src_lib.extract(real, ext, keep_features=True, progress="real features")
  exf = src_lib.extract(fake, ext, keep_features=True, progress="fake features")
  result = {"mode": args.mode, "inception": info, "real": _source_info(args.real, real, exr),
            "fake": _source_info(args.fake, fake, exf)}
  return exr, exf, result


def cmd_kid(args):
  exr, exf, result = _features_pair(args)
  kid = metrics.kernel_inception_distance(exr.features["pool"], exf.features["pool"],
                                          args.subsets, args.subset_size, args.seed)
  result.update(metric="kid", **kid)
  return result, f"KID {kid['kid_mean']:.6g} ± {kid['kid_std']:.3g}"


def cmd_prd(args):
  exr, exf, result = _features_pair(args)
  pr = metrics.precision_recall(exr.features["pool"], exf.features["pool"], args.k)
  result.update(metric="precision_recall", **pr)
  return result, f"precision {pr['precision']:.4f} recall {pr['recall']:.4f}"


def cmd_is(args):
  fake = _open(args, "--fake")
  ext, info = _extractor(args)
  ex = src_lib.extract(fake, ext, keep_features=True, progress="features")
  score = metrics.inception_score(ex.features["logits_unbiased"], args.splits)
  result = {"metric": "inception_score", "mode": args.mode, "inception": info,
            "fake": _source_info(args.fake, fake, ex), **score}
  return result, f"IS {score['is_mean']:.4f} ± {score['is_std']:.4f}"


def _read_lines(path, flag):
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{flag} {path}: no such file")
  with open(path, encoding="utf-8") as f:
    return [line.rstrip("\n") for line in f if line.strip()]


def cmd_clip_score(args):
  fake = _open(args, "--fake")
  n = len(fake)
  if args.captions:
    captions = _read_lines(args.captions, "--captions")
    if len(captions) < n:
      raise UsageError(f"--captions {args.captions}: {len(captions)} captions for {n} images")
    captions = captions[:n]
  elif fake.kind == "tfds":
    captions = fake.captions(n)
  else:
    raise UsageError("clip_score: --captions FILE is needed unless --fake is a DATASET:SPLIT "
                     "with captions")
  from dalle_jax.sampling import rerank  # pylint: disable=g-import-not-at-top
  enc = rerank.get_encoder(args.clip, batch_size=args.batch_size)
  # Any size is fine: images are brought to the CLIP's input size (clip_cosines).
  sums, skipped = clip_lib.ClipCosines(enc, args.batch_size).of_source(
      fake, captions, progress="CLIP cosines")
  score = sums.result()
  result = {"metric": "clip_score", "clip": os.path.abspath(args.clip),
            "clip_image_size": enc.image_size, "fake": {"spec": args.fake,
                                                        "description": fake.description,
                                                        "n": sums.n,
                                                        "skipped_unreadable": skipped},
            **score}
  return result, (f"CLIP score {score['clip_score_torchmetrics']:.4f} (torchmetrics) "
                  f"{score['clip_score_hessel']:.4f} (Hessel et al.)")


def cmd_rfid(args):
  from dalle_jax.data import images as img_lib  # pylint: disable=g-import-not-at-top
  from dalle_jax.models import loader  # pylint: disable=g-import-not-at-top
  real = _open(args, "--real")
  config = loader.check(args.vqgan, "vqgan", "--vqgan")  # family and files, no weights read
  if config.model.get("decoder_only", False):
    raise UsageError(f"--vqgan {args.vqgan}: a decoder-only VQGAN cannot reconstruct images")
  ext, info = _extractor(args)
  config, variables = loader.load_vqgan(args.vqgan, "--vqgan")
  size = args.image_size or int(config.data.image_size)

  def crop(batch):
    return [img_lib.resize_and_crop(im, size) for im in batch]

  def reconstruct(batch):  # the whole local batch at once: one compilation
    out, _ = loader.vqgan_reconstruct(config, variables, img_lib.to_float(np.stack(crop(batch))))
    return list(img_lib.to_uint8(np.asarray(out)))

  exo = src_lib.extract(real, ext, progress="inputs", transform=crop)
  exr = src_lib.extract(real, ext, progress="reconstructions", transform=reconstruct)
  value = stats_lib.frechet_distance(exo.stats.mu, exo.stats.sigma, exr.stats.mu, exr.stats.sigma)
  result = {"metric": "rfid", "value": value, "mode": args.mode, "inception": info,
            "vqgan": os.path.abspath(args.vqgan), "image_size": size,
            "real": _source_info(args.real, real, exo)}
  return result, f"rFID {value:.6f}"


def cmd_zero_shot(args):
  from dalle_jax.sampling import rerank  # pylint: disable=g-import-not-at-top
  from dalle_jax.tools import zero_shot  # pylint: disable=g-import-not-at-top
  enc = rerank.get_encoder(args.clip, batch_size=args.batch_size, show_progress=True)
  data_cfg = enc.config.data
  with data_cfg.unlocked():
    data_cfg.data_dir = args.data_dir
  split_list = lambda v, sep: None if v is None else (
      _read_lines(v, "--classnames/--templates") if os.path.isfile(v)
      else [x.strip() for x in v.split(sep) if x.strip()])
  res = zero_shot.evaluate(enc, data_cfg, args.dataset, args.split, args.label,
                           split_list(args.classnames, ","), split_list(args.templates, "|"),
                           args.max_examples, args.ensemble)
  res = {"metric": "zero_shot", "clip": os.path.abspath(args.clip), **res}
  top1 = {k: v["top1"] for k, v in res.items() if isinstance(v, dict) and "top1" in v}
  return res, "zero-shot top-1 " + " ".join(f"{k} {v:.4f}" for k, v in top1.items())


def _check_generate(args):
  """Every generate input checked before any model loads; returns (scores, captions)."""
  scores = [s.strip() for s in args.score.split(",") if s.strip()]
  bad = [s for s in scores if s not in gen_lib.SCORES]
  if bad or not scores:
    raise UsageError(f"--score {args.score}: choose from {','.join(gen_lib.SCORES)}")
  if args.num < 1:
    raise UsageError(f"--num {args.num}: must be >= 1")
  if args.sample_batch_size < 1:
    raise UsageError(f"--sample_batch_size {args.sample_batch_size}: must be >= 1")
  args.sampler_flags = gen_lib.parse_sampler_flags(
      args.family, {k: getattr(args, k) for k in gen_lib.ALL_SAMPLER_FLAGS})
  gen_lib.check_sampler_flags(args.family, args.sampler_flags)
  if args.vqgan and args.family != "ar":
    raise UsageError(f"--vqgan applies to --family ar, not {args.family}")
  model = args.workdir or args.checkpoint
  for path in model.split(",") if args.family in ("cascade", "unclip") else [model]:
    if not os.path.exists(path):
      flag = "--workdir" if args.workdir else "--checkpoint"
      raise FileNotFoundError(f"{flag} {path}: no such directory")
  captions = _read_lines(args.captions, "--captions")
  if not captions:
    raise UsageError(f"--captions {args.captions}: no captions in the file")
  if "fid" in scores:
    if not args.real:
      raise UsageError("--score fid needs --real REF (statistics .npz, images or DATASET:SPLIT)")
    if not args.inception:
      raise UsageError("--score fid needs --inception PT_INCEPTION.pth (or $DALLE_JAX_INCEPTION)")
    if not os.path.isfile(args.inception):
      raise FileNotFoundError(f"--inception {args.inception}: no such file")
  if "clip_score" in scores:
    if not args.clip:
      raise UsageError("--score clip_score needs --clip CLIP (workdir, checkpoint or HF dir)")
    if not os.path.exists(args.clip):
      raise FileNotFoundError(f"--clip {args.clip}: no such file or directory")
  if args.save_samples and not args.save_samples.endswith(".npz"):
    raise UsageError(f"--save_samples {args.save_samples}: expected a FILE.npz")
  return scores, [captions[i % len(captions)] for i in range(args.num)]


def cmd_generate(args):
  import shlex  # pylint: disable=g-import-not-at-top
  from dalle_jax.sampling import generate as ar_lib  # pylint: disable=g-import-not-at-top
  from dalle_jax.sampling import rerank  # pylint: disable=g-import-not-at-top
  scores, captions = _check_generate(args)
  real = None
  if "fid" in scores:  # all of it: --num counts samples here, not reference images
    real = src_lib.open_source(args.real, "--real", args.data_dir, allow_stats=True)
  ext = info = clip = ref = None
  model = ",".join(os.path.abspath(p) for p in (args.workdir or args.checkpoint).split(","))
  result = {"metric": "generate", "family": args.family, "model": model,
            "model_flag": "--workdir" if args.workdir else "--checkpoint"}
  sampler = gen_lib.load_sampler(args.family, model, args.sampler_flags,
                                 mesh=ar_lib.mesh_from_flag(args.mesh), vqgan=args.vqgan)
  fid_info = {}
  if real is not None:
    ext, info = _extractor(args)
    if real.kind == "stats":
      ref = (real.mu, real.sigma)
      fid_info["real"] = _source_info(args.real, real)
    else:
      ex = src_lib.extract(real, ext, progress="real features")
      ref = (ex.stats.mu, ex.stats.sigma)
      fid_info["real"] = _source_info(args.real, real, ex)
  if "clip_score" in scores:
    clip = clip_lib.ClipCosines(rerank.get_encoder(args.clip, flag="--clip",
                                                   batch_size=args.batch_size), args.batch_size)
  scorer = gen_lib.Scorer(ext, ref, clip)
  seeds, images = gen_lib.sample_and_score(sampler, captions, args.seed, args.sample_batch_size,
                                           scorer, keep_images=bool(args.save_samples),
                                           progress=True)
  import jax  # pylint: disable=g-import-not-at-top
  if args.save_samples and jax.process_index() == 0:
    os.makedirs(os.path.dirname(os.path.abspath(args.save_samples)), exist_ok=True)
    np.savez(args.save_samples, arr_0=images)
  got = scorer.result()
  if "fid" in got:
    got["fid"].update(mode=args.mode, inception=info, **fid_info)
  if "clip_score" in got:
    got["clip_score"].update(clip=os.path.abspath(args.clip),
                             clip_image_size=clip.encoder.image_size)
  result.update(
      num=args.num, seed=args.seed, sample_batch_size=args.sample_batch_size, seeds=seeds,
      mesh=args.mesh, settings=sampler.settings,
      captions_file=os.path.abspath(args.captions), captions=captions,
      save_samples=os.path.abspath(args.save_samples) if args.save_samples else None,
      command="python -m dalle_jax.evaluate " + shlex.join(args.argv), scores=got)
  line = []
  if "fid" in got:
    line.append(f"FID {got['fid']['value']:.6f}")
  if "clip_score" in got:
    cs = got["clip_score"]
    line.append(f"CLIP score {cs['clip_score_torchmetrics']:.4f} (torchmetrics) "
                f"{cs['clip_score_hessel']:.4f} (Hessel et al.)")
  return result, " ".join(line)


COMMANDS = {"fid": cmd_fid, "stats": cmd_stats, "kid": cmd_kid, "is": cmd_is, "prd": cmd_prd,
            "clip_score": cmd_clip_score, "rfid": cmd_rfid, "zero_shot": cmd_zero_shot,
            "generate": cmd_generate}


def main(argv=None):
  argv = list(sys.argv[1:] if argv is None else argv)
  args = build_parser().parse_args(argv)
  args.argv = argv
  logging.basicConfig(level=logging.WARNING)
  if args.cmd in INCEPTION_CMDS:
    if not args.inception:
      sys.exit(f"error: {args.cmd} needs --inception PT_INCEPTION.pth (pytorch-fid's weights, "
               "a local file) or $DALLE_JAX_INCEPTION")
    if not os.path.isfile(args.inception):
      sys.exit(f"error: --inception {args.inception}: no such file")
  if args.batch_size < 1:
    sys.exit(f"error: --batch_size must be >= 1, got {args.batch_size}")
  from dalle_jax import parallel  # pylint: disable=g-import-not-at-top
  parallel.initialize_distributed()
  start = time.time()
  try:
    result, last_line = COMMANDS[args.cmd](args)
  except (src_lib.SourceError, UsageError, FileNotFoundError, ValueError, KeyError) as e:
    sys.exit(f"error: {e}")
  import jax  # pylint: disable=g-import-not-at-top
  result.update(devices=jax.device_count(), processes=jax.process_count(),
                seconds=round(time.time() - start, 2))
  out = args.out or f"evaluate_{args.cmd}.json"
  write_results(out, result)
  if jax.process_index() == 0:
    print(f"results: {out} (+ {os.path.splitext(out)[0]}.md)")
    print(last_line)
  return result
