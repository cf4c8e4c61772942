"""What the runner would do with the calls it is given: its own choices (`next_point`) played on its own estimates
(`advance`), one call after another, with no GPU. It answers "how many device calls does the rest take" and "which
runs will the next call start" before a lease is spent on it."""
from dataclasses import dataclass

from .ledger import Point, estimate, unfinished
from .runner import SAFETY, Active, advance, end_times, next_point


@dataclass
class Call:
    """One simulated invocation: the runs it starts, each (start s, end s, name), and the time it ends."""

    runs: list[tuple[float, float, str]]
    end_s: float


def one_call(todo: list[Point], speeds: dict, time_s: float, lanes: int, memory_gib: float,
             safety: float = SAFETY) -> Call:
    """The runs one invocation of `time_s` seconds starts from `todo` (removed from it), as the runner picks them."""
    active: list[Active] = []
    started: dict[str, float] = {}
    runs, now = [], 0.0
    while True:
        pick = next_point(todo, speeds, active, time_s - now, memory_gib, safety) if len(active) < lanes else None
        if pick:
            todo.remove(pick[0])
            active.append(Active(pick[0], proc=None, est=pick[1]))
            started[pick[0].name] = now
            continue
        if not active:
            return Call(runs, now)
        dt = min(end_times([list(a.work) for a in active]))  # to the next run's end
        advance([a.work for a in active], dt)
        now += dt
        for a in [a for a in active if not any(x > 1e-9 for x in a.work)]:
            active.remove(a)
            runs.append((started[a.point.name], now, a.point.name))


def plan(points: list[Point], results, speeds: dict, time_s: float, lanes: int, memory_gib: float,
         safety: float = SAFETY, only=None) -> str:
    """The calls the unfinished points take, each with its runs, and the runs that no call of `time_s` fits."""
    todo = unfinished(points, results, only)
    lines, calls = [], 0
    while todo:
        call = one_call(todo, speeds, time_s, lanes, memory_gib, safety)
        if not call.runs:
            break
        calls += 1
        lines.append(f"call {calls} (~{call.end_s:.0f} s of {time_s:.0f}):")
        lines += [f"  {start:5.0f}-{end:5.0f} s  {name}" for start, end, name in sorted(call.runs)]
    lines.append(f"{calls} calls of {time_s:.0f} s at {lanes} lane(s), margin x{safety}")
    if todo:
        lines.append("no call fits: " + ", ".join(_why_not(p, speeds, time_s) for p in todo))
    return "\n".join(lines)


def _why_not(point: Point, speeds: dict, time_s: float) -> str:
    """A point no call fits: its estimate, and the --safety at which a call of its own would take it."""
    solo = estimate(point, speeds).solo_s
    if solo >= time_s:
        return f"{point.name} (~{solo:.0f} s alone): longer than a call of {time_s:.0f} s"
    return f"{point.name} (~{solo:.0f} s alone): alone in a call at --safety {int(time_s / solo * 1000) / 1000:.3f} or less"
