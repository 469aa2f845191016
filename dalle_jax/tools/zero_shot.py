"""Zero-shot classification and image<->text retrieval with a CLIP model.

  python -m dalle_jax.tools.zero_shot --clip demo/clip --data_dir data --dataset shapes
    shapes has built-in class names and prompts for its label fields 'color'
    and 'shape' (both evaluated by default). Prints and writes (--out) JSON:
    top-1/top-5 per label, and retrieval recall@1/5/10 on the captions.
  python -m dalle_jax.tools.zero_shot --clip HF_DIR --data_dir D --dataset my_tfds_ds \\
      --label label --classnames names.txt --templates "a photo of a {}.|a drawing of a {}."

Prompt ensembling: each class embedding is the normalised mean of its
normalised template embeddings ("{}" in a template is replaced by the class
name). --classnames / --templates take a file (one per line) or a list
separated by "," / "|".
"""
import argparse
import json
import logging
import os

import ml_collections
import numpy as np
from scipy.special import logsumexp

from dalle_jax.data import images as img_lib
from dalle_jax.data import pipeline
from dalle_jax.data import shapes
from dalle_jax.sampling.clip_encoder import ClipEncoder

log = logging.getLogger(__name__)


def shapes_prompts(field):
  """Built-in (class names, templates) for the shapes dataset's label fields."""
  colors, kinds = shapes.COLOR_NAMES, shapes.SHAPES
  if field == "color":  # the shape's colour, marginalised over shape and background
    return colors, [f"a {{}} {s} on a {b} background" for s in kinds for b in colors]
  if field == "shape":
    return kinds, [f"a {c} {{}} on a {b} background" for c in colors for b in colors]
  if field == "background":
    return colors, [f"a {c} {s} on a {{}} background" for c in colors for s in kinds]
  raise ValueError(f"shapes has label fields color|shape|background, not {field!r}")


def prompt_embeddings(encoder, classnames, templates):
  """(C, T, E) unit-norm embeddings of every class x template prompt."""
  templates = templates or ["{}"]
  texts = [t.replace("{}", c) for c in classnames for t in templates]
  return encoder.encode_texts(texts).reshape(len(classnames), len(templates), -1)


def class_embeddings(encoder, classnames, templates):
  """(C, E) unit-norm class embeddings, each the mean over its templates (CLIP)."""
  mean = prompt_embeddings(encoder, classnames, templates).mean(axis=1)
  return (mean / np.linalg.norm(mean, axis=-1, keepdims=True)).astype(np.float32)


def class_scores(encoder, image_emb, classnames, templates, ensemble="mean"):
  """(N, C) class scores of image embeddings.

  ensemble="mean": cosine to the mean template embedding (the CLIP paper's
  prompt ensembling). "logsumexp": log of the summed probabilities of a
  class's prompts — marginalises templates that spell out nuisance factors
  (shapes' prompts enumerate the other colour / shape) in probability space.
  """
  if ensemble == "mean":
    return image_emb @ class_embeddings(encoder, classnames, templates).T
  if ensemble == "logsumexp":
    z = np.einsum("ne,cte->nct", image_emb, prompt_embeddings(encoder, classnames, templates))
    return logsumexp(encoder.logit_scale * z, axis=-1)
  raise ValueError(f"unknown ensemble {ensemble!r}; choose mean|logsumexp")


def topk_accuracy(scores_nc, labels_n, ks=(1, 5)):
  order = np.argsort(-scores_nc, axis=1)
  labels_n = np.asarray(labels_n)
  out = {}
  for k in ks:
    k_eff = min(k, scores_nc.shape[1])
    out[f"top{k}"] = float(np.mean(np.any(order[:, :k_eff] == labels_n[:, None], axis=1)))
  return out


def zero_shot(encoder, image_emb, labels, classnames, templates, ensemble="mean"):
  """Top-1/top-5 accuracy of classifying image embeddings by prompt similarity."""
  scores = class_scores(encoder, image_emb, classnames, templates, ensemble)
  res = topk_accuracy(scores, labels)
  res["ensemble"] = ensemble
  res["num_classes"] = len(classnames)
  res["chance_top1"] = 1.0 / len(classnames)
  return res


def retrieval_recall(image_emb, text_emb, ks=(1, 5, 10)):
  """Pairs aligned by index: recall@k of image->text and text->image."""
  sim = image_emb @ text_emb.T
  n = len(sim)
  target = np.arange(n)
  out = {}
  for name, s in (("image_to_text", sim), ("text_to_image", sim.T)):
    # rank of the true partner: how many candidates score strictly higher
    true = s[target, target]
    rank = np.sum(s > true[:, None], axis=1)
    for k in ks:
      out[f"{name}_R@{k}"] = float(np.mean(rank < k))
  out["num_pairs"] = n
  return out


