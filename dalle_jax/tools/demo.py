"""The shapes demo, end to end on CPU: `make demo` / `python -m dalle_jax.tools.demo --out demo`.

  1. build the synthetic shapes dataset              -> OUT/data
  2. train the VQGAN `shapes` preset                  -> OUT/vqgan
  3. encode the dataset to VQGAN codes                -> OUT/data/shapes_codes
  4. train the DALL·E `shapes` preset on the codes    -> OUT/dalle
  5. train the CLIP `shapes` preset                   -> OUT/clip
  6. sample prompts, rerank with CLIP                 -> OUT/samples.png (+ the images)
  7. measure how often samples follow their prompts   -> OUT/report.json
  8. train the diffusion `shapes` preset (16 px), sample the prompts with guided DDIM
                                                      -> OUT/diffusion, OUT/diffusion_samples.png
     (its prompt-following rates go into OUT/report.json as diffusion_follow_rate)

Each stage runs the same public command a user would; a stage whose workdir is
already complete is skipped (training resumes), so an interrupted demo continues.
"""
import argparse
import glob
import json
import os
import subprocess
import sys
import time

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROMPTS = [
    "a red circle on a blue background",
    "a yellow square on a black background",
    "a green triangle on a white background",
    "a blue background with a magenta cross",
    "a cyan diamond on a red background",
    "a white circle on a green background",
]


def run(cmd, log):
  print(f"\n$ {' '.join(cmd)}", flush=True)
  t = time.time()
  with open(log, "a") as f:
    f.write(f"\n$ {' '.join(cmd)}\n")
    f.flush()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
      f.write(line)
      if line.startswith(("step ", "eval ", "error", "Traceback")) or "PSNR" in line or "%|" not in line and "WARNING" in line:
        print("  " + line.rstrip()[:160], flush=True)
    proc.wait()
  if proc.returncode:
    raise SystemExit(f"demo stage failed ({proc.returncode}): {' '.join(cmd)}\nsee {log}")
  return time.time() - t


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", default="demo")
  p.add_argument("--num_images", type=int, default=8, help="samples per prompt before reranking")
  p.add_argument("--rerank_top", type=int, default=4)
  p.add_argument("--fast", action="store_true", help="much shorter training (smoke test)")
  args = p.parse_args(argv)
  out = os.path.abspath(args.out)
  os.makedirs(out, exist_ok=True)
  log = os.path.join(out, "demo.log")
  data = os.path.join(out, "data")
  py = sys.executable
  short = ["--config.total_steps=30", "--config.eval_every=15", "--config.preview_every=30",
           "--config.checkpoint_every=30"] if args.fast else []
  times = {}

  def train(family, workdir, *extra):
    return run([py, "train.py", "--config", f"configs/{family}.py:shapes", "--workdir", workdir,
                f"--config.data.data_dir={data}", *short, *extra], log)

  times["vqgan"] = train("vqgan", os.path.join(out, "vqgan"))
  codes = os.path.join(data, "shapes_codes")
  times["encode"] = run([py, "-m", "dalle_jax.tools.encode_dataset", "--vqgan", os.path.join(out, "vqgan"),
                         "--data_dir", data, "--dataset", "shapes", "--out", codes], log)
  times["dalle"] = train("dalle", os.path.join(out, "dalle"), f"--config.data.dataset={codes}")
  times["clip"] = train("clip", os.path.join(out, "clip"))

  grid = os.path.join(out, "samples.png")
  cmd = [py, "sample.py", "--workdir", os.path.join(out, "dalle"), "--num_images", str(args.num_images),
         "--seed", "0", "--out", grid, "--rerank_with", os.path.join(out, "clip"),
         "--rerank_top", str(args.rerank_top)]
  for prompt in PROMPTS:
    cmd += ["--prompt", prompt]
  times["sample"] = run(cmd, log)

  times["diffusion"] = train("diffusion", os.path.join(out, "diffusion"))
  diff_grid = os.path.join(out, "diffusion_samples.png")
  cmd = [py, "sample.py", "--method", "diffusion", "--workdir", os.path.join(out, "diffusion"),
         "--sampler", "ddim", "--steps", "25", "--guidance_scale", "3",
         "--num_images", str(args.num_images), "--seed", "0", "--out", diff_grid]
  for prompt in PROMPTS:
    cmd += ["--prompt", prompt]
  times["diffusion_sample"] = run(cmd, log)

  report = {"seconds": {k: round(v, 1) for k, v in times.items()}}
  report.update(score_samples(out))
  diffusion_scores = score_samples(out, "diffusion_samples")
  report["diffusion_follow_rate"] = diffusion_scores["follow_rate"]
  report["diffusion_num_scored"] = diffusion_scores.get("num_scored")
  with open(os.path.join(out, "report.json"), "w") as f:
    json.dump(report, f, indent=2)
  print(json.dumps(report, indent=2))
  print(f"\nsample grid: {grid}")


def score_samples(out, name="samples"):
  """Prompt-following rates of the images sample.py wrote beside the grid OUT/NAME.png."""
  from dalle_jax.data import shapes_check
  meta_path = os.path.join(out, name, "samples.json")
  if not os.path.exists(meta_path):
    return {"follow_rate": None, "note": f"{meta_path} not found"}
  with open(meta_path) as f:
    meta = json.load(f)
  images, captions = [], []
  for row in meta["images"]:
    images.append(np.asarray(Image.open(os.path.join(out, name, row["file"])).convert("RGB")))
    captions.append(row["prompt"])
  rates = shapes_check.follow_rates(images, captions)
  return {"follow_rate": rates, "num_scored": len(images)}


if __name__ == "__main__":
  main()
