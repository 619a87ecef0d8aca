#!/bin/sh
# One replica of deploy/compose.yaml: its own clone of the configuration remote, then the service.
#
# The clone lives in the replica's own volume at $SWITCHBOARD_ROOT and is made once; after that
# the service's built-in pull (SWITCHBOARD_GIT_PULL=origin/BRANCH) keeps it up to date, and a
# restarted replica catches up from where its clone stands. The arguments are switchboard's
# (compose's `command:`), e.g. `serve --host 0.0.0.0`.
set -eu

: "${CONFIG_REMOTE:?CONFIG_REMOTE: the git remote to clone (a URL or a path)}"
: "${SWITCHBOARD_ROOT:?SWITCHBOARD_ROOT: where this replica keeps its clone}"
branch="${SWITCHBOARD_GIT_PULL:-origin/main}"
branch="${branch#*/}"

if [ ! -e "$SWITCHBOARD_ROOT/.git" ]; then
    echo "replica: cloning $CONFIG_REMOTE ($branch) into $SWITCHBOARD_ROOT" >&2
    # Into a temporary folder first: a clone cut short is never taken for a good one.
    rm -rf "$SWITCHBOARD_ROOT.partial"
    git clone --quiet --branch "$branch" -- "$CONFIG_REMOTE" "$SWITCHBOARD_ROOT.partial"
    mv "$SWITCHBOARD_ROOT.partial" "$SWITCHBOARD_ROOT"
fi

exec switchboard "$@"
