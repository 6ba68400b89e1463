"""benchmarks/trace_ops.py: a trace's time per kind of operation, each event counted once, by its own time."""

import gzip
import json

import jax
import jax.numpy as jnp
import pytest

from benchmarks import trace_ops

HLO = """HloModule jit_step, entry_computation_layout={(f32[1,8,8,4]{3,2,1,0})->f32[]}

%fused_computation.1 (param_0: f32[1,8,8,4], param_1: f32[3,3,4,4]) -> f32[1,8,8,4] {
  %param_0 = f32[1,8,8,4]{3,2,1,0} parameter(0)
  %param_1 = f32[3,3,4,4]{3,2,1,0} parameter(1)
  ROOT %convolution.3 = f32[1,8,8,4]{3,2,1,0} convolution(%param_0, %param_1), window={size=3x3 pad=1_1x1_1}
}

%fused_computation.2 (param_0.1: f32[64,4]) -> f32[64,4] {
  %param_0.1 = f32[64,4]{1,0} parameter(0)
  ROOT %maximum.1 = f32[64,4]{1,0} maximum(%param_0.1, %param_0.1), metadata={op_name="jit(step)/dot(x)"}
}

%body (loop: (s32[], f32[4])) -> (s32[], f32[4]) {
  %loop = (s32[], f32[4]{0}) parameter(0)
  ROOT %tuple.1 = (s32[], f32[4]{0}) tuple(%loop)
}

ENTRY %main.9 (x: f32[1,8,8,4], w: f32[3,3,4,4], m: f32[64,4]) -> f32[] {
  %x = f32[1,8,8,4]{3,2,1,0} parameter(0)
  %ynn_fusion.1 = f32[1,8,8,4]{3,2,1,0} fusion(%x, %w), kind=kCustom, calls=%fused_computation.1
  %dot_general.5 = f32[64,64]{1,0} dot(%m, %m), lhs_contracting_dims={1}, rhs_contracting_dims={1}
  %max_fusion = f32[64,4]{1,0} fusion(%m), kind=kLoop, calls=%fused_computation.2
  %while.2 = (s32[], f32[4]{0}) while(%init), condition=%cond, body=%body
  ROOT %reduce.7 = f32[] reduce(%x, %zero), dimensions={0,1,2,3}, to_apply=%add
}
"""


def test_instructions_are_classified_by_their_opcode_or_what_their_fusion_contains():
  kinds = trace_ops.instruction_kinds(HLO)
  assert kinds["ynn_fusion.1"] == "conv" and kinds["convolution.3"] == "conv"
  assert kinds["dot_general.5"] == "dot"
  # 'dot(' inside metadata is not an operation: the fusion is elementwise.
  assert kinds["max_fusion"] == "other" and kinds["maximum.1"] == "other"
  assert kinds["while.2"] == "other" and kinds["reduce.7"] == "other"


def write_trace(directory, events):
  path = directory / "plugins" / "profile" / "run" / "host.trace.json.gz"
  path.parent.mkdir(parents=True)
  with gzip.open(path, "wt") as f:
    json.dump({"traceEvents": events}, f)


def event(name, start_us, duration_us, thread=1):
  return {"ph": "X", "name": name, "ts": start_us, "dur": duration_us, "pid": 7, "tid": thread}


def test_each_event_counts_its_own_time_once_and_runtime_events_are_left_out(tmp_path):
  write_trace(tmp_path, [
      event("ThunkExecutor::Execute", 0, 10_000),       # the runtime's frame around everything: left out
      event("ynn_fusion.1", 0, 3_000),
      event("while.2", 3_000, 4_000),                  # 4 ms, of which its body's two ops take 2.5 ms
      event("max_fusion", 3_500, 1_000),
      event("dot_general.5", 5_000, 1_500),
      event("reduce.7", 7_000, 500),
      event("max_fusion", 0, 2_000, thread=2),          # another thread: not nested in the conv
      {"ph": "M", "name": "thread_name", "pid": 7, "tid": 1, "args": {"name": "main"}},
  ])
  seconds = trace_ops.seconds_by_kind(tmp_path, HLO, steps=2)
  assert seconds["conv"] == pytest.approx(3e-3 / 2)
  assert seconds["dot"] == pytest.approx(1.5e-3 / 2)
  # The loop's own 1.5 ms, the fusion in it (1 ms), the reduce (0.5 ms) and thread 2's fusion (2 ms).
  assert seconds["other"] == pytest.approx(5e-3 / 2)


def test_a_trace_of_another_program_or_none_at_all_is_an_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="no \\*.trace.json.gz"):
    trace_ops.seconds_by_kind(tmp_path, HLO)
  write_trace(tmp_path, [event("fusion.99", 0, 10)])
  with pytest.raises(ValueError, match="names an instruction of the program"):
    trace_ops.seconds_by_kind(tmp_path, HLO)


