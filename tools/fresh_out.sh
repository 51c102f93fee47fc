# Sourced by pipeline.sh and the tools' run scripts (zoom_world.sh, fewshot_grounding.sh): the run's output folder.
#   OUT=$(absolute_out "${OUT:-}")   # before the script's cd: a relative OUT is read from where it was started
#   fresh_out "$OUT"                 # an empty folder the run owns, marked as one
# A run replaces its OUT only when it is missing, empty, or marked by an earlier run of these scripts
# (.toy_run): never a folder holding files they did not write (OUT=runs, OUT=$HOME, a checkout).
absolute_out() {
    case $1 in
        "" | /*) printf '%s' "$1" ;;
        *) printf '%s/%s' "$PWD" "$1" ;;
    esac
}

fresh_out() {
    local dir=$1
    if [ -e "$dir" ] && { [ ! -d "$dir" ] || { [ -n "$(ls -A "$dir")" ] && [ ! -f "$dir/.toy_run" ]; }; }; then
        echo "error: OUT=$dir holds files no run of these scripts wrote (no $dir/.toy_run): choose another OUT," \
             "or remove it yourself" >&2
        exit 1
    fi
    rm -rf "$dir"
    mkdir -p "$dir"
    echo "$(basename "$0") $(date -u +%Y-%m-%dT%H:%M:%SZ)" > "$dir/.toy_run"
}
