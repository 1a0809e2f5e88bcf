package interop

// A real Coder deployment per test: coderd (in-process through coderdtest,
// with its embedded DERP relay and an echo provisioner daemon) on a fresh
// PostgreSQL database, an echo template whose workspace has one agent, and
// a real workspace agent (agenttest) with its own SSH server. Optional
// cuttable HTTP proxies sit in front of coderd for the agent (to make coderd
// see the agent disconnect while DERP keeps working) and for the client (to
// drop its coordinate websocket mid-stream).

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"cdr.dev/slog/v3"
	"cdr.dev/slog/v3/sloggers/sloghuman"
	"github.com/google/uuid"
	"github.com/stretchr/testify/require"

	"github.com/coder/coder/v2/agent"
	"github.com/coder/coder/v2/agent/agenttest"
	"github.com/coder/coder/v2/coderd/coderdtest"
	"github.com/coder/coder/v2/coderd/rbac"
	"github.com/coder/coder/v2/codersdk"
	"github.com/coder/coder/v2/codersdk/agentsdk"
	"github.com/coder/coder/v2/provisioner/echo"
	"github.com/coder/coder/v2/provisionersdk/proto"
)

// The names every deployment uses.
const (
	userName      = "alice"
	workspaceName = "dev"
	agentName     = "main"
	// A line the echo provisioner logs during every build; autostart
	// tests look for it on coder-proxy's stderr.
	buildLogLine = "interop-echo: provisioning the workspace"
)

type deployOpts struct {
	// Relay-only: coderd tells clients to disable direct connections and
	// strips STUN from the DERP map.
	blockDirect bool
	// coderd tells clients to reach DERP over websockets only.
	forceWebsockets bool
	// Start the agent at once (otherwise the test calls startAgent).
	startAgent bool
	// The agent reaches coderd through a cuttable proxy.
	agentProxy bool
	// coder-proxy and the coder CLI reach coderd through a cuttable proxy.
	clientProxy bool
	// Serve https with a certificate from a test CA, which the clients
	// trust through SSL_CERT_FILE.
	https bool
}

type deployment struct {
	t      testing.TB
	logDir string
	logger slog.Logger
	// coderd's own URL.
	coderdURL *url.URL
	// What the clients dial: coderd, or the client proxy in front of it.
	clientURL *url.URL
	owner     *codersdk.Client
	ownerOrg  uuid.UUID
	user      *codersdk.Client
	userID    uuid.UUID
	workspace codersdk.Workspace
	// The test CA the clients trust (https deployments).
	caFile string
	// The agent's auth token (baked into the template).
	agentToken  string
	agent       agent.Agent
	agentProxy  *cutProxy
	clientProxy *cutProxy
	// Extra environment for the clients (see withEnv).
	env []string
}

