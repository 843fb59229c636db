"""Where a jitted step's time goes: a `jax.profiler` trace, its op events summed per XLA op.

`pdiff bench --profile_dir=DIR` writes the trace (open it in Perfetto or TensorBoard's profile
plugin) and adds the summary to its JSON. Each op of the compiled module is classed as *matmul*
(its fusion holds a dot or a convolution, with whatever element-wise work XLA fused into it) or
*other*, and put in the phase its JAX op_name shows: forward (`jvp`), backward (`transpose`), or
rest (outside the differentiated function: a train step's optimizer, EMA and loss bookkeeping;
all of a sampler).

Why by hand: the profiler's own op-profile tool (xprof) is a TensorBoard plugin with no stable
Python API; this reads the Perfetto JSON that `jax.profiler.trace` writes and the compiled HLO
text, both plain formats.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import time
from typing import Callable, NamedTuple

import jax

# Ops that only hold other ops (their events enclose their body's events).
_CONTAINERS = {"while", "conditional", "call", "async-start", "async-done", "async-update",
               "fusion-start", "fusion-done", "custom-call-start", "custom-call-done"}
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?\b([a-z][\w\-]*)\((.*)$")
_CALLS = re.compile(r"\b(?:calls|to_apply|body|condition)=%?([\w.\-]+)|branch_computations=\{([^}]*)\}")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
# Library matmuls called from HLO (GPU: cuBLAS/cuBLASLt gemms, cuDNN convolutions).
_MATMUL_CALL = re.compile(r'custom_call_target="[^"]*(?:gemm|matmul|cudnn\$conv)[^"]*"', re.IGNORECASE)


class Op(NamedTuple):
  opcode: str      # the HLO opcode ("dot" also for a library gemm custom-call)
  matmul: bool     # a dot or convolution, or a fusion that holds one
  phase: str       # "forward", "backward" or "rest"
  op_name: str     # the JAX op_name from the HLO metadata
  computation: str = ""  # the HLO computation it is in (its instructions in schedule order)
  position: int = 0      # its place in that computation's schedule
  kernel: str = ""       # what it computes, without names: ops alike here can share one kernel


_NAMES = re.compile(r"%[\w.\-]+")
_METADATA = re.compile(r",? (?:metadata|backend_config|frontend_attributes)=(?:\{.*?\}|\S+)(?=,? \w+=|$)")


def _unnamed(line: str) -> str:
  """An instruction without its own, its operands' and its metadata's names."""
  line = _METADATA.sub("", line.strip())
  return _NAMES.sub("%", re.sub(r"^(?:ROOT )?%?[\w.\-]+ = ", "", line))


def parse_hlo(hlo_text: str) -> dict[str, Op]:
  """Every instruction of a compiled module's text (`compiled.as_text()`), by name."""
  bodies: dict[str, list[tuple[str, str, list[str], str, str]]] = {}
  current = None
  for line in hlo_text.splitlines():
    m = _COMPUTATION.match(line)
    if m:
      current = bodies.setdefault(m.group(1), [])
      continue
    m = _INSTRUCTION.match(line) if current is not None else None
    if m:
      calls = [c.strip().lstrip("%") for one, many in _CALLS.findall(m.group(3))
               for c in (one or many).split(",") if c.strip()]
      op_name = _OP_NAME.search(line)
      opcode = m.group(2)
      if opcode == "custom-call" and _MATMUL_CALL.search(line):
        opcode = "dot"  # counts as a matmul like XLA's own dot
      current.append((m.group(1), opcode, calls, op_name.group(1) if op_name else "",
                      _unnamed(line)))

  holds_dot: dict[str, bool] = {}

  def computation_has_dot(name: str) -> bool:  # HLO calls form a DAG: memoised recursion ends
    if name not in holds_dot:
      holds_dot[name] = any(
          opcode in ("dot", "convolution") or
          (opcode not in _CONTAINERS and any(computation_has_dot(c) for c in calls))
          for _, opcode, calls, _, _ in bodies.get(name, ()))
    return holds_dot[name]

  ops = {}
  for computation, body in bodies.items():
    for position, (name, opcode, calls, op_name, text) in enumerate(body):
      matmul = opcode in ("dot", "convolution") or (
          opcode not in _CONTAINERS and any(computation_has_dot(c) for c in calls))
      phase = "backward" if "transpose(" in op_name else "forward" if "jvp(" in op_name else "rest"
      # A fusion's kernel is its called computation's body: two fusions alike up to names may
      # run as one kernel (XLA's GPU backend reuses it, under the first one's name). A
      # container launches no kernel of its own.
      kernel = "" if opcode in _CONTAINERS else "\n".join(
          [text] + [line for c in calls for *_, line in bodies.get(c, ())])
      ops[name] = Op(opcode, matmul, phase, op_name, computation, position, kernel)
  return ops


