"""Diffusion U-Net and sampler throughput: dalle_jax vs diffusers' PyTorch UNet2DModel.

  python -m benchmarks.bench_diffusion [--batch 8] [--sample_batch 4] [--reps 3]

[1] U-Net forward and forward+backward: the DDPM CIFAR-10 layout (35.7M parameters,
    32 px) with the SAME random weights on both sides (a diffusers UNet2DModel saved
    and imported with dalle_jax.convert.diffusers_unet), f32, same batch; the outputs
    are checked to agree. Ratio = torch time / our time (> 1: ours is faster).
[2] DDIM-50 with classifier-free guidance (scale 3, the conditional and unconditional
    rows through one U-Net call per step), images/s: our sampler (one compiled loop)
    vs the diffusers loop (DDIMScheduler.step, torch.no_grad) on a narrower U-Net of
    the same layout (block_out_channels 32/64/64/64) so that 50 steps fit a CPU run.
[3] Batched guidance (one U-Net pass over 2B rows) vs two passes of B rows, ours, the two
    passes free to overlap and forced into sequence.
[4] Train step of the `shapes` preset through the trainer's own step
    (benchmarks.common.TrainerStep): examples/s and MFU against the measured matmul peak.
"""
import argparse
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402  pylint: disable=g-import-not-at-top

DDPM_CIFAR10 = dict(
    sample_size=32, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    flip_sin_to_cos=False, freq_shift=1, downsample_padding=0, norm_eps=1e-6)


def import_pair(diffusers_kwargs, tmp):
  """(torch UNet2DModel in eval mode, our UNet module, our variables, scheduler config dict)."""
  import diffusers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from dalle_jax.convert import diffusers_unet  # pylint: disable=g-import-not-at-top
  from dalle_jax.models import unet as unet_lib  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  ref = diffusers.UNet2DModel(**diffusers_kwargs).eval()
  ref.save_pretrained(tmp)
  diffusers.DDPMScheduler(num_train_timesteps=1000, clip_sample=True,
                          variance_type="fixed_large").save_pretrained(tmp)
  model_cfg, variables, sched, _ = diffusers_unet.convert_unet2d(tmp)
  ours = unet_lib.UNet(**unet_lib.unet_kwargs(model_cfg))
  return ref, ours, variables, sched


def bench_unet(batch, reps):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as tmp:
    ref, ours, variables, _ = import_pair(DDPM_CIFAR10, tmp)
  x = np.random.RandomState(0).standard_normal((batch, 32, 32, 3)).astype(np.float32)
  t = np.full((batch,), 500, np.int32)
  x_t = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
  t_t = torch.from_numpy(t.astype(np.int64))

  fwd = jax.jit(lambda v, x, t: ours.apply(v, x, t))
  loss = lambda v, x, t: jnp.mean(ours.apply(v, x, t) ** 2)
  fwd_bwd = jax.jit(jax.value_and_grad(loss))

  def torch_fwd():
    with torch.no_grad():
      return ref(x_t, t_t).sample

  def torch_fwd_bwd():
    ref.zero_grad(set_to_none=True)
    out = ref(x_t, t_t).sample
    l = (out ** 2).mean()
    l.backward()
    return l

  ours_f, out = common.timeit_with_output(fwd, variables, x, t, reps=reps)
  ref_f, ref_out = common.timeit_with_output(torch_fwd, reps=reps)
  err = float(np.abs(np.asarray(out) - ref_out.numpy().transpose(0, 2, 3, 1)).max())
  print(f"[1] U-Net DDPM CIFAR-10 layout (35.7M), batch {batch}, f32: max |ours - torch| = {err:.2e}")
  common.ratio_line(f"[1] U-Net forward (batch {batch})", ours_f, ref_f, theirs_label="torch")
  ours_fb = common.timeit(fwd_bwd, variables, x, t, reps=reps)
  ref_fb = common.timeit(torch_fwd_bwd, reps=reps)
  common.ratio_line(f"[1] U-Net forward+backward (batch {batch})", ours_fb, ref_fb,
                    theirs_label="torch")


