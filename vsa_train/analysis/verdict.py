"""The verdict sentences. The direction word (fewer, more) is derived from the number it goes with, and the
interval is turned the same way round, so no sentence can print a multiplier that contradicts its own numbers;
a bound that does not settle the direction is said to settle nothing."""

NAMES = {"vsa": "VSA"}  # how attention types read in a sentence


def name(attn: str) -> str:
    return NAMES.get(attn, attn)


def excludes_one(ci) -> bool | None:
    """Whether a (low, high, ...) interval of the multiplier excludes 1 (None: no interval)."""
    return None if ci is None else bool(ci[0] > 1 or ci[1] < 1)


def verdict(attn: str, baseline: str, m: dict | None) -> str:
    """One plain sentence: how many times fewer (or more) FLOPs `attn` needs than `baseline` for the same loss."""
    a, b = name(attn), name(baseline)
    if m is None:
        return f"no comparison: {a} or {b} has no run that reached its end with an eval."
    if m.get("bound"):
        return _bound_sentence(a, b, m)
    ratio, ci = m["ratio"], m["ci"]
    fewer = ratio >= 1
    value = ratio if fewer else 1 / ratio
    if ci is None:
        interval = f"no interval: {m.get('no_ci') or 'none computed'}"
    else:
        low, high = (ci[0], ci[1]) if fewer else (1 / ci[1], 1 / ci[0])
        interval = f"95% interval [{low:.2f}, {high:.2f}]; " + (
            "it excludes 1" if excludes_one(ci) else "it includes 1: the runs do not tell which needs fewer FLOPs")
        if not low <= value <= high:
            interval += "; the estimate lies outside its own interval, read it with care"
    seeds = f"{m['seeds']} seed{'s' if m['seeds'] != 1 else ''}"
    return (f"{a} needs {value:.2f}× {'fewer' if fewer else 'more'} FLOPs than {b} for the same eval loss "
            f"({interval}), over eval losses {m['low']:.4f}–{m['high']:.4f}, from {m['runs']} runs ({seeds}).")


def _bound_sentence(a: str, b: str, m: dict) -> str:
    ratio, tail = m["ratio"], f" (a bound: no interval), from {m['runs']} runs."
    if m["tells"] and m["bound"] == "lower":
        return (f"{a} needs at least {ratio:.2f}× fewer FLOPs than {b} for the same eval loss: its cheapest run "
                f"already beats {b}'s best eval loss {m['loss']:.4f}" + tail)
    if m["tells"]:
        return (f"{a} needs at least {1 / ratio:.2f}× more FLOPs than {b} for the same eval loss: {b}'s cheapest "
                f"run already beats {a}'s best eval loss {m['loss']:.4f}" + tail)
    sign = "≥" if m["bound"] == "lower" else "≤"
    return (f"the runs cannot tell whether {a} needs fewer or more FLOPs than {b}: their frontiers share no loss "
            f"range, and the only bound they give (multiplier {sign} {ratio:.2f}×) does not exclude 1; from "
            f"{m['runs']} runs.")


def bound_note(attn: str, baseline: str, m: dict, label: str) -> str:
    """The note beside a bound: the same numbers, the same way round as the verdict."""
    sign = "≥" if m["bound"] == "lower" else "≤"
    settles = "" if m["tells"] else ", which does not tell which needs fewer FLOPs"
    return (f"{label}: {name(attn)} and {name(baseline)} frontiers share no loss range: only a {m['bound']} bound on "
            f"the multiplier ({baseline} FLOPs / {attn} FLOPs {sign} {m['ratio']:.3g}×){settles}")
