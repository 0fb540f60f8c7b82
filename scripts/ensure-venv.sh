# Sourced by serve.sh, demo.sh and test.sh: `ensure_venv [EXTRAS]` makes .venv hold dinolab (editable)
# with the given extras ("serve", "test" ...), and skips pip when nothing changed since the last install:
# .venv/.dinolab-stamp records the SHA-256 of pyproject.toml with each extras set installed under it,
# so a second start takes seconds. Set DINOLAB_REINSTALL=1 to force the install.
ensure_venv() {
    local extras="${1:-}" spec="." stamp=".venv/.dinolab-stamp" hash line
    [ -n "$extras" ] && spec=".[$extras]"
    [ -x .venv/bin/python ] || python3 -m venv .venv
    hash=$(sha256sum pyproject.toml | cut -d' ' -f1)
    line="$hash ${extras:-core}"
    if [ -z "${DINOLAB_REINSTALL:-}" ] && [ -f "$stamp" ] && grep -qxF "$line" "$stamp" \
        && .venv/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('dinolab') is None)" 2>/dev/null; then
        return 0
    fi
    if ! .venv/bin/python -m pip install -q --disable-pip-version-check -e "$spec"; then
        return 1
    fi
    # keep only the lines of this pyproject.toml, then add ours
    { [ -f "$stamp" ] && grep "^$hash " "$stamp" | grep -vxF "$line"; echo "$line"; } > "$stamp.tmp" || true
    mv "$stamp.tmp" "$stamp"
}
