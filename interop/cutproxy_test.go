package interop

// cutProxy is an HTTP reverse proxy in front of coderd that can cut what
// passes through it: close the live connections of requests whose path
// matches, answer new ones with 502 while a block is on, and rewrite the
// query of matching requests. Websocket and DERP upgrades pass through
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
)

type connKey struct{}

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
	// Every request URI seen, in order.
	log []string
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
