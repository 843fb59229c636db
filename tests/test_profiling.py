"""`profiling`: the HLO parse classes ops by what they hold and where they come from, and the
trace summary adds up to the time the profiled calls took."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pdiff_jax import profiling


def _loss(w, x):
  return jnp.sum(jnp.tanh(x @ w) ** 2)


def _step(w, x):
  g = jax.grad(_loss)(w, x)
  return w - 0.1 * g  # an update outside the differentiated function


def test_parse_hlo_classes_matmuls_and_phases():
  w, x = jnp.ones((64, 64)), jnp.ones((32, 64))
  ops = profiling.parse_hlo(jax.jit(_step).lower(w, x).compile().as_text())
  # The forward dot, the backward dot for dL/dw; nothing else holds a dot.
  matmul_phases = sorted(op.phase for op in ops.values() if op.matmul and op.opcode != "parameter")
  assert "forward" in matmul_phases and "backward" in matmul_phases and "rest" not in matmul_phases
  assert all(not op.matmul for op in ops.values() if op.opcode in ("parameter", "constant"))
  # The update (w - 0.1 g) is outside the differentiated function.
  assert any(op.phase == "rest" and not op.matmul for op in ops.values()
             if op.opcode not in ("parameter", "constant"))


def test_loop_bodies_are_counted_once(tmp_path):
  """A fori_loop's body ops are counted, the `while` that holds them is not (its event encloses
  theirs), and they account for the calls' time, no more."""
  n, steps = 256, 8
  w = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)) / np.sqrt(n), jnp.float32)
  fn = jax.jit(lambda w, x: jax.lax.fori_loop(0, steps, lambda i, x: jnp.tanh(x @ w), x))
  x = jnp.ones((n, n))
  hlo = fn.lower(w, x).compile().as_text()
  ops = profiling.parse_hlo(hlo)
  assert any(op.opcode == "while" for op in ops.values())
  assert not [op for op in ops.values() if op.opcode == "while" and op.matmul]  # a container
  run = lambda: fn(w, x).block_until_ready()
  run()
  p = profiling.summarise(hlo, run, str(tmp_path), flops=2 * n ** 3 * steps, repeats=3)
  # (the lower bound is loose: another process on these 2 cores stretches the wall time)
  assert 0.2 * p["step_seconds"] <= p["op_seconds"] <= 2 * p["step_seconds"], p
  assert p["matmul_fraction"] > 0.5 and all("while" not in o["op"] for o in p["top_ops"])


def test_summarise_accounts_for_the_step(tmp_path):
  n = 384
  a, b = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32), jnp.eye(n)
  fn = jax.jit(lambda a, b: jnp.exp(-(a @ b) ** 2) @ b)
  run = lambda: fn(a, b).block_until_ready()
  run()
  p = profiling.summarise(fn.lower(a, b).compile().as_text(), run, str(tmp_path), flops=4 * n ** 3,
                          repeats=3)
  assert p["trace"].startswith(str(tmp_path)) and p["trace"].endswith("perfetto_trace.json.gz")
  # The two matmuls are nearly all of the work, and the ops fit in the calls' wall time.
  assert p["matmul_fraction"] > 0.5
  # (ops of one call can overlap on this machine's 2 threads, no more)
  assert 0 < p["matmul_seconds"] <= p["op_seconds"] <= 2 * p["step_seconds"]
  assert p["matmul_flops_per_sec"] == pytest.approx(4 * n ** 3 / p["matmul_seconds"])
  assert p["phase_seconds"]["rest"]["matmul"] == pytest.approx(p["matmul_seconds"])  # no grad here
  assert sum(sum(v.values()) for v in p["phase_seconds"].values()) == pytest.approx(p["op_seconds"])
  assert sum(p["other_seconds_by_primitive"].values()) == pytest.approx(p["op_seconds"] - p["matmul_seconds"])
  # Every op is listed, longest first, with the matmul label the totals use. (Which op is the
  # longest is the machine's to say: a busy core can stretch the exp past a matmul.)
  tops = p["top_ops"]
  assert [o["seconds"] for o in tops] == sorted((o["seconds"] for o in tops), reverse=True)
  assert tops[-1]["seconds"] > 0 and any(o["matmul"] for o in tops)
  assert sum(o["seconds"] for o in tops if o["matmul"]) == pytest.approx(p["matmul_seconds"])
  assert "matmul ops" in profiling.table(p, rate=1e11)
  # The HLO is kept beside the trace, and the summary can be made again from the two offline.
  hlo = (tmp_path / "hlo.txt").read_text()
  assert hlo == fn.lower(a, b).compile().as_text()
  assert profiling.summarise_trace(hlo, p["trace"], p["step_seconds"], 4 * n ** 3) == p