// newDeployment brings up coderd, a user with a running workspace built
// from an echo template, and (unless told otherwise) its agent.
func newDeployment(t testing.TB, o deployOpts) *deployment {
	t.Helper()
	requireEnv(t)
	d := &deployment{t: t, logDir: testLogDir(t)}
	d.logger = fileLogger(t, filepath.Join(d.logDir, "coderd.log"))

	dv := coderdtest.DeploymentValues(t)
	if o.blockDirect {
		require.NoError(t, dv.DERP.Config.BlockDirect.Set("true"))
	}
	if o.forceWebsockets {
		require.NoError(t, dv.DERP.Config.ForceWebSockets.Set("true"))
	}
	logger := d.logger.Named("coderd")
	opts := &coderdtest.Options{
		IncludeProvisionerDaemon: true,
		DeploymentValues:         dv,
		Logger:                   &logger,
	}
	if o.https {
		var cert tls.Certificate
		d.caFile, cert = testCertificate(t, d.logDir)
		opts.TLSCertificates = []tls.Certificate{cert}
	}
	d.owner = coderdtest.New(t, opts)
	d.coderdURL = d.owner.URL
	d.clientURL = d.owner.URL
	first := coderdtest.CreateFirstUser(t, d.owner)
	d.ownerOrg = first.OrganizationID
	var user codersdk.User
	d.user, user = coderdtest.CreateAnotherUserMutators(t, d.owner, first.OrganizationID, []rbac.RoleIdentifier{rbac.RoleTemplateAdmin()}, func(r *codersdk.CreateUserRequestWithOrgs) {
		r.Username = userName
	})
	d.userID = user.ID

	d.agentToken = uuid.NewString()
	version := coderdtest.CreateTemplateVersion(t, d.user, first.OrganizationID, echoResponses(d.agentToken))
	coderdtest.AwaitTemplateVersionJobCompleted(t, d.user, version.ID)
	template := coderdtest.CreateTemplate(t, d.user, first.OrganizationID, version.ID)
	ws := coderdtest.CreateWorkspace(t, d.user, template.ID, func(r *codersdk.CreateWorkspaceRequest) {
		r.Name = workspaceName
		r.AutostartSchedule = nil
		r.TTLMillis = nil
	})
	coderdtest.AwaitWorkspaceBuildJobCompleted(t, d.user, ws.LatestBuild.ID)
	d.workspace = ws

	if o.agentProxy {
		d.agentProxy = newCutProxy(t, d.coderdURL, "agent-proxy")
	}
	if o.clientProxy {
		d.clientProxy = newCutProxy(t, d.coderdURL, "client-proxy")
		d.clientURL = d.clientProxy.URL()
	}
	if o.startAgent {
		d.startAgent()
	}
	return d
}

// echoResponses is an echo template: one resource with one agent named
// agentName on start builds, nothing on stop and delete builds, and a log
// line in every build.
func echoResponses(agentToken string) *echo.Responses {
	logLine := &proto.Response{Type: &proto.Response_Log{Log: &proto.Log{
		Level: proto.LogLevel_INFO, Output: buildLogLine,
	}}}
	withAgent := echo.ProvisionGraphWithAgent(agentToken, func(g *proto.GraphComplete) {
		g.Resources[0].Name = "vm"
		g.Resources[0].Agents[0].Name = agentName
	})
	empty := []*proto.Response{{Type: &proto.Response_Graph{Graph: &proto.GraphComplete{}}}}
	return &echo.Responses{
		Parse:         echo.ParseComplete,
		ProvisionPlan: echo.PlanComplete,
		ProvisionGraphMap: map[proto.WorkspaceTransition][]*proto.Response{
			proto.WorkspaceTransition_START:   append([]*proto.Response{logLine}, withAgent...),
			proto.WorkspaceTransition_STOP:    append([]*proto.Response{logLine}, empty...),
			proto.WorkspaceTransition_DESTROY: append([]*proto.Response{logLine}, empty...),
		},
	}
}

// with is the deployment as seen from subtest t (helpers then fail t, not
// the parent test).
func (d *deployment) with(t testing.TB) *deployment {
	c := *d
	c.t = t
	return &c
}

// withEnv is the deployment with kv ("NAME=value") added to the clients'
// environment.
func (d *deployment) withEnv(kv ...string) *deployment {
	c := *d
	c.env = append(append([]string(nil), d.env...), kv...)
	return &c
}

// startAgent starts the workspace's real agent and waits until coderd
// reports it connected.
func (d *deployment) startAgent() {
	d.t.Helper()
	agentURL := d.coderdURL
	if d.agentProxy != nil {
		agentURL = d.agentProxy.URL()
	}
	logger := fileLogger(d.t, filepath.Join(d.logDir, "agent.log")).Named("agent")
	client := agentsdk.New(agentURL, agentsdk.WithFixedToken(d.agentToken))
	client.SDK.SetLogger(logger.Named("sdk"))
	if d.caFile != "" {
		client.SDK.HTTPClient = coderdtest.NewIsolatedHTTPClient(agentURL)
	}
	d.agent = agenttest.New(d.t, agentURL, d.agentToken, func(o *agent.Options) {
		o.Logger = logger
		o.Client = client
	})
	coderdtest.NewWorkspaceAgentWaiter(d.t, d.user, d.workspace.ID).Wait()
}

