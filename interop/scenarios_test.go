package interop

// The real-Coder scenarios: real OpenSSH through coder-proxy (and, where a
// scenario says so, through the real `coder ssh --stdio`) to a real agent
// of a real coderd.

import (
	"context"
	"fmt"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/coder/coder/v2/coderd/coderdtest"
	"github.com/coder/coder/v2/coderd/rbac"
	"github.com/coder/coder/v2/codersdk"
)

const mib = 1 << 20

// checker turns a scenario's expectations into failures for coder-proxy and
// into recorded differences for the peer (the real CLI), whose behaviour we
// document rather than dictate.
type checker struct {
	t      *testing.T
	c      client
	strict bool
}

func (k checker) check(ok bool, format string, args ...any) bool {
	k.t.Helper()
	if ok {
		return true
	}
	msg := fmt.Sprintf(format, args...)
	if k.strict {
		k.t.Errorf("%s: %s", k.c.name, msg)
	} else {
		recordDifference(k.t, k.c, msg)
	}
	return false
}

// note records an observation about a client (timings, messages) in the
// side-by-side report.
func (k checker) note(format string, args ...any) {
	k.t.Helper()
	msg := fmt.Sprintf(format, args...)
	k.t.Logf("%s: %s", k.c.name, msg)
	appendReport(k.t, fmt.Sprintf("- %s — %s: %s", k.t.Name(), k.c.name, msg))
}

var reportMu sync.Mutex

// appendReport adds a line to $INTEROP_REPORT (the side-by-side notes).
func appendReport(t *testing.T, line string) {
	path := os.Getenv("INTEROP_REPORT")
	if path == "" {
		return
	}
	reportMu.Lock()
	defer reportMu.Unlock()
	f, err := os.OpenFile(path, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		t.Logf("report: %v", err)
		return
	}
	defer f.Close()
	_, _ = fmt.Fprintln(f, line)
}

func recordDifference(t *testing.T, c client, msg string) {
	t.Helper()
	t.Logf("DIFFERENCE %s: %s", c.name, msg)
	appendReport(t, fmt.Sprintf("- %s — %s differs: %s", t.Name(), c.name, msg))
}

// --- Scenario 1: exec, pty, scp both ways, sftp --------------------------

func TestSessionBasicsOverTailnet(t *testing.T) {
	d := newDeployment(t, deployOpts{startAgent: true})
	sessionBasics(t, d, checker{t: t, c: coderProxy("tailnet"), strict: true})
}

func TestSessionBasicsWithTunnelAuto(t *testing.T) {
	d := newDeployment(t, deployOpts{startAgent: true})
	sessionBasics(t, d, checker{t: t, c: coderProxy("auto"), strict: true})
}

