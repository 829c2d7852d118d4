//go:build tools

// The Kubernetes commands the end-to-end run uses, built from this module:
// go build -o DIR k8s.io/kubernetes/cmd/kube-apiserver (see scripts/kube-build.sh).
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
