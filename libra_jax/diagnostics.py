"""Figures of the imbalance that Libra R-CNN removes.

``python -m libra_jax.diagnostics --out=DIR [--losses=NAME,...] [--import=MODULE]
[--config=FILE [--config.KEY=VALUE ...] --workdir=RUN]`` writes

- ``regression_losses.png``: loss and gradient magnitude against the
  regression error ``|x|`` for every registered box loss, or those named by
  ``--losses`` (the paper's Figure 5, with balanced L1 at several
  ``(alpha, gamma)``): balanced L1 gives inliers (small errors) larger
  gradients while capping outliers' at ``gamma``; ``--import=MODULE`` adds
  the losses a module registers;
- ``negative_iou_histogram.png``: the IoU distribution of the negatives chosen
  by random sampling and by IoU-balanced sampling from the same candidates:
  random sampling follows the candidates, which are mostly easy (IoU near 0);
  IoU-balanced sampling draws far more hard negatives.

Each figure comes from a function that also returns the arrays behind it.
"""

import functools
import itertools
import pathlib
from typing import Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from libra_jax import cli, losses
from libra_jax.errors import ConfigError
from libra_jax.ops import boxes as box_ops
from libra_jax.ops import sample

BALANCED_L1_SETTINGS = ((0.5, 1.5), (0.3, 1.5), (0.5, 1.0), (0.5, 2.0))


def box_losses() -> List[str]:
  """Names of the registered losses a box head can take (those consuming deltas or decoded boxes)."""
  return sorted(name for name, loss in losses.registered_losses().items() if loss.consumes in losses.BOX_CONSUMES)


# The R-CNN's delta normalization (mmdetection's DeltaXYWHBBoxCoder target_stds): a regression error x on dx is
# a shift of 0.1 x box widths.
RCNN_DELTA_STDS = (0.1, 0.1, 0.2, 0.2)


def _error_curve(loss: losses.RegisteredLoss, hparams: Dict[str, object]):
  """The loss as a function of one regression error ``x``: the error on the normalized ``dx`` delta, as the
  R-CNN head feeds its loss, with every other coordinate exact.

  A loss of decoded boxes sees the reference box ``(0, 0, 1, 1)`` shifted by
  ``x * 0.1`` box widths (``RCNN_DELTA_STDS``) against the unshifted box.
  """
  zeros = jnp.zeros(4, jnp.float32)
  if loss.consumes == "deltas":
    return lambda x: jnp.sum(loss.fn(zeros.at[0].set(x), zeros, **hparams))
  reference = jnp.array([0.0, 0.0, 1.0, 1.0], jnp.float32)
  return lambda x: jnp.sum(loss.fn(box_ops.decode_deltas(reference, zeros.at[0].set(x), stds=RCNN_DELTA_STDS),
                                   reference, **hparams))


def regression_loss_curves(max_error: float = 1.5, num_points: int = 301, names: Optional[Sequence[str]] = None,
                           settings: Sequence[Tuple[float, float]] = BALANCED_L1_SETTINGS,
                           beta: float = 1.0) -> Dict[str, np.ndarray]:
  """Loss value and gradient magnitude of box losses against the regression error (the paper's Figure 5).

  Args:
    names: registered box losses to draw (default: every one, ``box_losses``).
      ``balanced_l1`` is drawn at each ``(alpha, gamma)`` of ``settings``,
      every other loss at its default hyper-parameters; both smooth L1 and
      balanced L1 use ``beta``.

  Returns:
    ``{"error": [P]}`` plus, for every curve name (``"smooth_l1"``,
    ``"balanced_l1 a=0.5 g=1.5"``, ``"giou"``, ...), ``"<name>/loss"`` and
    ``"<name>/grad"``, each ``[P]`` float.
  """
  error = np.linspace(0.0, max_error, num_points, dtype=np.float32)
  curves = {}
  for name in (box_losses() if names is None else names):
    loss = losses.get_loss(name)
    if loss.consumes not in losses.BOX_CONSUMES:
      raise ConfigError(f"{name} is a {loss.consumes} loss, not a box loss; box losses: {box_losses()}")
    if name == "balanced_l1":
      for alpha, gamma in settings:
        curves[f"balanced_l1 a={alpha} g={gamma}"] = _error_curve(loss, dict(alpha=alpha, gamma=gamma, beta=beta))
    else:
      curves[name] = _error_curve(loss, dict(beta=beta) if name == "smooth_l1" else {})
  data = {"error": error}
  for name, fn in curves.items():
    data[f"{name}/loss"] = np.asarray(jax.jit(jax.vmap(fn))(error))
    data[f"{name}/grad"] = np.abs(np.asarray(jax.jit(jax.vmap(jax.grad(fn)))(error)))
  return data


