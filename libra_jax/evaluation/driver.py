"""The jit-compiled evaluation: detections over a split, COCO metrics, and the weights they come from.

``evaluate_checkpoint`` is ``train.py --mode=eval``: the latest checkpoint of
a work directory, or a weights file such as a published mmdetection model,
through the same data-parallel step the training run evaluates with.
"""

import json
import logging
import pathlib
from typing import Dict, Optional, Tuple

import jax
import numpy as np
import tqdm
from jax.sharding import Mesh

from libra_jax import convert, runtime
from libra_jax.data import pipeline
from libra_jax.errors import ConfigError, UserError
from libra_jax.evaluation import ground_truth
from libra_jax.evaluation.coco_eval import CocoAccumulator
from libra_jax.evaluation.predict_step import make_predict_step
from libra_jax.models.detectors import abstract_variables, build_detector
from libra_jax.training.checkpoint import Checkpointer
from libra_jax.training.metrics import MetricWriter

_log = logging.getLogger(__name__)


def checked_model(config, mesh) -> Tuple[pipeline.DatasetInfo, object]:
  """The dataset info and the detector of ``config``; a ``ConfigError`` where they disagree or the mesh does not fit.

  Checked before anything compiles: the class count, the splits (a misspelt
  ``eval_split`` would otherwise fail only at the first evaluation), and the
  batch sizes against the devices.
  """
  info = pipeline.dataset_info(config.data)
  if config.model.num_classes != info.num_classes:
    raise ConfigError(f"config.model.num_classes is {config.model.num_classes} but dataset "
                      f"{config.data.dataset!r} has {info.num_classes} classes; set "
                      f"--config.model.num_classes={info.num_classes}")
  pipeline.check_splits(config.data)
  runtime.check_batch_sizes(config, mesh)
  return info, build_detector(config.model)


def detection_inputs(batch, mesh):
  """What the detection step takes of a host's numpy ``batch``: global arrays of every key but ``image_id``."""
  return runtime.to_global({k: v for k, v in batch.items() if k != "image_id"}, mesh)


def detect_eval_split(predict, variables, config, mesh, info) -> CocoAccumulator:
  """Runs ``predict`` over the evaluation split (every image once); returns all detections, ready for COCOeval.

  A progress bar shows the images done, images/s and the time left, and the
  step's compilations are logged. Each process reads its share of the split
  and converts the detections of its own rows (``runtime.to_local``, matched to the batch it fed in); the
  processes' results are gathered at the end, so every process returns the
  same accumulator. Batch ``k + 1`` is dispatched before batch ``k``'s
  detections are fetched and converted, so the host work overlaps the
  device's.
  """
  per_host = config.eval_batch_size // jax.process_count()
  batches = pipeline.eval_batches(config.data, per_host, shard_index=jax.process_index(),
                                  num_shards=jax.process_count(), all_hosts=runtime.all_processes)
  truth = ground_truth.eval_ground_truth(config.data, batches.table, info.category_ids, info.class_names,
                                         gather=runtime.gather_objects)
  mine = CocoAccumulator(truth, info.category_ids)
  compilation = runtime.CompilationLog("detection step")
  progress = tqdm.tqdm(total=batches.num_images, unit=" images", desc="evaluating", dynamic_ncols=True,
                       leave=False)

  def convert(batch, detections):
    mine.add(batch, runtime.to_local(detections))
    progress.update(int(np.sum(batch["valid"])))

  pending = None
  for batch in batches:
    with compilation.around(batch["image"]):
      detections = predict(variables, detection_inputs(batch, mesh))
    if pending is not None:
      convert(*pending)
    pending = batch, detections
  if pending is not None:
    convert(*pending)
  progress.close()
  everything = CocoAccumulator(truth, info.category_ids)
  for results, image_ids in runtime.gather_objects((mine.results, sorted(mine.image_ids))):
    everything.extend(results, image_ids)
  return everything


def score_detections(accumulator: CocoAccumulator, workdir=None, step: int = -1) -> Dict[str, float]:
  """COCOeval of the collected detections.

  With ``workdir``, the metrics go to ``workdir/eval_<step>.json`` and the
  detections, in COCO's results format, to ``workdir/results_<step>.json``.
  """
  metrics = accumulator.evaluate()
  if workdir is not None and jax.process_index() == 0:
    (pathlib.Path(workdir) / f"eval_{step}.json").write_text(json.dumps(metrics, indent=1))
    (pathlib.Path(workdir) / f"results_{step}.json").write_text(json.dumps(accumulator.results))
  return metrics


def evaluate(predict, variables, config, mesh, info, workdir=None, step: int = -1) -> Dict[str, float]:
  """COCO metrics of the model on the evaluation split (``detect_eval_split`` then ``score_detections``)."""
  return score_detections(detect_eval_split(predict, variables, config, mesh, info), workdir, step)


def format_metrics(metrics: Dict[str, float]) -> str:
  """The COCO metrics as a two-line table."""
  names = [n for n in metrics if n in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")]
  return " ".join(f"{n:>7}" for n in names) + "\n" + " ".join(f"{metrics[n]:7.3f}" for n in names)


def load_trained_variables(config, model, workdir, checkpoint: Optional[str] = None, mesh: Optional[Mesh] = None):
  """``{"params", "batch_stats"}`` from a weights file or the newest readable checkpoint of an orbax work directory.

  ``checkpoint``: a ``.pth``, ``.safetensors`` or ``.npz`` state dict, or a
  training run's work directory; None reads ``workdir``'s own checkpoints.
  Arrays land replicated on ``mesh`` (default: all devices).
  """
  mesh = runtime.make_mesh() if mesh is None else mesh
  target = abstract_variables(model, pipeline.first_bucket_image(config.data))
  if checkpoint and not pathlib.Path(checkpoint).is_dir():
    variables, report = convert.import_detector(convert.load_state_dict(checkpoint), target)
    _log.info("weights from %s: %s", checkpoint, report)
    return jax.device_put(variables, runtime.replicated(mesh))
  source = pathlib.Path(checkpoint or workdir)
  checkpointer = Checkpointer(source, config.keep)
  try:
    found = checkpointer.restore_latest_model(jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=runtime.replicated(mesh)), target))
  finally:
    checkpointer.close()
  if found is None:
    raise UserError(f"no readable checkpoint in {source / 'checkpoints'}; train there first, or pass a weights "
                    f"file (.pth, .safetensors or .npz)")
  _log.info("weights of step %d from %s", found[0], source)
  return found[1]


def evaluate_checkpoint(config, workdir, checkpoint: Optional[str] = None) -> Dict[str, float]:
  """COCO metrics of the latest checkpoint in ``workdir``, or of a weights ``checkpoint`` file (e.g. mmdetection's)."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  runtime.enable_compilation_cache(config, workdir)
  mesh = runtime.make_mesh()
  info, model = checked_model(config, mesh)
  variables = load_trained_variables(config, model, workdir, checkpoint, mesh)
  metrics = evaluate(make_predict_step(model, mesh), variables, config, mesh, info, workdir)
  MetricWriter(workdir, enabled=jax.process_index() == 0).write(-1, metrics, kind="eval")
  return metrics
