#!/usr/bin/env bash
# scripts/test.sh: the single command that runs every kubeshard test.
#
# Target: a fresh Debian 12 machine where we are root (CI, throwaway VMs and
# containers). Developers can use it too: it is idempotent, so running it
# again skips whatever is already done.
#
#   scripts/test.sh                  set up everything, then fmt, clippy, build, test
#   scripts/test.sh differential     same, but pass "differential" to `cargo test`
#   scripts/test.sh -- --nocapture   anything after our options goes to `cargo test`
#   scripts/test.sh --no-setup       skip the apt/PostgreSQL/MariaDB set-up (servers
#                                    assumed to be running already)
#   scripts/test.sh --no-kubernetes  skip step 6 (for quick runs while developing)
#   eval "$(scripts/test.sh --setup-only)"
#                                    do the set-up only and print the test
#                                    environment as `export` lines (progress goes
#                                    to stderr, so only the exports reach stdout)
#
# Steps:
#   1. apt-get install postgresql, mariadb-server, etcd-server, etcd-client,
#      protobuf-compiler, libprotobuf-dev, prometheus (apt-get update only if
#      something is missing; Prometheus is only run by the dashboard check).
#   2. Start PostgreSQL (Debian cluster "15 main") on 127.0.0.1:5432 with
#      max_connections=1200 (room for kine in the benchmarks) and a SUPERUSER
#      role kubeshard/kubeshard.
#   3. Start MariaDB on 127.0.0.1:3306 with max_connections=300 and a user
#      kubeshard/kubeshard (@'%', @'localhost', @'127.0.0.1') with ALL
#      PRIVILEGES ON *.*.
#   Both serve TLS with a certificate of a CA made once in
#   /etc/kubeshard-test-tls, and have a user kubeshard_tls that may only log
#   in over TLS with that CA's client certificate.
#   4. Export KUBESHARD_TEST_POSTGRES_URL, KUBESHARD_TEST_MYSQL_URL (and the
#      same through Unix sockets, *_SOCKET_URL; kubeshard_tls's, *_TLS_URL,
#      and KUBESHARD_TEST_TLS_DIR), ETCD_BIN,
#      ETCDCTL_BIN and KUBESHARD_TEST_REQUIRE_ALL=1 (a missing backend makes
#      the tests fail instead of skip).
#   5. cargo fmt --check, cargo clippy -D warnings, cargo build, cargo test;
#      then the Grafana dashboard against a live Prometheus scraping two
#      routers under load (scripts/dashboard-check.sh); then linearizability
#      checks of short histories on etcd and kubeshard, with a router killed,
#      a database restarted or frozen, two routers (tests/linearizability).
#   6. Kubernetes' own code against kubeshard (needs Go; binaries are cached in
#      ${KUBESHARD_CACHE:-$HOME/.cache/kubeshard}): the apiserver storage
#      suite (scripts/kube-storage.sh), then kube-apiserver end to end
#      (scripts/kube-e2e.sh), then the [Conformance] specs of five SIGs of
#      Kubernetes' e2e suite on etcd and on six kubeshard shards, with
#      kwok's fake nodes in a private network namespace
#      (scripts/kube-conformance-check.sh), then the packaging in deploy/
#      (scripts/packaging-check.sh: systemd-analyze, helm, kubeconform).
#
# Servers started by this script are deliberately LEFT RUNNING when it exits:
# the machine is throwaway, a second run (or a developer's `cargo test`) reuses
# them, and there is no systemd here to own them anyway. Stop them by hand if
# needed:  pg_ctlcluster 15 main stop;  mariadb-admin -uroot shutdown
#
# There is no systemd in the target environment and /usr/sbin/policy-rc.d
# forbids service starts during apt-get install, so the packages install but
# their servers do not start; this script starts them itself.
#
# Durability settings (fsync, synchronous_commit, innodb_flush_log_at_trx_commit)
# are deliberately left at their defaults: the same servers are used for
# benchmarks.

set -euo pipefail

# ---------------------------------------------------------------- settings ---

