//go:build tools

// Package tools records the Kubernetes main packages this module builds, so
// that `go mod tidy` keeps their dependencies in go.sum: the control plane
// (kube-apiserver, kubectl) for the apiserver-only tier, and the node
// (kubelet, kube-proxy, kube-controller-manager, kube-scheduler) for the
// node tier.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