func sessionBasics(t *testing.T, d *deployment, k checker) {
	c := k.c
	t.Run("exec_with_exit_status", func(t *testing.T) {
		k := k
		k.t = t
		d := d.with(t)
		p := d.ssh(c, nil, nil, "echo hello-from-agent; echo to-stderr >&2; exit 7")
		code := p.wait(2 * time.Minute)
		k.check(code == 7, "exit status %d, want 7; stderr:\n%s", code, p.stderr.String())
		k.check(p.stdout.String() == "hello-from-agent\n", "stdout %q", p.stdout.String())
		k.check(strings.Contains(p.stderr.String(), "to-stderr"), "remote stderr missing")
	})
	t.Run("pty_shell", func(t *testing.T) {
		k := k
		k.t = t
		d := d.with(t)
		script := "tty; echo TERM=$TERM; exit 3\n"
		p := d.ssh(c, strings.NewReader(script), []string{"-tt", "-o", "SetEnv=TERM=xterm-256color"})
		code := p.wait(2 * time.Minute)
		out := p.stdout.String()
		k.check(code == 3, "exit status %d, want 3; stderr:\n%s", code, p.stderr.String())
		k.check(strings.Contains(out, "/dev/pts/"), "no pty: %q", out)
		k.check(strings.Contains(out, "TERM=xterm-256color"), "TERM not passed: %q", out)
	})
	dir := t.TempDir()
	src := randomFile(t, dir, 64*mib, 42)
	want := sha256File(t, src)
	t.Run("scp_64MiB_up_and_down", func(t *testing.T) {
		k := k
		k.t = t
		d := d.with(t)
		remote := filepath.Join(dir, "remote-copy.bin")
		start := time.Now()
		d.runOK("scp", append(sshOptions(c), src, c.host+":"+remote)...)
		up := time.Since(start)
		k.check(sha256File(t, remote) == want, "upload: sha256 differs")
		back := filepath.Join(dir, "downloaded.bin")
		start = time.Now()
		d.runOK("scp", append(sshOptions(c), c.host+":"+remote, back)...)
		down := time.Since(start)
		k.check(sha256File(t, back) == want, "download: sha256 differs")
		t.Logf("%s: scp 64 MiB up %.1f MiB/s, down %.1f MiB/s", c.name, 64/up.Seconds(), 64/down.Seconds())
	})
	t.Run("sftp_put_get_ls_rm", func(t *testing.T) {
		k := k
		k.t = t
		d := d.with(t)
		remote := filepath.Join(dir, "sftp-remote.bin")
		back := filepath.Join(dir, "sftp-back.bin")
		batch := filepath.Join(dir, "batch")
		require.NoError(t, os.WriteFile(batch, []byte(fmt.Sprintf(
			"put %s %s\nls -l %s\nget %s %s\nrm %s\n", src, remote, remote, remote, back, remote)), 0o644))
		p := d.runOK("sftp", append(sshOptions(c), "-b", batch, c.host)...)
		k.check(sha256File(t, back) == want, "sftp round trip: sha256 differs")
		k.check(strings.Contains(p.stdout.String(), filepath.Base(remote)), "ls output lacks the file: %q", p.stdout.String())
		_, err := os.Stat(remote)
		k.check(os.IsNotExist(err), "rm did not remove the remote file")
	})
}

// --- Scenario 2: DERP by upgrade and websocket; relay-only and direct ---
// (and the same over https, coderd's TLS and ALPN in the way).

func TestRelayModes(t *testing.T) {
	for _, m := range []struct {
		name string
		o    deployOpts
	}{
		{"derp_upgrade_block_direct", deployOpts{blockDirect: true}},
		{"derp_upgrade_direct_allowed", deployOpts{}},
		{"derp_websockets_block_direct", deployOpts{blockDirect: true, forceWebsockets: true}},
		{"derp_websockets_direct_allowed", deployOpts{forceWebsockets: true}},
		{"https_derp_upgrade", deployOpts{https: true}},
		{"https_derp_websockets", deployOpts{https: true, forceWebsockets: true}},
	} {
		t.Run(m.name, func(t *testing.T) {
			o := m.o
			o.startAgent = true
			d := newDeployment(t, o)
			c := coderProxy("tailnet")
			data := randomFile(t, t.TempDir(), 16*mib, 7)
			f, err := os.Open(data)
			require.NoError(t, err)
			defer f.Close()
			p := d.ssh(c, f, nil, "sha256sum | cut -d' ' -f1")
			code := p.wait(3 * time.Minute)
			require.Equal(t, 0, code, "stderr:\n%s", p.stderr.String())
			require.Equal(t, sha256File(t, data)+"\n", p.stdout.String())
			log := p.stderr.String()
			if o.forceWebsockets {
				require.Contains(t, log, "websocket /derp upgraded", "DERP did not use a websocket")
			} else {
				require.NotContains(t, log, "websocket /derp upgraded", "DERP used a websocket though the upgrade is allowed")
			}
		})
	}
}

// --- Scenario 3: autostart -----------------------------------------------

func TestAutostartStoppedWorkspace(t *testing.T) {
	d := newDeployment(t, deployOpts{})
	d.build(codersdk.WorkspaceTransitionStop)

	c := coderProxy("tailnet")
	p := d.ssh(c, nil, nil, "echo started")
	// The agent comes up once coder-proxy has started the workspace (as
	// a real VM's agent would).
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	require.True(t, eventually(ctx, 2*time.Minute, 100*time.Millisecond, func() bool {
		ws, err := d.user.Workspace(ctx, d.workspace.ID)
		return err == nil && ws.LatestBuild.Transition == codersdk.WorkspaceTransitionStart &&
			ws.LatestBuild.BuildNumber >= 3
	}), "coder-proxy did not start the workspace; stderr:\n%s", p.stderr.String())
	d.startAgent()
	code := p.wait(3 * time.Minute)
	log := p.stderr.String()
	require.Equal(t, 0, code, "stderr:\n%s", log)
	require.Equal(t, "started\n", p.stdout.String())
	require.Contains(t, log, "Workspace was stopped, starting workspace")
	require.Contains(t, log, buildLogLine, "the build log did not reach stderr")
}