// build runs a workspace build with the given transition and waits for it.
func (d *deployment) build(transition codersdk.WorkspaceTransition) codersdk.WorkspaceBuild {
	d.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	b, err := d.user.CreateWorkspaceBuild(ctx, d.workspace.ID, codersdk.CreateWorkspaceBuildRequest{
		Transition: transition,
	})
	require.NoError(d.t, err)
	return coderdtest.AwaitWorkspaceBuildJobCompleted(d.t, d.user, b.ID)
}

// agentStatus is the agent's status as coderd reports it now.
func (d *deployment) agentStatus(ctx context.Context) (codersdk.WorkspaceAgentStatus, error) {
	ws, err := d.user.Workspace(ctx, d.workspace.ID)
	if err != nil {
		return "", err
	}
	for _, r := range ws.LatestBuild.Resources {
		for _, a := range r.Agents {
			if a.Name == agentName {
				return a.Status, nil
			}
		}
	}
	return "", fmt.Errorf("no agent %q in build #%d", agentName, ws.LatestBuild.BuildNumber)
}

// clientEnv is the environment both clients run with: the deployment URL,
// the user's session token and an empty config directory.
func (d *deployment) clientEnv(token string) []string {
	cfg := filepath.Join(d.t.TempDir(), "coder-config")
	require.NoError(d.t, os.MkdirAll(cfg, 0o700))
	env := []string{}
	for _, kv := range os.Environ() {
		name := strings.ToUpper(strings.SplitN(kv, "=", 2)[0])
		if strings.HasPrefix(name, "CODER_") || strings.HasSuffix(name, "_PROXY") {
			continue
		}
		env = append(env, kv)
	}
	env = append(env,
		"CODER_URL="+d.clientURL.String(),
		"CODER_SESSION_TOKEN="+token,
		"CODER_CONFIG_DIR="+cfg,
	)
	if d.caFile != "" {
		env = append(env, "SSL_CERT_FILE="+d.caFile, "SSL_CERT_DIR=/nonexistent")
	}
	return append(env, d.env...)
}

// testCertificate makes a CA (written to dir/ca.pem, returned as a path)
// and a server certificate it signed for 127.0.0.1 and localhost.
func testCertificate(t testing.TB, dir string) (string, tls.Certificate) {
	t.Helper()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	ca := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "coder-proxy interop test CA"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, ca, ca, &caKey.PublicKey, caKey)
	require.NoError(t, err)
	caCert, err := x509.ParseCertificate(caDER)
	require.NoError(t, err)
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	leaf := &x509.Certificate{
		SerialNumber: big.NewInt(2),
		Subject:      pkix.Name{CommonName: "127.0.0.1"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
		DNSNames:     []string{"localhost"},
	}
	leafDER, err := x509.CreateCertificate(rand.Reader, leaf, caCert, &key.PublicKey, caKey)
	require.NoError(t, err)
	caFile := filepath.Join(dir, "ca.pem")
	require.NoError(t, os.WriteFile(caFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}), 0o644))
	return caFile, tls.Certificate{Certificate: [][]byte{leafDER}, PrivateKey: key}
}

// fileLogger writes a component's debug log to path (kept for failures).
// The file stays open until the process exits: coderd's and the agent's
// goroutines may still log after the test's cleanups have run.
func fileLogger(t testing.TB, path string) slog.Logger {
	t.Helper()
	f, err := os.OpenFile(path, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
	require.NoError(t, err)
	return slog.Make(sloghuman.Sink(f)).Leveled(slog.LevelDebug)
}

// testLogDir is where one test keeps its logs: $INTEROP_LOG_DIR/<test>.
func testLogDir(t testing.TB) string {
	t.Helper()
	root := os.Getenv("INTEROP_LOG_DIR")
	if root == "" {
		root = filepath.Join(os.TempDir(), "coder-proxy-interop-logs")
	}
	dir := filepath.Join(root, strings.ReplaceAll(t.Name(), "/", "_"))
	require.NoError(t, os.MkdirAll(dir, 0o755))
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("logs of this test: %s", dir)
		}
	})
	return dir
}
