#!/usr/bin/env bash
# A pydist cluster by hand: a name server, a head node and a child node, each in its own terminal,
# then a fourth terminal that sends tasks (examples/send_tasks.py).
#
#   terminal 1:  examples/spawn_node.sh ns                 # the Pyro5 name server
#   terminal 2:  examples/spawn_node.sh head               # the head node (root of the tree)
#   terminal 3:  examples/spawn_node.sh child              # a child of the head (repeat with
#                examples/spawn_node.sh child b            #   another name for more children)
#   terminal 4:  python examples/send_tasks.py --ns 127.0.0.1:9090 --secret-file secret
#                pydist status --ns 127.0.0.1:9090 --secret-file secret
#
# Each command prints the exact line it runs, so on real machines you can type it yourself: the
# commands are
#
#   python -c 'import secrets; print(secrets.token_hex(32))' > secret      # once; copy to every machine
#   pyro5-ns -n NS_HOST -p 9090 -x                                          # terminal 1
#   pydist-node --host HEAD_HOST --ns NS_HOST:9090 --name head --workers 2 --secret-file secret
#   pydist-node --host CHILD_HOST --ns NS_HOST:9090 --name a --parent head --workers 2 --secret-file secret
#
# The order does not matter: a child started before its head waits for it, and rejoins when a
# restarted head comes back (same --name).  Stop a node with Ctrl-C.
#
# Settings (environment): NS_HOST (127.0.0.1), NS_PORT (9090), HEAD_HOST (127.0.0.2),
# CHILD_HOST (127.0.0.3), WORKERS (2), SECRET_FILE (./secret, created if missing).
# The defaults keep everything on loopback; each node gets its own 127.0.0.x address (Linux) so the
# nodes look like distinct machines.
set -euo pipefail

NS_HOST=${NS_HOST:-127.0.0.1}
NS_PORT=${NS_PORT:-9090}
HEAD_HOST=${HEAD_HOST:-127.0.0.2}
CHILD_HOST=${CHILD_HOST:-127.0.0.3}
WORKERS=${WORKERS:-2}
SECRET_FILE=${SECRET_FILE:-secret}
PYTHON=${PYTHON:-python}

usage() {
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
}

make_secret() {
    if [ ! -s "$SECRET_FILE" ]; then
        (umask 077; "$PYTHON" -c 'import secrets; print(secrets.token_hex(32))' > "$SECRET_FILE")
        echo "wrote a new cluster secret to $SECRET_FILE (copy it to every machine)" >&2
    fi
}

run() {
    echo "+ $*" >&2
    exec "$@"
}

role=${1:-}
case "$role" in
    ns)
        # -x: no broadcast responder (clients and nodes are told where the name server is)
        run "$PYTHON" -m Pyro5.nameserver -n "$NS_HOST" -p "$NS_PORT" -x
        ;;
    head)
        make_secret
        run "$PYTHON" -m pydist.cli node --host "$HEAD_HOST" --port "${HEAD_PORT:-0}" --ns "$NS_HOST:$NS_PORT" \
            --name "${2:-head}" --workers "$WORKERS" --secret-file "$SECRET_FILE"
        ;;
    child)
        make_secret
        run "$PYTHON" -m pydist.cli node --host "$CHILD_HOST" --port "${CHILD_PORT:-0}" --ns "$NS_HOST:$NS_PORT" \
            --name "${2:-a}" --parent "${3:-head}" --workers "$WORKERS" --secret-file "$SECRET_FILE"
        ;;
    *)
        usage
        ;;
esac
