# Sourced by install.sh and test.sh: what this machine offers for the set-up, and a message naming
# what it lacks, so that a machine unlike the project's own (a Mac, a user without root, a
# distribution without apt) either works or stops before any test with the missing tools named.

# Stops the set-up: the first argument says what happened, each further one names a missing tool.
missing() {
  printf 'loraserve set-up: %s\n' "$1" >&2
  shift
  local line
  for line in "$@"; do
    printf '  - %s\n' "$line" >&2
  done
  exit 1
}

# apt-get only where it exists and we are root, as on the project's own machines and CI.
can_apt() {
  [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null
}

# The pip arguments that install torch for this machine. LORASERVE_TORCH=cpu|cuda overrides the
# guess. torch==2.13.0 is a fast path, not a requirement: where pip finds that build without an
# index (a CPU build lies in this machine's find-links), nothing is downloaded.
torch_args() {
  local pip="$1" choice="${LORASERVE_TORCH:-}"
  if [ -z "$choice" ]; then
    if "$pip" install -q --dry-run --no-index --no-deps torch==2.13.0 >/dev/null 2>&1; then
      echo "torch==2.13.0"
      return
    fi
    if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
      choice=cuda
    else
      choice=cpu
    fi
  fi
  case "$choice" in
    # PyPI's Linux wheels are CUDA builds; its macOS wheels run on the CPU (and Apple's GPU).
    cuda) echo "torch" ;;
    cpu)
      if [ "$(uname -s)" = Linux ]; then
        # PyTorch's CPU-only build: a few hundred MB instead of several GB of CUDA libraries.
        echo "torch --index-url https://download.pytorch.org/whl/cpu"
      else
        echo "torch"
      fi
      ;;
    *) missing "LORASERVE_TORCH=$choice is neither cpu nor cuda" ;;
  esac
}

# Where the tests' PostgreSQL server is found (tests/postgres_server.py: PATH, Debian's, pgserver's).
has_postgres() {
  "$1" -c 'import sys; from tests.postgres_server import find_bin_dir; sys.exit(find_bin_dir() is None)' 2>/dev/null
}

# The tools the tests run besides Python: promtool, a PostgreSQL server, Node.js with npm. apt
# installs what it can where we may use it; elsewhere PostgreSQL comes from pip (pgserver's build,
# which runs as the current user: the server refuses to run as root); what is still missing is named.
test_tools() {
  local python="$1" packages=() lacking=()
  command -v promtool >/dev/null || packages+=(prometheus)
  has_postgres "$python" || packages+=(postgresql)
  command -v npm >/dev/null && command -v node >/dev/null || packages+=(nodejs npm)
  if [ ${#packages[@]} -gt 0 ] && can_apt; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
  fi
  if ! has_postgres "$python" && [ "$(id -u)" != 0 ]; then
    "$python" -m pip install -q pgserver || echo "loraserve set-up: pip could not install pgserver" >&2
  fi
  command -v promtool >/dev/null \
    || lacking+=("promtool (Prometheus' rule checker) on PATH: apt-get install prometheus, brew install prometheus, or promtool from a Prometheus release")
  has_postgres "$python" \
    || lacking+=("a PostgreSQL server (initdb, pg_ctl, postgres, pg_isready) on PATH: apt-get install postgresql, brew install postgresql; run as a user other than root, this script installs pgserver with pip")
  command -v npm >/dev/null && command -v node >/dev/null \
    || lacking+=("Node.js with npm on PATH (for buf, fal's JS client and Helm): apt-get install nodejs npm, brew install node")
  if [ ${#lacking[@]} -gt 0 ]; then
    local why="apt-get cannot install them here: that needs apt-get and root"
    can_apt && why="apt-get did not install them"
    missing "the tests need these, which are not installed ($why):" "${lacking[@]}"
  fi
}
