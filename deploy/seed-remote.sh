#!/bin/sh
# The remote of deploy/compose.yaml: a bare git repository in the `remote` volume, made once as a
# copy of the configuration repository mounted at $SEED (/seed; its branch $SEED_BRANCH). An
# existing remote is left as it is: from then on changes reach it by `git push`
# (docs/deploy.md) or by the replicas' own writes (SWITCHBOARD_GIT_PUSH). Compose runs this as
# root only to hand the volume to the service's user: $OWNER (65533:65533).
set -eu

: "${CONFIG_REMOTE:?CONFIG_REMOTE: where the bare repository goes}"
seed="${SEED:-/seed}"
branch="${SEED_BRANCH:-main}"

if [ ! -d "$CONFIG_REMOTE" ]; then
    echo "remote: seeding $CONFIG_REMOTE from $seed ($branch)" >&2
    rm -rf "$CONFIG_REMOTE.partial"
    # The seed belongs to the host's user, not to this one: git would call it dubious.
    git -c safe.directory='*' clone --quiet --bare --single-branch --branch "$branch" -- "$seed" "$CONFIG_REMOTE.partial"
    git -C "$CONFIG_REMOTE.partial" remote remove origin
    mv "$CONFIG_REMOTE.partial" "$CONFIG_REMOTE"
fi
if [ -n "${OWNER:-}" ]; then
    chown -R "$OWNER" "$(dirname "$CONFIG_REMOTE")"
fi
