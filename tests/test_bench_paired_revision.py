"""benchmarks/paired_revision.py: swaps named on the command line, modules read from a git revision, restored."""

import json
import subprocess
import sys
import types

import pytest

from benchmarks import paired_revision
from benchmarks.paired_revision import ROOT
from libra_jax import cli


def test_swaps_parse_with_and_without_a_source_module():
  assert paired_revision.parse_swap("libra_jax.ops.conv:winograd_conv3x3_maps") == paired_revision.Swap(
      "libra_jax.ops.conv", "winograd_conv3x3_maps", "libra_jax.ops.conv")
  assert paired_revision.parse_swap("a.b:f=a.c") == paired_revision.Swap("a.b", "f", "a.c")
  for bad in ("libra_jax.ops.conv", "a.b:", ":f", "a.b:f=", "a..b:f", "a.b:f-g", "a b:f"):
    with pytest.raises(cli.UsageError, match=r"--swap=.*MODULE:NAME"):
      paired_revision.parse_swap(bad)


@pytest.fixture
def repository(tmp_path):
  """A git repository whose module ``pkg.values`` has ``VALUE = 1`` at HEAD~1 and ``VALUE = 2`` at HEAD."""
  (tmp_path / "pkg").mkdir()

  def commit(value):
    (tmp_path / "pkg" / "values.py").write_text(f"import collections\nVALUE = {value}\n"
                                                f"Pair = collections.namedtuple('Pair', 'a b')\n")
    subprocess.run(["git", "add", "-A"], cwd=tmp_path, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", f"value {value}"],
                   cwd=tmp_path, check=True)

  subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
  commit(1)
  commit(2)
  return tmp_path


def test_a_module_is_read_as_it_was_at_a_revision(repository):
  old = paired_revision.module_at_revision("pkg.values", "HEAD~1", repository)
  assert old.VALUE == 1 and old.Pair(1, 2).b == 2
  assert paired_revision.module_at_revision("pkg.values", "HEAD", repository).VALUE == 2
  with pytest.raises(cli.UsageError, match=r"--base=nope: no pkg/values.py there"):
    paired_revision.module_at_revision("pkg.values", "nope", repository)
  with pytest.raises(cli.UsageError, match=r"--base=HEAD: no pkg/other.py there"):
    paired_revision.module_at_revision("pkg.other", "HEAD", repository)


def test_base_values_name_what_is_missing(repository, monkeypatch):
  target = types.ModuleType("swap_target")
  target.VALUE = 2
  monkeypatch.setitem(sys.modules, "swap_target", target)
  swap = paired_revision.Swap("swap_target", "VALUE", "pkg.values")
  assert paired_revision.base_values([swap], "HEAD~1", repository) == {swap: 1}
  target.Missing = 0
  with pytest.raises(cli.UsageError, match=r"pkg.values at HEAD~1 has no Missing"):
    paired_revision.base_values([paired_revision.Swap("swap_target", "Missing", "pkg.values")], "HEAD~1", repository)
  with pytest.raises(cli.UsageError, match=r"the working tree's swap_target has no Other"):
    paired_revision.base_values([paired_revision.Swap("swap_target", "Other", "pkg.values")], "HEAD~1", repository)


def test_swapped_values_are_restored_even_after_an_error(monkeypatch):
  target = types.ModuleType("swap_target")
  target.first, target.second = "new", "new too"
  monkeypatch.setitem(sys.modules, "swap_target", target)
  values = {paired_revision.Swap("swap_target", "first", "x"): "old",
            paired_revision.Swap("swap_target", "second", "x"): "old too"}
  with pytest.raises(RuntimeError):
    with paired_revision.swapped(values):
      assert (target.first, target.second) == ("old", "old too")
      raise RuntimeError
  assert (target.first, target.second) == ("new", "new too")


def test_the_command_needs_a_base_and_a_swap():
  with pytest.raises(cli.UsageError, match="--base"):
    paired_revision.main(["--config=configs/faster_rcnn_r50_fpn_1x_coco.py", "--swap=a.b:c"])
  with pytest.raises(cli.UsageError, match="--mode"):
    paired_revision.main(["--config=configs/faster_rcnn_r50_fpn_1x_coco.py", "--base=HEAD", "--swap=a.b:c",
                          "--mode=eval"])


@pytest.mark.slow  # two tiny detectors' inference steps, compiled in a fresh process
def test_both_steps_are_compiled_in_a_fresh_process_and_loaded_for_timing():
  # As a command of its own: measuring sets JAX's persistent cache up, which this process shares with other tests.
  tiny = ["--config.model.backbone.depth=18", "--config.model.backbone.base_channels=8",
          "--config.model.neck.out_channels=16", "--config.model.rpn.feat_channels=16",
          "--config.model.rcnn.fc_channels=32"]
  done = subprocess.run([sys.executable, "benchmarks/paired_revision.py",
                         "--config=configs/faster_rcnn_r50_fpn_1x_coco.py", *tiny, "--base=HEAD", "--swap=libra_jax.ops.conv:winograd_conv3x3_maps", "--mode=infer",
                         "--height=64", "--width=64", "--batch=1", "--repeats=2", "--json"],
                        cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-2000:]
  result = json.loads(done.stdout.splitlines()[-1])
  assert result["compiled_while_timing"] == 0
  assert len(result["change_s_per_round"]) == 2 and result["base_step_s"] > 0 and result["step_s"] > 0