SCOPED_HLO = """HloModule jit_step

%fused_computation (param_0: f32[4]) -> f32[4] {
  %param_0 = f32[4]{0} parameter(0)
  ROOT %subtract.1 = f32[4]{0} subtract(%param_0, %param_0), metadata={op_name="jit(step)/optimizer/sub"}
}

%fused_computation.2 (param_0.2: f32[4], param_1.2: f32[4]) -> f32[4] {
  %param_0.2 = f32[4]{0} parameter(0)
  %param_1.2 = f32[4]{0} parameter(1)
  %negate.4 = f32[4]{0} negate(%param_1.2), metadata={op_name="jit(step)/jvp(Model)/neck/neg"}
  ROOT %dot.5 = f32[4]{0} dot(%param_0.2, %negate.4), lhs_contracting_dims={}, rhs_contracting_dims={}
}

ENTRY %main (x: f32[4]) -> f32[4] {
  %x = f32[4]{0} parameter(0)
  %add.1 = f32[4]{0} add(%x, %x), metadata={op_name="jit(step)/jvp(Model)/backbone/layer1/add"}
  %multiply.2 = f32[4]{0} multiply(%add.1, %x), metadata={op_name="jit(step)/transpose(jvp(M))/roi_head/rpn_loss/mul"}
  %sub_fusion = f32[4]{0} fusion(%multiply.2), kind=kLoop, calls=%fused_computation
  %ynn_fusion = f32[4]{0} fusion(%x, %sub_fusion), kind=kCustom, calls=%fused_computation.2
  %dot.6 = f32[4]{0} dot(%x, %ynn_fusion), lhs_contracting_dims={}, rhs_contracting_dims={}
  ROOT %negate.3 = f32[4]{0} negate(%dot.6), metadata={op_name="jit(step)/neg"}
}
"""
SCOPES = {"backbone_neck": ("backbone", "neck"), "rcnn_head": ("roi_head",), "rpn_loss": ("rpn_loss",),
          "optimizer": ("optimizer",)}


def test_an_operation_belongs_to_the_scope_of_its_innermost_named_component():
  op_names = trace_ops.instruction_op_names(SCOPED_HLO)
  assert op_names["add.1"] == "jit(step)/jvp(Model)/backbone/layer1/add" and op_names["x"] == ""
  # Fusions without metadata of their own: their root's op_name, else the first fused instruction's that has one.
  assert op_names["sub_fusion"] == "jit(step)/optimizer/sub"
  assert op_names["ynn_fusion"] == "jit(step)/jvp(Model)/neck/neg"
  assert op_names["dot.6"] == ""
  assert trace_ops.scope_of("jit(step)/jvp(Model)/neck/fpn_convs/0/conv", SCOPES) == "backbone_neck"
  assert trace_ops.scope_of("jit(step)/transpose(jvp(Model))/roi_head/rpn_loss/mul", SCOPES) == "rpn_loss"
  # A component must equal a scope's name: 'rpn_loss_weight' and 'jvp(optimizer)' are not 'rpn_loss', 'optimizer'.
  assert trace_ops.scope_of("jit(step)/rpn_loss_weight/jvp(optimizer)", SCOPES) == trace_ops.UNSCOPED
  assert trace_ops.scope_of("", SCOPES) == trace_ops.UNSCOPED


def test_seconds_by_scope_and_kind_of_each_events_own_time(tmp_path):
  write_trace(tmp_path, [event("add.1", 0, 1_000), event("multiply.2", 1_000, 3_000),
                         event("subtract.1", 1_500, 500),  # inside multiply.2: its own time is 2.5 ms
                         event("sub_fusion", 4_000, 2_000), event("ynn_fusion", 6_000, 1_000),
                         event("dot.6", 7_000, 600), event("negate.3", 7_600, 2_400),
                         event("ThunkExecutor::Execute", 0, 10_000, thread=2)])
  seconds = trace_ops.seconds_by_scope(tmp_path, SCOPED_HLO, SCOPES, steps=2)
  zero = dict.fromkeys(trace_ops.KINDS, 0.0)
  expected = {"backbone_neck": dict(zero, other=0.5e-3, dot=0.5e-3), "rcnn_head": zero,
              "rpn_loss": dict(zero, other=1.25e-3), "optimizer": dict(zero, other=1.25e-3),
              trace_ops.UNSCOPED: dict(zero, dot=0.3e-3, other=1.2e-3)}
  assert set(seconds) == set(expected)
  for scope, kinds in expected.items():
    assert seconds[scope] == pytest.approx(kinds), scope


def test_a_real_trace_of_a_convolution_and_a_matmul(tmp_path):
  @jax.jit
  def program(image, kernel, matrix):
    features = jax.lax.conv_general_dilated(image, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.sum(features ** 2) + jnp.sum(matrix @ matrix)

  args = (jnp.ones((1, 64, 64, 32)), jnp.ones((3, 3, 32, 32)), jnp.ones((256, 256)))
  compiled = program.lower(*args).compile()
  jax.block_until_ready(compiled(*args))
  with jax.profiler.trace(str(tmp_path)):
    jax.block_until_ready(compiled(*args))
  seconds = trace_ops.seconds_by_kind(tmp_path, compiled.as_text())
  assert seconds["conv"] > 0 and seconds["dot"] > 0