def synthetic_candidates(key, num_candidates: int = 2000, positive_fraction: float = 0.1,
                         disjoint_fraction: float = 0.6) -> np.ndarray:
  """IoUs with the best gt of synthetic RoI candidates ``[N]`` float32.

  Most proposals of an RPN do not touch any object: a ``disjoint_fraction``
  share of the negatives has IoU exactly 0. The other negatives' IoUs follow
  a Beta(0.6, 4) law scaled to [0, 0.5) (mostly easy, a tail of hard ones); a
  ``positive_fraction`` share of all candidates lies uniformly in [0.5, 1], and
  one gt added as a proposal has IoU 1.
  """
  neg_key, pos_key = jax.random.split(key)
  num_pos = int(num_candidates * positive_fraction)
  num_neg = num_candidates - num_pos - 1
  num_disjoint = int(num_neg * disjoint_fraction)
  touching = 0.5 * jax.random.beta(neg_key, 0.6, 4.0, (num_neg - num_disjoint,))
  positives = jax.random.uniform(pos_key, (num_pos,), minval=0.5, maxval=1.0)
  return np.asarray(jnp.concatenate([jnp.zeros((num_disjoint,)), touching, positives, jnp.ones((1,))]),
                    np.float32)


def model_candidates(config, workdir, num_batches: int = 4) -> List[np.ndarray]:
  """Per image, the IoU with the best gt of the R-CNN stage's candidates from a trained Faster R-CNN.

  Candidates are the image's gts (IoU 1, added as proposals in training) and
  the RPN's training-time proposals, from the latest checkpoint in ``workdir``
  on ``num_batches`` evaluation batches.
  """
  from libra_jax.data import pipeline
  from libra_jax.models.detectors import FasterRCNN, build_detector
  from libra_jax.ops.boxes import iou
  from libra_jax.evaluation.driver import load_trained_variables
  model = build_detector(config.model)
  if not isinstance(model, FasterRCNN):
    raise ConfigError(f"config.model.type={config.model.type!r}: the proposal diagnostics need a Faster R-CNN "
                      f"config (model.type='faster_rcnn')")
  variables = load_trained_variables(config, model, workdir)
  propose = jax.jit(lambda v, b: model.apply(v, b, train=True, method=FasterRCNN.proposals))
  per_image = []
  for batch in itertools.islice(pipeline.eval_batches(config.data, config.eval_batch_size), num_batches):
    proposals = jax.tree.map(np.asarray, propose(variables, {k: v for k, v in batch.items() if k != "image_id"}))
    for i in np.flatnonzero(batch["valid"]):
      gts = batch["boxes"][i][(batch["labels"][i] >= 0) & ~batch["is_crowd"][i]]
      if not len(gts):
        continue
      boxes = proposals.boxes[i][proposals.valid[i]]
      overlaps = np.asarray(iou(boxes, gts)).max(axis=1) if len(boxes) else np.zeros(0)
      per_image.append(np.concatenate([np.ones(len(gts)), overlaps]).astype(np.float32))
  return per_image


@functools.partial(jax.jit, static_argnums=3)
def _negative_draws(keys, max_iou, is_negative, num_negatives: int):
  """Masks ``[D, N]`` bool of the negatives picked by random and by IoU-balanced sampling, one row per key of
  ``keys [D]``, from candidates ``max_iou [N]`` of which ``is_negative [N]`` may be picked."""
  random_keys, balanced_keys = jax.vmap(jax.random.split, out_axes=1)(keys)
  random_masks = jax.vmap(lambda k: sample.choose_random(k, is_negative, num_negatives))(random_keys)
  balanced_masks = jax.vmap(
      lambda k: sample.iou_balanced_negatives(k, max_iou, is_negative, num_negatives, floor_thr=0))(balanced_keys)
  return random_masks, balanced_masks


def negative_iou_histograms(candidates: Optional[Sequence[np.ndarray]] = None, seed: int = 0,
                            num_negatives: int = 384, num_draws: int = 50, neg_iou_thr: float = 0.5,
                            num_hist_bins: int = 10) -> Dict[str, np.ndarray]:
  """IoU histograms of all negatives and of those each sampler picks.

  For every image's candidates (``max_iou`` arrays; default: one synthetic
  set of 2,000 from :func:`synthetic_candidates`), ``num_draws`` independent
  draws of ``num_negatives``, added up: random uniform sampling against
  IoU-balanced sampling (3 bins, ``floor_thr=0``, as in the Libra configs).

  Returns:
    ``edges [H + 1]``; ``candidates``, ``random``, ``iou_balanced`` ``[H]``
    as fractions of their totals; ``max_iou``: all candidates' IoUs.
  """
  key = jax.random.key(seed)
  if candidates is None:
    key, data_key = jax.random.split(key)
    candidates = [synthetic_candidates(data_key)]
  edges = np.linspace(0.0, neg_iou_thr, num_hist_bins + 1)
  totals = {name: np.zeros(num_hist_bins) for name in ("candidates", "random", "iou_balanced")}
  for index, max_iou in enumerate(candidates):
    is_negative = max_iou < neg_iou_thr
    keys = jax.random.split(jax.random.fold_in(key, index), num_draws)
    random_masks, balanced_masks = _negative_draws(keys, max_iou, is_negative, num_negatives)
    for name, weights in (("candidates", is_negative.astype(np.float64)),
                          ("random", np.asarray(random_masks).sum(0)),
                          ("iou_balanced", np.asarray(balanced_masks).sum(0))):
      totals[name] += np.histogram(max_iou, bins=edges, weights=weights)[0]
  result = {name: counts / counts.sum() for name, counts in totals.items()}
  result.update(edges=edges, max_iou=np.concatenate(list(candidates)))
  return result


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def plot_regression_losses(path, **kwargs) -> Dict[str, np.ndarray]:
  """Draws :func:`regression_loss_curves` into the PNG file ``path``; returns the data."""
  data = regression_loss_curves(**kwargs)
  names = sorted({key.split("/")[0] for key in data if "/" in key}, key=lambda n: (n != "smooth_l1", n))
  plt = _pyplot()
  fig, (ax_grad, ax_loss) = plt.subplots(1, 2, figsize=(11, 4.2))
  for name in names:
    style = "--" if name == "smooth_l1" else "-"
    ax_grad.plot(data["error"], data[f"{name}/grad"], style, label=name)
    ax_loss.plot(data["error"], data[f"{name}/loss"], style, label=name)
  ax_grad.set(xlabel="regression error |x|", ylabel="gradient magnitude", title="Gradient")
  ax_loss.set(xlabel="regression error |x|", ylabel="loss", title="Loss")
  ax_grad.legend(fontsize=8)
  for ax in (ax_grad, ax_loss):
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return data


