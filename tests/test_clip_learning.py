"""The `shapes` CLIP preset learns: trained with the real trainer on CPU, it
names held-out images' shape colour zero-shot, and their shape above chance."""
import json
import os
import time

import numpy as np

from dalle_jax.configs import clip as clip_configs


def test_shapes_clip_zero_shot(tmp_path):
  from dalle_jax.tools import zero_shot
  from dalle_jax.tools.embed import ClipEncoder
  from dalle_jax.train import loop
  config = clip_configs.get_config("shapes")
  config.data.data_dir = str(tmp_path / "data")
  config.data.dataset = "shapes/32px_3000"  # 3000 train / 150 held-out test images
  config.total_steps = 800
  config.log_every = 100
  config.eval_every = 0
  config.preview_every = 0
  config.checkpoint_every = 800
  config.async_checkpoints = False
  workdir = str(tmp_path / "clip")
  t0 = time.time()
  loop.train(config, workdir)
  train_s = time.time() - t0

  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(l) for l in f if l.strip()]
  losses = [r["loss"] for r in rows if "loss" in r]
  assert losses[-1] < 0.5 * losses[0], losses

  enc = ClipEncoder.load(workdir)
  res = zero_shot.evaluate(enc, enc.config.data, config.data.dataset, "test",
                           ensemble="logsumexp")
  mean = zero_shot.evaluate(enc, enc.config.data, config.data.dataset, "test", ensemble="mean")
  print(f"\ntrained {config.total_steps} steps in {train_s:.0f}s; zero-shot on "
        f"{res['num_images']} held-out images: colour top-1 {res['color']['top1']:.3f} "
        f"(mean-embedding ensembling {mean['color']['top1']:.3f}), shape top-1 "
        f"{res['shape']['top1']:.3f} ({mean['shape']['top1']:.3f}; chance 0.2), retrieval "
        f"R@1 i->t {res['retrieval']['image_to_text_R@1']:.3f} (chance {1 / res['num_images']:.3f})")
  assert res["color"]["top1"] >= 0.9
  assert res["shape"]["top1"] > 0.25  # chance: 0.2
  assert res["retrieval"]["image_to_text_R@5"] > 10 * 5 / res["num_images"]

  # Reranking with the trained model: among all held-out images, the best one
  # for a prompt has the prompt's shape colour and background.
  from dalle_jax.data import shapes
  from dalle_jax.sampling import rerank
  images, _, labels = zero_shot.load_eval_split(enc.config.data, "test", enc.image_size)
  combos = [("red", "blue"), ("yellow", "black"), ("green", "white"), ("cyan", "magenta")]
  prompts = [f"a {c} square on a {b} background" for c, b in combos]
  kept, scores, idx = rerank.rerank(enc, prompts, [images] * len(prompts), top_k=3,
                                    return_indices=True)
  assert kept[0].shape == (3,) + images.shape[1:] and np.all(np.diff(scores[0]) <= 0)
  hits = sum(shapes.COLOR_NAMES[labels["color"][i[0]]] == c and
             shapes.COLOR_NAMES[labels["background"][i[0]]] == b
             for i, (c, b) in zip(idx, combos))
  assert hits >= 3, hits
