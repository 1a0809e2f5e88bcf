package interop

// The peer, side by side: scenarios 1, 4 and 5 (and leaving) with the real Coder CLI
// (`coder ssh --stdio`, built from the same module) as the ProxyCommand.
// The CLI must do the basics (that checks the harness); where it behaves
// differently from coder-proxy in scenarios 4 and 5 the difference is
// recorded in $INTEROP_REPORT, not failed.

import (
	"testing"

	"github.com/coder/coder/v2/codersdk"
)

func TestPeerCoderCLISessionBasics(t *testing.T) {
	requireCLI(t)
	d := newDeployment(t, deployOpts{startAgent: true})
	sessionBasics(t, d, checker{t: t, c: coderCLI(), strict: true})
}

func TestPeerCoderCLIAgentDisconnected(t *testing.T) {
	requireCLI(t)
	agentDisconnected(t, coderCLI(), false)
}

func TestPeerCoderCLIStop(t *testing.T) {
	requireCLI(t)
	workspaceGoesAway(t, coderCLI(), codersdk.WorkspaceTransitionStop, false)
}

// The CLI ends its coordination gracefully: the expectation coder-proxy is
// held to in TestAgentForgetsClientAfterSession.
func TestPeerCoderCLIAgentForgetsClient(t *testing.T) {
	requireCLI(t)
	agentForgetsClient(t, coderCLI())
}

// A silently dead relay connection mid-upload, with the real CLI.
func TestPeerCoderCLISilentRelayDeath(t *testing.T) {
	requireCLI(t)
	silentRelayDeath(t, coderCLI(), false)
}