// --- Scenario 4: the agent disconnected from coderd, data path up --------

func TestAgentDisconnectedWhileDataPathUp(t *testing.T) {
	agentDisconnected(t, coderProxy("tailnet"), true)
}

func agentDisconnected(t *testing.T, c client, strict bool) {
	k := checker{t: t, c: c, strict: strict}
	d := newDeployment(t, deployOpts{agentProxy: true, startAgent: true})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	statuses := watchAgentStatus(ctx, t, d)

	// 32 MiB at 2 MiB/s; the last quarter only once the agent is back.
	src := newPacedReader(32*mib, 2*mib, 99)
	gate := newGate(src, 24*mib)
	p := d.ssh(c, gate, nil, "sha256sum | cut -d' ' -f1")
	require.True(t, eventually(ctx, time.Minute, 50*time.Millisecond, func() bool { return src.Progress() >= 4*mib }),
		"the transfer did not start; stderr:\n%s", p.stderr.String())

	const rpc = "/api/v2/workspaceagents/me/rpc"
	d.agentProxy.Block(rpc)
	cut := d.agentProxy.Cut(rpc)
	require.Positive(t, cut, "no agent RPC connection to cut")
	cutAt := time.Now()
	require.True(t, statuses.await(ctx, time.Minute, codersdk.WorkspaceAgentDisconnected),
		"coderd's watch never showed the agent disconnected (saw %v)", statuses.seen())
	t.Logf("watch showed the agent disconnected %.1fs after the cut", time.Since(cutAt).Seconds())
	// Stay disconnected a while, data still flowing.
	before := src.Progress()
	time.Sleep(5 * time.Second)
	k.check(src.Progress() > before, "no data moved while the agent was disconnected")
	k.check(!p.exited(), "the session ended while the agent was disconnected; stderr:\n%s", p.stderr.String())

	d.agentProxy.Unblock()
	require.True(t, statuses.await(ctx, 2*time.Minute, codersdk.WorkspaceAgentConnected),
		"the agent did not reconnect (saw %v)", statuses.seen())
	gate.open()
	code := p.wait(3 * time.Minute)
	k.check(code == 0, "exit %d; stderr:\n%s", code, p.stderr.String())
	k.check(p.stdout.String() == src.Sum()+"\n", "bytes lost: remote sha256 %q, sent %q", strings.TrimSpace(p.stdout.String()), src.Sum())
	if code == 0 {
		k.note("survived the agent being disconnected from coderd for %.0fs with the data path up", time.Since(cutAt).Seconds())
	}
}

// gate passes a reader through until at bytes, then holds until opened.
type gate struct {
	r    *pacedReader
	at   int
	ch   chan struct{}
	once sync.Once
}

func newGate(r *pacedReader, at int) *gate {
	return &gate{r: r, at: at, ch: make(chan struct{})}
}

func (g *gate) open() { g.once.Do(func() { close(g.ch) }) }

func (g *gate) Read(p []byte) (int, error) {
	if sent := g.r.Progress(); sent >= g.at {
		<-g.ch
	} else if len(p) > g.at-sent {
		p = p[:g.at-sent]
	}
	return g.r.Read(p)
}

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// statusWatch follows the agent's status through coderd's watch stream
// (the same server-sent events coder-proxy reads).
type statusWatch struct {
	mu      sync.Mutex
	history []codersdk.WorkspaceAgentStatus
	changed chan struct{}
}

