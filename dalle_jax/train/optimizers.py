"""Optimizers and learning-rate schedules from config (AdamW, Adafactor, Lion, SGD).

A task may own several parameter groups (a GAN's generator and discriminator);
`make_optimizer` builds one optax chain per group and joins them with
`optax.multi_transform`, so one train step updates all of them.
"""
import re

import jax
import jax.numpy as jnp
import optax


SCHEDULES = ("cosine", "linear", "constant")


def make_schedule(opt_cfg, total_steps):
  """Linear warmup, then cosine / linear decay to lr·end_lr_factor, or constant."""
  lr = float(opt_cfg.learning_rate)
  warmup = int(min(opt_cfg.warmup_steps, max(total_steps - 1, 0)))
  end = lr * float(opt_cfg.end_lr_factor)
  decay_steps = max(int(total_steps) - warmup, 1)
  if opt_cfg.schedule == "cosine":
    decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=float(opt_cfg.end_lr_factor))
  elif opt_cfg.schedule == "linear":
    decay = optax.linear_schedule(lr, end, decay_steps)
  elif opt_cfg.schedule == "constant":
    decay = optax.constant_schedule(lr)
  else:
    raise ValueError(f"optimizer.schedule={opt_cfg.schedule!r}: choose {' | '.join(SCHEDULES)}")
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def path_str(path):
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def decay_mask(params, no_decay_regex):
  """True where weight decay applies: matrices whose path doesn't match the regex."""
  pattern = re.compile(no_decay_regex) if no_decay_regex else None
  def keep(path, x):
    return bool(x.ndim >= 2 and not (pattern and pattern.search(path_str(path))))
  return jax.tree_util.tree_map_with_path(keep, params)


# optimizer.name -> (config, schedule, weight-decay mask fn) -> optax transformation
OPTIMIZERS = {
    "adamw": lambda o, sched, mask: optax.adamw(sched, b1=o.b1, b2=o.b2, eps=o.eps,
                                                weight_decay=float(o.weight_decay), mask=mask),
    "adafactor": lambda o, sched, mask: optax.adafactor(
        sched, weight_decay_rate=float(o.weight_decay) or None, weight_decay_mask=mask,
        multiply_by_parameter_scale=False),
    "lion": lambda o, sched, mask: optax.lion(sched, b1=o.b1, b2=o.b2,
                                              weight_decay=float(o.weight_decay), mask=mask),
    "sgd": lambda o, sched, mask: optax.chain(optax.add_decayed_weights(float(o.weight_decay), mask),
                                              optax.sgd(sched, momentum=o.b1)),
}


def _single(opt_cfg, total_steps):
  if opt_cfg.name not in OPTIMIZERS:
    raise ValueError(f"optimizer.name={opt_cfg.name!r}: choose {' | '.join(OPTIMIZERS)}")
  sched = make_schedule(opt_cfg, total_steps)
  mask = lambda p: decay_mask(p, opt_cfg.no_decay)
  tx = OPTIMIZERS[opt_cfg.name](opt_cfg, sched, mask)
  if opt_cfg.grad_clip and opt_cfg.grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(float(opt_cfg.grad_clip)), tx)
  return tx, sched


def make_optimizer(groups, labels_fn, total_steps):
  """groups: {name: optimizer ConfigDict}; labels_fn(params) -> tree of names.

  Returns (tx, {name: schedule}).
  """
  built = {name: _single(cfg, total_steps) for name, cfg in groups.items()}
  schedules = {name: s for name, (_, s) in built.items()}
  if len(built) == 1:
    (name, (tx, _)), = built.items()
    return tx, schedules
  return optax.multi_transform({n: t for n, (t, _) in built.items()}, labels_fn), schedules


def global_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))