PG_VERSION="${PG_VERSION:-15}"
PG_CLUSTER="${PG_CLUSTER:-main}"
PG_PORT=5432
MYSQL_PORT=3306
MYSQL_DATADIR=/var/lib/mysql
MYSQL_RUNDIR=/run/mysqld
MYSQL_SOCKET="$MYSQL_RUNDIR/mysqld.sock"
MYSQL_LOG=/var/log/mysql/error.log
MAX_CONNECTIONS=300
# PostgreSQL also serves the benchmark peers: kine opens one connection per
# concurrent request (1000 in scripts/bench-suite.sh), and capping its pool
# instead deadlocks it (kine 0.17.5 with 100: every connection idle in a
# transaction waiting for another).
PG_MAX_CONNECTIONS=1200
WAIT_SECONDS="${KUBESHARD_SETUP_WAIT_SECONDS:-90}"

APT_PACKAGES=(postgresql mariadb-server etcd-server etcd-client protobuf-compiler libprotobuf-dev prometheus)

export KUBESHARD_TEST_POSTGRES_URL="postgres://kubeshard:kubeshard@127.0.0.1:${PG_PORT}/postgres"
export KUBESHARD_TEST_MYSQL_URL="mysql://kubeshard:kubeshard@127.0.0.1:${MYSQL_PORT}/mysql"
# The same servers through their Unix sockets, in the forms users write
# (kine's unix(...) for MySQL): a private network namespace (the Kubernetes
# e2e harness) reaches the databases only this way.
PG_SOCKET_DIR=/var/run/postgresql
export KUBESHARD_TEST_POSTGRES_SOCKET_URL="postgres://kubeshard:kubeshard@/postgres?host=${PG_SOCKET_DIR}&port=${PG_PORT}"
export KUBESHARD_TEST_MYSQL_SOCKET_URL="mysql://kubeshard:kubeshard@unix(${MYSQL_SOCKET})/mysql"
# Databases that require TLS (issue 19): a CA this script makes, a server
# certificate for 127.0.0.1 on both servers, and a role/user kubeshard_tls
# that may only log in over TLS with a client certificate of that CA.
TLS_DIR="${KUBESHARD_TEST_TLS_DIR:-/etc/kubeshard-test-tls}"
export KUBESHARD_TEST_TLS_DIR="$TLS_DIR"
export KUBESHARD_TEST_POSTGRES_TLS_URL="postgres://kubeshard_tls@127.0.0.1:${PG_PORT}/postgres"
export KUBESHARD_TEST_MYSQL_TLS_URL="mysql://kubeshard_tls:kubeshard@127.0.0.1:${MYSQL_PORT}/mysql"
export KUBESHARD_TEST_REQUIRE_ALL=1
# CI replays a fixed set of property-test cases, so a red run always points
# at a change; developers' runs draw new random cases each time (a failure
# there prints the whole sequence, which becomes a deterministic test).
if [ "${CI:-}" = "true" ]; then
    export PROPTEST_RNG_SEED="${PROPTEST_RNG_SEED:-20261125}"
fi

# ----------------------------------------------------------------- options ---

usage() {
    sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
}

do_setup=1
setup_only=0
kubernetes=1
cargo_test_args=()
while (($#)); do
    case "$1" in
        --no-setup) do_setup=0 ;;
        --setup-only) setup_only=1 ;;
        --no-kubernetes) kubernetes=0 ;;
        -h | --help) usage; exit 0 ;;
        --) cargo_test_args+=("$@"); break ;; # keep "--" for cargo test
        *) cargo_test_args+=("$1") ;;
    esac
    shift
done
if ((setup_only && !do_setup)); then
    echo "scripts/test.sh: --setup-only and --no-setup are mutually exclusive" >&2
    exit 2
fi

# With --setup-only, stdout carries only the `export` lines (for eval); every
# other byte, ours or a child's, goes to stderr.
if ((setup_only)); then
    exec 3>&1 1>&2
fi

phase() {
    printf '\n==> [%4ds] %s\n' "$SECONDS" "$*" >&2
}
info() {
    printf '    %s\n' "$*" >&2
}
die() {
    printf 'scripts/test.sh: error: %s\n' "$*" >&2
    exit 1
}

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"

# ------------------------------------------------------------------- setup ---

