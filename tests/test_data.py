"""Data layer: shapes / image_text_folder builders, records, the grain pipeline."""
import hashlib
import io
import json
import os
import re
import time

import ml_collections
import numpy as np
import pytest
from PIL import Image

from dalle_jax.data import image_text_folder as itf
from dalle_jax.data import images as img_lib
from dalle_jax.data import pipeline
from dalle_jax.data import records
from dalle_jax.data import shapes

TINY = "shapes/32px_64"  # 64 train + 16 test examples of 32 px


def data_cfg(data_dir, dataset=TINY, **kw):
  c = ml_collections.ConfigDict(dict(dataset=dataset, data_dir=str(data_dir), image_size=32,
                                     train_split="train", eval_split="test", shuffle=True,
                                     num_workers=0, random_crop=False))
  c.update(kw)
  return c


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("shapes")
  pipeline.load_source(data_cfg(d), "train")  # auto-builds the first time
  return d


def take(it, n):
  return [next(it) for _ in range(n)]


def image_ids(batch):
  return [hashlib.md5(np.ascontiguousarray(im).tobytes()).hexdigest() for im in batch["image"]]


# ------------------------------------------------------------------ shapes

def test_shapes_examples_are_deterministic():
  a, b = shapes.make_example(7, "train", 32), shapes.make_example(7, "train", 32)
  assert a["image"].tobytes() == b["image"].tobytes() and a["caption"] == b["caption"]
  c = shapes.make_example(7, "test", 32)
  assert c["image"].tobytes() != a["image"].tobytes()


def test_shapes_build_is_byte_identical(shapes_dir, tmp_path):
  shapes.builder(str(tmp_path), "32px_64").download_and_prepare()
  rel = os.path.join("shapes", "32px_64", "1.0.0")
  files = sorted(f for f in os.listdir(shapes_dir / rel) if "array_record" in f)
  assert len(files) == 2
  for f in files:
    assert (shapes_dir / rel / f).read_bytes() == (tmp_path / rel / f).read_bytes()


def _parse_caption(caption):
  for t in shapes.TEMPLATES:
    pattern = re.escape(t).replace(r"\{c\}", "(?P<c>\\w+)").replace(r"\{s\}", "(?P<s>\\w+)")
    m = re.fullmatch(pattern.replace(r"\{b\}", "(?P<b>\\w+)"), caption)
    if m:
      return m["c"], m["s"], m["b"]
  raise AssertionError(f"caption matches no template: {caption!r}")


def test_shapes_captions_and_labels_match_pixels(shapes_dir):
  source = pipeline.load_source(data_cfg(shapes_dir), "train")
  assert len(source) == 64 and len(pipeline.load_source(data_cfg(shapes_dir), "test")) == 16
  templates_seen = set()
  for i in range(len(source)):
    ex = source[i]
    image = img_lib.decode(ex["image"])
    assert image.shape == (32, 32, 3)
    c, s, b = _parse_caption(ex["caption"])
    templates_seen.add(ex["caption"].split()[1])
    assert (c, s, b) == (shapes.COLOR_NAMES[ex["color"]], shapes.SHAPES[ex["shape"]],
                         shapes.COLOR_NAMES[ex["background"]])
    assert c != b
    colors, counts = np.unique(image.reshape(-1, 3), axis=0, return_counts=True)
    dominant = tuple(colors[np.argmax(counts)])
    assert dominant == shapes.COLORS[b], (i, ex["caption"])  # the background is the majority
    fg = counts[(colors == shapes.COLORS[c]).all(-1)]
    assert fg.size == 1 and fg[0] > 0.05 * 32 * 32, (i, ex["caption"])  # the shape is visible
    ref = shapes.make_example(i, "train", 32)
    assert ref["caption"] == ex["caption"] and np.array_equal(ref["image"], image)
  assert len(templates_seen) > 2  # several caption templates are used


