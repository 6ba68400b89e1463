"""The quick start: Libra Faster R-CNN with a small ResNet-18 on the synthetic shapes dataset.

Every Libra part is on (IoU-balanced sampling, BFP, balanced L1); the network
is narrowed and trained from scratch so that it learns on two CPU cores in
minutes. ``get_config("hard")`` uses the harder variant (small objects,
clutter); the ablation uses it.

    python train.py --config=configs/shapes_libra_faster_rcnn.py --workdir=runs/quickstart   # ./quickstart.sh

Expected: 6 min 40 s and 2.0 GB on this project's 2-core CPU machine, idle (2026-12-02: dataset,
compilation, 500 steps at about 14.7 images/s, evaluation, drawings); AP 0.606, AP50 0.873.
"""

import ml_collections

from configs import base_faster_rcnn, common
from libra_jax.data import default_data_config


def get_config(variant: str = "easy") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  model = base_faster_rcnn.model_config(libra=True, num_classes=3)
  model.backbone.update(depth=18, base_channels=16, frozen_stages=-1)
  model.neck.out_channels = 64
  model.rpn.feat_channels = 64
  model.rcnn.fc_channels = 256
  model.rcnn.sampling_ratio = 2  # the fixed grid: faster than the adaptive one, which these small boxes do not need
  model.anchors.scales = (4.0,)
  model.train.rpn_proposal.update(nms_pre=500, max_per_img=300)
  model.test.rpn_proposal.update(nms_pre=500, max_per_img=300)
  model.train.rcnn.sampler.num = 128
  config.model = model
  config.data = default_data_config("shapes" if variant == "easy" else "shapes_hard")
  # 500 steps of 8 images (two passes over 2,000), the learning rate x0.1 at step 375, one evaluation at the end:
  # about 10 images/s on two CPU cores, so the quick start fits in 10 minutes.
  common.run_config(config, train_images=2000, epochs=2, global_batch_size=8)
  config.optim.update(warmup_steps=100, warmup_ratio=0.01, milestone_epochs=(1.5,), grad_clip_norm=10.0)
  config.eval_every = config.get_ref("total_steps") * 1
  config.eval_batch_size = 8
  config.log_every = 20
  config.checkpoint_every = 250
  config.backbone_checkpoint = ""
  config.input_size = (160, 192)
  return config