# Close every file descriptor above 2 in the current (sub)shell. Servers
# started from here must not inherit extra descriptors: a daemon holding the
# write end of a pipe (our --setup-only stdout, a CI runner's log pipe) keeps
# whoever reads that pipe waiting forever after this script has exited.
close_extra_fds() {
    local fd
    for fd in /proc/self/fd/*; do
        fd="${fd##*/}"
        if ((fd > 2)); then eval "exec ${fd}>&-"; fi
    done
}

# Run "$@" (in the foreground) without descriptors above 2.
without_extra_fds() {
    (
        close_extra_fds
        exec "$@"
    )
}

need_root() {
    [[ $EUID -eq 0 ]] || die "the set-up phase must run as root (or use --no-setup with servers already running)"
}

install_packages() {
    phase "packages: ${APT_PACKAGES[*]}"
    local missing=() pkg
    for pkg in "${APT_PACKAGES[@]}"; do
        if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
            missing+=("$pkg")
        fi
    done
    if ((${#missing[@]} == 0)); then
        info "all installed"
        return
    fi
    info "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
}

# The test CA, server and client certificates (made once, kept). Made in a
# scratch folder and moved into place whole, so an interrupted run leaves
# nothing a later run would take for finished.
TLS_FILES=(ca.crt ca.key other-ca.crt server.crt server.key client.crt client.key)
setup_tls_files() {
    phase "TLS files for the databases in $TLS_DIR"
    local f missing=0
    for f in "${TLS_FILES[@]}"; do [[ -s $TLS_DIR/$f ]] || missing=1; done
    if ((!missing)); then
        info "already there"
        return
    fi
    local tmp
    tmp="$(mktemp -d "${TLS_DIR%/}.new.XXXXXX")"
    if ! make_tls_files "$tmp"; then
        tail -n 20 "$tmp/openssl.log" >&2 || true
        rm -rf "$tmp"
        die "could not make the TLS files (openssl's output above)"
    fi
    for f in "${TLS_FILES[@]}"; do
        [[ -s $tmp/$f ]] || { rm -rf "$tmp"; die "openssl made no $f"; }
    done
    chmod 0755 "$tmp"
    rm -rf "$TLS_DIR"
    mv "$tmp" "$TLS_DIR"
    info "made a CA, a server certificate for 127.0.0.1 and a client certificate (CN=kubeshard_tls)"
}

# make_tls_files DIR: every command must succeed (no set -e reliance).
make_tls_files() {
    local d=$1
    openssl req -x509 -newkey rsa:2048 -nodes -keyout "$d/ca.key" -out "$d/ca.crt" -days 3650 \
        -subj /CN=kubeshard-test-database-ca 2>&1 || return 1
    openssl req -x509 -newkey rsa:2048 -nodes -keyout "$d/other-ca.key" -out "$d/other-ca.crt" \
        -days 3650 -subj /CN=kubeshard-test-other-ca 2>&1 || return 1
    printf '%s\n' 'basicConstraints=CA:FALSE' 'keyUsage=digitalSignature,keyEncipherment' \
        'extendedKeyUsage=serverAuth' 'subjectAltName=IP:127.0.0.1,DNS:localhost' >"$d/server.ext" || return 1
    openssl req -newkey rsa:2048 -nodes -keyout "$d/server.key" -out "$d/server.csr" \
        -subj /CN=localhost 2>&1 || return 1
    openssl x509 -req -in "$d/server.csr" -CA "$d/ca.crt" -CAkey "$d/ca.key" -CAcreateserial \
        -days 3650 -out "$d/server.crt" -extfile "$d/server.ext" 2>&1 || return 1
    printf '%s\n' 'basicConstraints=CA:FALSE' 'keyUsage=digitalSignature,keyEncipherment' \
        'extendedKeyUsage=clientAuth' >"$d/client.ext" || return 1
    # PostgreSQL's cert authentication takes the user name from the CN.
    openssl req -newkey rsa:2048 -nodes -keyout "$d/client.key" -out "$d/client.csr" \
        -subj /CN=kubeshard_tls 2>&1 || return 1
    openssl x509 -req -in "$d/client.csr" -CA "$d/ca.crt" -CAkey "$d/ca.key" -CAcreateserial \
        -days 3650 -out "$d/client.crt" -extfile "$d/client.ext" 2>&1 || return 1
    # libpq refuses a client key others can read.
    chmod 0644 "$d"/*.crt && chmod 0600 "$d"/*.key
} >>"$1/openssl.log"

# PostgreSQL serves TLS with the test server certificate; kubeshard_tls may
# only log in over TLS with a client certificate (pg_hba 'cert').
setup_postgres_tls() {
    local confdir="/etc/postgresql/$PG_VERSION/$PG_CLUSTER" dir
    dir="$confdir/kubeshard-tls"
    install -d -o postgres -g postgres -m 0700 "$dir"
    install -o postgres -g postgres -m 0644 "$TLS_DIR/server.crt" "$TLS_DIR/ca.crt" "$dir/"
    install -o postgres -g postgres -m 0600 "$TLS_DIR/server.key" "$dir/"
    cat >"$confdir/conf.d/91-kubeshard-tls.conf" <<EOF
# Written by kubeshard scripts/test.sh: TLS with the test CA's certificate.
ssl = on
ssl_cert_file = '$dir/server.crt'
ssl_key_file = '$dir/server.key'
ssl_ca_file = '$dir/ca.crt'
EOF
    local hba="$confdir/pg_hba.conf"
    if ! grep -Eq '^[[:space:]]*hostssl[[:space:]]+all[[:space:]]+kubeshard_tls[[:space:]]' "$hba"; then
        info "adding kubeshard_tls rules (TLS with a client certificate, else reject) first in $hba"
        sed -i '0,/^[[:space:]]*local[[:space:]]/s//hostssl all             kubeshard_tls   127.0.0.1\/32            cert\nhost    all             kubeshard_tls   all                     reject\n&/' "$hba"
        grep -Eq '^[[:space:]]*hostssl[[:space:]]+all[[:space:]]+kubeshard_tls[[:space:]]' "$hba" ||
            die "could not add the kubeshard_tls rules to $hba (no 'local' line to put them before)"
    fi
    without_extra_fds pg_ctlcluster "$PG_VERSION" "$PG_CLUSTER" reload </dev/null >&2
    pg_psql_admin <<'EOF'
SELECT 'CREATE ROLE kubeshard_tls' WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'kubeshard_tls')
\gexec
ALTER ROLE kubeshard_tls WITH LOGIN SUPERUSER CREATEDB;
EOF
    # A reload is a signal: wait until the server has read the settings.
    local deadline=$((SECONDS + WAIT_SECONDS))
    until [[ $(pg_psql_admin -At -c 'SHOW ssl') == on ]]; do
        ((SECONDS < deadline)) || die "PostgreSQL did not turn TLS on within ${WAIT_SECONDS}s (see its log)"
        sleep 0.2
    done
    info "TLS on; role kubeshard_tls logs in with a client certificate only"
}

pg_ready() {
    pg_isready -q -h 127.0.0.1 -p "$PG_PORT"
}

pg_psql_admin() {
    # Local socket, peer authentication as the postgres OS user.
    runuser -u postgres -- psql -X -q -v ON_ERROR_STOP=1 -p "$PG_PORT" -d postgres "$@"
}

setup_postgres() {
    phase "PostgreSQL $PG_VERSION/$PG_CLUSTER on 127.0.0.1:$PG_PORT"
    local confdir="/etc/postgresql/$PG_VERSION/$PG_CLUSTER"
    if ! pg_ready; then
        if ! pg_lsclusters -h 2>/dev/null | awk -v v="$PG_VERSION" -v c="$PG_CLUSTER" '$1 == v && $2 == c { found = 1 } END { exit !found }'; then
            info "creating cluster $PG_VERSION $PG_CLUSTER"
            pg_createcluster "$PG_VERSION" "$PG_CLUSTER" --port="$PG_PORT"
        fi
        # Debian's postgresql.conf has include_dir = 'conf.d'. Durability
        # settings stay at their defaults (we benchmark on this server).
        mkdir -p "$confdir/conf.d"
        cat >"$confdir/conf.d/90-kubeshard.conf" <<EOF
# Written by kubeshard scripts/test.sh
listen_addresses = 'localhost'
port = $PG_PORT
max_connections = $PG_MAX_CONNECTIONS
EOF
        install -d -o postgres -g postgres -m 2775 /run/postgresql
        info "starting cluster (log: /var/log/postgresql/postgresql-$PG_VERSION-$PG_CLUSTER.log)"
        without_extra_fds pg_ctlcluster "$PG_VERSION" "$PG_CLUSTER" start </dev/null >&2 ||
            info "pg_ctlcluster start failed (maybe already starting); waiting"
        local deadline=$((SECONDS + WAIT_SECONDS))
        until pg_ready; do
            if ((SECONDS >= deadline)); then
                tail -n 40 "/var/log/postgresql/postgresql-$PG_VERSION-$PG_CLUSTER.log" >&2 || true
                die "PostgreSQL did not accept connections on 127.0.0.1:$PG_PORT within ${WAIT_SECONDS}s (log tail above)"
            fi
            sleep 1
        done
    else
        info "already accepting connections"
    fi

    # pg_hba.conf: Debian's default already has
    #   host all all 127.0.0.1/32 scram-sha-256
    # which is what our TCP password login needs; add it only if missing.
    local hba="$confdir/pg_hba.conf"
    if [[ -f $hba ]] && ! grep -Eq '^[[:space:]]*host[[:space:]]+all[[:space:]]+all[[:space:]]+127\.0\.0\.1/32[[:space:]]+(scram-sha-256|md5|password)' "$hba"; then
        info "adding 127.0.0.1/32 scram-sha-256 rule to $hba"
        echo 'host    all             all             127.0.0.1/32            scram-sha-256' >>"$hba"
        without_extra_fds pg_ctlcluster "$PG_VERSION" "$PG_CLUSTER" reload </dev/null >&2
    fi
    # Debian authenticates every socket login by the OS user (peer); the
    # kubeshard role logs in over the socket with its password, so its rule
    # goes first (the first matching line wins).
    if [[ -f $hba ]] && ! grep -Eq '^[[:space:]]*local[[:space:]]+all[[:space:]]+kubeshard[[:space:]]' "$hba"; then
        info "adding a 'local all kubeshard scram-sha-256' rule first in $hba"
        sed -i '0,/^[[:space:]]*local[[:space:]]/s//local   all             kubeshard                               scram-sha-256\n&/' "$hba"
        without_extra_fds pg_ctlcluster "$PG_VERSION" "$PG_CLUSTER" reload </dev/null >&2
    fi

    info "ensuring role kubeshard (SUPERUSER, password kubeshard)"
    pg_psql_admin <<'EOF'
SELECT 'CREATE ROLE kubeshard' WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'kubeshard')
\gexec
ALTER ROLE kubeshard WITH LOGIN SUPERUSER CREATEDB PASSWORD 'kubeshard';
EOF
    local mc
    mc="$(pg_psql_admin -At -c 'SHOW max_connections')"
    if ((mc < PG_MAX_CONNECTIONS)); then
        info "WARNING: max_connections is $mc (< $PG_MAX_CONNECTIONS); the server was already running before this script configured it; restart it with: pg_ctlcluster $PG_VERSION $PG_CLUSTER restart"
    fi
}

mysql_ready() {
    # `ping` exits 0 whenever the server answers, even with "access denied".
    mariadb-admin --no-defaults --protocol=tcp -h 127.0.0.1 -P "$MYSQL_PORT" \
        --connect-timeout=2 ping >/dev/null 2>&1
}

mysql_admin() {
    # root@localhost authenticates with unix_socket on Debian: OS root == DB root.
    mariadb --protocol=socket --socket="$MYSQL_SOCKET" -uroot "$@"
}

install_mariadb_tls_files() {
    install -d -o mysql -g mysql -m 0700 /etc/mysql/kubeshard-tls
    install -o mysql -g mysql -m 0644 "$TLS_DIR/server.crt" "$TLS_DIR/ca.crt" /etc/mysql/kubeshard-tls/
    install -o mysql -g mysql -m 0600 "$TLS_DIR/server.key" /etc/mysql/kubeshard-tls/
}

# Starts mariadbd detached, with TLS from the test CA, and waits for it.
start_mariadbd() {
    install_mariadb_tls_files
    info "starting mariadbd (log: $MYSQL_LOG)"
    # Detached (own session, no inherited stdio or other descriptors) so
    # that it survives this script and does not keep a CI log pipe open.
    # (setsid execs in place, so $! is mariadbd's own pid.)
    (
        close_extra_fds
        exec setsid mariadbd --user=mysql --datadir="$MYSQL_DATADIR" \
            --socket="$MYSQL_SOCKET" --bind-address=127.0.0.1 --port="$MYSQL_PORT" \
            --max-connections="$MAX_CONNECTIONS" --log-error="$MYSQL_LOG" \
            --ssl-cert=/etc/mysql/kubeshard-tls/server.crt \
            --ssl-key=/etc/mysql/kubeshard-tls/server.key \
            --ssl-ca=/etc/mysql/kubeshard-tls/ca.crt
    ) </dev/null >>"$MYSQL_LOG" 2>&1 &
    local pid=$!
    local deadline=$((SECONDS + WAIT_SECONDS))
    until mysql_ready; do
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -n 40 "$MYSQL_LOG" >&2 || true
            die "mariadbd exited during start-up (error log tail above)"
        fi
        if ((SECONDS >= deadline)); then
            tail -n 40 "$MYSQL_LOG" >&2 || true
            die "MariaDB did not answer on 127.0.0.1:$MYSQL_PORT within ${WAIT_SECONDS}s (error log tail above)"
        fi
        sleep 1
    done
    info "started (pid $pid)"
}

setup_mariadb() {
    phase "MariaDB on 127.0.0.1:$MYSQL_PORT"
    if ! mysql_ready; then
        install -d -o mysql -g root -m 0755 "$MYSQL_RUNDIR"
        install -d -o mysql -g adm -m 2750 "$(dirname "$MYSQL_LOG")"
        # Settings in a drop-in file so a later manual restart keeps them.
        cat >/etc/mysql/mariadb.conf.d/90-kubeshard.cnf <<EOF
# Written by kubeshard scripts/test.sh
[mysqld]
bind-address    = 127.0.0.1
port            = $MYSQL_PORT
socket          = $MYSQL_SOCKET
max_connections = $MAX_CONNECTIONS
ssl-cert        = /etc/mysql/kubeshard-tls/server.crt
ssl-key         = /etc/mysql/kubeshard-tls/server.key
ssl-ca          = /etc/mysql/kubeshard-tls/ca.crt
EOF
        if [[ ! -d $MYSQL_DATADIR/mysql ]]; then
            info "initialising datadir $MYSQL_DATADIR"
            install -d -o mysql -g mysql -m 0700 "$MYSQL_DATADIR"
            mariadb-install-db --user=mysql --datadir="$MYSQL_DATADIR" \
                --auth-root-authentication-method=socket --skip-test-db >/dev/null
        fi
        start_mariadbd
    else
        info "already answering"
    fi
    # The certificates of this run (the TLS folder may have been made anew).
    install_mariadb_tls_files
    if [[ $(mysql_admin -N -B -e 'SELECT @@have_ssl') == YES ]]; then
        mysql_admin -e 'FLUSH SSL' || die "MariaDB could not reload its TLS files"
    else
        # TLS settings are read at start-up only.
        info "restarting mariadbd with TLS (its settings are read at start-up)"
        mysql_admin -e 'SHUTDOWN' || die "could not stop MariaDB to turn TLS on"
        local deadline=$((SECONDS + WAIT_SECONDS))
        while mysql_ready; do
            ((SECONDS < deadline)) || die "MariaDB did not stop within ${WAIT_SECONDS}s"
            sleep 1
        done
        start_mariadbd
    fi

    info "ensuring user kubeshard (@'%', @'localhost', @'127.0.0.1') with ALL PRIVILEGES ON *.*"
    local host sql=""
    for host in '%' localhost 127.0.0.1; do
        sql+="CREATE USER IF NOT EXISTS 'kubeshard'@'$host' IDENTIFIED BY 'kubeshard';"
        sql+="ALTER USER 'kubeshard'@'$host' IDENTIFIED BY 'kubeshard';"
        sql+="GRANT ALL PRIVILEGES ON *.* TO 'kubeshard'@'$host';"
    done
    # kubeshard_tls: TLS with a client certificate of the test CA only.
    sql+="CREATE USER IF NOT EXISTS 'kubeshard_tls'@'127.0.0.1' IDENTIFIED BY 'kubeshard';"
    sql+="ALTER USER 'kubeshard_tls'@'127.0.0.1' IDENTIFIED BY 'kubeshard' REQUIRE X509;"
    sql+="GRANT ALL PRIVILEGES ON *.* TO 'kubeshard_tls'@'127.0.0.1';"
    mysql_admin -e "$sql FLUSH PRIVILEGES;" ||
        die "could not create the kubeshard MariaDB user as root over $MYSQL_SOCKET"
    local mc
    mc="$(mysql_admin -N -B -e 'SELECT @@max_connections')"
    if ((mc < MAX_CONNECTIONS)); then
        info "WARNING: max_connections is $mc (< $MAX_CONNECTIONS); the server was already running before this script configured it"
    fi
}

setup_etcd_bins() {
    ETCD_BIN="$(command -v etcd || true)"
    ETCDCTL_BIN="$(command -v etcdctl || true)"
    [[ -n $ETCD_BIN ]] || die "etcd not found in PATH (apt-get install etcd-server)"
    [[ -n $ETCDCTL_BIN ]] || die "etcdctl not found in PATH (apt-get install etcd-client)"
    export ETCD_BIN ETCDCTL_BIN
}

print_exports() {
    local v
    for v in KUBESHARD_TEST_POSTGRES_URL KUBESHARD_TEST_MYSQL_URL KUBESHARD_TEST_POSTGRES_SOCKET_URL KUBESHARD_TEST_MYSQL_SOCKET_URL KUBESHARD_TEST_TLS_DIR KUBESHARD_TEST_POSTGRES_TLS_URL KUBESHARD_TEST_MYSQL_TLS_URL ETCD_BIN ETCDCTL_BIN KUBESHARD_TEST_REQUIRE_ALL; do
        printf 'export %s=%q\n' "$v" "${!v}"
    done
}

# -------------------------------------------------------------------- main ---

phase "kubeshard tests in $REPO_ROOT"
if ((do_setup)); then
    need_root
    install_packages
    setup_tls_files
    setup_postgres
    setup_postgres_tls
    setup_mariadb
else
    info "--no-setup: assuming PostgreSQL and MariaDB are already running"
fi
setup_etcd_bins

phase "test environment"
print_exports | sed 's/^/    /' >&2

if ((setup_only)); then
    print_exports >&3
    phase "set-up done"
    exit 0
fi

command -v cargo >/dev/null || die "cargo not found in PATH (install Rust with rustup)"
if command -v rustup >/dev/null; then
    # No-ops when present; only matters on a minimal toolchain profile.
    cargo fmt --version >/dev/null 2>&1 || rustup component add rustfmt
    cargo clippy --version >/dev/null 2>&1 || rustup component add clippy
fi

locked=()
if git ls-files --error-unmatch Cargo.lock >/dev/null 2>&1; then
    locked=(--locked)
fi

phase "cargo fmt --all -- --check"
cargo fmt --all -- --check

phase "cargo clippy --workspace --all-targets ${locked[*]} -- -D warnings"
cargo clippy --workspace --all-targets "${locked[@]}" -- -D warnings

phase "cargo build --workspace --bins ${locked[*]}"
cargo build --workspace --bins "${locked[@]}"

phase "cargo test --workspace ${locked[*]} ${cargo_test_args[*]}"
cargo test --workspace "${locked[@]}" "${cargo_test_args[@]}"

phase "dashboard: every panel query answered by a live Prometheus scraping two routers under load"
scripts/dashboard-check.sh

command -v go >/dev/null || die "go not found in PATH (lincheck and the Kubernetes tests are Go)"
phase "linearizability: porcupine on etcd and kubeshard histories, with faults (tests/linearizability)"
python3 tests/linearizability/lincheck.py --kubeshard target/debug/kubeshard --seconds 8

if ((kubernetes)); then
    command -v go >/dev/null || die "go not found in PATH (the Kubernetes tests build Kubernetes' own code)"
    phase "Kubernetes: the apiserver storage suite on etcd and kubeshard"
    scripts/kube-storage.sh
    phase "Kubernetes: kube-apiserver end to end on kubeshard"
    scripts/kube-e2e.sh
    phase "Kubernetes: e2e conformance specs on etcd and on sharded kubeshard (kwok, private network namespace)"
    scripts/kube-conformance-check.sh
    phase "packaging: systemd unit, static pod, Helm chart (helm lint, kubeconform)"
    scripts/packaging-check.sh
fi

phase "all tests passed"