def trace(fn: Callable[[], object], logdir: str, repeats: int = 3) -> tuple[str, float]:
  """Runs `fn` (which must block) `repeats` times under the profiler; (Perfetto trace, seconds)."""
  os.makedirs(logdir, exist_ok=True)
  before = set(glob.glob(os.path.join(logdir, "**", "perfetto_trace.json.gz"), recursive=True))
  with jax.profiler.trace(logdir, create_perfetto_trace=True):
    t = time.perf_counter()
    for _ in range(repeats):
      fn()
    seconds = time.perf_counter() - t
  [path] = set(glob.glob(os.path.join(logdir, "**", "perfetto_trace.json.gz"), recursive=True)) - before
  return path, seconds


# Lines the trace viewer derives from the kernels (one event per op or module spanning its
# kernels): counting them too would count the same time twice.
_DERIVED_LINES = {"XLA Ops", "XLA Modules", "Steps", "Framework Ops", "Framework Name Scope",
                  "Source code", "TensorFlow Ops", "TensorFlow Name Scope"}


# Library kernels (cuBLAS/cuBLASLt gemms, CUTLASS, cuDNN) by their kernel names, for kernels that
# run inside a command buffer, where the trace does not name the HLO op that launched them.
_LIBRARY_MATMUL_KERNEL = re.compile(r"gemm|nvjet|xmma|cutlass|cublas|cudnn", re.IGNORECASE)


def kernel_name(op: str) -> str:
  """The name XLA's GPU backend gives the kernel of HLO op `op` ('.' and '-' become '_')."""
  return re.sub(r"[.\-]", "_", op)


def _next_gemms(ops: dict[str, Op]) -> dict[str, str]:
  """For each op, the next library gemm (a "dot" custom-call) after it in its computation."""
  following, upcoming = {}, {}
  for name, op in reversed(list(ops.items())):  # parse order: each computation in schedule order
    if upcoming.get(op.computation) is not None:
      following[name] = upcoming[op.computation]
    if op.opcode == "dot" and op.computation:
      upcoming[op.computation] = name
  return following


def op_seconds(trace_path: str, ops: dict[str, Op], module: str | None = None
               ) -> tuple[collections.Counter, dict[str, Op], int]:
  """Seconds of the trace's complete events per XLA op of `ops`, of `module` only; with the ops
  made up for kernels no HLO op accounts for, and the number of events counted.

  Only events that carry an `hlo_op` argument count (CPU thunks, GPU kernels), and none on the
  viewer's derived lines. Where the trace has device lanes (a GPU's or TPU's), only those count,
  so host-side launch events are not counted twice. A GPU kernel inside a command buffer (a CUDA
  graph) carries the buffer's name as its `hlo_op`, so it is matched to its op by kernel name,
  following the schedule where ops alike share a kernel; a library kernel there (cuBLAS names
  its own) is given to the next library gemm after the op matched before it on its stream;
  failing that, it is counted under "[unattributed] KERNEL" (a matmul if its name says gemm).
  """
  with gzip.open(trace_path) as f:
    data = json.load(f)
  events = data["traceEvents"] if isinstance(data, dict) else data
  meta = [e for e in events if e.get("ph") == "M"]
  devices = {e["pid"] for e in meta if e.get("name") == "process_name"
             and str((e.get("args") or {}).get("name", "")).startswith("/device:")}
  derived = {(e["pid"], e.get("tid")) for e in meta if e.get("name") == "thread_name"
             and (e.get("args") or {}).get("name") in _DERIVED_LINES}
  by_kernel = {kernel_name(n): n for n in ops}
  alike = collections.defaultdict(list)  # ops that may share a kernel, in schedule order
  for n, op in ops.items():
    alike[op.kernel].append(n)
  next_gemm = _next_gemms(ops)
  total, made_up, counted = collections.Counter(), {}, 0
  previous: dict[tuple, str] = {}  # per stream, the op its last kernel belonged to

  def named_op(kernel: str, lane) -> str | None:
    """The op that ran `kernel`: the op it is named after, or, when that kernel is shared, the
    first op alike after the stream's last op in its computation (else the first there: a
    loop's next iteration; else the namesake)."""
    name = by_kernel.get(kernel)
    group = alike[ops[name].kernel] if name is not None else ()
    if len(group) < 2:
      return name
    last = ops.get(previous.get(lane, ""))
    if last is not None:
      here = [n for n in group if ops[n].computation == last.computation]
      after = [n for n in here if ops[n].position > last.position]
      if after or here:
        return (after or here)[0]
    return name

  selected = [e for e in events
              if e.get("ph") == "X" and not (devices and e.get("pid") not in devices)
              and (e.get("pid"), e.get("tid")) not in derived and "hlo_op" in (e.get("args") or {})]
  for e in sorted(selected, key=lambda e: float(e.get("ts", 0.0))):
    args, lane, kernel = e["args"], (e.get("pid"), e.get("tid")), e.get("name", "")
    if module and args.get("hlo_module", module) != module:
      continue
    name = args["hlo_op"] if args["hlo_op"] in ops else named_op(kernel, lane)
    if name is None and devices:  # in a command buffer, a kernel no op is named after
      library = bool(_LIBRARY_MATMUL_KERNEL.search(kernel))
      name = next_gemm.get(previous.get(lane)) if library else None
      if name is None:
        name = f"[unattributed] {kernel}"
        made_up.setdefault(name, Op("kernel", library, "unattributed", ""))
    if name is None:
      continue
    if name in ops:
      previous[lane] = name
    total[name] += float(e.get("dur", 0.0)) * 1e-6  # Perfetto JSON durations are microseconds
    counted += 1
  return total, made_up, counted