def test_shape_masks_are_distinct():
  masks = [shapes.shape_mask(s, 32.0, 32.0, 20.0, 64) for s in shapes.SHAPES]
  for i in range(len(masks)):
    assert 0.15 < masks[i].mean() < 0.5
    for j in range(i):
      assert np.abs(masks[i] - masks[j]).mean() > 0.02, (shapes.SHAPES[i], shapes.SHAPES[j])


# ------------------------------------------------------------------ pipeline

def test_batches_shapes_and_dtypes(shapes_dir):
  it = pipeline.make_iterator(data_cfg(shapes_dir, image_size=24), "train", 8, seed=0,
                              process_index=0, process_count=1)
  b = next(it)
  assert b["image"].shape == (8, 24, 24, 3) and b["image"].dtype == np.float32
  assert -1.0 <= b["image"].min() < 0.0 < b["image"].max() <= 1.0
  assert b["caption"].shape == (8,) and all(type(c) is str for c in b["caption"])
  assert b["shape"].dtype == np.int32


def test_process_shards_partition_the_global_batch(shapes_dir):
  cfg = data_cfg(shapes_dir)
  full = take(pipeline.make_iterator(cfg, "train", 16, seed=3, process_index=0,
                                     process_count=1), 6)
  parts = [take(pipeline.make_iterator(cfg, "train", 16, seed=3, process_index=p,
                                       process_count=4), 6) for p in range(4)]
  for step in range(6):
    locals_ = [parts[p][step] for p in range(4)]
    assert all(b["image"].shape[0] == 4 for b in locals_)
    ids = [image_ids(b) for b in locals_]
    assert len(set(sum(ids, []))) == 16  # disjoint
    joined = np.concatenate([b["image"] for b in locals_])
    np.testing.assert_array_equal(joined, full[step]["image"])  # cover the global batch
    assert sum((list(b["caption"]) for b in locals_), []) == list(full[step]["caption"])
  with pytest.raises(ValueError, match="multiple of the process count"):
    pipeline.make_iterator(cfg, "train", 10, seed=0, process_index=0, process_count=4)


def test_shuffle_is_seeded_and_reshuffled_each_epoch(shapes_dir):
  cfg = data_cfg(shapes_dir)

  def epochs(seed):
    it = pipeline.make_iterator(cfg, "train", 16, seed=seed, process_index=0, process_count=1)
    ids = sum((image_ids(b) for b in take(it, 8)), [])
    return ids[:64], ids[64:]

  a1, a2 = epochs(0)
  b1, _ = epochs(0)
  c1, _ = epochs(1)
  assert a1 == b1  # same seed, same order
  assert a1 != c1  # different seed, different order
  assert len(set(a1)) == 64 and set(a1) == set(a2) and a1 != a2  # a new permutation per epoch
  no_shuffle = pipeline.make_iterator(data_cfg(shapes_dir, shuffle=False), "train", 16, seed=0,
                                      process_index=0, process_count=1)
  src = pipeline.load_source(cfg, "train")
  assert list(next(no_shuffle)["caption"]) == [src[i]["caption"] for i in range(16)]


@pytest.mark.parametrize("random_crop", [False, True])
def test_iterator_resumes_exactly(shapes_dir, random_crop):
  cfg = data_cfg(shapes_dir, image_size=24, random_crop=random_crop)
  make = lambda: pipeline.make_iterator(cfg, "train", 12, seed=5, process_index=1,
                                        process_count=2)
  it = make()
  take(it, 7)  # crosses an epoch boundary (64 examples, 12 per global batch)
  state = json.loads(json.dumps(it.get_state()))  # JSON-serialisable
  expected = take(it, 4)
  resumed = make()
  resumed.set_state(state)
  for a, b in zip(expected, take(resumed, 4)):
    np.testing.assert_array_equal(a["image"], b["image"])
    assert list(a["caption"]) == list(b["caption"])


def test_eval_iterator_without_repeat(shapes_dir):
  it = pipeline.make_iterator(data_cfg(shapes_dir), "test", 4, seed=0, shuffle=False,
                              repeat=False, process_index=0, process_count=1)
  batches = list(it)
  assert len(batches) == 4 and it.steps_per_epoch == 4
  assert len(set(sum((image_ids(b) for b in batches), []))) == 16


