# shellcheck shell=bash
# Source me:  . scripts/dev-env.sh
# Test environment for servers that are already running (e.g. started earlier
# by `scripts/test.sh --setup-only`). Same variables as scripts/test.sh exports.
export KUBESHARD_TEST_POSTGRES_URL="postgres://kubeshard:kubeshard@127.0.0.1:5432/postgres"
export KUBESHARD_TEST_MYSQL_URL="mysql://kubeshard:kubeshard@127.0.0.1:3306/mysql"
export KUBESHARD_TEST_POSTGRES_SOCKET_URL="postgres://kubeshard:kubeshard@/postgres?host=/var/run/postgresql&port=5432"
export KUBESHARD_TEST_MYSQL_SOCKET_URL="mysql://kubeshard:kubeshard@unix(/run/mysqld/mysqld.sock)/mysql"
ETCD_BIN="$(command -v etcd || true)"
ETCDCTL_BIN="$(command -v etcdctl || true)"
export ETCD_BIN ETCDCTL_BIN
export KUBESHARD_TEST_REQUIRE_ALL=1