def load_eval_split(data_cfg, split, image_size, max_examples=None):
  """uint8 images resized/cropped to the model's size, captions and label fields."""
  source = pipeline.load_source(data_cfg, split)
  n = len(source) if not max_examples else min(len(source), max_examples)
  images, captions, labels = [], [], {}
  for i in range(n):
    ex = source[i]
    images.append(img_lib.resize_and_crop(img_lib.decode(ex["image"]), image_size))
    if "caption" in ex:
      captions.append(str(ex["caption"]))
    for k, v in ex.items():
      if k not in ("image", "caption") and np.ndim(v) == 0 and isinstance(v, (int, np.integer)):
        labels.setdefault(k, []).append(int(v))
  return (np.stack(images), captions, {k: np.asarray(v) for k, v in labels.items()})


def _list_arg(value, sep):
  if value is None:
    return None
  if os.path.isfile(value):
    with open(value, encoding="utf-8") as f:
      return [l.strip() for l in f if l.strip()]
  return [v.strip() for v in value.split(sep) if v.strip()]


def evaluate(encoder, data_cfg, dataset, split="test", labels=None, classnames=None,
             templates=None, max_examples=None, ensemble="mean"):
  """Zero-shot + retrieval metrics on `split` of `dataset` -> dict."""
  _ = encoder.tokenizer  # built from the model's own data config before we change it
  data_cfg = ml_collections.ConfigDict(data_cfg.to_dict() if hasattr(data_cfg, "to_dict") else dict(data_cfg))
  data_cfg.dataset = dataset
  images, captions, label_values = load_eval_split(data_cfg, split, encoder.image_size,
                                                   max_examples)
  img_emb = encoder.encode_images(images)
  results = {"dataset": dataset, "split": split, "num_images": len(images)}
  is_shapes = dataset.split("/")[0] == "shapes"
  fields = labels or (["color", "shape"] if is_shapes else [k for k in ("label",) if k in label_values])
  for field in fields:
    if field not in label_values:
      raise KeyError(f"{dataset}:{split} has no integer label field {field!r} "
                     f"(fields: {sorted(label_values)})")
    names, temps = classnames, templates
    if is_shapes and names is None:
      names, temps_default = shapes_prompts(field)
      temps = temps or temps_default
    if names is None:
      raise ValueError(f"--classnames is needed for label field {field!r} of {dataset}")
    results[field] = zero_shot(encoder, img_emb, label_values[field], names, temps or ["{}"],
                               ensemble)
  if captions:
    results["retrieval"] = retrieval_recall(img_emb, encoder.encode_texts(captions))
  return results


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m dalle_jax.tools.zero_shot", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--clip", required=True, help="CLIP training workdir, imported checkpoint or HF dir")
  p.add_argument("--data_dir", required=True)
  p.add_argument("--dataset", default="shapes", help="TFDS name (e.g. shapes, shapes/32px_5000)")
  p.add_argument("--split", default="test")
  p.add_argument("--label", action="append", default=None,
                 help="integer label field(s) to classify (shapes: color, shape, background)")
  p.add_argument("--classnames", default=None, help="file (one per line) or comma-separated list")
  p.add_argument("--templates", default=None, help="file (one per line) or '|'-separated list with {}")
  p.add_argument("--ensemble", default="mean", choices=["mean", "logsumexp"],
                 help="prompt ensembling: mean embedding (CLIP) or summed probabilities")
  p.add_argument("--max_examples", type=int, default=None)
  p.add_argument("--batch_size", type=int, default=256)
  p.add_argument("--out", default=None, help="write the results as JSON here")
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.WARNING)
  try:
    enc = ClipEncoder.load(args.clip, batch_size=args.batch_size, show_progress=True)
    data_cfg = enc.config.data
    with data_cfg.unlocked():
      data_cfg.data_dir = args.data_dir
    # The tokenizer of a model trained here may be cached in its own data_dir.
    results = evaluate(enc, data_cfg, args.dataset, args.split, args.label,
                       _list_arg(args.classnames, ","), _list_arg(args.templates, "|"),
                       args.max_examples, args.ensemble)
  except (FileNotFoundError, ValueError, KeyError) as e:
    raise SystemExit(f"error: {e}") from None
  text = json.dumps(results, indent=2)
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  main()
