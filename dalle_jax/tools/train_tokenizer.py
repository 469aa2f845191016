r"""Train a SentencePiece BPE text tokenizer on a dataset's captions.

  python -m dalle_jax.tools.train_tokenizer --data_dir data --dataset shapes \
      --out data/shapes_bpe.model --vocab_size 1024

Then train with `--config.text.path=data/shapes_bpe.model`. (With an empty
`text.path` the trainer does the same automatically and caches the model in
data_dir.) Prints the number of pieces and the token-length statistics of the
captions, to choose `text.max_len`. Deterministic: the same captions and flags
give the same model file.
"""
import argparse
import logging
import sys

import numpy as np

from dalle_jax.configs import common


def main(argv=None):
  parser = argparse.ArgumentParser(
      prog="python -m dalle_jax.tools.train_tokenizer", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--data_dir", required=True, help="TFDS data_dir holding the dataset")
  parser.add_argument("--dataset", default="shapes", help="dataset name or records directory")
  parser.add_argument("--split", default="train")
  parser.add_argument("--out", required=True, help="output .model path")
  parser.add_argument("--vocab_size", type=int, required=True)
  parser.add_argument("--model_type", default="bpe", choices=["bpe", "unigram", "char", "word"])
  parser.add_argument("--no_lowercase", action="store_true", help="keep case")
  parser.add_argument("--max_examples", type=int, default=0,
                      help="use at most this many examples (even stride); 0 = all")
  parser.add_argument("--max_len", type=int, default=64,
                      help="report how many captions would be truncated at this length")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

  from dalle_jax.data import tokenizers  # pylint: disable=g-import-not-at-top

  data_cfg = common.base_config().data
  data_cfg.dataset, data_cfg.data_dir, data_cfg.train_split = args.dataset, args.data_dir, args.split
  captions = tokenizers.dataset_captions(data_cfg, args.split, max_examples=args.max_examples)
  print(f"{len(captions)} captions from {args.dataset}/{args.split} in {args.data_dir}")
  tok = tokenizers.train_sentencepiece(
      captions, args.out, args.vocab_size, lowercase=not args.no_lowercase,
      model_type=args.model_type)

  lengths = np.array([len(s) for s in tok.tokenize(captions)])
  print(f"wrote {args.out}: {tok.vocab_size} pieces (asked {args.vocab_size}); "
        f"pad={tok.pad_id} eos={tok.eos_id}")
  print(f"tokens per caption (with EOS): mean {lengths.mean():.1f}, "
        f"p99 {np.percentile(lengths, 99):.0f}, max {lengths.max()}; "
        f"{int((lengths > args.max_len).sum())} of {len(lengths)} longer than "
        f"max_len={args.max_len}")
  ids, _ = tok.encode(captions[:3], max_len=args.max_len)
  for c, d in zip(captions[:3], tok.decode(ids)):
    print(f"  {c!r} -> {d!r}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
