"""The isolated reference environment for the evaluation parity tests (`make ref-env`).

pytorch-fid imports torchvision, and the registry's torchvision wheels are CUDA builds that fail to
import beside the CPU torch in `.venv` (`operator torchvision::nms does not exist`). So the parity
tests run pytorch-fid in a subprocess of a venv of its own, `.venv-ref`, holding a matching CUDA
torch + torchvision pair (which runs on CPU). It is about 5 GB and installs in a few minutes, once:
`make test` builds it when absent and later runs reuse it (the stamp records the pinned set).

    python tests/reference_env.py            # build .venv-ref if absent or stale
    python tests/reference_env.py --check    # exit 0 when usable, else print why

pytorch-fid 0.3.0 passes `disp=` to scipy.linalg.sqrtm, which scipy 1.18 removed, hence the cap.
The machine-wide pip config (find-links to CPU wheels, a torch version cap) is bypassed on purpose.
"""

import argparse
import os
import pathlib
import subprocess
import sys
import venv

ROOT = pathlib.Path(__file__).resolve().parent.parent
ENV_DIR = ROOT / ".venv-ref"
REQUIREMENTS = ("torch==2.13.0", "torchvision==0.28.0", "pytorch-fid==0.3.0", "scipy<1.18",
                "pillow", "numpy")
STAMP = ENV_DIR / ".installed"
FAILED = ENV_DIR / ".failed"  # why the last build failed (shown when the parity tests skip)


def python() -> pathlib.Path:
  return ENV_DIR / "bin" / "python"


def usable() -> str | None:
  """None when the reference env is installed with the pinned set, else the reason it is not."""
  if not STAMP.exists():
    why = f": the last build failed: {FAILED.read_text().strip()}" if FAILED.exists() else ""
    return f"{ENV_DIR.name} not built (run `make ref-env`){why}"
  if STAMP.read_text().strip() != " ".join(REQUIREMENTS):
    return f"{ENV_DIR.name} holds another pinned set (run `make ref-env`)"
  return None


def build() -> None:
  if usable() is None:
    return
  print(f"building the pytorch-fid reference env {ENV_DIR} (once; ~5 GB, a few minutes)",
        flush=True)
  try:
    _install()
  except (OSError, subprocess.CalledProcessError) as e:
    ENV_DIR.mkdir(exist_ok=True)
    FAILED.write_text(f"{e}\n")
    raise
  FAILED.unlink(missing_ok=True)


def _install() -> None:
  if not python().exists():
    venv.EnvBuilder(with_pip=True, clear=True).create(ENV_DIR)
  pip_env = dict(os.environ, PIP_FIND_LINKS="", PIP_CONFIG_FILE=os.devnull,
                 PIP_DISABLE_PIP_VERSION_CHECK="1")
  subprocess.run([str(python()), "-m", "pip", "install", "-q", *REQUIREMENTS],
                 env=pip_env, check=True)
  # The import is the real check: torchvision's ops must load beside this torch.
  subprocess.run([str(python()), "-c", "import pytorch_fid.inception, torchvision, scipy"],
                 check=True)
  STAMP.write_text(" ".join(REQUIREMENTS) + "\n")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--check", action="store_true", help="only report whether the env is usable")
  args = parser.parse_args()
  if args.check:
    reason = usable()
    if reason:
      sys.exit(reason)
    return
  build()
  print(f"reference env ready: {python()}")


if __name__ == "__main__":
  main()
