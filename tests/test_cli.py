"""The command-line convention: one config loader with overrides, its checks, and one-line errors."""

import pathlib

import pytest

from libra_jax import cli, config_loader
from libra_jax.errors import ConfigError, UserError

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHAPES = str(ROOT / "configs" / "shapes_libra_faster_rcnn.py")
COCO_BASELINE = str(ROOT / "configs" / "faster_rcnn_r50_fpn_1x_coco.py")


def load(*overrides, spec=SHAPES):
  return config_loader.load_config(spec, [tuple(o.split("=", 1)) for o in overrides])


def test_overrides_take_the_type_of_the_key_and_keep_derived_values_derived():
  # The shapes config: 2,000 training images, 2 epochs. A batch of 4 makes 500 steps per epoch and 1,000 in all.
  config = load("global_batch_size=4")
  assert (config.steps_per_epoch, config.total_steps, config.eval_every) == (500, 1000, 1000)
  # Overriding a derived value replaces it and leaves what it was derived from alone (8 images: 250 per epoch).
  config = load("eval_every=7")
  assert (config.eval_every, config.steps_per_epoch, config.total_steps) == (7, 250, 500)
  config = load("data.tfds_data_dir=/data/tfds", "data.buckets=((160, 192), (192, 160), (224, 224))",
                "model.neck.bfp=None", "optim.grad_clip_norm=3", "skip_nonfinite=true", "model.anchors.scales=2.0")
  assert config.data.tfds_data_dir == "/data/tfds" and config.data.buckets[2] == (224, 224)
  assert config.model.neck.bfp is None and config.skip_nonfinite is True and config.model.anchors.scales == (2.0,)
  assert isinstance(config.optim.grad_clip_norm, float) and config.optim.grad_clip_norm == 3.0
  config = load("model.neck.bfp={'refine_level': 1, 'refine_type': 'conv'}", spec=COCO_BASELINE)
  assert config.model.neck.bfp.to_dict() == {"refine_level": 1, "refine_type": "conv"}
  # FILE:arg passes arg to get_config.
  assert load(spec=f"{SHAPES}:hard").data.dataset == "shapes_hard"


def test_a_loaded_config_is_locked_against_new_keys():
  config = load()
  with pytest.raises(AttributeError):
    config.total_stepz = 3


@pytest.mark.parametrize("override, message", [
    ("total_stepz=3", "unknown config key total_stepz; did you mean total_steps?"),
    ("model.neck.out_channelz=8", "did you mean model.neck.out_channels?"),
    ("model.backbone.depth.x=1", "model.backbone.depth is a value, not a section"),
    ("data.xyzzy=1", "section data has: buckets, dataset,"),
    ("global_batch_size=abc", "--config.global_batch_size=abc: expected an int, like the current value 8"),
    ("distributed=maybe", "expected a bool"),
    ("model=3", "model is a section; set one of its keys (anchors, backbone,"),
    ("global_batch_size=0", "config.global_batch_size must be a positive integer, got 0"),
    ("global_batch_size=-8", "config.global_batch_size must be a positive integer, got -8"),
    ("log_every=0", "config.log_every must be a positive integer, got 0; set --config.log_every=N with N >= 1"),
    ("checkpoint_every=0", "config.checkpoint_every must be a positive integer"),
    ("eval_batch_size=0", "config.eval_batch_size must be a positive integer"),
    ("keep=0", "config.keep must be a positive integer"),
    ("optim.lr_per_16=0.0", "config.optim.lr_per_16 must be > 0"),
    ("optim.warmup_ratio=0.0", "config.optim.warmup_ratio must be in (0, 1]"),
    ("data.max_instances=0", "data.max_instances must be at least 1"),
    ("data.buckets=((160, 192),)", "no bucket of data.buckets ((160, 192),) holds a portrait image"),
    ("model.rcnn.loss_bbox.name=tukey", "config.model.rcnn.loss_bbox: unknown loss 'tukey'; known: balanced_l1,"),
    ("model.rpn.loss_cls.loss_weigth=2.0", "did you mean model.rpn.loss_cls.loss_weight?"),
    ("model.type=cascade", "unknown detector type 'cascade'; known: faster_rcnn, retinanet"),
    ("model.train.rcnn.sampler.type=ohem",
     "config.model.train.rcnn.sampler.type: unknown sampler 'ohem'; known: libra, random"),
    ("model.num_classes=0", "config.model.num_classes must be >= 1"),
    ("distributed=True", "config.distributed=True needs a coordinator: pass --config.coordinator_address=HOST:PORT"),
])
def test_every_value_that_cannot_work_is_named_before_anything_runs(override, message):
  with pytest.raises(ConfigError) as error:
    load(override)
  assert message in str(error.value)
  assert "\n" not in cli.one_line(error.value)


