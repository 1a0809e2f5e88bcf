package interop

// Side-by-side benchmarks on one real deployment (relay only, so both
// clients take the DERP path): coder-proxy against the real
// `coder ssh --stdio`, alternating run by run. Run by scripts/bench.sh:
//
//	interop.test -test.run '^$' -test.bench SideBySide -test.benchtime 1x
//
// It writes a markdown table to $INTEROP_BENCH_OUT (ratios are
// coder-proxy ÷ coder CLI). Knobs: INTEROP_BENCH_RUNS (9),
// INTEROP_BENCH_XFER_RUNS (3), INTEROP_BENCH_XFER_MIB (256),
// INTEROP_BENCH_SESSIONS (20).

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime/debug"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func TestMain(m *testing.M) {
	// `interop.test __wrap OUT PROG ARGS...` runs PROG as a ProxyCommand
	// and records its CPU time and peak RSS (see wrap).
	if len(os.Args) > 3 && os.Args[1] == "__wrap" {
		os.Exit(wrap(os.Args[2], os.Args[3], os.Args[4:]))
	}
	os.Exit(m.Run())
}

// wrap runs prog with our stdio, forwards SIGHUP/SIGTERM/SIGINT, writes its
// pid to OUT.pid at start and "cpu_seconds peak_rss_kib exit_code" to OUT
// at the end. Peak RSS is VmHWM sampled from /proc (rusage's maxrss would
// include the wrapper's own image).
func wrap(out, prog string, args []string) int {
	cmd := exec.Command(prog, args...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	if err := cmd.Start(); err != nil {
		fmt.Fprintf(os.Stderr, "wrap: %v\n", err)
		return 127
	}
	_ = os.WriteFile(out+".pid", []byte(strconv.Itoa(cmd.Process.Pid)), 0o644)
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGHUP, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		for s := range sigs {
			_ = cmd.Process.Signal(s)
		}
	}()
	var peak int64
	stop := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		for {
			if kib := procStatusKiB(cmd.Process.Pid, "VmHWM:"); kib > peak {
				peak = kib
			}
			select {
			case <-stop:
				return
			case <-time.After(10 * time.Millisecond):
			}
		}
	}()
	// The last sample is at most 10 ms old when it exits (a zombie has no
	// VmHWM left to read).
	_ = cmd.Wait()
	close(stop)
	<-sampled
	info, _ := cmd.ProcessState.SysUsage().(*syscall.Rusage)
	if info == nil {
		info = &syscall.Rusage{}
	}
	ws, _ := cmd.ProcessState.Sys().(syscall.WaitStatus)
	cpu := time.Duration(info.Utime.Nano() + info.Stime.Nano()).Seconds()
	code := ws.ExitStatus()
	if ws.Signaled() {
		code = 128 + int(ws.Signal())
	}
	_ = os.WriteFile(out, []byte(fmt.Sprintf("%f %d %d\n", cpu, peak, code)), 0o644)
	return code
}

// procStatusKiB reads a "Name:   N kB" field of /proc/PID/status.
func procStatusKiB(pid int, field string) int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	return kibField(string(b), field)
}

func kibField(text, field string) int64 {
	for _, line := range strings.Split(text, "\n") {
		if strings.HasPrefix(line, field) {
			f := strings.Fields(line[len(field):])
			if len(f) > 0 {
				n, _ := strconv.ParseInt(f[0], 10, 64)
				return n
			}
		}
	}
	return 0
}

type rusage struct {
	cpu    float64
	hwmKiB int64
	code   int
}

// readRusage waits for the wrapper's record: OpenSSH does not wait for its
// ProxyCommand to exit (it sends SIGHUP and goes), so the record can land
// after ssh is gone.
func readRusage(t testing.TB, path string) rusage {
	t.Helper()
	var b []byte
	var err error
	for deadline := time.Now().Add(15 * time.Second); ; {
		b, err = os.ReadFile(path)
		if err == nil || time.Now().After(deadline) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	require.NoError(t, err, "the wrapper wrote no rusage")
	var r rusage
	_, err = fmt.Sscan(string(b), &r.cpu, &r.hwmKiB, &r.code)
	require.NoError(t, err)
	return r
}

func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return def
}

// benchClient is a client under test plus how to run it bare (for the
// first-byte measurement) and wrapped (for CPU and RSS).
type benchClient struct {
	client
	bare []string
}

