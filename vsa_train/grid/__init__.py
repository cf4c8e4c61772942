"""A ledger-driven runner for a sweep that outlasts any one machine lease: run what fits, keep what finished.

    python -m vsa_train.grid status EXPERIMENT RESULTS            # the ledger: finished runs and what remains
    python -m vsa_train.grid run EXPERIMENT RESULTS --time 540    # run the next unfinished runs that fit in 540 s
    python -m vsa_train.grid plan EXPERIMENT RESULTS --time 540 --lanes 2   # the calls the rest would take

The grid is the experiment's own sweep (`hydra.sweeper.params` of configs/experiment/EXPERIMENT.yaml, a product of
comma-separated choices), so `python train.py experiment=EXPERIMENT` on a cluster runs the same points. Each point
is one `python train.py experiment=EXPERIMENT key=value ...` in a scratch directory, always from its first step: a
run either finishes inside one invocation or is run again from its start, so no run mixes halves made on different
code or cards. A run that reaches its FLOPs budget (within +2%) is copied into RESULTS/runs/<name>/ as
metrics.jsonl, config.yaml and record.json (commit, card, versions, wall time, executed FLOPs, final eval loss):
that folder is the ledger, meant to be committed; it holds no checkpoints.

`ledger.py` reads the ledger and estimates what is left; `runner.py` starts runs, in parallel lanes on one GPU
where their memory and time allow, and keeps what finished; `plan.py` plays the runner's choices on its estimates,
call after call, without a GPU.
"""
