"""The shapes demo, end to end on CPU: `make demo` / `python -m dalle_jax.tools.demo --out demo`.

  1. build the synthetic shapes dataset              -> OUT/data
  then two chains at once (their processes leave each other's cores idle time):
  2a. train the VQGAN `shapes` preset                 -> OUT/vqgan
  3a. encode the dataset to VQGAN codes               -> OUT/data/shapes_codes
  4a. train the DALL·E `shapes` preset on the codes   -> OUT/dalle
  2b. train the CLIP `shapes` preset                  -> OUT/clip
  3b. train the diffusion `shapes` preset (16 px), sample the prompts with guided DDIM
                                                      -> OUT/diffusion, OUT/diffusion_samples.png
  5. sample the prompts with DALL·E, rerank with CLIP -> OUT/samples.png (+ the images)
  6. measure how often samples follow their prompts   -> OUT/report.json
     (follow_rate for DALL·E, diffusion_follow_rate for the diffusion model)

Each stage runs the same public command a user would (its output in OUT/logs/STAGE.log); a
stage whose workdir is already complete is skipped (training resumes), so an interrupted
demo continues.
"""
import argparse
import glob
import json
import os
import concurrent.futures
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


def run(cmd, log, tag):
  """Runs one stage's command, its output to `log`; progress lines echoed with `tag`."""
  print(f"[{tag}] $ {' '.join(cmd)}", flush=True)
  t = time.time()
  with open(log, "a") as f:
    f.write(f"\n$ {' '.join(cmd)}\n")
    f.flush()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
      f.write(line)
      if line.startswith(("step ", "eval ", "error", "Traceback")) or "PSNR" in line or "%|" not in line and "WARNING" in line:
        print(f"[{tag}]  " + line.rstrip()[:150], flush=True)
    proc.wait()
  if proc.returncode:
    raise SystemExit(f"demo stage {tag} failed ({proc.returncode}): {' '.join(cmd)}\nsee {log}")
  print(f"[{tag}] done in {time.time() - t:.0f} s", flush=True)
  return time.time() - t


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", default="demo")
  p.add_argument("--num_images", type=int, default=8, help="samples per prompt before reranking")
  p.add_argument("--rerank_top", type=int, default=4)
  p.add_argument("--fast", action="store_true", help="much shorter training (smoke test)")
  args = p.parse_args(argv)
  out = os.path.abspath(args.out)
  logs = os.path.join(out, "logs")
  os.makedirs(logs, exist_ok=True)
  data = os.path.join(out, "data")
  py = sys.executable
  short = ["--config.total_steps=30", "--config.eval_every=15", "--config.preview_every=30",
           "--config.checkpoint_every=30"] if args.fast else []
  times = {}
  start = time.time()

  def stage(tag, cmd):
    times[tag] = run(cmd, os.path.join(logs, f"{tag}.log"), tag)

  def train(family, *extra):
    stage(family, [py, "train.py", "--config", f"configs/{family}.py:shapes",
                   "--workdir", os.path.join(out, family), f"--config.data.data_dir={data}",
                   *short, *extra])

  def with_prompts(cmd):
    for prompt in PROMPTS:
      cmd += ["--prompt", prompt]
    return cmd

  stage("data", [py, "-m", "dalle_jax.tools.build_dataset", "shapes", "--data_dir", data,
                 "--image_size", "32", "--num_examples", "5000"])
  codes = os.path.join(data, "shapes_codes")

  def autoregressive():
    train("vqgan")
    stage("encode", [py, "-m", "dalle_jax.tools.encode_dataset", "--vqgan", os.path.join(out, "vqgan"),
                     "--data_dir", data, "--dataset", "shapes", "--out", codes])
    train("dalle", f"--config.data.dataset={codes}")

  def clip_and_diffusion():
    train("clip")  # first: the diffusion model then reuses the captions' cached tokenizer
    train("diffusion")
    stage("diffusion_sample", with_prompts([
        py, "sample.py", "--method", "diffusion", "--workdir", os.path.join(out, "diffusion"),
        "--sampler", "ddim", "--steps", "25", "--guidance_scale", "3",
        "--num_images", str(args.num_images), "--seed", "0",
        "--out", os.path.join(out, "diffusion_samples.png")]))

  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    chains = [pool.submit(autoregressive), pool.submit(clip_and_diffusion)]
    for chain in chains:
      chain.result()  # a failed stage's SystemExit surfaces here

  grid = os.path.join(out, "samples.png")
  stage("sample", with_prompts([
      py, "sample.py", "--workdir", os.path.join(out, "dalle"), "--num_images", str(args.num_images),
      "--seed", "0", "--out", grid, "--rerank_with", os.path.join(out, "clip"),
      "--rerank_top", str(args.rerank_top)]))
  times["total"] = time.time() - start

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
