# pause_background_jobs: stops the project's long background jobs (the atlas explainer, whose
# pid is in data/explain/explain.pid) for as long as the sourcing script runs, and lets them go
# on when it exits, however it exits. A benchmark sources this first, so that two cores are
# not shared with a job that would skew every figure.
pause_background_jobs() {
    local root pidfile pid
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
    PAUSED_JOBS=()
    for pidfile in "$root"/data/explain/explain.pid; do
        [ -f "$pidfile" ] || continue
        pid="$(cat "$pidfile")"
        # Only a live process that is still the job (pids are reused).
        if kill -0 "$pid" 2>/dev/null && grep -q explain.py "/proc/$pid/cmdline" 2>/dev/null; then
            kill -STOP "$pid" && PAUSED_JOBS+=("$pid")
            echo "paused background job $pid ($(basename "$(dirname "$pidfile")")) for this benchmark" >&2
        fi
    done
    trap resume_background_jobs EXIT
}

# resume_background_jobs: lets paused jobs go on (a script that sets its own EXIT trap calls it
# from there).
resume_background_jobs() {
    local pid
    for pid in "${PAUSED_JOBS[@]}"; do kill -CONT "$pid" 2>/dev/null || true; done
}