func watchAgentStatus(ctx context.Context, t *testing.T, d *deployment) *statusWatch {
	t.Helper()
	updates, err := d.user.WatchWorkspace(ctx, d.workspace.ID)
	require.NoError(t, err)
	w := &statusWatch{changed: make(chan struct{}, 1)}
	go func() {
		for ws := range updates {
			for _, r := range ws.LatestBuild.Resources {
				for _, a := range r.Agents {
					if a.Name != agentName {
						continue
					}
					w.mu.Lock()
					if n := len(w.history); n == 0 || w.history[n-1] != a.Status {
						w.history = append(w.history, a.Status)
					}
					w.mu.Unlock()
					select {
					case w.changed <- struct{}{}:
					default:
					}
				}
			}
		}
	}()
	return w
}

func (w *statusWatch) seen() []codersdk.WorkspaceAgentStatus {
	w.mu.Lock()
	defer w.mu.Unlock()
	return append([]codersdk.WorkspaceAgentStatus(nil), w.history...)
}

// await waits until the latest status is s.
func (w *statusWatch) await(ctx context.Context, limit time.Duration, s codersdk.WorkspaceAgentStatus) bool {
	deadline := time.After(limit)
	for {
		h := w.seen()
		if len(h) > 0 && h[len(h)-1] == s {
			return true
		}
		select {
		case <-w.changed:
		case <-deadline:
			return false
		case <-ctx.Done():
			return false
		}
	}
}

// --- Scenario 5: stop and delete end the session ------------------------

func TestStopEndsSession(t *testing.T) {
	workspaceGoesAway(t, coderProxy("tailnet"), codersdk.WorkspaceTransitionStop, true)
}

func TestDeleteEndsSession(t *testing.T) {
	workspaceGoesAway(t, coderProxy("tailnet"), codersdk.WorkspaceTransitionDelete, true)
}

func workspaceGoesAway(t *testing.T, c client, transition codersdk.WorkspaceTransition, strict bool) {
	k := checker{t: t, c: c, strict: strict}
	d := newDeployment(t, deployOpts{startAgent: true})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	p := d.ssh(c, nil, nil, "echo session-up; sleep 600")
	require.True(t, eventually(ctx, 2*time.Minute, 20*time.Millisecond, func() bool {
		return strings.Contains(p.stdout.String(), "session-up") || p.exited()
	}), "the session did not come up; stderr:\n%s", p.stderr.String())
	require.False(t, p.exited(), "the session ended early; stderr:\n%s", p.stderr.String())

	b, err := d.user.CreateWorkspaceBuild(ctx, d.workspace.ID, codersdk.CreateWorkspaceBuildRequest{Transition: transition})
	require.NoError(t, err)
	final := codersdk.WorkspaceStatusStopped
	if transition == codersdk.WorkspaceTransitionDelete {
		final = codersdk.WorkspaceStatusDeleted
	}
	var doneAt time.Time
	require.True(t, eventually(ctx, 2*time.Minute, 20*time.Millisecond, func() bool {
		got, err := d.user.WorkspaceBuild(ctx, b.ID)
		if err == nil && got.Status == final {
			doneAt = time.Now()
			return true
		}
		return false
	}), "the %s build did not finish", transition)

	select {
	case <-p.done:
	case <-time.After(30 * time.Second):
	}
	if !k.check(p.exited(), "ssh still running 30s after the workspace was %s", final) {
		return
	}
	after := p.ended.Sub(doneAt)
	code := exitCode(p.waitErr)
	k.note("ssh ended %.2fs after the build was %s (exit %d); stderr: %q", after.Seconds(), final, code, lastLine(p.stderr.String()))
	k.check(after < 5*time.Second, "ssh ended %.1fs after the build was %s (want < 5s)", after.Seconds(), final)
	want := "was stopped"
	if final == codersdk.WorkspaceStatusDeleted {
		want = "was deleted"
	}
	k.check(strings.Contains(p.stderr.String(), want), "no reason (%q) on stderr:\n%s", want, p.stderr.String())
}

func lastLine(s string) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	return lines[len(lines)-1]
}

// --- Scenario 6: coderd drops the coordinate websocket mid-transfer ------