def module_name(hlo_text: str) -> str | None:
  m = re.match(r"HloModule ([\w.\-]+)", hlo_text)
  return m.group(1) if m else None


def summarise(hlo_text: str, fn: Callable[[], object], logdir: str, flops: float,
              repeats: int = 3, top: int = 12) -> dict:
  """Profile `repeats` calls of `fn` (a compiled step doing `flops` matmul FLOPs per call).

  Figures are per call. `matmul_flops_per_sec` is the rate inside the matmul ops alone, so that
  MFU = matmul_flops_per_sec / device rate x matmul_seconds / step_seconds (+ any idle time).
  """
  os.makedirs(logdir, exist_ok=True)
  with open(os.path.join(logdir, "hlo.txt"), "w") as f:  # beside the trace: what it ran
    f.write(hlo_text)
  path, wall = trace(fn, logdir, repeats)
  return summarise_trace(hlo_text, path, wall / repeats, flops, repeats, top)


def summarise_trace(hlo_text: str, path: str, step_seconds: float, flops: float,
                    repeats: int = 3, top: int = 12) -> dict:
  """The summary of a trace of `repeats` calls already taken (`summarise`); `step_seconds` is
  the wall time per call. Offline: `summarise_trace(open(D + "/hlo.txt").read(), trace, ...)`."""
  ops = {n: op for n, op in parse_hlo(hlo_text).items() if op.opcode not in _CONTAINERS}
  per_op, made_up, events = op_seconds(path, ops, module_name(hlo_text))
  ops.update(made_up)
  per_call = {n: s / repeats for n, s in per_op.items()}
  op_total = sum(per_call.values())
  matmul = sum(s for n, s in per_call.items() if ops[n].matmul)
  phases = collections.defaultdict(lambda: {"matmul": 0.0, "other": 0.0})
  for n, s in per_call.items():
    phases[ops[n].phase]["matmul" if ops[n].matmul else "other"] += s
  # The other ops by the JAX primitive their op_name ends in (layer norm's reduce_sum and rsqrt,
  # softmax's exp, random_bits, the optimizer's element-wise arithmetic, ...); the `top` largest.
  primitives = collections.Counter()
  for n, s in per_call.items():
    if not ops[n].matmul:
      primitives[ops[n].op_name.rsplit("/", 1)[-1] or ops[n].opcode] += s
  ranked = sorted(per_call.items(), key=lambda kv: -kv[1])[:top]
  return {
      "trace": path,
      "step_seconds": step_seconds,
      "op_seconds": op_total,
      "events_per_call": events / repeats,
      "matmul_seconds": matmul,
      "matmul_fraction": matmul / op_total if op_total else None,
      "matmul_flops_per_sec": flops / matmul if matmul else None,
      "phase_seconds": dict(sorted(phases.items())),
      "other_seconds_by_primitive": dict(primitives.most_common(top)),
      "top_ops": [{"op": n, "seconds": s, "matmul": ops[n].matmul, "phase": ops[n].phase,
                   "op_name": ops[n].op_name} for n, s in ranked],
  }


def table(p: dict, rate: float) -> str:
  """A few lines for `pdiff bench`'s printout."""
  lines = [f"  ops {1e3 * p['op_seconds']:.1f} ms of a {1e3 * p['step_seconds']:.1f} ms step; "
           f"matmul ops {100 * (p['matmul_fraction'] or 0):.0f}% of op time"
           + (f", at {p['matmul_flops_per_sec'] / 1e12:.2f} TFLOP/s "
              f"({100 * p['matmul_flops_per_sec'] / rate:.0f}% of the matmul rate)"
              if p["matmul_flops_per_sec"] else "")]
  lines.append("  " + "; ".join(f"{k}: matmul {1e3 * v['matmul']:.1f} ms, other {1e3 * v['other']:.1f} ms"
                               for k, v in p["phase_seconds"].items()))
  lines.append("  other ops: " + ", ".join(f"{k} {1e3 * v:.1f} ms"
                                          for k, v in list(p["other_seconds_by_primitive"].items())[:6]))
  for o in p["top_ops"][:6]:
    lines.append(f"    {1e3 * o['seconds']:8.2f} ms  {'matmul' if o['matmul'] else 'other ':6}  "
                 f"{o['phase']:8}  {o['op']}  {o['op_name'][-70:]}")
  return "\n".join(lines)