def test_random_crop_and_preprocess(shapes_dir):
  seen = []

  def preprocess(ex):
    seen.append(ex["image"].dtype)
    ex["num_words"] = len(ex["caption"].split())
    return ex

  cfg = data_cfg(shapes_dir, image_size=20, random_crop=True)
  b = next(pipeline.make_iterator(cfg, "train", 8, seed=0, preprocess=preprocess,
                                  process_index=0, process_count=1))
  assert b["image"].shape == (8, 20, 20, 3) and seen[0] == np.float32
  assert b["num_words"].tolist() == [len(c.split()) for c in b["caption"]]


def test_uint8_batches_are_the_stored_pixels(shapes_dir):
  # No shuffle, stored size == image_size: batch k holds examples [8k, 8k+8) unresized.
  cfg = data_cfg(shapes_dir, shuffle=False, image_dtype="uint8")
  u8 = take(pipeline.make_iterator(cfg, "train", 8, seed=0, process_index=0, process_count=1), 2)
  f32 = take(pipeline.make_iterator(data_cfg(shapes_dir, shuffle=False), "train", 8, seed=0,
                                    process_index=0, process_count=1), 2)
  src = pipeline.load_source(cfg, "train")
  for k, (a, b) in enumerate(zip(u8, f32)):
    assert a["image"].dtype == np.uint8 and b["image"].dtype == np.float32
    stored = np.stack([img_lib.decode(src[i]["image"]) for i in range(8 * k, 8 * k + 8)])
    np.testing.assert_array_equal(a["image"], stored)
    np.testing.assert_allclose(b["image"], stored / 127.5 - 1.0, atol=1e-6)
    assert list(a["caption"]) == list(b["caption"])


def test_normalize_images_on_host_and_in_jit(shapes_dir):
  import jax
  cfg = data_cfg(shapes_dir, image_size=24, random_crop=True)
  f32 = next(pipeline.make_iterator(cfg, "train", 8, seed=4, process_index=0, process_count=1))
  cfg.image_dtype = "uint8"
  u8 = next(pipeline.make_iterator(cfg, "train", 8, seed=4, process_index=0, process_count=1))
  np.testing.assert_array_equal(pipeline.normalize_images(u8["image"]), f32["image"])
  on_device = jax.jit(pipeline.normalize_images)(u8["image"])
  assert on_device.dtype == np.float32
  np.testing.assert_allclose(np.asarray(on_device), f32["image"], atol=1e-6)
  ends = pipeline.normalize_images(np.array([0, 255], np.uint8))
  np.testing.assert_array_equal(ends, [-1.0, 1.0])
  assert pipeline.normalize_images(f32["image"]) is f32["image"]  # already normalised


def test_uint8_preprocess_sees_bytes_and_must_keep_them(shapes_dir):
  seen = []

  def keep(ex):
    seen.append(ex["image"].dtype)
    return ex

  cfg = data_cfg(shapes_dir, image_dtype="uint8")
  b = next(pipeline.make_iterator(cfg, "train", 4, seed=0, preprocess=keep, process_index=0,
                                  process_count=1))
  assert b["image"].dtype == np.uint8 and set(seen) == {np.dtype(np.uint8)}

  def cast(ex):  # what a task written for float batches does
    ex["image"] = np.asarray(ex["image"], np.float32)
    return ex

  it = pipeline.make_iterator(cfg, "train", 4, seed=0, preprocess=cast, process_index=0,
                              process_count=1)
  with pytest.raises(ValueError, match="image_dtype='uint8' but `preprocess` returned float32"):
    next(it)