func TestCoordinateDropMidTransfer(t *testing.T) {
	d := newDeployment(t, deployOpts{clientProxy: true, startAgent: true})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	c := coderProxy("tailnet")
	src := newPacedReader(32*mib, 4*mib, 5)
	p := d.ssh(c, src, nil, "sha256sum | cut -d' ' -f1")
	for i, at := range []int{4 * mib, 16 * mib} {
		require.True(t, eventually(ctx, time.Minute, 20*time.Millisecond, func() bool { return src.Progress() >= at }),
			"the transfer stalled; stderr:\n%s", p.stderr.String())
		n := d.clientProxy.Cut("/coordinate")
		require.Positive(t, n, "no coordinate websocket to drop")
		// The next drop only once the redial is up.
		require.True(t, eventually(ctx, 30*time.Second, 20*time.Millisecond, func() bool {
			return strings.Count(p.stderr.String(), "coordinate connection restored") >= i+1 &&
				len(d.clientProxy.Requests("/coordinate")) >= i+2
		}), "no coordinate redial; stderr:\n%s", p.stderr.String())
	}
	code := p.wait(3 * time.Minute)
	log := p.stderr.String()
	require.Equal(t, 0, code, "stderr:\n%s", log)
	require.Equal(t, src.Sum()+"\n", p.stdout.String(), "bytes lost")
	reqs := d.clientProxy.Requests("/coordinate")
	require.GreaterOrEqual(t, len(reqs), 3, "want the first dial and two redials: %v", reqs)
	for _, r := range reqs[1:] {
		u, err := url.Parse(r)
		require.NoError(t, err)
		require.NotEmpty(t, u.Query().Get("resume_token"), "a redial without the resume token: %s", r)
	}
	require.GreaterOrEqual(t, strings.Count(log, "coordinate connection restored"), 2, "stderr:\n%s", log)
	require.NotContains(t, log, "HTTP 401", "coderd refused the resume token")
}

// --- Scenario 7: bad input against real coderd ---------------------------

func TestBadInputAgainstRealCoderd(t *testing.T) {
	d := newDeployment(t, deployOpts{startAgent: true, clientProxy: true})
	// Bob is a plain member: he cannot see (let alone SSH into) Alice's
	// workspace.
	bob, _ := coderdtest.CreateAnotherUserMutators(t, d.owner, d.ownerOrg, nil, func(r *codersdk.CreateUserRequestWithOrgs) {
		r.Username = "bob"
	})
	// Carol administers templates: she can see Alice's workspace but may
	// not SSH into it (coderd checks that on the coordinate endpoint).
	carol, _ := coderdtest.CreateAnotherUserMutators(t, d.owner, d.ownerOrg, []rbac.RoleIdentifier{rbac.RoleTemplateAdmin()}, func(r *codersdk.CreateUserRequestWithOrgs) {
		r.Username = "carol"
	})
	cases := []struct {
		name, host, token string
		before            func()
		want              string
	}{
		{name: "wrong_token", host: "dev.coder", token: "AAAAAAAAAA-BBBBBBBBBBBBBBBBBBBBBBBB", want: "coder login"},
		{name: "unknown_workspace", host: "nosuch.coder", want: "not found"},
		{name: "unknown_agent", host: "dev.nosuch.coder", want: "nosuch"},
		{name: "other_users_workspace_not_visible", host: userName + "--dev.coder", token: bob.SessionToken(), want: "not found"},
		{name: "other_users_workspace_visible_without_ssh", host: userName + "--dev.coder", token: carol.SessionToken(), want: "permission to ssh"},
		{name: "coordinate_version_refused", host: "dev.coder", want: "version", before: func() {
			d.clientProxy.Rewrite("/coordinate", func(q url.Values) { q.Set("version", "3.0") })
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if tc.before != nil {
				tc.before()
			}
			token := tc.token
			if token == "" {
				token = d.user.SessionToken()
			}
			// Stdin stays open and silent, as OpenSSH's would.
			stdinR, stdinW, err := os.Pipe()
			require.NoError(t, err)
			defer stdinW.Close()
			p := d.startFor(t, proxyBin(), token, stdinR, "--tunnel", "tailnet", "--wait-timeout", "30s", tc.host)
			_ = stdinR.Close()
			code := p.wait(2 * time.Minute)
			errText := p.stderr.String()
			require.NotEqual(t, 0, code, "stderr:\n%s", errText)
			require.Empty(t, p.stdout.Bytes(), "bytes on stdout")
			lines := strings.Split(strings.TrimRight(errText, "\n"), "\n")
			require.Len(t, lines, 1, "want one line on stderr, got:\n%s", errText)
			require.Contains(t, strings.ToLower(errText), strings.ToLower(tc.want))
			require.NotContains(t, errText, token, "the token leaked")
			require.NotContains(t, errText, "panicked")
			t.Logf("%s: exit %d: %s", tc.name, code, strings.TrimSpace(errText))
			appendReport(t, fmt.Sprintf("- bad input %s: exit %d, %q", tc.name, code, strings.TrimSpace(errText)))
		})
	}
}

