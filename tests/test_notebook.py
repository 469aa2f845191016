"""notebooks/colab_tpu.ipynb runs headless: its code cells exec'd in one namespace, in order,
with the parameters cell followed by CI's overrides (SMOKE: tiny random models on the 8 fake
CPU devices of conftest.py) — papermill's parameter injection without a Jupyter kernel."""
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "colab_tpu.ipynb")


def test_colab_notebook_runs_in_smoke_mode(tmp_path, capsys):
  with open(NOTEBOOK, encoding="utf-8") as f:
    nb = json.load(f)
  cells = [c for c in nb["cells"] if c["cell_type"] == "code"]
  assert "parameters" in cells[0]["metadata"].get("tags", [])
  overrides = (f"SMOKE = True\nWORK = {str(tmp_path)!r}\nNUM_IMAGES = 1\nRERANK_TOP = 2\n"
               "NUM_EVAL = 4\nAR_SAMPLING = {'top_k': 8, 'guidance_scale': 2.0}\n"
               "DIFFUSION_SAMPLING = {'sampler': 'ddim', 'steps': 2, 'guidance_scale': 2.0}\n"
               "INCEPTION_PTH = REAL_STATS = ''\n")
  namespace = {"__name__": "__main__"}
  cwd = os.getcwd()
  os.chdir(ROOT)  # the notebook imports configs/ from the checkout
  try:
    for i, cell in enumerate(cells):
      exec(compile("".join(cell["source"]), f"{NOTEBOOK}:cell{i}", "exec"), namespace)
      if i == 0:
        exec(overrides, namespace)
  finally:
    os.chdir(cwd)
  out = capsys.readouterr().out
  # every step prints its command line; grids written; both families scored in memory
  assert "$ python sample.py --checkpoint" in out and "$ python -m dalle_jax.evaluate generate" in out
  for name in ("ar_samples.png", "diffusion_samples.png", "eval_ar.json", "eval_diffusion.json"):
    assert (tmp_path / name).exists(), name
  scores = namespace["results"]
  assert set(scores) == {"ar", "diffusion"}
  for fam in scores.values():
    assert fam["clip_score"]["num_pairs"] == 4 and "fid" not in fam
