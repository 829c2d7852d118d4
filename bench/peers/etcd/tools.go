//go:build tools

// The etcd server and etcdctl: go build -o DIR go.etcd.io/etcd/server/v3.
package tools

import (
	_ "go.etcd.io/etcd/etcdctl/v3"
	_ "go.etcd.io/etcd/server/v3"
)
