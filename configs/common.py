"""Run settings shared by every config: schedule, optimizer, logging, checkpoints.

Numbers are mmdetection's 1x schedule (LIBRA_SPEC.md section 1.7): SGD 0.02 per
16 images, momentum 0.9, weight decay 1e-4, linear warm-up over 500
iterations from 0.001, x0.1 at epochs 8 and 11 of 12. ``steps_per_epoch`` and
``total_steps`` follow ``global_batch_size`` lazily, so
``--config.global_batch_size=8`` keeps the schedule in epochs.
"""

import ml_collections

# COCO train2017 images that keep at least one usable box (the reference's filter_empty_gt).
COCO_TRAIN_IMAGES = 117_266


def run_config(config: ml_collections.ConfigDict, train_images: int, epochs: int = 12,
               global_batch_size: int = 16) -> ml_collections.ConfigDict:
  """Adds the top-level run keys and ``config.optim`` to ``config``."""
  config.seed = 0
  config.global_batch_size = global_batch_size
  config.eval_batch_size = 8
  config.epochs = epochs
  config.train_images = train_images
  batch = config.get_ref("global_batch_size")
  config.steps_per_epoch = (config.get_ref("train_images") - 1) // batch + 1
  config.total_steps = config.get_ref("epochs") * config.get_ref("steps_per_epoch")
  config.log_every = 50
  # "* 1" makes a derived value: overriding eval_every then replaces it instead of setting steps_per_epoch.
  config.eval_every = config.get_ref("steps_per_epoch") * 1
  config.checkpoint_every = 2000
  config.keep = 3
  config.skip_nonfinite = False
  config.compilation_cache_dir = ""
  # On a CPU host with one process, compile the run's programs in a fresh process before training, which then
  # loads them from the cache and steps as fast as a restarted run (libra_jax/training/precompile.py).
  config.precompile_in_fresh_process = True
  # Fine-tuning: a fresh run starts from this whole detector (.pth, .safetensors or .npz state dict, or an orbax
  # work directory) instead of config.backbone_checkpoint; a resumed run reads its own checkpoints.
  config.init_checkpoint = ""
  # Several processes (TPU pods, multi-node GPU, local CPU processes over gloo): libra_jax/distributed.py.
  # With distributed=True alone, JAX detects the topology on Cloud TPU, SLURM and Open MPI.
  config.distributed = False
  config.coordinator_address = ""   # HOST:PORT of process 0
  config.num_processes = 0
  config.process_id = 0
  config.optim = dict(lr_per_16=0.02, momentum=0.9, weight_decay=1e-4, warmup_steps=500, warmup_ratio=0.001,
                      milestone_epochs=(8, 11), gamma=0.1, grad_clip_norm=0.0)
  return config


# torchvision's IMAGENET1K_V1 files (mmdetection's torchvision://resnet50 and resnet101).
TORCHVISION_FILES = {50: "resnet50-0676ba61.pth", 101: "resnet101-63fe2227.pth"}


def coco_config(model: ml_collections.ConfigDict, lr_per_16: float, depth: int) -> ml_collections.ConfigDict:
  """A COCO experiment around ``model``: coco/2017 data, the 1x schedule, the ImageNet backbone file."""
  from libra_jax.data import default_data_config
  config = ml_collections.ConfigDict()
  config.model = model
  config.data = default_data_config("coco/2017")
  run_config(config, train_images=COCO_TRAIN_IMAGES)
  config.optim.lr_per_16 = lr_per_16
  # ImageNet weights of the backbone, a torchvision state dict (.pth, .safetensors or .npz).
  config.backbone_checkpoint = f"checkpoints/{TORCHVISION_FILES[depth]}"
  # Padded input shape of the bucket used for sizing (model summary, benchmarks): 800 x 1333 -> 800 x 1344.
  config.input_size = (800, 1344)
  return config