func benchClients() []benchClient {
	return []benchClient{
		{client: coderProxy("tailnet"), bare: []string{proxyBin(), "--tunnel", "tailnet", workspaceName + ".coder"}},
		{client: coderCLI(), bare: []string{cliBin(), "ssh", "--stdio", workspaceName}},
	}
}

// wrapped is c's ProxyCommand recording its rusage in out.
func wrapped(c client, out string) client {
	self, _ := os.Executable()
	c.proxyCommand = fmt.Sprintf("%s __wrap %s %s", shellQuote(self), shellQuote(out), c.proxyCommand)
	return c
}

// series collects one measurement per client.
type series map[string][]float64

func (s series) add(name string, v float64) { s[name] = append(s[name], v) }

func median(v []float64) (med, lo, hi float64) {
	if len(v) == 0 {
		return 0, 0, 0
	}
	c := append([]float64(nil), v...)
	sort.Float64s(c)
	n := len(c)
	med = c[n/2]
	if n%2 == 0 {
		med = (c[n/2-1] + c[n/2]) / 2
	}
	return med, c[0], c[n-1]
}

func BenchmarkSideBySide(b *testing.B) {
	requireCLI(b)
	d := newDeployment(b, deployOpts{blockDirect: true, startAgent: true})
	runs := envInt("INTEROP_BENCH_RUNS", 9)
	xferRuns := envInt("INTEROP_BENCH_XFER_RUNS", 3)
	xferMiB := envInt("INTEROP_BENCH_XFER_MIB", 256)
	sessions := envInt("INTEROP_BENCH_SESSIONS", 20)
	clients := benchClients()
	tmp := b.TempDir()
	ours, peer := clients[0].name, clients[1].name

	firstByte, sshTrue := series{}, series{}
	upRate, downRate, upCPU, downCPU, xferRSS, idleRSS := series{}, series{}, series{}, series{}, series{}, series{}
	// CPU of this process (coderd with its DERP relay, the agent and its
	// SSH server, the harness) per GiB: on two CPUs it bounds throughput.
	upServer, downServer := series{}, series{}
	for i := 0; i < runs; i++ {
		for j := range clients {
			c := clients[(i+j)%len(clients)]
			firstByte.add(c.name, benchFirstByte(b, d, c).Seconds()*1000)
			start := time.Now()
			p := d.ssh(c.client, nil, nil, "true")
			require.Equal(b, 0, p.wait(time.Minute), "ssh true via %s: %s", c.name, p.stderr.String())
			sshTrue.add(c.name, time.Since(start).Seconds()*1000)
		}
	}
	gib := float64(xferMiB) / 1024
	for i := 0; i < xferRuns; i++ {
		for j := range clients {
			c := clients[(i+j)%len(clients)]
			self0 := selfCPU()
			secs, ru := benchUpload(b, d, c.client, filepath.Join(tmp, fmt.Sprintf("up-%d-%d", i, j)), xferMiB)
			upServer.add(c.name, (selfCPU()-self0)/gib)
			upRate.add(c.name, float64(xferMiB)/secs)
			upCPU.add(c.name, ru.cpu/gib)
			xferRSS.add(c.name, float64(ru.hwmKiB)/1024)
			self0 = selfCPU()
			secs, ru = benchDownload(b, d, c.client, filepath.Join(tmp, fmt.Sprintf("down-%d-%d", i, j)), xferMiB)
			downServer.add(c.name, (selfCPU()-self0)/gib)
			downRate.add(c.name, float64(xferMiB)/secs)
			downCPU.add(c.name, ru.cpu/gib)
			xferRSS.add(c.name, float64(ru.hwmKiB)/1024)
			out := filepath.Join(tmp, fmt.Sprintf("idle-%d-%d", i, j))
			p := d.ssh(wrapped(c.client, out), nil, nil, "sleep 2")
			require.Equal(b, 0, p.wait(time.Minute), "idle via %s: %s", c.name, p.stderr.String())
			idleRSS.add(c.name, float64(readRusage(b, out).hwmKiB)/1024)
		}
	}
	concRSS, concPSS, concCPU := map[string]float64{}, map[string]float64{}, map[string]float64{}
	for _, c := range clients {
		rss, pss, cpu := benchConcurrent(b, d, c.client, filepath.Join(tmp, "conc-"+strings.ReplaceAll(c.name, "/", "_")), sessions)
		concRSS[c.name], concPSS[c.name], concCPU[c.name] = rss, pss, cpu
	}

	var md strings.Builder
	fmt.Fprintf(&md, "Real coderd %s (in-process, embedded DERP relay, relay only), real agent, real OpenSSH; %s vs %s (`coder ssh --stdio`, built from the same module), alternating. Medians (min–max); ratio = coder-proxy ÷ coder CLI.\n\n",
		coderVersion(), ours, peer)
	md.WriteString("| measurement | coder-proxy | coder ssh --stdio | ratio | target |\n|---|---|---|---|---|\n")
	row := func(name, unit string, s series, target string, lowerBetter bool, limit float64) {
		m1, lo1, hi1 := median(s[ours])
		m2, lo2, hi2 := median(s[peer])
		ratio := m1 / m2
		verdict := target + ": met"
		switch {
		case target == "—":
			verdict = "—"
		case (lowerBetter && ratio > limit) || (!lowerBetter && ratio < limit):
			verdict = target + ": **missed**"
		}
		fmt.Fprintf(&md, "| %s | %.1f %s (%.1f–%.1f) | %.1f %s (%.1f–%.1f) | %.2f× | %s |\n",
			name, m1, unit, lo1, hi1, m2, unit, lo2, hi2, ratio, verdict)
	}
	row("process start → first SSH byte", "ms", firstByte, "≤ 0.5×", true, 0.5)
	row("`ssh host true`", "ms", sshTrue, "—", true, 1e9)
	row(fmt.Sprintf("ssh upload, %d MiB", xferMiB), "MiB/s", upRate, "≥ 2×", false, 2)
	row(fmt.Sprintf("ssh download, %d MiB", xferMiB), "MiB/s", downRate, "≥ 2×", false, 2)
	row("CPU per GiB, upload", "s", upCPU, "≤ 0.5×", true, 0.5)
	row("CPU per GiB, download", "s", downCPU, "≤ 0.5×", true, 0.5)
	row("server side (coderd + relay + agent) CPU per GiB, upload", "s", upServer, "—", true, 0)
	row("server side (coderd + relay + agent) CPU per GiB, download", "s", downServer, "—", true, 0)
	row("peak RSS, idle session", "MiB", idleRSS, "≤ 0.25×", true, 0.25)
	row("peak RSS, during a transfer", "MiB", xferRSS, "≤ 0.25×", true, 0.25)
	fmt.Fprintf(&md, "| %d concurrent sessions: total RSS | %.1f MiB | %.1f MiB | %.2f× | ≤ 0.25× |\n", sessions, concRSS[ours], concRSS[peer], concRSS[ours]/concRSS[peer])
	fmt.Fprintf(&md, "| %d concurrent sessions: total PSS | %.1f MiB | %.1f MiB | %.2f× | — |\n", sessions, concPSS[ours], concPSS[peer], concPSS[ours]/concPSS[peer])
	fmt.Fprintf(&md, "| %d concurrent sessions: total CPU | %.2f s | %.2f s | %.2f× | — |\n", sessions, concCPU[ours], concCPU[peer], concCPU[ours]/concCPU[peer])
	fmt.Fprintf(&md, "\nRuns: %d (start-up), %d × %d MiB each way (transfers). Machine: %s.\n", runs, xferRuns, xferMiB, machine())
	b.Log("\n" + md.String())
	if out := os.Getenv("INTEROP_BENCH_OUT"); out != "" {
		require.NoError(b, os.WriteFile(out, []byte(md.String()), 0o644))
	}
}