def test_parse_hlo_counts_library_gemms_as_matmuls():
  """GPU modules call cuBLAS through custom-calls; those are matmuls, other custom-calls are not."""
  hlo = """HloModule jit_f

ENTRY %main.1 (a.1: f32[8,8], b.1: f32[8,8]) -> f32[8,8] {
  %a.1 = f32[8,8]{1,0} parameter(0), metadata={op_name="a"}
  %b.1 = f32[8,8]{1,0} parameter(1), metadata={op_name="b"}
  %cublas-gemm.1 = (f32[8,8]{1,0}, s8[0]{0}) custom-call(%a.1, %b.1), custom_call_target="__cublas$gemm", metadata={op_name="jit(f)/jvp()/dot_general"}
  %gte.1 = f32[8,8]{1,0} get-tuple-element(%cublas-gemm.1), index=0
  ROOT %topk.1 = f32[8,8]{1,0} custom-call(%gte.1), custom_call_target="TopK", metadata={op_name="jit(f)/top_k"}
}
"""
  ops = profiling.parse_hlo(hlo)
  assert profiling.module_name(hlo) == "jit_f"
  assert ops["cublas-gemm.1"].matmul and ops["cublas-gemm.1"].phase == "forward"
  assert not ops["topk.1"].matmul and ops["topk.1"].phase == "rest"
  assert not ops["gte.1"].matmul