def test_a_coordinator_needs_the_process_count_and_index():
  with pytest.raises(ConfigError, match="set --config.num_processes=N"):
    load("distributed=True", "coordinator_address=127.0.0.1:1234")
  with pytest.raises(ConfigError, match="must be HOST:PORT"):
    load("distributed=True", "coordinator_address=localhost", "num_processes=2", "process_id=1")
  config = load("distributed=True", "coordinator_address=127.0.0.1:1234", "num_processes=2", "process_id=1")
  assert (config.num_processes, config.process_id) == (2, 1)


def test_distributed_alone_is_enough_where_the_cluster_is_detected(monkeypatch):
  monkeypatch.setenv("SLURM_JOB_ID", "7")
  monkeypatch.setenv("SLURM_NTASKS", "2")
  assert load("distributed=True").distributed is True


def test_config_files_that_cannot_load(tmp_path):
  with pytest.raises(ConfigError, match="config file configs/absent.py does not exist"):
    config_loader.load_config("configs/absent.py")
  (tmp_path / "empty.py").write_text("x = 1\n")
  with pytest.raises(ConfigError, match="has no get_config"):
    config_loader.load_config(str(tmp_path / "empty.py"))
  (tmp_path / "broken.py").write_text("def get_config():\n  return 1 / 0\n")
  with pytest.raises(ConfigError, match=r"broken.py: get_config\(\) failed \(ZeroDivisionError"):
    config_loader.load_config(str(tmp_path / "broken.py"))
  (tmp_path / "syntax.py").write_text("def get_config(:\n")
  with pytest.raises(ConfigError, match="syntax.py cannot be loaded .SyntaxError"):
    config_loader.load_config(str(tmp_path / "syntax.py"))
  with pytest.raises(ConfigError, match="get_config.'easy'. failed .TypeError.*check the ':arg' part"):
    config_loader.load_config(f"{COCO_BASELINE}:easy")


def make_parser(config="required"):
  parser = cli.ArgumentParser(prog="tool", config=config)
  parser.add_argument("--workdir")
  parser.add_argument("images", nargs="*")
  return parser


def test_the_parser_loads_the_config_and_keeps_positionals_around_overrides():
  args = make_parser().parse_args([f"--config={SHAPES}", "a.png", "--config.total_steps=9", "b.png",
                                   "--workdir=w"])
  assert args.config.total_steps == 9 and args.images == ["a.png", "b.png"] and args.workdir == "w"
  assert args.config_file == SHAPES


@pytest.mark.parametrize("argv, message", [
    (["--config.total_steps"], "an override is --config.KEY=VALUE"),
    (["--config.total_steps=3"], "needs --config=FILE to override"),
    (["--bogus"], "unrecognized arguments: --bogus (see tool --help)"),
])
def test_usage_errors(argv, message):
  with pytest.raises(cli.UsageError) as error:
    make_parser(config="optional").parse_args(argv)
  assert message in str(error.value)


def test_a_required_config(capsys):
  with pytest.raises(cli.UsageError, match="--config"):
    make_parser().parse_args([])


def failing(error):
  def main(argv):
    del argv
    raise error
  return main


@pytest.mark.parametrize("error, code, line", [
    (UserError("data/x.json is not valid JSON; fix it"), 1, "error: data/x.json is not valid JSON; fix it"),
    (cli.UsageError("unrecognized arguments: --x"), 2, "error: unrecognized arguments: --x"),
    (FileNotFoundError("no checkpoint at w.npz"), 1, "error: no checkpoint at w.npz"),
    (KeyError("no entry 'x'\nin the table"), 1,
     "error: unexpected KeyError: no entry 'x' in the table (a bug: rerun with --verbose for the traceback, and "
     "report it)"),
    (ZeroDivisionError("division by zero"), 1,
     "error: unexpected ZeroDivisionError: division by zero (a bug: rerun with --verbose for the traceback, and "
     "report it)"),
])
def test_run_prints_one_line_and_exits_non_zero(error, code, line, capsys, monkeypatch):
  monkeypatch.delenv(cli.VERBOSE_ENV, raising=False)
  with pytest.raises(SystemExit) as exit_info:
    cli.run(failing(error), [])
  assert exit_info.value.code == code
  assert capsys.readouterr().err == line + "\n"


def test_verbose_shows_the_traceback(monkeypatch):
  with pytest.raises(ZeroDivisionError):
    cli.run(failing(ZeroDivisionError("x")), ["--verbose"])
  monkeypatch.setenv(cli.VERBOSE_ENV, "1")
  with pytest.raises(UserError):
    cli.run(failing(UserError("x")), [])


def test_run_exits_with_mains_status():
  with pytest.raises(SystemExit) as exit_info:
    cli.run(lambda argv: 3, [])
  assert exit_info.value.code == 3
