// Command yamux-go is the Go side of coder-tailnet's yamux interop test
// (tailnet/tests/yamux_go_interop.rs). It uses HashiCorp's yamux, the
// multiplexer coderd and the Coder CLI use, so the test proves our Rust
// session speaks the same wire protocol as the real thing.
//
// It listens on 127.0.0.1:0, prints the port on the first stdout line,
// accepts exactly one TCP connection and runs yamux.Server on it. Every
// stream the Rust client opens starts with one command byte:
//
//	'E'  echo every byte back until EOF, then close.
//	'S'  sink: read to EOF, reply with 8-byte count + 8-byte FNV-1a 64 (BE).
//	'G'  generate: read count (8 BE) and seed (8 BE), write count bytes of
//	     the xorshift64 pattern (see pattern below), then close.
//	'O'  open back: read k (4 BE); open k streams to the client, on each
//	     send len (8 BE) + len pattern bytes, expect them echoed back, close;
//	     reply "OK\n" or "ERR <why>\n" on the command stream.
//	'P'  ping: ping the client 3 times; reply "OK\n" or "ERR <why>\n".
//
// When the session ends it prints "END <reason>" on stdout and exits 0.
//
// Build (module mode; yamux pinned in go.mod to the version Coder uses):
//
//	GOTOOLCHAIN=local go build -o yamux-go .
package main

import (
	"bytes"
	"encoding/binary"
	"flag"
	"fmt"
	"hash/fnv"
	"io"
	"net"
	"os"
	"sync"
	"time"

	"github.com/hashicorp/yamux"
)

func main() {
	window := flag.Uint("window", 256*1024, "MaxStreamWindowSize in bytes")
	keepalive := flag.Duration("keepalive", 30*time.Second, "KeepAliveInterval (pings we send)")
	writeTimeout := flag.Duration("write-timeout", 10*time.Second,
		"ConnectionWriteTimeout, also the deadline for ping replies")
	flag.Parse()

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Fprintln(os.Stderr, "listen:", err)
		os.Exit(1)
	}
	fmt.Println(ln.Addr().(*net.TCPAddr).Port)

	conn, err := ln.Accept()
	if err != nil {
		fmt.Fprintln(os.Stderr, "accept:", err)
		os.Exit(1)
	}
	ln.Close()

	cfg := yamux.DefaultConfig()
	cfg.MaxStreamWindowSize = uint32(*window)
	cfg.KeepAliveInterval = *keepalive
	cfg.ConnectionWriteTimeout = *writeTimeout
	cfg.LogOutput = os.Stderr
	sess, err := yamux.Server(conn, cfg)
	if err != nil {
		fmt.Fprintln(os.Stderr, "yamux.Server:", err)
		os.Exit(1)
	}

	for {
		st, err := sess.AcceptStream()
		if err != nil {
			fmt.Printf("END %v\n", err)
			return
		}
		go handle(sess, st)
	}
}

