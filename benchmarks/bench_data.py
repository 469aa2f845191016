"""Input pipeline: examples/s it delivers vs examples/s the train step consumes.

  python -m benchmarks.bench_data [--data_dir data] [--batches 24] [--presets vqgan,dalle,...]
                                  [--vit_batch 512] [--vit_batches 3] [--no_train] [--no_vit]

1. Each family's `shapes` preset (vqgan, dalle, dalle_mini, clip) at its own
   dataset, image size and batch: the task's own iterator (task.make_iterator:
   decoding, resize/crop, the task's preprocess with its tokenizer, batching)
   in two settings, "1 thread" (read_threads=1, prefetch=2, float32: the
   pipeline before these keys existed) and the preset's config (read_threads,
   prefetch, image_dtype, num_workers as configured). Against it, the trainer's
   jitted, donated step (benchmarks.common.TrainerStep) at the same batch on
   this host's default device. ratio = pipeline examples/s / step examples/s;
   >= 2 means the input keeps the step fed with room to spare (in a real run
   both share this CPU).
2. CLIP vit_b32 geometry, pipeline only: 224 px crops of 320x256 JPEGs (the
   size tools.build_dataset image_text_folder stores at its default 256 px),
   at --vit_batch examples per host (the preset's global 4096 over 8 hosts)
   in float32 and uint8 and with worker processes: what one host delivers;
   and the time to place one such batch on this host's devices
   (parallel.shard_batch), float32 vs uint8.

Rates: the first 1 + prefetch batches are untimed (start-up, and batches read
ahead while it ran), then --windows runs of --batches batches are timed and
the best kept (as the best train step is): the steady rate of the producer,
since the consumer here takes each batch at once. The dalle presets
read a records directory of random 8x8 codes with the shapes captions, written
once under --data_dir (the same fields and sizes tools.encode_dataset writes).
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402  pylint: disable=g-import-not-at-top

PRESETS = ("vqgan", "dalle", "dalle_mini", "clip")
BEFORE = dict(read_threads=1, prefetch=2, num_workers=0, image_dtype="float32")


def rate(v):
  return f"{v:.0f} ex/s"


def shapes_config(family, data_dir):
  import importlib  # pylint: disable=g-import-not-at-top
  config = importlib.import_module(f"configs.{family}").get_config("shapes")
  config.data.data_dir = data_dir
  if family in ("dalle", "dalle_mini"):
    config.data.dataset = codes_records(config, data_dir)
  return config


def codes_records(config, data_dir):
  """Random codes at the preset's grid and codebook, with the shapes captions."""
  from dalle_jax.data import pipeline, records  # pylint: disable=g-import-not-at-top
  grid, vocab = int(config.model.image_grid), int(config.model.image_vocab_size)
  out = os.path.join(data_dir, f"bench_shapes_codes_{grid}x{grid}_{vocab}")
  if records.is_records_dir(out):
    return out
  shapes_cfg = dict(dataset="shapes", data_dir=data_dir)
  rng = np.random.default_rng(0)
  for split in ("train", "test"):
    source = pipeline.load_source(shapes_cfg, split)

    def examples(source=source):
      for start in range(0, len(source), 1024):
        for ex in source.__getitems__(range(start, min(len(source), start + 1024))):
          yield {"codes": rng.integers(0, vocab, (grid, grid)).astype(np.int32),
                 "caption": ex["caption"], "shape": ex["shape"], "color": ex["color"],
                 "background": ex["background"]}
    records.write_records(out, split, examples(), meta={"grid": [grid, grid], "n_embed": vocab})
  return out


