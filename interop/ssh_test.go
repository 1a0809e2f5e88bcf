package interop

// Running the real OpenSSH client (ssh, scp, sftp) through a ProxyCommand —
// coder-proxy or the real `coder ssh --stdio` — against a deployment.

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// A client is what OpenSSH runs as its ProxyCommand.
type client struct {
	name string
	// The ProxyCommand, with %h for the host.
	proxyCommand string
	// The host name to give ssh.
	host string
}

// coderProxy is coder-proxy with the given --tunnel (and -v, so a failing
// test's log says what happened).
func coderProxy(tunnel string) client {
	return client{
		name:         "coder-proxy/" + tunnel,
		proxyCommand: fmt.Sprintf("%s -v --tunnel %s %%h", shellQuote(proxyBin()), tunnel),
		host:         workspaceName + ".coder",
	}
}

// coderCLI is the real Coder CLI as `coder ssh --stdio`.
func coderCLI() client {
	return client{
		name:         "coder-cli",
		proxyCommand: fmt.Sprintf("%s ssh --stdio %%h", shellQuote(cliBin())),
		host:         workspaceName,
	}
}

func proxyBin() string { return os.Getenv("CODER_PROXY_BIN") }
func cliBin() string   { return os.Getenv("CODER_CLI_BIN") }

// requireEnv fails (never skips) the test when a part the suite needs is
// missing.
func requireEnv(t testing.TB) {
	t.Helper()
	for _, bin := range []string{"ssh", "scp", "sftp"} {
		if _, err := exec.LookPath(bin); err != nil {
			t.Fatalf("%s is required (install openssh-client)", bin)
		}
	}
	if p := proxyBin(); p == "" {
		t.Fatal("CODER_PROXY_BIN must name the coder-proxy binary (scripts/interop.sh sets it)")
	} else if _, err := os.Stat(p); err != nil {
		t.Fatalf("CODER_PROXY_BIN: %v", err)
	}
}

func requireCLI(t testing.TB) {
	t.Helper()
	if p := cliBin(); p == "" {
		t.Fatal("CODER_CLI_BIN must name the real coder binary (scripts/interop.sh builds it)")
	} else if _, err := os.Stat(p); err != nil {
		t.Fatalf("CODER_CLI_BIN: %v", err)
	}
}

func shellQuote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// sshOptions are the options every OpenSSH command gets: no user config,
// no host key prompts (the agent's key is new each deployment), the
// ProxyCommand.
func sshOptions(c client) []string {
	return []string{
		"-F", "/dev/null",
		"-o", "StrictHostKeyChecking=no",
		"-o", "UserKnownHostsFile=/dev/null",
		"-o", "LogLevel=ERROR",
		"-o", "BatchMode=yes",
		"-o", "ConnectTimeout=120",
		"-o", "ServerAliveInterval=0",
		"-o", "ProxyCommand=" + c.proxyCommand,
	}
}

// lockedBuffer collects a process's output while the test reads it.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
	// Everything is also written here (a log file).
	tee io.Writer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.tee != nil {
		_, _ = b.tee.Write(p)
	}
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

func (b *lockedBuffer) Bytes() []byte {
	b.mu.Lock()
	defer b.mu.Unlock()
	return bytes.Clone(b.buf.Bytes())
}

// A proc is a running OpenSSH command.
type proc struct {
	t       testing.TB
	name    string
	cmd     *exec.Cmd
	stdout  *lockedBuffer
	stderr  *lockedBuffer
	done    chan struct{}
	waitErr error
	ended   time.Time
}

// start runs bin (ssh, scp, sftp or coder-proxy itself) with args in the
// deployment's client environment for token; stdin may be nil.
func (d *deployment) start(bin string, token string, stdin io.Reader, args ...string) *proc {
	d.t.Helper()
	return d.startFor(d.t, bin, token, stdin, args...)
}

// startFor is start for a subtest t of the deployment's test.
func (d *deployment) startFor(t testing.TB, bin string, token string, stdin io.Reader, args ...string) *proc {
	t.Helper()
	name := fmt.Sprintf("%s-%d", filepath.Base(bin), time.Now().UnixNano())
	errLog, err := os.Create(filepath.Join(d.logDir, name+".stderr"))
	require.NoError(t, err)
	t.Cleanup(func() { _ = errLog.Close() })
	p := &proc{
		t:      t,
		name:   name,
		cmd:    exec.Command(bin, args...),
		stdout: &lockedBuffer{},
		stderr: &lockedBuffer{tee: errLog},
		done:   make(chan struct{}),
	}
	p.cmd.Env = d.clientEnv(token)
	p.cmd.Stdin = stdin
	p.cmd.Stdout = p.stdout
	p.cmd.Stderr = p.stderr
	require.NoError(t, p.cmd.Start())
	go func() {
		p.waitErr = p.cmd.Wait()
		p.ended = time.Now()
		close(p.done)
	}()
	t.Cleanup(func() {
		select {
		case <-p.done:
		default:
			_ = p.cmd.Process.Kill()
			<-p.done
		}
	})
	return p
}

