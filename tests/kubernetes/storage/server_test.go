package storage

// The server under test, started fresh for every test: a real etcd, or
// kubeshard on one SQLite shard, or kubeshard on a sharded topology.
//
// Environment:
//   STORAGE_TARGET   etcd | kubeshard | kubeshard-sharded (default kubeshard)
//   ETCD_BIN         etcd for the etcd target (default: etcd on PATH)
//   KUBESHARD_BIN    kubeshard for the kubeshard targets (required)
//   STORAGE_SHARDS   sqlite (default) | postgres-mariadb: the databases of the
//                    sharded target; the latter uses KUBESHARD_TEST_POSTGRES_URL
//                    and KUBESHARD_TEST_MYSQL_URL.

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/kubernetes"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	storagetesting "k8s.io/apiserver/pkg/storage/testing"
)

// serverOptions are what some tests need from the server.
type serverOptions struct {
	// progressNotify: how often the server sends progress notifications to
	// watches that asked for them (0: the server's default, 10 minutes).
	progressNotify time.Duration
}

func target() string {
	if t := os.Getenv("STORAGE_TARGET"); t != "" {
		return t
	}
	return "kubeshard"
}

func freePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("no free port: %v", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func randomHex(n int) string {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		panic(err)
	}
	return hex.EncodeToString(b)
}