// --- Leaving: the agent forgets a client that ended its session ----------

// The real CLI ends its coordination with a Disconnect request, so coderd
// tells the agent the peer left (DISCONNECTED) and the agent drops it from
// WireGuard at once; a client that just hangs up is reported LOST, and the
// agent keeps it configured for a quarter of an hour. coder-proxy must leave
// like the CLI does, whichever way its session ends.
func TestAgentForgetsClientAfterSession(t *testing.T) {
	agentForgetsClient(t, coderProxy("tailnet"))
}

func agentForgetsClient(t *testing.T, c client) {
	d := newDeployment(t, deployOpts{startAgent: true})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	// The agent's WireGuard peers (by node key); coderd itself may hold
	// some, so the test looks at the ones a session adds.
	peers := func() map[string]bool {
		out := map[string]bool{}
		if conn := d.agent.TailnetConn(); conn != nil {
			for k := range conn.Status().Peer {
				out[k.String()] = true
			}
		}
		return out
	}
	before := peers()
	added := func() int {
		n := 0
		for k := range peers() {
			if !before[k] {
				n++
			}
		}
		return n
	}
	for _, end := range []struct {
		name    string
		command string
	}{
		{"remote_exit", "echo bye"},
		{"ssh_sigterm", "echo up; sleep 600"},
	} {
		t.Run(end.name, func(t *testing.T) {
			d := d.with(t)
			p := d.ssh(c, nil, nil, end.command)
			require.True(t, eventually(ctx, time.Minute, 20*time.Millisecond, func() bool {
				return added() >= 1 || p.exited()
			}), "the agent never saw the client; stderr:\n%s", p.stderr.String())
			if end.name == "ssh_sigterm" {
				require.True(t, eventually(ctx, time.Minute, 20*time.Millisecond, func() bool {
					return strings.Contains(p.stdout.String(), "up")
				}), "the session did not come up; stderr:\n%s", p.stderr.String())
				require.NoError(t, p.cmd.Process.Signal(syscall.SIGTERM))
			}
			p.wait(time.Minute)
			left := time.Now()
			gone := eventually(ctx, 15*time.Second, 50*time.Millisecond, func() bool { return added() == 0 })
			require.True(t, gone, "the agent still has the client as a peer 15s after the session ended; coder-proxy's stderr:\n%s", p.stderr.String())
			t.Logf("the agent dropped the client %.2fs after ssh exited", time.Since(left).Seconds())
		})
	}
}

// --- The relay connection dies silently mid-transfer ---------------------

// After a laptop sleep, a Wi-Fi change or a NAT expiry the connection to
// the relay can go dead with no FIN or RST. Here the client proxy freezes
// coder-proxy's DERP connection to real coderd's relay (open, nothing moves
// either way): coder-proxy must notice (a DERP ping unanswered: real relays
// only send a keep-alive every 60 s), dial the relay again and finish the
// transfer with nothing lost — the real relay handing the agent's packets
// to the new connection, soon: the real agent's TCP stack (gVisor, five
// retransmissions, the last about 6.2 s after the first send) drops a
// connection whose data goes unacknowledged for about 12.6 s. This test
// once failed that way with a 15 s redial ("operation timed out" in the
// agent's log); the download variant below is the strict check.
func TestSilentRelayDeathIsRedialed(t *testing.T) {
	silentRelayDeath(t, coderProxy("tailnet"), true)
}