def bench_sampling(batch, steps, scale, reps):
  import diffusers  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from dalle_jax.diffusion import guidance, samplers  # pylint: disable=g-import-not-at-top
  from dalle_jax.diffusion.schedule import SchedulerConfig  # pylint: disable=g-import-not-at-top
  small = dict(DDPM_CIFAR10, block_out_channels=(32, 64, 64, 64), norm_num_groups=16)
  with tempfile.TemporaryDirectory() as tmp:
    ref, ours, variables, sched_dict = import_pair(small, tmp)
    ref_sched = diffusers.DDIMScheduler.from_pretrained(tmp)
  cfg = SchedulerConfig.from_dict(sched_dict)
  x_T = np.random.RandomState(1).standard_normal((batch, 32, 32, 3)).astype(np.float32)
  # Both halves see the same weights; the "unconditional" rows differ only in being a
  # second batch of rows (an unconditional UNet2DModel has no text input): the cost is
  # that of guided sampling.
  def batched_fn(v):
    return guidance.classifier_free_guidance(lambda x, t: ours.apply(v, x, t), scale)

  def two_pass_fn(v):
    def fn(x, t):
      # -x for the second pass: the same cost, and XLA cannot merge two identical calls
      cond, uncond = ours.apply(v, x, t), ours.apply(v, -x, t)
      return uncond + scale * (cond - uncond)
    return fn

  def two_pass_in_sequence_fn(v):
    def fn(x, t):
      cond = ours.apply(v, x, t)
      cond, x2 = jax.lax.optimization_barrier((cond, -x))  # x2 is ready only after cond
      uncond = ours.apply(v, x2, t)
      return uncond + scale * (cond - uncond)
    return fn

  # the weights are arguments (not constants folded into the program)
  run = lambda make: jax.jit(lambda v, x: samplers.sample(make(v), cfg, x, sampler="ddim",
                                                          steps=steps))
  batched = lambda x: run_b(variables, x)
  separate = lambda x: run_s(variables, x)
  run_b, run_s = run(batched_fn), run(two_pass_fn)

  def torch_loop():
    ref_sched.set_timesteps(steps)
    x = torch.from_numpy(x_T.transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
      for t in ref_sched.timesteps:
        out = ref(torch.cat([x, x]), t).sample
        cond, uncond = out.chunk(2)
        x = ref_sched.step(uncond + scale * (cond - uncond), t, x, eta=0.0).prev_sample
    return x

  ours_s, ours_x = common.timeit_with_output(batched, x_T, reps=reps)
  ref_s, ref_x = common.timeit_with_output(torch_loop, reps=reps)
  err = float(np.abs(np.asarray(ours_x) - ref_x.numpy().transpose(0, 2, 3, 1)).max())
  print(f"[2] DDIM-{steps}, guidance {scale}, {batch} images, U-Net 32/64/64/64 at 32 px: "
        f"max |ours - diffusers| = {err:.2e}")
  rate = lambda s: f"{batch / s:.2f} images/s"
  common.ratio_line(f"[2] DDIM-{steps} guided sampling images/s", batch / ours_s, batch / ref_s,
                    theirs_label="diffusers", fmt=lambda r: f"{r:.2f} images/s",
                    lower_is_better=False)
  two_s = common.timeit(separate, x_T, reps=reps)
  common.ratio_line("[3] batched guidance (one 2B pass) vs two B passes", ours_s, two_s,
                    theirs_label="two passes", extra=f"({rate(ours_s)} vs {rate(two_s)})")
  # On XLA:CPU the two independent passes run at the same time on two cores (its thunk
  # executor overlaps independent work; one small convolution uses one core), which is
  # what [3] measures there. The same two passes forced into sequence (the second waits
  # for the first) isolate the cost of batching itself.
  run_q = run(two_pass_in_sequence_fn)
  seq_s = common.timeit(lambda x: run_q(variables, x), x_T, reps=reps)
  common.ratio_line("[3] batched guidance vs two B passes in sequence", ours_s, seq_s,
                    theirs_label="two passes, sequential",
                    extra=f"({rate(ours_s)} vs {rate(seq_s)})")


def bench_train_step(reps):
  from dalle_jax.configs import diffusion as diffusion_cfg  # pylint: disable=g-import-not-at-top
  from dalle_jax.train import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  config = diffusion_cfg.get_config("shapes")
  config.mesh.data = 1
  step = common.TrainerStep(config)
  s = step.time(reps=reps, stat=min)
  flops = step.task.flops_per_example() * config.batch_size
  peak = metrics_lib.measure_matmul_flops(dtype="float32")
  print(f"[4] shapes preset train step (batch {config.batch_size}, f32): {common.fmt_seconds(s)}, "
        f"{config.batch_size / s:.1f} examples/s, {flops / s / 1e9:.1f} GFLOP/s; matmul peak "
        f"{peak / 1e9:.1f} GFLOP/s; MFU {flops / s / peak:.3f} (ratio to peak "
        f"{flops / s / peak:.2f}x)")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch", type=int, default=8, help="U-Net batch for [1]")
  p.add_argument("--sample_batch", type=int, default=4, help="images for [2]/[3]")
  p.add_argument("--steps", type=int, default=50)
  p.add_argument("--guidance_scale", type=float, default=3.0)
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--only", default="1234", help="which parts to run, e.g. 12")
  args = p.parse_args(argv)
  import jax  # pylint: disable=g-import-not-at-top
  print(f"device: {jax.devices()[0].platform} x{jax.device_count()}")
  if "1" in args.only:
    bench_unet(args.batch, args.reps)
  if "2" in args.only or "3" in args.only:
    bench_sampling(args.sample_batch, args.steps, args.guidance_scale, args.reps)
  if "4" in args.only:
    bench_train_step(args.reps)


if __name__ == "__main__":
  main()