@pytest.mark.parametrize("key,value,match", [
    ("image_dtype", "int8", r"data.image_dtype='int8'; valid: float32\|uint8"),
    ("read_threads", 0, r"data.read_threads=0; must be an integer >= 1"),
    ("prefetch", 1.5, r"data.prefetch=1.5; must be an integer >= 1"),
    ("num_workers", -1, r"data.num_workers=-1; must be an integer >= 0"),
])
def test_bad_throughput_keys_are_named_before_reading(tmp_path, key, value, match):
  # The dataset is not built: a check made after opening it would raise FileNotFoundError.
  cfg = data_cfg(tmp_path, dataset="image_text_folder/none")
  cfg[key] = value
  with pytest.raises(ValueError, match=match):
    pipeline.make_iterator(cfg, "train", 4, seed=0, process_index=0, process_count=1)


def test_read_threads_and_prefetch_keep_the_order(shapes_dir):
  def ids(**kw):
    it = pipeline.make_iterator(data_cfg(shapes_dir, **kw), "train", 12, seed=6,
                                process_index=0, process_count=1)
    return [image_ids(b) for b in take(it, 7)]  # crosses an epoch boundary

  one = ids(read_threads=1, prefetch=1)
  many = ids(read_threads=3, prefetch=5)
  assert many == one and len(set(sum(one[:5], []))) == 60


def test_missing_datasets_are_clear_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="build_dataset image_text_folder"):
    pipeline.load_source(data_cfg(tmp_path, dataset="image_text_folder/mine"), "train")
  with pytest.raises(ValueError, match="no split 'validation'"):
    pipeline.load_source(data_cfg(tmp_path, dataset="shapes/32px_20"), "validation")
  with pytest.raises(ValueError, match="not a records directory"):
    pipeline.load_source(data_cfg(tmp_path, dataset=str(tmp_path)), "train")


# ------------------------------------------------------------------ image_text_folder

def _jpeg(rng, h, w):
  buf = io.BytesIO()
  Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(buf, format="JPEG")
  return buf.getvalue()