def jpeg_records(data_dir, n=512):
  """n 320x256 JPEG photos-like images (shapes + sensor noise) with captions."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from dalle_jax.data import images as img_lib, records, shapes  # pylint: disable=g-import-not-at-top
  out = os.path.join(data_dir, f"bench_jpeg_320x256_{n}")
  if records.is_records_dir(out):
    return out
  rng = np.random.default_rng(0)

  def examples():
    for i in range(n):
      ex = shapes.make_example(i, image_size=256)
      im = np.asarray(Image.fromarray(ex["image"]).resize((320, 256), Image.BICUBIC))
      im = np.clip(im + rng.normal(0, 6, im.shape), 0, 255).astype(np.uint8)
      yield {"image": img_lib.encode(im, "JPEG", quality=90), "caption": ex["caption"]}
  records.write_records(out, "train", examples())
  return out


def pipeline_rate(make_iterator, data_cfg, batch, batches, windows=1, **settings):
  """Steady examples/s of make_iterator(data_cfg) under `settings` (data.* overrides):
  the best of `windows` runs of `batches` batches."""
  data_cfg = data_cfg.copy_and_resolve_references() if hasattr(
      data_cfg, "copy_and_resolve_references") else dict(data_cfg)
  for k, v in settings.items():
    data_cfg[k] = v
  it = make_iterator(data_cfg, batch)
  try:
    for _ in range(1 + int(data_cfg["prefetch"])):
      next(it)
    best = 0.0
    for _ in range(windows):  # best window: robust to a shared host's busy phases
      t = time.perf_counter()
      for _ in range(batches):
        next(it)
      best = max(best, batches * batch / (time.perf_counter() - t))
    return best
  finally:
    it.close()


def task_iterator(config):
  from dalle_jax.tasks.base import get_task  # pylint: disable=g-import-not-at-top

  def make(data_cfg, batch):
    c = config.copy_and_resolve_references()
    with c.unlocked():
      c.data = data_cfg
    return get_task(c).make_iterator(c.data.train_split, batch)
  return make


def bench_presets(args):
  rows, ratios = [], []
  for family in args.presets.split(","):
    config = shapes_config(family, args.data_dir)
    make = task_iterator(config)
    b = int(config.batch_size)
    before = pipeline_rate(make, config.data, b, args.batches, args.windows, **BEFORE)
    now = pipeline_rate(make, config.data, b, args.batches, args.windows)
    step = None
    if not args.no_train:
      trainer = common.TrainerStep(config)
      step = b / trainer.time(warmup=1, reps=args.train_reps, stat=min)
      trainer.release()
    d = config.data
    print(f"{family}: pipeline {before:.0f} ex/s (1 thread), {now:.0f} ex/s (as configured); "
          f"train step {f'{step:.0f} ex/s' if step else '-'}", flush=True)
    rows.append([family, b, d.image_size, f"{before:.0f}",
                 f"{now:.0f} ({d.read_threads}t/{d.prefetch}p/{d.num_workers}w/{d.image_dtype})",
                 f"{step:.0f}" if step else "-"])
    if step:
      ratios.append((family, now, step))
  common.print_table(rows, ["shapes preset", "batch", "px", "pipeline 1 thread ex/s",
                            "pipeline as configured ex/s", "train step ex/s"],
                     title="Pipeline vs train step (this host)")
  for family, now, step in ratios:
    common.ratio_line(f"{family} shapes: pipeline vs train step", now, step,
                      ours_label="pipeline", theirs_label="step", fmt=rate,
                      lower_is_better=False, extra="(>= 2 required)")
  return ratios


def bench_vit(args):
  import ml_collections  # pylint: disable=g-import-not-at-top
  from dalle_jax.configs import clip as clip_configs  # pylint: disable=g-import-not-at-top
  from dalle_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  config = clip_configs.get_config("vit_b32")
  data = ml_collections.ConfigDict(config.data.to_dict())
  data.dataset = jpeg_records(args.data_dir)
  data.data_dir = args.data_dir
  b = args.vit_batch

  def make(data_cfg, batch):
    return pipeline.make_iterator(data_cfg, "train", batch, seed=0, process_index=0,
                                  process_count=1)

  cores = os.cpu_count() or 1
  settings = [("1 thread, float32", BEFORE),
              (f"{cores} threads, float32", dict(read_threads=cores, prefetch=cores)),
              (f"{cores} threads, uint8", dict(read_threads=cores, prefetch=cores,
                                               image_dtype="uint8")),
              (f"{cores} workers, uint8", dict(num_workers=cores, read_threads=1, prefetch=1,
                                               image_dtype="uint8"))]
  rows, rates = [], {}
  for name, s in settings:
    rates[name] = pipeline_rate(make, data, b, args.vit_batches, **s)
    print(f"vit_b32 geometry, {name}: {rates[name]:.0f} ex/s", flush=True)
    mib = b * 224 * 224 * 3 * (1 if s.get("image_dtype") == "uint8" else 4) / 2**20
    rows.append([name, f"{rates[name]:.0f}", f"{rates[name] / cores:.0f}", f"{mib:.0f}"])
  common.print_table(rows, ["setting", "ex/s", "ex/s per core", "MiB per batch"],
                     title=f"CLIP vit_b32 geometry: {data.image_size} px crops of 320x256 "
                           f"JPEGs, {b} per host, {cores} cores")
  bench_transfer(b, int(data.image_size))
  best = max(rates, key=rates.get)
  common.ratio_line(f"vit_b32 pipeline: best ({best}) vs 1 thread float32", rates[best],
                    rates["1 thread, float32"], ours_label="best", theirs_label="before",
                    fmt=rate, lower_is_better=False)
  return rates


def bench_transfer(batch, size):
  """Host -> device placement of one image batch (parallel.shard_batch), float32 vs uint8."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from dalle_jax import parallel  # pylint: disable=g-import-not-at-top
  mesh = parallel.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)))
  u8 = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), np.uint8)
  times = {}
  for name, x in (("float32", (u8 / 127.5 - 1).astype(np.float32)), ("uint8", u8)):
    times[name] = common.timeit(lambda x=x: parallel.shard_batch({"image": x}, mesh),
                                reps=3, stat=min)
  common.ratio_line(f"image batch to device ({batch}x{size}x{size}x3, "
                    f"{parallel.batch_axis_size(mesh)} device(s)): uint8 vs float32",
                    times["uint8"], times["float32"], ours_label="uint8",
                    theirs_label="float32")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--data_dir", default="data", help="datasets are built/written here once")
  p.add_argument("--presets", default=",".join(PRESETS))
  p.add_argument("--batches", type=int, default=12, help="batches per timed window")
  p.add_argument("--windows", type=int, default=3, help="timed windows per setting (best kept)")
  p.add_argument("--train_reps", type=int, default=5, help="timed train steps (best kept)")
  p.add_argument("--vit_batch", type=int, default=512)
  p.add_argument("--vit_batches", type=int, default=3)
  p.add_argument("--no_train", action="store_true", help="pipeline rates only")
  p.add_argument("--no_vit", action="store_true")
  args = p.parse_args(argv)
  if args.presets:
    bench_presets(args)
  if not args.no_vit:
    bench_vit(args)


if __name__ == "__main__":
  main()
