"""Benchmarks and profiling tools, run as `python -m vsa_train.bench <tool> [options]` (`--help` on each):

    op       the VSA op vs dense cuDNN SDPA: timings, accuracy vs float64, kernel profiles   (op.py, accuracy.py)
    step     the trainer's own training step, dense vs VSA, eager and compiled               (step.py)
    goals    the op, dq-accuracy and step goals in one call and one table                    (goals.py)
    skew     how unevenly top-k selections spread over key tiles, per layer                  (skew.py)
    gaps     where the GPU sits idle in a torch.profiler trace                               (gaps.py)
    launch   host cost of one launch at each layer of the op, on a GPU                       (launch.py)
    host     host cost of one op call, on the CPU with every Triton launch stubbed           (host.py)
    buckets  each bucket's step time in a mixed-shape run vs single-shape runs, first steps   (buckets.py)

A package inside vsa_train, not a folder of scripts: installed with the library, importable by its tests, no
sys.path edits; it sits above everything else of vsa_train (nothing imports it). GPU wrappers that log a
tool's output with the card and versions are in scripts/gpu/; docs/benchmarks.md holds the current figures.
"""
