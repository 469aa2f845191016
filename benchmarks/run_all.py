"""`make bench`: runs every benchmarks/bench_*.py in its own process, one after another.

Each benchmark measures ours and the reference side by side in the same run and
prints ratios; this runner collects their last lines into benchmarks/results.txt.
"""
import glob
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
  names = sys.argv[1:] or sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(HERE, "bench_*.py")))
  summary = []
  for name in names:
    print(f"\n=== {name} ===", flush=True)
    t = time.time()
    r = subprocess.run([sys.executable, "-m", f"benchmarks.{name}"], cwd=os.path.dirname(HERE),
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    print(r.stdout, flush=True)
    status = "ok" if r.returncode == 0 else f"FAILED ({r.returncode})"
    summary.append(f"{name}: {status} in {time.time() - t:.0f}s")
    summary += ["  " + l for l in r.stdout.splitlines()
                if "ratio" in l.lower() or "×" in l or " s per 1k" in l]  # bench_generate
  text = "\n".join(summary)
  print("\n=== summary ===\n" + text)
  with open(os.path.join(HERE, "results.txt"), "w") as f:
    f.write(text + "\n")


if __name__ == "__main__":
  main()