// benchFirstByte runs the client bare, as OpenSSH would (stdin open and
// silent), and times process start → first byte on stdout (the agent's
// SSH banner).
func benchFirstByte(t testing.TB, d *deployment, c benchClient) time.Duration {
	t.Helper()
	cmd := exec.Command(c.bare[0], c.bare[1:]...)
	cmd.Env = d.clientEnv(d.user.SessionToken())
	stdin, err := cmd.StdinPipe()
	require.NoError(t, err)
	stdout, err := cmd.StdoutPipe()
	require.NoError(t, err)
	start := time.Now()
	require.NoError(t, cmd.Start())
	var one [1]byte
	_, err = io.ReadFull(stdout, one[:])
	took := time.Since(start)
	require.NoError(t, err, "%s wrote nothing", c.name)
	_ = stdin.Close()
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		_ = cmd.Process.Kill()
		<-done
	}
	return took
}

// benchUpload sends n MiB of zeros into `cat >/dev/null`; returns the
// data phase (first stdin read → exit) and the ProxyCommand's rusage.
func benchUpload(t testing.TB, d *deployment, c client, out string, n int) (float64, rusage) {
	t.Helper()
	src := &timedReader{r: io.LimitReader(zeros{}, int64(n)<<20)}
	p := d.ssh(wrapped(c, out), src, nil, "cat >/dev/null")
	require.Equal(t, 0, p.wait(10*time.Minute), "upload via %s: %s", c.name, p.stderr.String())
	return p.ended.Sub(src.first()).Seconds(), readRusage(t, out)
}