func silentRelayDeath(t *testing.T, c client, strict bool) {
	k := checker{t: t, c: c, strict: strict}
	// Relay only: the real CLI would otherwise move to a direct UDP path to
	// the (local) agent and never need the relay.
	d := newDeployment(t, deployOpts{clientProxy: true, startAgent: true, blockDirect: true})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	src := newPacedReader(40*mib, 2*mib, 11)
	p := d.ssh(c, src, nil, "sha256sum | cut -d' ' -f1")
	defer d.clientProxy.Thaw()
	require.True(t, eventually(ctx, time.Minute, 20*time.Millisecond, func() bool { return src.Progress() >= 4*mib }),
		"the transfer did not start; stderr:\n%s", p.stderr.String())
	frozenAt := time.Now()
	require.Positive(t, d.clientProxy.Freeze("/derp"), "no relay connection to freeze")
	var redialAt time.Time
	redialed := eventually(ctx, 45*time.Second, 20*time.Millisecond, func() bool {
		if len(d.clientProxy.RequestsSince("/derp", frozenAt)) > 0 {
			redialAt = time.Now()
			return true
		}
		return p.exited()
	}) && !redialAt.IsZero()
	if !k.check(redialed, "no new relay connection 45s after the old one went silent") {
		code := p.wait(4 * time.Minute)
		intact := p.stdout.String() == src.Sum()+"\n"
		k.note("relay frozen mid-upload: no redial within 45s; ssh exit %d after %.0fs, bytes intact: %v, last line %q",
			code, time.Since(frozenAt).Seconds(), intact, lastLine(p.stderr.String()))
		return
	}
	took := redialAt.Sub(frozenAt)
	k.note("silent relay death → redial %.1fs (real coderd relay)", took.Seconds())
	k.check(took <= 10*time.Second, "redialed after %.1fs, too late for a real agent", took.Seconds())
	code := p.wait(4 * time.Minute)
	log := p.stderr.String()
	k.check(code == 0, "exit %d; stderr:\n%s", code, log)
	k.check(p.stdout.String() == src.Sum()+"\n", "bytes lost")
	if strict {
		require.Contains(t, log, "no answer to ping", "the silence was not found by the DERP ping probe")
	}
}

// The same while the agent is the sender (a download read slowly, so the
// agent has unacknowledged data in flight the whole time): the redial must
// beat the agent's ~12.6 s give-up, and every byte arrives.
func TestSilentRelayDeathDuringDownloadIsHealedBeforeTheAgentGivesUp(t *testing.T) {
	d := newDeployment(t, deployOpts{clientProxy: true, startAgent: true})
	const total = 24 * mib
	c := coderProxy("tailnet")
	args := append(sshOptions(c), c.host, fmt.Sprintf("head -c %d /dev/zero", total))
	cmd := exec.Command("ssh", args...)
	cmd.Env = d.clientEnv(d.user.SessionToken())
	var stderr lockedBuffer
	cmd.Stderr = &stderr
	stdout, err := cmd.StdoutPipe()
	require.NoError(t, err)
	require.NoError(t, cmd.Start())
	defer func() { _ = cmd.Process.Kill() }()
	defer d.clientProxy.Thaw()
	// Read at about 2 MiB/s: the agent's window stays full.
	var got int64
	buf := make([]byte, 64<<10)
	start := time.Now()
	var frozenAt time.Time
	for {
		n, err := stdout.Read(buf)
		got += int64(n)
		if err != nil {
			break
		}
		if frozenAt.IsZero() && got >= 4*mib {
			frozenAt = time.Now()
			require.Positive(t, d.clientProxy.Freeze("/derp"), "no relay connection to freeze")
		}
		if due := start.Add(time.Duration(float64(got) / (2 * mib) * float64(time.Second))); time.Until(due) > 0 {
			time.Sleep(time.Until(due))
		}
	}
	waitErr := cmd.Wait()
	log := stderr.String()
	redials := d.clientProxy.RequestsSince("/derp", frozenAt)
	require.NotEmpty(t, redials, "no relay redial; stderr:\n%s", log)
	require.Equal(t, int64(total), got, "bytes lost (did the agent give up?); stderr:\n%s", log)
	require.NoError(t, waitErr, "stderr:\n%s", log)
}

// --- An HTTP proxy in the path (a corporate proxy) -----------------------

