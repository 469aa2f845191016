"""Test setup: 8 fake CPU devices, set before JAX is imported anywhere."""
import os

_DEVICES = "--xla_force_host_platform_device_count=8"
# Append rather than setdefault: an inherited XLA_FLAGS (even an empty one) must
# not silently leave the suite on a single device.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _DEVICES).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The CLIs' persistent compilation cache stays off in tests (nothing written to
# ~/.cache; every test compiles what it measures); test_cli turns it on in a tmp dir.
os.environ["DALLE_JAX_CACHE_DIR"] = ""


def pytest_sessionstart(session):
  import jax
  assert jax.device_count() == 8, (
      f"tests expect 8 fake CPU devices, got {jax.device_count()} (XLA_FLAGS={os.environ.get('XLA_FLAGS')!r})")


def pytest_configure(config):
  # `make test` (CI) skips these: each trains a model through several full runs on 8 fake
  # devices (minutes on 2 cores). `make test-all` runs them.
  config.addinivalue_line("markers", "slow: heavy end-to-end training check, run by make test-all")
