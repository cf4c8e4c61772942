"""Where the GPU waits: idle gaps between kernels in a torch.profiler Chrome trace, and what the host did then.

    python -m vsa_train.bench gaps TRACE.json[.gz] [--min-us 20] [--rows 15]

A gap is a stretch inside the traced work where no kernel, copy or memset runs on any stream. Each gap is
charged to the host when the kernel that ends it was launched after the GPU ran dry ("host-bound": the host
was still busy reaching that launch), else to a dependency (an event wait, another stream). The tables add
up idle time by the host operation that enclosed that launch (innermost named op) and by the outermost one
(the step phase: forward, backward's autograd nodes, optimizer, a sync), then list the longest gaps.
`python -m vsa_train.bench step --trace DIR` writes a trace of one trainer step and prints this report.
"""
import argparse
import bisect
import gzip
import json
from collections import defaultdict

DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
LAUNCH_CATS = ("cuda_runtime", "cuda_driver")
HOST_CATS = ("cpu_op", "user_annotation")


def load(path: str) -> dict:
    """A Chrome trace (plain or gzipped JSON), as torch.profiler's export_chrome_trace writes it."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        trace = json.load(f)
    if not isinstance(trace, dict) or not isinstance(trace.get("traceEvents"), list):
        raise ValueError(f"{path}: not a Chrome trace (no traceEvents list)")
    return trace


def _spans(events, cats):
    return [e for e in events if e.get("ph") == "X" and e.get("cat") in cats
            and isinstance(e.get("ts"), (int, float)) and isinstance(e.get("dur"), (int, float))]


class _HostStacks:
    """The named host operations open at a time on a thread (Chrome 'X' spans nest by time)."""

    def __init__(self, ops):
        self.by_tid = defaultdict(list)
        for e in sorted(ops, key=lambda e: (e["ts"], -e["dur"])):
            self.by_tid[e.get("tid")].append(e)
        self.starts = {tid: [e["ts"] for e in es] for tid, es in self.by_tid.items()}

    def at(self, tid, ts: float) -> list[str]:
        """Names of the ops enclosing ts on thread tid, outermost first."""
        ops = self.by_tid.get(tid, [])
        hi = bisect.bisect_right(self.starts.get(tid, []), ts)
        return [e["name"] for e in ops[:hi] if e["ts"] + e["dur"] >= ts]


def idle_gaps(trace: dict, min_us: float = 20.0) -> dict:
    """Busy and idle time of the traced device work and every gap of at least min_us, with its host context."""
    events = trace["traceEvents"]
    device = sorted(_spans(events, DEVICE_CATS), key=lambda e: e["ts"])
    if not device:
        return {"span_us": 0.0, "busy_us": 0.0, "gaps": []}
    launches = {e.get("args", {}).get("correlation"): e for e in _spans(events, LAUNCH_CATS)}
    stacks = _HostStacks(_spans(events, HOST_CATS))
    gaps, busy, end = [], 0.0, device[0]["ts"]
    start = end
    for k in device:
        if k["ts"] > end:
            idle = k["ts"] - end
            if idle >= min_us:
                launch = launches.get(k.get("args", {}).get("correlation"))
                gaps.append(_gap(idle, end, k, launch, stacks, start))
        busy += max(0.0, k["ts"] + k["dur"] - max(end, k["ts"]))
        end = max(end, k["ts"] + k["dur"])
    return {"span_us": end - start, "busy_us": busy, "gaps": gaps}


def _gap(idle: float, dry_at: float, kernel: dict, launch: dict | None, stacks: _HostStacks, origin: float) -> dict:
    gap = {"us": idle, "at_us": dry_at - origin, "kernel": kernel["name"], "cause": "unknown", "stack": []}
    if launch is not None:  # else nothing recorded its launch (e.g. a CUDA graph replay)
        gap["cause"] = "host" if launch["ts"] > dry_at else "dependency"
        gap["stack"] = stacks.at(launch.get("tid"), launch["ts"]) or [launch["name"]]
    return gap


def report(result: dict, rows: int = 15) -> str:
    """Markdown: the totals, idle time by innermost and by outermost host op, and the longest gaps."""
    span, busy, gaps = result["span_us"], result["busy_us"], result["gaps"]
    idle = span - busy
    counted = sum(g["us"] for g in gaps)
    host = sum(g["us"] for g in gaps if g["cause"] == "host")
    out = [f"device span {span / 1e3:.2f} ms: busy {busy / 1e3:.2f} ms, idle {idle / 1e3:.2f} ms "
           f"({100 * idle / span if span else 0:.1f}%); {len(gaps)} gaps listed hold {counted / 1e3:.2f} ms, "
           f"{host / 1e3:.2f} ms of it host-bound"]
    for title, pick in (("innermost host op at the launch that ended the gap", lambda s: s[-1]),
                        ("outermost host op (step phase)", lambda s: s[0])):
        total, count = defaultdict(float), defaultdict(int)
        for g in gaps:
            key = (pick(g["stack"]) if g["stack"] else "-", g["cause"])
            total[key] += g["us"]
            count[key] += 1
        out += ["", f"| {title} | cause | gaps | idle ms |", "|---|---|---|---|"]
        out += [f"| `{name[:90]}` | {cause} | {count[(name, cause)]} | {us / 1e3:.2f} |"
                for (name, cause), us in sorted(total.items(), key=lambda kv: -kv[1])[:rows]]
    out += ["", "| gap us | at ms | cause | next kernel | host ops (outermost > innermost) |", "|---|---|---|---|---|"]
    for g in sorted(gaps, key=lambda g: -g["us"])[:rows]:
        names = g["stack"] if len(g["stack"]) <= 3 else g["stack"][:2] + ["…", g["stack"][-1]]
        stack = " > ".join(n[:40] for n in names)
        out.append(f"| {g['us']:.0f} | {g['at_us'] / 1e3:.2f} | {g['cause']} | `{g['kernel'][:50]}` | {stack} |")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m vsa_train.bench gaps", description=__doc__.splitlines()[0])
    p.add_argument("trace")
    p.add_argument("--min-us", type=float, default=20.0, help="shortest gap listed (microseconds)")
    p.add_argument("--rows", type=int, default=15)
    args = p.parse_args(argv)
    print(report(idle_gaps(load(args.trace), args.min_us), args.rows))


if __name__ == "__main__":
    main()
