//go:build tools

// Package tools records the containerd main packages the node tier builds
// (containerd, its runc shim, ctr), so that `go mod tidy` keeps their
// dependencies in go.sum. Built by scripts/build-node.sh.
package tools

import (
	_ "github.com/containerd/containerd/v2/cmd/containerd"
	_ "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2"
	_ "github.com/containerd/containerd/v2/cmd/ctr"
)
