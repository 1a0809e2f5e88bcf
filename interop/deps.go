//go:build tools

// Package interop pins, for `go mod tidy`, the Coder commands the suite builds
// beside its test binary: the real `coder` CLI (server, agent, ssh --stdio).
package interop

import (
	_ "github.com/coder/coder/v2/cmd/coder"
)
