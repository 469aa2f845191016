"""Periodic FID / CLIP score during training (config.eval_metrics, evaluate/periodic.py)."""
import json
import os

import pytest

from dalle_jax.evaluate import periodic
from tests.test_diffusion_task import tiny_config


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


# a whole training run (90 s); the fast suite checks generate's scores against fid/clip_score
@pytest.mark.slow
def test_diffusion_run_logs_clip_score_equal_to_evaluate_generate(tmp_path, capsys):
  """A 2-step diffusion run with eval_metrics.every=2 logs eval/clip_score of 4 samples of
  its sampling.prompts; `evaluate generate` on the saved workdir (same EMA parameters,
  captions, seed, batch and mesh) gives the same score."""
  from dalle_jax.evaluate import cli  # pylint: disable=g-import-not-at-top
  from dalle_jax.train import loop  # pylint: disable=g-import-not-at-top
  from tests.test_clip_convert import write_tiny_hf_clip  # pylint: disable=g-import-not-at-top
  clip = str(tmp_path / "clip")
  write_tiny_hf_clip(clip)
  config = tiny_config(tmp_path)
  with config.unlocked():
    config.batch_size = 8
    config.total_steps = 2
    config.checkpoint_every = 2
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = -1, 1, 1
    config.sampling.steps = 3
    config.eval_metrics.update(every=2, num=4, batch_size=4, metrics="clip_score", clip=clip,
                               seed=5)
  workdir = str(tmp_path / "run")
  loop.train(config, workdir)
  logged = [r for r in _rows(workdir) if "eval/clip_score" in r]
  assert [r["step"] for r in logged] == [2]
  assert "eval/fid" not in logged[0] and 0 <= logged[0]["eval/clip_score_hessel"] <= 2.5
  prompts = list(config.sampling.prompts)
  (tmp_path / "captions.txt").write_text("\n".join(prompts) + "\n")
  res = cli.main(["generate", "--family", "diffusion", "--workdir", workdir, "--captions",
                  str(tmp_path / "captions.txt"), "--num", "4", "--seed", "5",
                  "--sample_batch_size", "4", "--score", "clip_score", "--clip", clip,
                  "--out", str(tmp_path / "gen.json")])
  assert res["captions"] == [prompts[i % len(prompts)] for i in range(4)]
  assert res["scores"]["clip_score"]["clip_score_torchmetrics"] == pytest.approx(
      logged[0]["eval/clip_score"], rel=1e-5, abs=1e-5)


def test_eval_metrics_config_errors_name_the_key(tmp_path):
  from dalle_jax.tasks import diffusion as diffusion_task  # pylint: disable=g-import-not-at-top
  config = tiny_config(tmp_path)
  cases = [(dict(metrics="fid"), "eval_metrics.inception: '': no such file"),
           (dict(metrics="fid,is"), "eval_metrics.metrics: 'fid,is': choose"),
           (dict(metrics="clip_score", clip=str(tmp_path / "none")), "eval_metrics.clip: "),
           (dict(metrics="clip_score", num=1), "eval_metrics.num: 1: at least 2"),
           (dict(metrics="clip_score", captions="nope.txt"), "eval_metrics.captions: nope.txt")]
  for keys, msg in cases:
    with config.unlocked():
      config.eval_metrics.update(every=1, metrics="fid,clip_score", clip=str(tmp_path),
                                 num=4, captions="")
      config.eval_metrics.update(**keys)
    with pytest.raises(periodic.EvalMetricsError, match=msg):
      periodic.PeriodicMetrics.from_config(diffusion_task.DiffusionTask(config), None)
  with config.unlocked():
    config.eval_metrics.every = 0
  assert periodic.PeriodicMetrics.from_config(diffusion_task.DiffusionTask(config), None) is None
