//go:build tools

// kine: go build -o DIR github.com/k3s-io/kine.
package tools

import (
	_ "github.com/k3s-io/kine"
)