def plot_negative_iou_histogram(path, **kwargs) -> Dict[str, np.ndarray]:
  """Draws :func:`negative_iou_histograms` into the PNG file ``path``; returns the data."""
  data = negative_iou_histograms(**kwargs)
  edges = data["edges"]
  centers, width = (edges[:-1] + edges[1:]) / 2, (edges[1] - edges[0]) / 3.2
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7, 4.2))
  for offset, name in zip((-1, 0, 1), ("candidates", "random", "iou_balanced")):
    ax.bar(centers + offset * width, data[name], width=width, label=name.replace("_", "-"))
  ax.set(xlabel="IoU with the best ground truth", ylabel="fraction of negatives",
         title="Negatives chosen by random vs IoU-balanced sampling")
  ax.legend()
  ax.grid(alpha=0.3, axis="y")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return data


def write_all(out_dir, loss_names: Optional[Sequence[str]] = None, **histogram_kwargs) -> Dict[str, pathlib.Path]:
  """Writes every diagnostic figure into ``out_dir``; returns their paths by name.

  ``loss_names`` go to :func:`regression_loss_curves` (None: every box loss);
  ``histogram_kwargs`` to :func:`negative_iou_histograms` (e.g. a model's ``candidates``).
  """
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  paths = {"regression_losses": out_dir / "regression_losses.png",
           "negative_iou_histogram": out_dir / "negative_iou_histogram.png"}
  plot_regression_losses(paths["regression_losses"], names=loss_names)
  histograms = plot_negative_iou_histogram(paths["negative_iou_histogram"], **histogram_kwargs)
  hard = histograms["edges"][:-1] >= 0.1
  print(f"negatives with IoU >= 0.1: candidates {histograms['candidates'][hard].sum():.1%}, "
        f"random {histograms['random'][hard].sum():.1%}, "
        f"IoU-balanced {histograms['iou_balanced'][hard].sum():.1%}")
  return paths


def main(argv) -> int:
  parser = cli.ArgumentParser(prog="python -m libra_jax.diagnostics", description=__doc__.split("\n")[0],
                              config="optional")
  parser.add_argument("--out", default="runs/diagnostics", help="directory for the PNG files")
  parser.add_argument("--workdir", help="with --config: take the candidates from this run's trained Faster R-CNN")
  parser.add_argument("--num_batches", type=int, default=4, help="evaluation batches for --workdir")
  parser.add_argument("--losses", default=None, help="comma-separated box losses for the gradient figure "
                      "(default: every registered one)")
  parser.add_argument("--import", dest="imports", action="append", default=[],
                      help="a module to import first, e.g. one that registers a loss (repeatable)")
  args = parser.parse_args(argv)
  if (args.config is None) != (args.workdir is None):
    parser.error("--config and --workdir go together")
  cli.import_modules(args.imports)
  loss_names = [name.strip() for name in args.losses.split(",") if name.strip()] if args.losses else None
  for name in loss_names or ():
    try:
      kind = losses.get_loss(name).consumes
    except KeyError as error:
      parser.error(f"--losses: {error.args[0] if error.args else error}")
    if kind not in losses.BOX_CONSUMES:
      parser.error(f"--losses: {name} is a {kind} loss, not a box loss; box losses: {', '.join(box_losses())}")
  histogram_kwargs = {}
  if args.config is not None:
    cli.check_workdir(args.workdir, must_exist=True)
    candidates = model_candidates(args.config, args.workdir, args.num_batches)
    sampler = args.config.model.train.rcnn.sampler
    histogram_kwargs = dict(candidates=candidates, num_negatives=int(sampler.num * (1 - sampler.pos_fraction)))
  for name, path in write_all(args.out, loss_names, **histogram_kwargs).items():
    print(f"{name}: {path}")
  return 0


if __name__ == "__main__":
  cli.run(main)