// ssh runs `ssh <options> host cmd...` through c as the workspace owner.
func (d *deployment) ssh(c client, stdin io.Reader, extra []string, command ...string) *proc {
	d.t.Helper()
	args := append(sshOptions(c), extra...)
	args = append(args, c.host)
	args = append(args, command...)
	return d.start("ssh", d.user.SessionToken(), stdin, args...)
}

// wait waits up to limit for the command and returns its exit code.
func (p *proc) wait(limit time.Duration) int {
	p.t.Helper()
	select {
	case <-p.done:
	case <-time.After(limit):
		_ = p.cmd.Process.Kill()
		<-p.done
		p.t.Fatalf("%s did not finish within %s; stderr:\n%s", p.name, limit, p.stderr.String())
	}
	return exitCode(p.waitErr)
}

func exitCode(err error) int {
	if err == nil {
		return 0
	}
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return ee.ExitCode()
	}
	return -1
}

// runOK runs an OpenSSH command to completion and requires exit 0.
func (d *deployment) runOK(bin string, args ...string) *proc {
	d.t.Helper()
	p := d.start(bin, d.user.SessionToken(), nil, args...)
	code := p.wait(5 * time.Minute)
	require.Equal(d.t, 0, code, "%s %v failed; stderr:\n%s", bin, args, p.stderr.String())
	return p
}

// randomFile writes n pseudo-random bytes (seeded) and returns the path.
func randomFile(t testing.TB, dir string, n int, seed uint64) string {
	t.Helper()
	path := filepath.Join(dir, fmt.Sprintf("random-%d-%d.bin", n, seed))
	f, err := os.Create(path)
	require.NoError(t, err)
	defer f.Close()
	_, err = io.CopyN(f, &xorshift{state: seed | 1}, int64(n))
	require.NoError(t, err)
	return path
}

// xorshift is a fast deterministic byte source.
type xorshift struct{ state uint64 }

func (x *xorshift) Read(p []byte) (int, error) {
	for i := 0; i < len(p); i += 8 {
		x.state ^= x.state << 13
		x.state ^= x.state >> 7
		x.state ^= x.state << 17
		v := x.state
		for j := 0; j < 8 && i+j < len(p); j++ {
			p[i+j] = byte(v >> (8 * j))
		}
	}
	return len(p), nil
}

func sha256File(t testing.TB, path string) string {
	t.Helper()
	f, err := os.Open(path)
	require.NoError(t, err)
	defer f.Close()
	h := sha256.New()
	_, err = io.Copy(h, f)
	require.NoError(t, err)
	return hex.EncodeToString(h.Sum(nil))
}

// pacedReader yields n pseudo-random bytes at about rate bytes per second,
// hashing what it hands out; gate, when set, pauses it.
type pacedReader struct {
	src   xorshift
	left  int
	rate  int
	start time.Time
	sent  int
	hash  interface {
		io.Writer
		Sum([]byte) []byte
	}
	mu sync.Mutex
}

func newPacedReader(n, rate int, seed uint64) *pacedReader {
	return &pacedReader{src: xorshift{state: seed | 1}, left: n, rate: rate, hash: sha256.New()}
}

func (r *pacedReader) Read(p []byte) (int, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.left == 0 {
		return 0, io.EOF
	}
	if r.start.IsZero() {
		r.start = time.Now()
	}
	if len(p) > 64<<10 {
		p = p[:64<<10]
	}
	if len(p) > r.left {
		p = p[:r.left]
	}
	// Hold back until the schedule allows these bytes.
	due := r.start.Add(time.Duration(float64(r.sent+len(p)) / float64(r.rate) * float64(time.Second)))
	if d := time.Until(due); d > 0 {
		r.mu.Unlock()
		time.Sleep(d)
		r.mu.Lock()
	}
	n, _ := r.src.Read(p)
	_, _ = r.hash.Write(p[:n])
	r.left -= n
	r.sent += n
	return n, nil
}

// Progress is how many bytes went out so far.
func (r *pacedReader) Progress() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.sent
}

func (r *pacedReader) Sum() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return hex.EncodeToString(r.hash.Sum(nil))
}

// eventually polls cond every interval until it holds or limit passes.
func eventually(ctx context.Context, limit, interval time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(limit)
	for {
		if cond() {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		select {
		case <-ctx.Done():
			return false
		case <-time.After(interval):
		}
	}
}