func handle(sess *yamux.Session, st *yamux.Stream) {
	defer st.Close()
	var cmd [1]byte
	if _, err := io.ReadFull(st, cmd[:]); err != nil {
		if err == yamux.ErrConnectionReset {
			// The Rust test resets one stream on purpose.
			fmt.Fprintf(os.Stderr, "stream %d: reset by the client (expected once per run)\n", st.StreamID())
		} else {
			fmt.Fprintf(os.Stderr, "stream %d: read command: %v\n", st.StreamID(), err)
		}
		return
	}
	switch cmd[0] {
	case 'E':
		if _, err := io.Copy(st, st); err == yamux.ErrConnectionReset {
			fmt.Fprintf(os.Stderr, "stream %d: reset by the client (expected once per run)\n", st.StreamID())
		} else if err != nil {
			fmt.Fprintf(os.Stderr, "stream %d: echo: %v\n", st.StreamID(), err)
		}
	case 'S':
		h := fnv.New64a()
		n, err := io.Copy(h, st)
		if err != nil {
			fmt.Fprintf(os.Stderr, "stream %d: sink: %v\n", st.StreamID(), err)
			return
		}
		var out [16]byte
		binary.BigEndian.PutUint64(out[:8], uint64(n))
		binary.BigEndian.PutUint64(out[8:], h.Sum64())
		st.Write(out[:])
	case 'G':
		var hdr [16]byte
		if _, err := io.ReadFull(st, hdr[:]); err != nil {
			return
		}
		n := binary.BigEndian.Uint64(hdr[:8])
		p := newPattern(binary.BigEndian.Uint64(hdr[8:]))
		buf := make([]byte, 32*1024)
		for n > 0 {
			chunk := buf
			if uint64(len(chunk)) > n {
				chunk = chunk[:n]
			}
			p.fill(chunk)
			if _, err := st.Write(chunk); err != nil {
				fmt.Fprintf(os.Stderr, "stream %d: generate: %v\n", st.StreamID(), err)
				return
			}
			n -= uint64(len(chunk))
		}
	case 'O':
		var hdr [4]byte
		if _, err := io.ReadFull(st, hdr[:]); err != nil {
			return
		}
		k := int(binary.BigEndian.Uint32(hdr[:]))
		errs := make(chan error, k)
		var wg sync.WaitGroup
		for i := 0; i < k; i++ {
			wg.Add(1)
			go func(i int) {
				defer wg.Done()
				errs <- openBack(sess, i)
			}(i)
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			if err != nil {
				fmt.Fprintf(st, "ERR %v\n", err)
				return
			}
		}
		fmt.Fprintf(st, "OK\n")
	case 'P':
		for i := 0; i < 3; i++ {
			if _, err := sess.Ping(); err != nil {
				fmt.Fprintf(st, "ERR ping %d: %v\n", i, err)
				return
			}
		}
		fmt.Fprintf(st, "OK\n")
	default:
		fmt.Fprintf(os.Stderr, "stream %d: unknown command %q\n", st.StreamID(), cmd[0])
	}
}

// openBack opens a stream from the server side (even ID) and checks that
// the Rust side echoes a length-prefixed payload. Old yamux versions return
// EOF from Read once the local side is closed, so we close only at the end.
func openBack(sess *yamux.Session, i int) error {
	st, err := sess.OpenStream()
	if err != nil {
		return fmt.Errorf("open %d: %v", i, err)
	}
	defer st.Close()
	n := 64*1024 + i*4099
	payload := make([]byte, n)
	newPattern(uint64(1000 + i)).fill(payload)
	var hdr [8]byte
	binary.BigEndian.PutUint64(hdr[:], uint64(n))
	go func() {
		st.Write(hdr[:])
		st.Write(payload)
	}()
	got := make([]byte, n)
	if _, err := io.ReadFull(st, got); err != nil {
		return fmt.Errorf("stream %d: read echo: %v", st.StreamID(), err)
	}
	if !bytes.Equal(got, payload) {
		return fmt.Errorf("stream %d: echo mismatch", st.StreamID())
	}
	return nil
}

// pattern is xorshift64 (13, 7, 17) emitting each state as 8 little-endian
// bytes; the Rust test generates the same sequence to check transfers.
type pattern struct {
	s   uint64
	buf [8]byte
	off int
}

func newPattern(seed uint64) *pattern {
	if seed == 0 {
		seed = 0x9E3779B97F4A7C15
	}
	return &pattern{s: seed, off: 8}
}

func (p *pattern) fill(b []byte) {
	for i := range b {
		if p.off == 8 {
			p.s ^= p.s << 13
			p.s ^= p.s >> 7
			p.s ^= p.s << 17
			binary.LittleEndian.PutUint64(p.buf[:], p.s)
			p.off = 0
		}
		b[i] = p.buf[p.off]
		p.off++
	}
}