def _make_folder(root):
  rng = np.random.default_rng(0)
  (root / "sub").mkdir(parents=True)
  for i in range(5):
    path = root / ("sub" if i % 2 else ".") / f"img{i}.jpg"
    path.write_bytes(_jpeg(rng, 40 + 10 * i, 60))
    path.with_suffix(".txt").write_text(f"photo  number\n{i}")
  Image.fromarray(np.zeros((50, 50, 3), np.uint8) + 200).save(root / "grey.png")
  (root / "grey.txt").write_text("a grey square")
  (root / "nocaption.jpg").write_bytes(_jpeg(rng, 40, 40))
  data = _jpeg(rng, 64, 64)
  (root / "truncated.jpg").write_bytes(data[:len(data) // 2])
  (root / "truncated.txt").write_text("cut off")
  (root / "fake.png").write_text("this is not a png")
  (root / "fake.txt").write_text("fake")
  (root / "notes.pdf").write_bytes(b"%PDF-1.4")


def test_image_text_folder_skips_and_counts_bad_files(tmp_path):
  src = tmp_path / "my photos"
  _make_folder(src)
  builder = itf.builder(str(tmp_path / "data"), src=str(src), image_size=32, test_fraction=0.2,
                        num_workers=1)
  builder.download_and_prepare()
  assert builder.builder_config.name == "my_photos"
  assert not [d for d in os.listdir(tmp_path / "data" / "image_text_folder") if d.startswith(".")]
  skipped = dict(builder.info.metadata["skipped"])
  assert skipped == {"no caption": 1, "truncated": 1, "not an image": 2}
  cfg = data_cfg(tmp_path / "data", dataset="image_text_folder", image_size=16)
  train, test = pipeline.load_source(cfg, "train"), pipeline.load_source(cfg, "test")
  assert len(train) + len(test) == 6 and len(test) == 1
  captions = {ex["caption"] for ex in train.__getitems__(range(len(train)))} | {test[0]["caption"]}
  assert captions == {f"photo number {i}" for i in range(5)} | {"a grey square"}
  for ex in train.__getitems__(range(len(train))):
    assert min(img_lib.decode(ex["image"]).shape[:2]) <= 32  # downscaled at build time
  b = next(pipeline.make_iterator(cfg, "train", 4, seed=0, process_index=0, process_count=1))
  assert b["image"].shape == (4, 16, 16, 3)


def test_image_text_folder_index_files(tmp_path):
  rng = np.random.default_rng(1)
  src = tmp_path / "indexed"
  src.mkdir()
  for i in range(3):
    (src / f"{i}.jpg").write_bytes(_jpeg(rng, 30, 30))
  lines = [{"image": "0.jpg", "caption": "zero"}, {"file": "1.jpg", "text": "one"},
           {"image": "1.jpg", "caption": "uno"}, {"image": "gone.jpg", "caption": "missing"}]
  (src / "captions.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
  pairs, skipped = itf.scan_folder(str(src))
  assert pairs == [("0.jpg", "zero"), ("1.jpg", "one"), ("1.jpg", "uno")]
  assert skipped == {"no caption": 1, "listed in index but missing": 1}
  (src / "captions.jsonl").unlink()
  (src / "captions.csv").write_text("image,caption\n2.jpg,\"two, with a comma\"\n")
  pairs, _ = itf.scan_folder(str(src))
  assert pairs == [("2.jpg", "two, with a comma")]


def test_image_text_folder_errors_name_the_folder(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(itf.FolderError, match="no images found in .*empty"):
    itf.scan_folder(str(empty))
  (empty / "a.png").write_bytes(b"")
  with pytest.raises(itf.FolderError, match="no captions found in .*empty"):
    itf.scan_folder(str(empty))
  with pytest.raises(itf.FolderError, match="does not exist"):
    itf.scan_folder(str(tmp_path / "nope"))
  (empty / "a.txt").write_text("broken")
  with pytest.raises(itf.FolderError, match="no readable images"):
    itf.builder(str(tmp_path / "d"), src=str(empty), num_workers=1).download_and_prepare()


# ------------------------------------------------------------------ records

def test_records_roundtrip_and_pipeline(tmp_path):
  out = tmp_path / "codes"
  examples = [{"codes": np.arange(6, dtype=np.int32) * i, "caption": f"caption {i}",
               "image": img_lib.encode(shapes.make_example(i, image_size=16)["image"])}
              for i in range(20)]
  n = records.write_records(str(out), "train", examples, num_shards=3,
                            meta={"vqgan": "/some/vqgan", "grid": [2, 3]})
  records.write_records(str(out), "test", examples[:8])
  assert n == 20 and not [f for f in os.listdir(out) if ".tmp" in f]
  index = json.loads((out / "records.json").read_text())
  assert index["splits"]["train"]["num_examples"] == 20
  assert index["features"]["codes"] == {"dtype": "int32", "shape": [6]}
  assert index["meta"] == {"vqgan": "/some/vqgan", "grid": [2, 3]}
  src = records.RecordsSource(str(out), "train")
  assert len(src) == 20 and src.meta["grid"] == [2, 3]
  for i in (0, 4, 19):
    assert src[i]["caption"] == f"caption {i}"
    np.testing.assert_array_equal(src[i]["codes"], examples[i]["codes"])
    assert src[i]["codes"].dtype == np.int32 and src[i]["image"] == examples[i]["image"]
  assert [e["caption"] for e in src.__getitems__([5, 2])] == ["caption 5", "caption 2"]
  with pytest.raises(ValueError, match="no split 'validation'"):
    records.RecordsSource(str(out), "validation")
  # Rewriting a split replaces it (and its shard files).
  records.write_records(str(out), "train", examples[:4], num_shards=1)
  assert len(records.RecordsSource(str(out), "train")) == 4
  assert len([f for f in os.listdir(out) if f.startswith("train.")]) == 1
  # A records directory is a dataset for the pipeline.
  it = pipeline.make_iterator(data_cfg(tmp_path, dataset=str(out), image_size=8), "test", 4,
                              seed=0, process_index=0, process_count=1)
  b = next(it)
  assert b["codes"].shape == (4, 6) and b["codes"].dtype == np.int32
  assert b["image"].shape == (4, 8, 8, 3) and b["caption"][0].startswith("caption")


def test_records_reject_bad_examples(tmp_path):
  with pytest.raises(ValueError, match="earlier examples had"):
    records.write_records(str(tmp_path), "train", [{"a": 1}, {"b": 2}])
  with pytest.raises(TypeError, match="dtype object"):
    records.write_records(str(tmp_path), "train", [{"a": np.array(["x"], dtype=object)}])
  assert not os.listdir(tmp_path)  # nothing half-written


def test_worker_processes_give_the_same_batches_and_resume(shapes_dir):
  cfg = data_cfg(shapes_dir, random_crop=True, image_size=28)
  make = lambda: pipeline.make_iterator(cfg, "train", 8, seed=2, process_index=0,
                                        process_count=1)
  it = make()
  take(it, 2)
  state = json.loads(json.dumps(it.get_state()))  # the checkpoint at step 2
  ref = take(it, 4)
  cfg.num_workers, cfg.read_threads = 2, 2
  resumed = make()  # started once (worker start-up is the slow part)
  try:
    resumed.set_state(state)
    for a, b in zip(ref, take(resumed, 4)):  # two workers take turns
      np.testing.assert_array_equal(a["image"], b["image"])
      assert list(a["caption"]) == list(b["caption"])
    assert resumed.get_state()["position"] == 6 * 8
  finally:
    resumed.close()


# ------------------------------------------------------------------ device prefetch

def _mesh():
  from dalle_jax import parallel
  return parallel.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)))


def test_device_prefetch_places_batches_and_checkpoints_what_was_used(shapes_dir):
  from dalle_jax import parallel
  mesh = _mesh()
  cfg = data_cfg(shapes_dir, image_dtype="uint8")
  make = lambda: pipeline.make_iterator(cfg, "train", 16, seed=1, process_index=0,
                                        process_count=1)
  ref = take(make(), 4)
  it = pipeline.prefetch_to_device(make(), mesh, size=2)
  first = take(it, 2)
  for a, b in zip(first, ref):
    assert sorted(a) == ["background", "color", "image", "shape"]  # captions stay on the host
    assert a["image"].dtype == np.uint8
    assert a["image"].sharding == parallel.batch_sharding(mesh, 4)
    for k in a:
      np.testing.assert_array_equal(np.asarray(a[k]), b[k])
  deadline = time.monotonic() + 30
  while it.iterator.position < 4 * 16 and time.monotonic() < deadline:
    time.sleep(0.01)  # let the thread fill its buffer
  assert it.iterator.position == 4 * 16  # read ahead ...
  state = it.get_state()
  assert state["position"] == 2 * 16  # ... but the checkpoint is what was used
  resumed = pipeline.prefetch_to_device(make(), mesh)
  resumed.set_state(state)
  np.testing.assert_array_equal(np.asarray(next(resumed)["image"]), ref[2]["image"])
  it.set_state(dict(state, position=16))  # rewinding drops the buffer
  np.testing.assert_array_equal(np.asarray(next(it)["image"]), ref[1]["image"])
  it.close()
  resumed.close()


def test_device_prefetch_ends_and_raises_like_its_iterator(shapes_dir):
  mesh = _mesh()
  cfg = data_cfg(shapes_dir)
  it = pipeline.prefetch_to_device(
      pipeline.make_iterator(cfg, "test", 8, seed=0, shuffle=False, repeat=False,
                             process_index=0, process_count=1), mesh)
  assert len(list(it)) == 2 and it.get_state()["position"] == 16
  with pytest.raises(StopIteration):
    next(it)

  def broken(ex):
    raise KeyError("no field 'codes'")

  bad = pipeline.prefetch_to_device(
      pipeline.make_iterator(cfg, "train", 8, seed=0, preprocess=broken, process_index=0,
                             process_count=1), mesh)
  with pytest.raises(KeyError, match="no field 'codes'"):
    next(bad)
  bad.close()