// Every connection coder-proxy makes to real coderd — REST, the coordinate
// websocket, the DERP relay — goes through a real HTTP proxy (tinyproxy,
// with Basic auth), over http and over https (CONNECT for everything).
func TestThroughHTTPProxy(t *testing.T) {
	if _, err := exec.LookPath("tinyproxy"); err != nil {
		t.Fatal("tinyproxy is required (apt-get install tinyproxy)")
	}
	for _, m := range []struct {
		name string
		o    deployOpts
	}{
		{"http_deployment", deployOpts{}},
		{"https_deployment", deployOpts{https: true}},
		{"https_deployment_derp_websockets", deployOpts{https: true, forceWebsockets: true}},
	} {
		t.Run(m.name, func(t *testing.T) {
			o := m.o
			o.startAgent = true
			d := newDeployment(t, o)
			proxy := startTinyproxy(t, d.logDir, "alice-proxy", "pr0xy-secret")
			proxyURL := "http://alice-proxy:pr0xy-secret@" + proxy.addr
			d = d.withEnv("HTTP_PROXY="+proxyURL, "HTTPS_PROXY="+proxyURL,
				// The deployment is on loopback, which proxies are
				// normally skipped for.
				"CODER_PROXY_PROXY_LOOPBACK=1")
			data := randomFile(t, t.TempDir(), 16*mib, 3)
			f, err := os.Open(data)
			require.NoError(t, err)
			defer f.Close()
			p := d.ssh(coderProxy("tailnet"), f, nil, "sha256sum | cut -d' ' -f1")
			code := p.wait(3 * time.Minute)
			log := p.stderr.String()
			require.Equal(t, 0, code, "stderr:\n%s", log)
			require.Equal(t, sha256File(t, data)+"\n", p.stdout.String())
			require.NotContains(t, log, "pr0xy-secret", "the proxy password leaked")
			coderd := d.coderdURL.Host
			connects := proxy.count("CONNECT " + coderd)
			if o.https {
				// REST, the coordinate websocket and DERP: all tunnelled.
				require.GreaterOrEqual(t, connects, 3, "proxy log:\n%s", proxy.log())
			} else {
				// The websocket and DERP upgrades are tunnelled; REST goes
				// as plain proxy requests.
				require.GreaterOrEqual(t, connects, 2, "proxy log:\n%s", proxy.log())
				require.Positive(t, proxy.count("GET http://"+coderd+"/api/v2/"), "proxy log:\n%s", proxy.log())
			}
		})
	}
}

type tinyproxy struct {
	addr    string
	logPath string
}

// startTinyproxy runs Debian's tinyproxy on a free loopback port with Basic
// auth, for the test's lifetime.
func startTinyproxy(t *testing.T, dir, user, pass string) *tinyproxy {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	port := l.Addr().(*net.TCPAddr).Port
	require.NoError(t, l.Close())
	conf := filepath.Join(dir, "tinyproxy.conf")
	logPath := filepath.Join(dir, "tinyproxy.log")
	require.NoError(t, os.WriteFile(conf, []byte(fmt.Sprintf(
		"Port %d\nListen 127.0.0.1\nTimeout 600\nLogLevel Info\nMaxClients 100\nBasicAuth %s %s\n",
		port, user, pass)), 0o600))
	out, err := os.Create(logPath)
	require.NoError(t, err)
	cmd := exec.Command("tinyproxy", "-d", "-c", conf)
	cmd.Stdout, cmd.Stderr = out, out
	require.NoError(t, cmd.Start())
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait(); _ = out.Close() })
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	require.True(t, eventually(ctx, 10*time.Second, 20*time.Millisecond, func() bool {
		c, err := net.Dial("tcp", addr)
		if err == nil {
			_ = c.Close()
		}
		return err == nil
	}), "tinyproxy did not listen on %s", addr)
	return &tinyproxy{addr: addr, logPath: logPath}
}

func (p *tinyproxy) log() string {
	b, _ := os.ReadFile(p.logPath)
	return string(b)
}

// count is how many requests the proxy logged that start with prefix
// (tinyproxy logs each as `Request (file descriptor N): METHOD TARGET HTTP/1.1`).
func (p *tinyproxy) count(prefix string) int {
	n := 0
	for _, l := range strings.Split(p.log(), "\n") {
		if i := strings.Index(l, "): "); i >= 0 && strings.Contains(l, "Request (") && strings.HasPrefix(l[i+3:], prefix) {
			n++
		}
	}
	return n
}