// startServer starts a fresh server and returns a client of it, with the
// KV and Kubernetes interfaces wrapped in the suite's call recorders. The
// server is stopped (and its databases dropped) when the test ends.
func startServer(t testing.TB, opts serverOptions) *kubernetes.Client {
	t.Helper()
	dir := t.TempDir()
	port := freePort(t)
	endpoint := fmt.Sprintf("127.0.0.1:%d", port)
	var cmd *exec.Cmd
	switch target() {
	case "etcd":
		bin := os.Getenv("ETCD_BIN")
		if bin == "" {
			bin = "etcd"
		}
		peer := fmt.Sprintf("http://127.0.0.1:%d", freePort(t))
		args := []string{
			"--name", "storage-test",
			"--data-dir", filepath.Join(dir, "etcd"),
			"--listen-client-urls", "http://" + endpoint,
			"--advertise-client-urls", "http://" + endpoint,
			"--listen-peer-urls", peer,
			"--initial-advertise-peer-urls", peer,
			"--initial-cluster", "storage-test=" + peer,
		}
		if opts.progressNotify > 0 {
			args = append(args, "--experimental-watch-progress-notify-interval", opts.progressNotify.String())
		}
		cmd = exec.Command(bin, args...)
	case "kubeshard", "kubeshard-sharded":
		bin := os.Getenv("KUBESHARD_BIN")
		if bin == "" {
			t.Fatal("KUBESHARD_BIN is not set")
		}
		args := []string{"--listen-address", endpoint, "--metrics-bind-address", ""}
		if target() == "kubeshard" {
			args = append(args, "--endpoint", "sqlite://"+filepath.Join(dir, "state.db"))
		} else {
			config, drop := shardedTopology(t, dir)
			t.Cleanup(drop)
			args = append(args, "--config", config)
		}
		if opts.progressNotify > 0 {
			secs := int(opts.progressNotify / time.Second)
			if secs < 1 {
				secs = 1
			}
			args = append(args, "--progress-notify-interval-secs", fmt.Sprint(secs))
		}
		cmd = exec.Command(bin, args...)
	default:
		t.Fatalf("unknown STORAGE_TARGET %q", target())
	}
	logPath := filepath.Join(dir, "server.log")
	logFile, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = logFile, logFile
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", cmd.Path, err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		_ = logFile.Close()
		if t.Failed() {
			if log, err := os.ReadFile(logPath); err == nil {
				t.Logf("server log (%s):\n%s", cmd.Path, tail(string(log), 40))
			}
		}
	})

	client, err := kubernetes.New(clientv3.Config{
		Endpoints:   []string{"http://" + endpoint},
		DialTimeout: 10 * time.Second,
		DialOptions: []grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials())},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = client.Close() })
	deadline := time.Now().Add(30 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		_, err := client.Client.Get(ctx, "/storage-test/ready")
		cancel()
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("server at %s did not answer: %v", endpoint, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	client.KV = storagetesting.NewKVRecorder(client.KV)
	client.Kubernetes = storagetesting.NewKubernetesRecorder(client.Kubernetes)
	return client
}

func tail(s string, lines int) string {
	all := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(all) > lines {
		all = all[len(all)-lines:]
	}
	return strings.Join(all, "\n")
}

// shardedTopology writes a topology for the sharded target, on SQLite: a
// default shard and pods spread over two shards by namespace (so lists
// across namespaces are merged); on PostgreSQL + MariaDB the same plus
// events, leases and custom resources each on a shard of their own, as in
// the end-to-end run. The compaction key and increaseRV's key live on the
// default shard. Returns its path and a function dropping its databases.
func shardedTopology(t testing.TB, dir string) (string, func()) {
	t.Helper()
	type shard struct{ name, base string }
	var shards []shard
	var drops []func()
	switch os.Getenv("STORAGE_SHARDS") {
	case "", "sqlite":
		for _, name := range []string{"core", "pods-a", "pods-b"} {
			shards = append(shards, shard{name, "sqlite://" + filepath.Join(dir, name+".db")})
		}
	case "postgres-mariadb":
		pg := os.Getenv("KUBESHARD_TEST_POSTGRES_URL")
		my := os.Getenv("KUBESHARD_TEST_MYSQL_URL")
		if pg == "" || my == "" {
			t.Fatal("STORAGE_SHARDS=postgres-mariadb needs KUBESHARD_TEST_POSTGRES_URL and KUBESHARD_TEST_MYSQL_URL")
		}
		for _, s := range []shard{{"core", pg}, {"pods-a", my}, {"pods-b", pg},
			{"events", pg}, {"leases", my}, {"custom", pg}} {
			u, err := url.Parse(s.base)
			if err != nil {
				t.Fatalf("database URL %q: %v", s.base, err)
			}
			database := "ks_st_" + randomHex(8)
			u.Path = "/" + database
			base := s.base
			drops = append(drops, func() { dropDatabase(base, database) })
			shards = append(shards, shard{s.name, u.String()})
		}
	default:
		t.Fatalf("unknown STORAGE_SHARDS %q", os.Getenv("STORAGE_SHARDS"))
	}
	var b strings.Builder
	b.WriteString("default_shard = \"core\"\n")
	names := map[string]bool{}
	for _, s := range shards {
		names[s.name] = true
		fmt.Fprintf(&b, "\n[[shards]]\nname = %q\nendpoint = %q\n", s.name, s.base)
	}
	b.WriteString("\n[[routes]]\nresource = \"pods\"\nshards = [\"pods-a\", \"pods-b\"]\nhash = \"resource-namespace\"\n")
	if names["events"] {
		b.WriteString("\n[[routes]]\nresource = \"events\"\nshard = \"events\"\n")
		b.WriteString("\n[[routes]]\nresource = \"leases\"\nshard = \"leases\"\n")
		b.WriteString("\n[[routes]]\ngroup = \"example.apiserver.k8s.io\"\nresource = \"widgets\"\nshard = \"custom\"\n")
	}
	path := filepath.Join(dir, "topology.toml")
	if err := os.WriteFile(path, []byte(b.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	return path, func() {
		for _, drop := range drops {
			drop()
		}
	}
}

// dropDatabase removes a test database with the database's own client
// (best effort: names are unique, a leftover harms nothing).
func dropDatabase(base, database string) {
	u, err := url.Parse(base)
	if err != nil {
		return
	}
	switch u.Scheme {
	case "postgres", "postgresql":
		u.Path = "/postgres"
		_ = exec.Command("psql", u.String(), "-qtAc",
			fmt.Sprintf("DROP DATABASE IF EXISTS %q WITH (FORCE)", database)).Run()
	case "mysql":
		password, _ := u.User.Password()
		cmd := exec.Command("mysql", "-h", u.Hostname(), "-P", u.Port(), "-u", u.User.Username(),
			"-e", fmt.Sprintf("DROP DATABASE IF EXISTS `%s`", database))
		cmd.Env = append(os.Environ(), "MYSQL_PWD="+password)
		_ = cmd.Run()
	}
}
