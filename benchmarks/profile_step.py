"""Where a train step's time goes: a jax.profiler trace of the step, summed per XLA operation.

  .venv/bin/python benchmarks/profile_step.py [train_step.py flags] [--trace-steps 2] [--top 30]
  .venv/bin/python benchmarks/profile_step.py --shapes camvid_iddlite --method consistency

Builds the step exactly as benchmarks/train_step.py does (same flags), runs the warm-up, traces
`--trace-steps` steps and sums the duration of every executed XLA operation (thunk) by

* stage: the encoder's layer0..layer8, the heads, the entropy module, and the rest (losses,
  upsampling, optimizer), from the operation's source metadata;
* direction: forward, or backward (operations of the gradient: "transpose(" in the metadata);
* kind: convolution forward / input gradient / kernel gradient, dot, reduction fusion (e.g. the
  BatchNorm moments), elementwise fusion, data movement (copy, slice, pad, transpose), other.

Thunk times are wall time per operation (the loop's containers, while / conditional, are not
counted twice); on a loaded machine they include time the process waited, which spreads over
the operations in proportion to their length, so shares stay meaningful where seconds do not.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

import jax  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks import train_step as ts  # noqa: E402
from usss_jax import cli  # noqa: E402

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\S+) ([\w\-]+)\((.*)$")
_COMPUTATION = re.compile(r"^%([\w.\-]+) .*\{$|^ENTRY %([\w.\-]+) .*\{$")
_CONTAINERS = ("while", "conditional", "call", "async-start", "async-done")


def parse_hlo(text: str) -> dict:
  """{instruction name: {"opcode", "op_name", "fusion_kind", "calls", "window", "shape"}}."""
  ops, metadata_of = {}, {}
  computation = None
  for line in text.splitlines():
    m = _COMPUTATION.match(line)
    if m:
      computation = m.group(1) or m.group(2)
      continue
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    name, shape, opcode, rest = m.groups()
    op_name = re.search(r'op_name="([^"]*)"', rest)
    calls = re.search(r"calls=%([\w.\-]+)", rest)
    kind = re.search(r"kind=(k\w+)", rest)
    window = re.search(r"window=\{size=([\dx]+)", rest)
    target = re.search(r'custom_call_target="([^"]*)"', rest)
    ops[name] = {"opcode": opcode, "op_name": op_name.group(1) if op_name else "",
                 "calls": calls.group(1) if calls else None,
                 "fusion_kind": kind.group(1) if kind else None,
                 "window": window.group(1) if window else None, "shape": shape,
                 "target": target.group(1) if target else None, "computation": computation,
                 "inner": None}
    if op_name and computation not in metadata_of:
      metadata_of[computation] = op_name.group(1)
  # A fusion without metadata takes its computation's; remember what it wraps.
  roots = collections.defaultdict(list)
  for name, op in ops.items():
    roots[op["computation"]].append(op)
  for op in ops.values():
    if op["calls"]:
      inner = roots.get(op["calls"], [])
      if not op["op_name"]:
        op["op_name"] = metadata_of.get(op["calls"], "")
      inner_codes = {o["opcode"] for o in inner}
      for code in ("convolution", "dot", "reduce", "reduce-window", "scatter", "gather"):
        if code in inner_codes:
          op["inner"] = code
          break
      if op["inner"] == "convolution":
        op["window"] = next((o["window"] for o in inner if o["window"]), None)
  return ops


def stage_of(op_name: str) -> str:
  m = re.search(r"encoder/(layer\d)", op_name)
  if m:
    return "encoder/" + m.group(1)
  if "/encoder/" in op_name:
    return "encoder/other"
  if re.search(r"/head_\d", op_name):
    return "heads"
  if "/embedding/" in op_name or op_name.endswith("/embedding"):
    return "entropy module"
  return "rest"


def kind_of(op: dict) -> str:
  code = op["inner"] if op["opcode"] == "fusion" and op["inner"] else op["opcode"]
  if code == "convolution":
    if "transpose(" not in op["op_name"]:
      return "conv forward"
    window = op["window"] or ""
    big = any(int(v) > 7 for v in window.split("x") if v)
    return "conv kernel grad" if big else "conv input grad"
  if code == "dot":
    return "dot"
  if code in ("reduce", "reduce-window"):
    return "reduction"
  if op["opcode"] == "fusion":
    name_hint = op["calls"] or ""
    if op["fusion_kind"] == "kCustom" or "ynn" in name_hint or "xnn" in name_hint:
      return "library fusion"
    return "elementwise fusion"
  if code in ("copy", "slice", "dynamic-slice", "dynamic-update-slice", "pad", "transpose",
              "concatenate", "bitcast", "broadcast", "copy-start", "copy-done"):
    return "data movement"
  if code == "custom-call":
    return f"custom-call {op['target']}"
  return code


def trace_step(built: dict, steps: int, warmup: int) -> list[dict]:
  step = ts.stepper(built)
  for _ in range(max(warmup, 1)):
    jax.block_until_ready(step())
  logdir = tempfile.mkdtemp(prefix="usss_profile_")
  with jax.profiler.trace(logdir, create_perfetto_trace=True):
    for _ in range(steps):
      jax.block_until_ready(step())
  path = glob.glob(os.path.join(logdir, "**", "perfetto_trace.json.gz"), recursive=True)[0]
  with gzip.open(path) as f:
    data = json.load(f)
  events = data["traceEvents"] if isinstance(data, dict) else data
  return [e for e in events if e.get("ph") == "X" and "hlo_op" in e.get("args", {})]


def summarise(events: list[dict], ops: dict, steps: int, top: int) -> dict:
  by_op = collections.Counter()
  for e in events:
    by_op[e["args"]["hlo_op"]] += e["dur"] / 1e6 / steps
  totals = {"stage": collections.Counter(), "kind": collections.Counter(),
            "stage_direction": collections.Counter(), "stage_kind": collections.Counter()}
  rows = []
  for name, seconds in by_op.items():
    op = ops.get(name, {"opcode": "?", "op_name": "", "inner": None, "fusion_kind": None,
                        "calls": None, "window": None, "target": None, "shape": ""})
    if op["opcode"] in _CONTAINERS:
      continue
    stage, kind = stage_of(op["op_name"]), kind_of(op)
    direction = "backward" if "transpose(" in op["op_name"] else "forward"
    totals["stage"][stage] += seconds
    totals["kind"][kind] += seconds
    totals["stage_direction"][f"{stage} {direction}"] += seconds
    totals["stage_kind"][f"{stage} | {kind}"] += seconds
    rows.append({"op": name, "seconds": seconds, "stage": stage, "kind": kind,
                 "direction": direction, "shape": op["shape"], "op_name": op["op_name"][-90:]})
  total = sum(totals["stage"].values())
  rows.sort(key=lambda r: -r["seconds"])
  shares = {key: {k: {"seconds": v, "share": v / total} for k, v in counter.most_common()}
            for key, counter in totals.items()}
  return {"thunk_seconds_per_step": total, "shares": shares, "top_ops": rows[:top]}


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], add_help=False)
  parser.add_argument("--trace-steps", type=int, default=1)
  parser.add_argument("--top", type=int, default=30)
  parser.add_argument("--dump-hlo", default="", help="also write the compiled HLO text here")
  ours, rest = parser.parse_known_args(argv)
  args = ts.parse_args(rest + ["--matmul-size", "0"])
  for key, value in vars(ours).items():
    setattr(args, key, value)
  return args


def run(args) -> dict:
  built = ts.build(args)
  hlo = built["compiled"].as_text()
  if args.dump_hlo:
    with open(args.dump_hlo, "w") as f:
      f.write(hlo)
  ops = parse_hlo(hlo)
  load_start = common.load_average()
  events = trace_step(built, args.trace_steps, args.warmup)
  result = summarise(events, ops, args.trace_steps, args.top)
  result.update(benchmark="profile_step", machine=built["info"],
                setup=ts.setup_of(args, built),
                flops_per_step=built["flops"], load_average_start=load_start,
                load_average_end=common.load_average(), trace_steps=args.trace_steps)
  return result


def table(r: dict) -> str:
  s = r["setup"]
  lines = [f"profile of the train step: {s['shapes']} shapes, method {s['method']}, kernel "
           f"gradients {s['conv_weight_grad']}"
           f"{', XLA_FLAGS=' + s['xla_flags'] if s['xla_flags'] else ''}; thunk seconds per step "
           f"{r['thunk_seconds_per_step']:.3f} (load average {r['load_average_start']} -> "
           f"{r['load_average_end']})"]
  for key, title in (("stage_direction", "stage, direction"), ("kind", "kind"),
                     ("stage_kind", "stage | kind (top 25)")):
    items = list(r["shares"][key].items())[:25]
    lines += ["", common.format_table([title, "s/step", "share"],
                                      [(k, v["seconds"], v["share"]) for k, v in items])]
  lines += ["", common.format_table(
      ["op", "s/step", "stage", "kind", "dir", "shape"],
      [(o["op"][:40], o["seconds"], o["stage"], o["kind"], o["direction"][:3], o["shape"][:40])
       for o in r["top_ops"]])]
  return "\n".join(lines)


def main(argv=None) -> None:
  cli.default_xla_flags()  # the launcher's XLA options (before jax starts its backend)
  args = parse_args(argv)
  result = run(args)
  common.emit(result, table(result), args)


if __name__ == "__main__":
  main()