// benchDownload reads n MiB of zeros from the agent; returns the data phase
// (first byte → EOF) and the ProxyCommand's rusage.
func benchDownload(t testing.TB, d *deployment, c client, out string, n int) (float64, rusage) {
	t.Helper()
	wc := wrapped(c, out)
	args := append(sshOptions(wc), wc.host, fmt.Sprintf("head -c %d /dev/zero", n<<20))
	cmd := exec.Command("ssh", args...)
	cmd.Env = d.clientEnv(d.user.SessionToken())
	stdout, err := cmd.StdoutPipe()
	require.NoError(t, err)
	require.NoError(t, cmd.Start())
	r := bufio.NewReaderSize(stdout, 1<<20)
	_, err = r.Peek(1)
	require.NoError(t, err)
	first := time.Now()
	got, _ := io.Copy(io.Discard, r)
	secs := time.Since(first).Seconds()
	require.NoError(t, cmd.Wait(), "download via %s", c.name)
	require.Equal(t, int64(n)<<20, got, "download via %s: short", c.name)
	return secs, readRusage(t, out)
}

// benchConcurrent holds n sessions open at once and returns the clients'
// total RSS and PSS (MiB) with all up, and their total CPU seconds.
func benchConcurrent(t testing.TB, d *deployment, c client, dir string, n int) (rss, pss, cpu float64) {
	t.Helper()
	require.NoError(t, os.MkdirAll(dir, 0o755))
	procs := make([]*proc, n)
	outs := make([]string, n)
	for i := range procs {
		outs[i] = filepath.Join(dir, strconv.Itoa(i))
		procs[i] = d.ssh(wrapped(c, outs[i]), nil, nil, "echo up; sleep 15")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	require.True(t, eventually(ctx, 3*time.Minute, 50*time.Millisecond, func() bool {
		for _, p := range procs {
			if !strings.Contains(p.stdout.String(), "up") {
				return false
			}
		}
		return true
	}), "not all %d sessions came up via %s", n, c.name)
	for _, o := range outs {
		b, err := os.ReadFile(o + ".pid")
		require.NoError(t, err)
		pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
		rss += float64(procStatusKiB(pid, "VmRSS:")) / 1024
		if roll, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps_rollup", pid)); err == nil {
			pss += float64(kibField(string(roll), "Pss:")) / 1024
		}
	}
	var wg sync.WaitGroup
	for _, p := range procs {
		wg.Add(1)
		go func(p *proc) { defer wg.Done(); p.wait(2 * time.Minute) }(p)
	}
	wg.Wait()
	for _, o := range outs {
		cpu += readRusage(t, o).cpu
	}
	return rss, pss, cpu
}

// selfCPU is this process's user + system CPU seconds so far.
func selfCPU() float64 {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano()).Seconds()
}

type zeros struct{}

func (zeros) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
}

// timedReader notes when it was first read.
type timedReader struct {
	r  io.Reader
	mu sync.Mutex
	at time.Time
}

func (t *timedReader) Read(p []byte) (int, error) {
	t.mu.Lock()
	if t.at.IsZero() {
		t.at = time.Now()
	}
	t.mu.Unlock()
	return t.r.Read(p)
}

func (t *timedReader) first() time.Time {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.at
}

// coderVersion is the Coder module this suite is built from (the binaries
// call themselves v0.0.0-devel: no release ldflags). scripts/interop.sh
// passes it from `go list -m`; a test binary's build info may not list it.
func coderVersion() string {
	if v := os.Getenv("INTEROP_CODER_VERSION"); v != "" {
		return v
	}
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, m := range bi.Deps {
			if m.Path == "github.com/coder/coder/v2" {
				return m.Version
			}
		}
	}
	return "(unknown version)"
}

func machine() string {
	cpu := "unknown CPU"
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if strings.HasPrefix(l, "model name") {
				cpu = strings.TrimSpace(l[strings.Index(l, ":")+1:])
				break
			}
		}
	}
	load, _ := os.ReadFile("/proc/loadavg")
	return fmt.Sprintf("%s, %d CPUs, load %s", cpu, numCPU(), strings.Join(strings.Fields(string(load))[:3], " "))
}

func numCPU() int {
	n := 0
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		n = strings.Count(string(b), "processor\t:")
	}
	return n
}