def test_gpu_command_buffer_kernels_are_matched_to_their_ops(tmp_path):
  """On a GPU, XLA runs most of a step as command buffers (CUDA graphs): every kernel's `hlo_op` is
  then the buffer's name. XLA's own kernels are matched by name (fusion `a.3` runs as kernel
  `a_3`), and where two fusions alike share one kernel, by the schedule; a cuBLAS kernel goes to
  the next gemm in the schedule; a memset, or a library kernel before any op, stays unattributed.
  The viewer's derived "XLA Ops" line and host events are not counted; event order in the file
  does not matter."""
  import gzip
  import json
  import random
  hlo = """HloModule jit_step, is_scheduled=true

%fused_add (p0: bf16[8,8], p1: bf16[8,8]) -> bf16[8,8] {
  %p0 = bf16[8,8]{1,0} parameter(0)
  %p1 = bf16[8,8]{1,0} parameter(1)
  ROOT %add.0 = bf16[8,8]{1,0} add(%p0, %p1)
}

%fused_add.1 (q0: bf16[8,8], q1: bf16[8,8]) -> bf16[8,8] {
  %q0 = bf16[8,8]{1,0} parameter(0)
  %q1 = bf16[8,8]{1,0} parameter(1)
  ROOT %add.1 = bf16[8,8]{1,0} add(%q0, %q1)
}

ENTRY %main.9 (a.1: bf16[8,8], b.1: bf16[8,8]) -> bf16[8,8] {
  %a.1 = bf16[8,8]{1,0} parameter(0), metadata={op_name="a"}
  %b.1 = bf16[8,8]{1,0} parameter(1), metadata={op_name="b"}
  %loop_add_fusion.3 = bf16[8,8]{1,0} fusion(%a.1, %b.1), kind=kLoop, calls=%fused_add, metadata={op_name="jit(step)/jvp(M)/add"}
  %custom-call.7 = (bf16[8,8]{1,0}, s8[0]{0}) custom-call(%loop_add_fusion.3, %b.1), custom_call_target="__cublas$lt$matmul", metadata={op_name="jit(step)/transpose(jvp(M))/dot_general"}
  %get-tuple-element.2 = bf16[8,8]{1,0} get-tuple-element(%custom-call.7), index=0
  %loop_add_fusion.4 = bf16[8,8]{1,0} fusion(%get-tuple-element.2, %b.1), kind=kLoop, calls=%fused_add.1, metadata={op_name="jit(step)/add"}
  %custom-call.8 = (bf16[8,8]{1,0}, s8[0]{0}) custom-call(%loop_add_fusion.4, %b.1), custom_call_target="__cublas$lt$matmul", metadata={op_name="jit(step)/jvp(M)/dot_general"}
  ROOT %get-tuple-element.3 = bf16[8,8]{1,0} get-tuple-element(%custom-call.8), index=0
}
"""
  ops = profiling.parse_hlo(hlo)
  assert ops["loop_add_fusion.3"].kernel == ops["loop_add_fusion.4"].kernel  # alike up to names
  device, host = 1, 700
  buffer = {"hlo_op": "command_buffer_0", "hlo_module": "jit_step"}
  events = [
      {"ph": "M", "name": "process_name", "pid": device, "args": {"name": "/device:GPU:0"}},
      {"ph": "M", "name": "thread_name", "pid": device, "tid": 14, "args": {"name": "Stream #14(Compute)"}},
      {"ph": "M", "name": "thread_name", "pid": device, "tid": 99, "args": {"name": "XLA Ops"}},
      {"ph": "M", "name": "process_name", "pid": host, "args": {"name": "/host:CPU"}},
      {"ph": "X", "pid": device, "tid": 14, "ts": -10.0, "dur": 2.0, "name": "cutlass_80_gemm_k", "args": buffer},
  ]
  kernel = lambda ts, dur, name: {"ph": "X", "pid": device, "tid": 14, "ts": ts, "dur": dur,
                                  "name": name, "args": buffer}
  for step in range(2):
    t0 = 1000.0 * step
    events += [
        kernel(t0, 10.0, "loop_add_fusion_3"),
        kernel(t0 + 12, 30.0, "nvjet_sm90_tst_128x160_64x5_2x1_v_bz_NNT"),
        kernel(t0 + 45, 5.0, "loop_add_fusion_3"),  # loop_add_fusion.4, on the kernel of .3
        kernel(t0 + 52, 20.0, "nvjet_sm90_tst_192x96_64x5_1x2_h_bz_TNN"),
        kernel(t0 + 75, 1.0, "Memset 0"),
        {"ph": "X", "pid": device, "tid": 99, "ts": t0, "dur": 76.0, "name": "command_buffer_0", "args": buffer},
        {"ph": "X", "pid": host, "tid": 3, "ts": t0, "dur": 80.0, "name": "ExecuteCommandBuffer", "args": buffer},
    ]
  random.Random(0).shuffle(events)
  path = tmp_path / "perfetto_trace.json.gz"
  with gzip.open(path, "wt") as f:
    json.dump({"traceEvents": events}, f)
  p = profiling.summarise_trace(hlo, str(path), step_seconds=100e-6, flops=4 * 8 ** 3, repeats=2)
  seconds = {o["op"]: o["seconds"] for o in p["top_ops"]}
  assert seconds == pytest.approx({"custom-call.7": 30e-6, "custom-call.8": 20e-6,
                                   "loop_add_fusion.3": 10e-6, "loop_add_fusion.4": 5e-6,
                                   "[unattributed] cutlass_80_gemm_k": 1e-6,
                                   "[unattributed] Memset 0": 1e-6})
  assert p["events_per_call"] == 5.5
  assert p["matmul_seconds"] == pytest.approx(51e-6)
  expected = {"backward": {"matmul": 30e-6, "other": 0.0}, "forward": {"matmul": 20e-6, "other": 10e-6},
              "rest": {"matmul": 0.0, "other": 5e-6}, "unattributed": {"matmul": 1e-6, "other": 1e-6}}
  assert set(p["phase_seconds"]) == set(expected)
  for phase, seconds in expected.items():
    assert p["phase_seconds"][phase] == pytest.approx(seconds), phase
