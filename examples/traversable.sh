# Sourced by examples/run.sh and tests/run.sh.
# Run as root, torud runs each plugin under its own unprivileged uid, which must be able to
# traverse the directories leading to the plugins (and to the files a script plugin reads).
# A checkout under a 0700 directory (a home directory, `mktemp -d`) would hide them: let
# those directories be traversed (o+x only: nothing becomes listable or readable).
traversable() {
  [ "$(id -u)" = 0 ] || return 0
  local dir
  dir="$(cd "$1" && pwd)"
  while [ "$dir" != / ]; do
    if [ -z "$(find "$dir" -maxdepth 0 -perm -o+x)" ]; then
      printf 'note: chmod o+x %s (plugin users must reach the plugins below it)\n' "$dir"
      chmod o+x "$dir"
    fi
    dir="$(dirname "$dir")"
  done
}
