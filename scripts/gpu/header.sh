# Sourced by the GPU scripts: where their log goes (start_log), and the first lines of each log say what ran where.
start_log() {  # start_log NAME: needs $OUT (made here); LOG=$OUT/NAME.log; the repo on PYTHONPATH; wandb off
  : "${OUT:?set OUT to the output folder}"
  mkdir -p "$OUT"
  LOG="$OUT/$1.log"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" WANDB_MODE=disabled
}
log_header() {  # log_header TITLE: "# TITLE on <host>, <date>, commit <sha>[ + changes to <files>]", the card, torch and triton
  local commit changed
  commit=$(git rev-parse --short HEAD 2>/dev/null || echo '(no git)')
  # A copied working tree can differ from its .git's HEAD (edits, or local commits not in that .git): say so.
  changed=$(git diff --name-only HEAD 2>/dev/null | head -5 | tr '\n' ' ')
  echo "# $1 on $(hostname 2>/dev/null || echo "?"), $(date -u '+%Y-%m-%d %H:%M UTC'), commit ${commit}${changed:+ + changes to ${changed% }}"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "(no nvidia-smi)"
  python -c "import torch, triton; print(f'torch {torch.__version__}, triton {triton.__version__}')" 2>&1 || true
}
