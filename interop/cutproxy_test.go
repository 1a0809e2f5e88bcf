package interop

// cutProxy is an HTTP reverse proxy in front of coderd that can cut what
// passes through it: close the live connections of requests whose path
// matches, freeze them (keep the TCP connection open but move no byte in
// either direction: a connection that died silently, as after a laptop
// sleep or a NAT expiry), answer new ones with 502 while a block is on, and
// rewrite the query of matching requests. Websocket and DERP upgrades pass through
// (httputil.ReverseProxy carries any Upgrade), so the agent's relay
// connection and the clients' coordinate websockets can go through it.

import (
	"context"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"
)

type connKey struct{}

// freezableConn stops reading and writing while frozen (the bytes stay in
// the kernel's buffers, as on a path that went dead).
type freezableConn struct {
	net.Conn
	mu     sync.Mutex
	frozen bool
	thawed *sync.Cond
}

func newFreezableConn(c net.Conn) *freezableConn {
	f := &freezableConn{Conn: c}
	f.thawed = sync.NewCond(&f.mu)
	return f
}

func (f *freezableConn) wait() {
	f.mu.Lock()
	for f.frozen {
		f.thawed.Wait()
	}
	f.mu.Unlock()
}

func (f *freezableConn) Read(p []byte) (int, error) {
	f.wait()
	n, err := f.Conn.Read(p)
	// Bytes read just before a freeze are held, not passed on.
	f.wait()
	return n, err
}

func (f *freezableConn) Write(p []byte) (int, error) {
	f.wait()
	return f.Conn.Write(p)
}

func (f *freezableConn) setFrozen(v bool) {
	f.mu.Lock()
	f.frozen = v
	f.mu.Unlock()
	f.thawed.Broadcast()
}

type freezableListener struct{ net.Listener }

func (l freezableListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return newFreezableConn(c), nil
}

type cutProxy struct {
	name string
	srv  *httptest.Server

	mu sync.Mutex
	// The path each live connection last carried.
	conns map[net.Conn]string
	// Requests whose path contains one of these get 502.
	blocked []string
	// Rewrite the query of requests whose path contains the key.
	rewrites map[string]func(url.Values)
	// Every request URI seen, in order, and when.
	log   []string
	times []time.Time
	// Connections frozen by Freeze.
	frozen []*freezableConn
}

func newCutProxy(t testing.TB, target *url.URL, name string) *cutProxy {
	t.Helper()
	p := &cutProxy{
		name:     name,
		conns:    map[net.Conn]string{},
		rewrites: map[string]func(url.Values){},
	}
	rp := httputil.NewSingleHostReverseProxy(target)
	// Stream responses (the watch is server-sent events).
	rp.FlushInterval = -1
	p.srv = httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		path := r.URL.Path
		p.mu.Lock()
		p.log = append(p.log, r.URL.RequestURI())
		p.times = append(p.times, time.Now())
		for _, b := range p.blocked {
			if strings.Contains(path, b) {
				p.mu.Unlock()
				w.Header().Set("Content-Type", "application/json")
				w.WriteHeader(http.StatusBadGateway)
				_, _ = w.Write([]byte(`{"message":"` + p.name + `: blocked by the test"}`))
				return
			}
		}
		for k, f := range p.rewrites {
			if strings.Contains(path, k) {
				q := r.URL.Query()
				f(q)
				r.URL.RawQuery = q.Encode()
			}
		}
		if c, ok := r.Context().Value(connKey{}).(net.Conn); ok {
			p.conns[c] = path
		}
		p.mu.Unlock()
		rp.ServeHTTP(w, r)
	}))
	p.srv.Listener = freezableListener{p.srv.Listener}
	p.srv.Config.ConnContext = func(ctx context.Context, c net.Conn) context.Context {
		return context.WithValue(ctx, connKey{}, c)
	}
	p.srv.Config.ConnState = func(c net.Conn, s http.ConnState) {
		if s == http.StateClosed {
			p.mu.Lock()
			delete(p.conns, c)
			p.mu.Unlock()
		}
	}
	p.srv.Start()
	t.Cleanup(p.srv.Close)
	return p
}

// URL is the proxy's base URL, on 127.0.0.1.
func (p *cutProxy) URL() *url.URL {
	u, _ := url.Parse(p.srv.URL)
	return u
}

// Cut closes every live connection whose last request path contains part;
// returns how many.
func (p *cutProxy) Cut(part string) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := 0
	for c, path := range p.conns {
		if strings.Contains(path, part) {
			_ = c.Close()
			delete(p.conns, c)
			n++
		}
	}
	return n
}

// Freeze makes every live connection whose last request path contains part
// go silent (see freezableConn) until Thaw; returns how many.
func (p *cutProxy) Freeze(part string) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := 0
	for c, path := range p.conns {
		if f, ok := c.(*freezableConn); ok && strings.Contains(path, part) {
			f.setFrozen(true)
			p.frozen = append(p.frozen, f)
			n++
		}
	}
	return n
}

// Thaw lets every frozen connection move again.
func (p *cutProxy) Thaw() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, f := range p.frozen {
		f.setFrozen(false)
	}
	p.frozen = nil
}

// Block makes new requests whose path contains part fail with 502.
func (p *cutProxy) Block(part string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.blocked = append(p.blocked, part)
}

// Unblock lifts every block.
func (p *cutProxy) Unblock() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.blocked = nil
}

// Rewrite changes the query of requests whose path contains part.
func (p *cutProxy) Rewrite(part string, f func(url.Values)) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.rewrites[part] = f
}

// RequestsSince returns the request URIs that contain part and arrived
// after t.
func (p *cutProxy) RequestsSince(part string, t time.Time) []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []string
	for i, r := range p.log {
		if p.times[i].After(t) && strings.Contains(r, part) {
			out = append(out, r)
		}
	}
	return out
}

// Requests returns the request URIs seen so far that contain part.
func (p *cutProxy) Requests(part string) []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []string
	for _, r := range p.log {
		if strings.Contains(r, part) {
			out = append(out, r)
		}
	}
	return out
}
