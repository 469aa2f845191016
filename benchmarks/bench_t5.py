"""T5 encoder throughput: dalle_jax vs transformers' PyTorch T5EncoderModel.

  python benchmarks/bench_t5.py [--preset t5_v1_1_base] [--batch 16] [--length 77] [--reps 3]

Both sides run the SAME random weights (a transformers T5EncoderModel /
UMT5EncoderModel at the preset's dims, saved and imported with
dalle_jax.convert.hf_t5), f32, on the local default device (PyTorch on CPU),
on one batch of ids with a padding mask (texts of varied length, as prompts
padded to --length). Median of --reps timed runs after a warm-up; prints
texts/s for each and the ratio (ours / torch), and checks the two agree on
the real tokens.
"""
import argparse
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402  pylint: disable=g-import-not-at-top


def reference_model(preset, vocab_size):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from dalle_jax.models import t5 as t5_lib  # pylint: disable=g-import-not-at-top
  dims = dict(t5_lib.PRESETS[preset])
  umt5 = dims.pop("per_layer_position_bias", False)
  dims["vocab_size"] = vocab_size
  torch.manual_seed(0)
  if umt5:
    return transformers.UMT5EncoderModel(transformers.UMT5Config(**dims)).eval()
  return transformers.T5EncoderModel(transformers.T5Config(**dims)).eval()


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", default="t5_v1_1_base")
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--length", type=int, default=77)
  p.add_argument("--vocab_size", type=int, default=32128)
  p.add_argument("--reps", type=int, default=3)
  args = p.parse_args(argv)

  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from dalle_jax.convert import hf_t5  # pylint: disable=g-import-not-at-top
  from dalle_jax.models import t5 as t5_lib  # pylint: disable=g-import-not-at-top

  ref = reference_model(args.preset, args.vocab_size)
  with tempfile.TemporaryDirectory() as d:
    ref.save_pretrained(d)
    config, variables = hf_t5.load_hf_t5(d)
  model = t5_lib.build_model(config)
  variables = jax.device_put(variables)
  rng = np.random.default_rng(0)
  b, t = args.batch, args.length
  lengths = rng.integers(max(1, t // 4), t + 1, b)
  mask = np.arange(t)[None] < lengths[:, None]
  ids = np.where(mask, rng.integers(3, args.vocab_size, (b, t)), 0)
  ids[np.arange(b), lengths - 1] = 1  # EOS closes every text

  fn = jax.jit(model.apply)
  ids_j, mask_j = jax.device_put(ids.astype(np.int32)), jax.device_put(mask)
  ids_t, mask_t = torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(mask.astype(np.int64))
  with torch.inference_mode():
    t_torch, out_torch = common.timeit_with_output(
        lambda: ref(input_ids=ids_t, attention_mask=mask_t).last_hidden_state, reps=args.reps)
  t_ours, out_ours = common.timeit_with_output(lambda: fn(variables, ids_j, mask_j), reps=args.reps)
  err = float(np.abs(np.asarray(out_ours) - out_torch.numpy())[mask].max())

  m = config.model
  print(f"{args.preset}: {t5_lib.param_count(variables['params']) / 1e6:.1f}M params "
        f"(d_model {m.d_model}, {m.num_layers} layers, {m.feed_forward_proj}), "
        f"jax on {jax.devices()[0].device_kind}, torch {torch.__version__} CPU "
        f"({torch.get_num_threads()} threads)")
  rate = lambda v: f"{v:8.1f}/s"
  common.ratio_line(f"t5 encoder ({b}x{t} tok, {int(mask.sum())} real)", b / t_ours, b / t_torch,
                    ours_label="dalle_jax", theirs_label="torch", fmt=rate, lower_is_better=False,
                    extra=f"max|diff| {err:.1e}")


if __name__ == "__main__":
  main()
