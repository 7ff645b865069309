package peer

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

func TestRoundTrip(t *testing.T) {
	ctx := context.Background()
	st := newStore()
	const bs = 1 << 20
	size := int64(3*bs + 3*512) // last block partial
	ref, fc := st.addFile(t, size, bs)
	_, addr := startServer(t, st, ServerConfig{})
	c := newClient(t, addr, ClientConfig{})

	if c.RTT() != 0 {
		t.Fatalf("RTT before any request: %v", c.RTT())
	}
	if d, err := c.Ping(ctx); err != nil || d <= 0 {
		t.Fatalf("ping: %v %v", d, err)
	}
	if c.RTT() <= 0 {
		t.Fatal("RTT not measured")
	}

	data := randBytes(2 * bs)
	if err := c.WriteAt(ctx, ref, data, 4096, false); err != nil {
		t.Fatal(err)
	}
	if err := c.WriteAt(ctx, ref, data[:4096], 0, true); err != nil {
		t.Fatal(err)
	}
	tail := randBytes(3 * 512)
	if err := c.WriteAt(ctx, ref, tail, 3*bs, true); err != nil {
		t.Fatal(err)
	}
	if err := c.Sync(ctx, ref); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 2*bs)
	if err := c.ReadAt(ctx, ref, got, 4096); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatal("read back differs")
	}
	// The local file holds what the peer wrote.
	local := make([]byte, 4096)
	if err := fc.ReadAt(ctx, local, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(local, data[:4096]) {
		t.Fatal("file differs")
	}
	gotTail := make([]byte, len(tail))
	if err := c.ReadAt(ctx, ref, gotTail, 3*bs); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(gotTail, tail) {
		t.Fatal("tail differs")
	}

	if err := c.Unmap(ctx, ref, 0, bs); err != nil {
		t.Fatal(err)
	}
	if err := c.ReadAt(ctx, ref, got[:bs], 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got[:bs], make([]byte, bs)) {
		t.Fatal("unmapped range not zero")
	}
	if err := c.ReadAt(ctx, ref, got[:4096], bs); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got[:4096], data[bs-4096:bs]) {
		t.Fatal("unmap went too far")
	}

	// RemoteCopy is a lun.Copy.
	rc := RemoteCopy(c, ref)
	p := randBytes(8192)
	if err := rc.WriteAt(ctx, p, 8192, true); err != nil {
		t.Fatal(err)
	}
	q := make([]byte, 8192)
	if err := rc.ReadAt(ctx, q, 8192); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(p, q) {
		t.Fatal("RemoteCopy read back differs")
	}
	if err := rc.Unmap(ctx, 8192, 8192); err != nil {
		t.Fatal(err)
	}
	if err := rc.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	if err := rc.Close(); err != nil {
		t.Fatal(err)
	}
	if err := c.ReadAt(ctx, ref, q, 8192); err != nil || !bytes.Equal(q, make([]byte, 8192)) {
		t.Fatalf("after RemoteCopy unmap: %v", err)
	}
}

func TestRefused(t *testing.T) {
	ctx := context.Background()
	st := newStore()
	const size = 4 << 20
	ref, _ := st.addFile(t, size, 1<<20)
	_, addr := startServer(t, st, ServerConfig{})
	c := newClient(t, addr, ClientConfig{})
	buf := make([]byte, 4096)

	cases := []struct {
		name string
		err  error
	}{
		{"unaligned offset read", c.ReadAt(ctx, ref, buf, 100)},
		{"unaligned offset write", c.WriteAt(ctx, ref, buf, 100, false)},
		{"unaligned length read", c.ReadAt(ctx, ref, buf[:1000], 0)},
		{"unaligned length write", c.WriteAt(ctx, ref, buf[:1000], 0, false)},
		{"read beyond end", c.ReadAt(ctx, ref, buf, size-512)},
		{"write beyond end", c.WriteAt(ctx, ref, buf, size, false)},
		{"negative offset", c.ReadAt(ctx, ref, buf, -4096)},
		{"unmap beyond end", c.Unmap(ctx, ref, size-4096, 8192)},
		{"unmap unaligned", c.Unmap(ctx, ref, 1, 4096)},
		{"oversized read", c.ReadAt(ctx, ref, make([]byte, MaxIO+512), 0)},
		{"bad id", c.Sync(ctx, Ref{ID: "xyz", Gen: 1})},
	}
	_, err := c.Checksums(ctx, ref, 0, 5)
	cases = append(cases, struct {
		name string
		err  error
	}{"checksums beyond end", err})
	err = c.ReadRange(ctx, ref, 3, 3, func(int64, []byte) error { return nil })
	cases = append(cases, struct {
		name string
		err  error
	}{"empty range", err})
	for _, tc := range cases {
		if !errors.Is(tc.err, ErrBadRequest) {
			t.Errorf("%s: %v, want ErrBadRequest", tc.name, tc.err)
		}
	}

	// Hand-made requests the client would never send, on one connection:
	// each is answered 400 and the connection goes on.
	rb := dialRawBlk(t, addr)
	good := reqHdr{op: opRead, id: ref.ID, gen: 1, n: 4096}
	mod := func(h reqHdr, f func(b []byte)) []byte { b := h.bytes(); f(b); return b }
	with := func(f func(h *reqHdr)) reqHdr { h := good; f(&h); return h }
	for i, tc := range []struct {
		name  string
		parts [][]byte
	}{
		{"oversized read", [][]byte{with(func(h *reqHdr) { h.n = 1 << 30 }).bytes()}},
		{"zero length read", [][]byte{with(func(h *reqHdr) { h.n = 0 }).bytes()}},
		{"offset above MaxInt64", [][]byte{mod(good, func(b []byte) { b[16] = 0x80 })}},
		{"reserved byte", [][]byte{mod(good, func(b []byte) { b[3] = 1 })}},
		{"unknown flag", [][]byte{mod(good, func(b []byte) { b[2] = 0x80 })}},
		{"fua on a read", [][]byte{with(func(h *reqHdr) { h.flags = flagFUA }).bytes()}},
		{"bad id", [][]byte{mod(good, func(b []byte) { b[40] = 'z' })}},
		{"sync with a length", [][]byte{with(func(h *reqHdr) { h.op, h.n = opSync, 4096 }).bytes()}},
		{"unaligned write (payload skipped)", [][]byte{with(func(h *reqHdr) { h.op, h.off = opWrite, 100 }).bytes(), make([]byte, 4096)}},
		{"write with a bad id (payload skipped)", [][]byte{mod(with(func(h *reqHdr) { h.op = opWrite }), func(b []byte) { b[33] = '-' }), make([]byte, 4096)}},
	} {
		rb.refused(tc.name, uint32(100+i), 0, tc.parts...)
	}
	rb.send(reqHdr{op: opPing, id: pingID, tag: 7}.bytes())
	if h, _, err := rb.recv(); err != nil || h.code != codeOK || h.tag != 7 {
		t.Fatalf("ping after refused requests: %+v %v", h, err)
	}
	// Requests that break the framing end the connection.
	for _, tc := range []struct {
		name  string
		parts [][]byte
	}{
		{"bad magic", [][]byte{mod(good, func(b []byte) { b[0] = 'G' })}},
		{"unknown op", [][]byte{mod(good, func(b []byte) { b[1] = 99 })}},
		{"oversized write", [][]byte{with(func(h *reqHdr) { h.op, h.n = opWrite, MaxIO*2 }).bytes(), make([]byte, 4096)}},
		{"write cut short", [][]byte{with(func(h *reqHdr) { h.op, h.n = opWrite, 8192 }).bytes(), make([]byte, 4096)}},
		{"header cut short", [][]byte{good.bytes()[:30]}},
	} {
		rb := dialRawBlk(t, addr)
		rb.send(tc.parts...)
		if tc.name == "write cut short" || tc.name == "header cut short" {
			rb.nc.(*net.TCPConn).CloseWrite()
		}
		if !rb.closed() {
			t.Errorf("%s: connection not ended", tc.name)
		}
	}
	// The HTTP/2 side refuses what it does not serve.
	hc := rawClient(t)
	for _, tc := range []struct {
		method, path string
		want         int
	}{{"GET", "/peer/v1/nope", 404}, {"POST", pathChecksums, 405}, {"GET", "/peer/v1/read", 404}} {
		req, _ := http.NewRequest(tc.method, "http://"+addr+tc.path, nil)
		req.Header.Set(hID, ref.ID)
		req.Header.Set(hGen, "1")
		resp, err := hc.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != tc.want {
			t.Errorf("%s %s: status %d, want %d", tc.method, tc.path, resp.StatusCode, tc.want)
		}
	}
	// Nothing was written by the refused writes.
	got := make([]byte, 8192)
	if err := c.ReadAt(ctx, ref, got, 0); err != nil || !bytes.Equal(got, make([]byte, 8192)) {
		t.Fatalf("refused writes changed the copy: %v", err)
	}
}

func TestGenerations(t *testing.T) {
	ctx := context.Background()
	st := newStore()
	ref, _ := st.addFile(t, 1<<20, 64<<10)
	_, addr := startServer(t, st, ServerConfig{})
	c := newClient(t, addr, ClientConfig{})
	buf := make([]byte, 4096)

	wantErr(t, c.ReadAt(ctx, Ref{ID: newID(), Gen: 1}, buf, 0), ErrNoCopy)
	wantErr(t, c.WriteAt(ctx, Ref{ID: newID(), Gen: 1}, buf, 0, false), ErrNoCopy)
	_, err := c.Checksums(ctx, Ref{ID: newID(), Gen: 1}, 0, 1)
	wantErr(t, err, ErrNoCopy)

	if err := c.WriteAt(ctx, ref, buf, 0, false); err != nil {
		t.Fatal(err)
	}
	newer := Ref{ID: ref.ID, Gen: 5}
	if err := c.WriteAt(ctx, newer, randBytes(4096), 0, false); err != nil {
		t.Fatal(err)
	}
	if g := st.gen(ref.ID); g != 5 {
		t.Fatalf("floor %d, want 5", g)
	}
	// The fenced-off writer (gen 1) is refused and changes nothing.
	wantErr(t, c.WriteAt(ctx, ref, make([]byte, 4096), 0, false), ErrStaleGeneration)
	wantErr(t, c.ReadAt(ctx, ref, buf, 0), ErrStaleGeneration)
	wantErr(t, c.Sync(ctx, Ref{ID: ref.ID, Gen: 4}), ErrStaleGeneration)
	wantErr(t, c.Unmap(ctx, Ref{ID: ref.ID, Gen: 4}, 0, 4096), ErrStaleGeneration)
	err = c.ReadRange(ctx, ref, 0, 1, func(int64, []byte) error { return nil })
	wantErr(t, err, ErrStaleGeneration)
	if err := c.ReadAt(ctx, newer, buf, 0); err != nil {
		t.Fatal(err)
	}
	if bytes.Equal(buf, make([]byte, 4096)) {
		t.Fatal("stale write was applied")
	}
	if err := c.Sync(ctx, newer); err != nil {
		t.Fatal(err)
	}
}

func TestChecksums(t *testing.T) {
	ctx := context.Background()
	st := newStore()
	const bs = 64 << 10
	size := int64(100*bs + 4096) // 101 blocks, the last 4 KiB
	a, _ := st.addFile(t, size, bs)
	b, _ := st.addFile(t, size, bs)
	_, addr := startServer(t, st, ServerConfig{})
	c := newClient(t, addr, ClientConfig{})

	data := randBytes(int(size))
	for _, ref := range []Ref{a, b} {
		// Leave blocks 10..19 as holes.
		if err := c.WriteAt(ctx, ref, data[:10*bs], 0, false); err != nil {
			t.Fatal(err)
		}
		if err := c.WriteAt(ctx, ref, data[20*bs:], 20*bs, false); err != nil {
			t.Fatal(err)
		}
	}
	sa, err := c.Checksums(ctx, a, 0, 101)
	if err != nil {
		t.Fatal(err)
	}
	sb, err := c.Checksums(ctx, b, 0, 101)
	if err != nil {
		t.Fatal(err)
	}
	if len(sa) != 101 {
		t.Fatalf("%d sums", len(sa))
	}
	for i := range sa {
		if sa[i] != sb[i] {
			t.Fatalf("block %d: sums differ for equal data", i)
		}
	}
	zero := sumOf(make([]byte, bs))
	for i := 10; i < 20; i++ {
		if sa[i] != zero {
			t.Fatalf("hole block %d does not hash like zeros", i)
		}
	}
	if sa[0] != Sum(sha256.Sum256(data[:bs])) {
		t.Fatal("block 0 sum")
	}
	if sa[100] != Sum(sha256.Sum256(data[100*bs:])) {
		t.Fatal("last partial block not hashed at its real length")
	}
	// A sub-range matches.
	sub, err := c.Checksums(ctx, a, 99, 101)
	if err != nil || sub[0] != sa[99] || sub[1] != sa[100] {
		t.Fatalf("sub-range: %v", err)
	}
	// A write changes exactly its block.
	if err := c.WriteAt(ctx, b, randBytes(512), 7*bs+512, false); err != nil {
		t.Fatal(err)
	}
	sb, err = c.Checksums(ctx, b, 0, 101)
	if err != nil {
		t.Fatal(err)
	}
	for i := range sa {
		if (sa[i] != sb[i]) != (i == 7) {
			t.Fatalf("block %d: equal=%v after writing block 7", i, sa[i] == sb[i])
		}
	}
}

func TestReadRange(t *testing.T) {
	ctx := context.Background()
	st := newStore()
	const bs = 64 << 10
	size := int64(200*bs + 1024)
	ref, _ := st.addFile(t, size, bs)
	_, addr := startServer(t, st, ServerConfig{})
	c := newClient(t, addr, ClientConfig{})
	data := randBytes(int(size))
	if err := c.WriteAt(ctx, ref, data[:100*bs], 0, false); err != nil {
		t.Fatal(err)
	}
	if err := c.WriteAt(ctx, ref, data[150*bs:], 150*bs, false); err != nil {
		t.Fatal(err)
	}
	copy(data[100*bs:150*bs], make([]byte, 50*bs)) // holes

	next := int64(3)
	err := c.ReadRange(ctx, ref, 3, 201, func(b int64, got []byte) error {
		if b != next {
			return fmt.Errorf("block %d, want %d", b, next)
		}
		next++
		want := make([]byte, blockLen(b, size, bs))
		if err := c.ReadAt(ctx, ref, want, b*bs); err != nil {
			return err
		}
		if !bytes.Equal(got, want) || !bytes.Equal(got, data[b*bs:b*bs+int64(len(got))]) {
			return fmt.Errorf("block %d differs", b)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if next != 201 {
		t.Fatalf("stopped at %d", next)
	}
	// An error from fn stops the transfer and comes back as is.
	stop := errors.New("stop")
	err = c.ReadRange(ctx, ref, 0, 200, func(b int64, _ []byte) error {
		if b == 5 {
			return stop
		}
		return nil
	})
	if err != stop {
		t.Fatalf("fn error: %v", err)
	}
	// The connection is still good.
	if _, err := c.Ping(ctx); err != nil {
		t.Fatal(err)
	}
}

// killingCopy closes the server when a read reaches off.
type killingCopy struct {
	*blockingCopy
	off  int64
	once sync.Once
	kill func()
}

func (k *killingCopy) ReadAt(ctx context.Context, p []byte, off int64) error {
	if off >= k.off {
		k.once.Do(func() { go k.kill() })
		<-ctx.Done()
		return ctx.Err()
	}
	return k.blockingCopy.Copy.ReadAt(ctx, p, off)
}

func TestReadRangeServerKilled(t *testing.T) {
	ctx := context.Background()
	st := newStore()
	const bs = 64 << 10
	ref, fc := st.addFile(t, 400*bs, bs)
	s, err := NewServer(ServerConfig{Listen: "127.0.0.1:0"}, st)
	if err != nil {
		t.Fatal(err)
	}
	kc := &killingCopy{blockingCopy: &blockingCopy{Copy: fc}, off: 300 * bs, kill: func() {
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		s.Close(cctx)
	}}
	st.add(ref.ID, kc, 400*bs, bs)
	if err := s.Listen(); err != nil {
		t.Fatal(err)
	}
	go s.Serve(ctx)
	c := newClient(t, s.Addr().String(), ClientConfig{})
	var n int64
	err = c.ReadRange(ctx, ref, 0, 400, func(int64, []byte) error { n++; return nil })
	if !errors.Is(err, ErrUnavailable) {
		t.Fatalf("error %v after %d blocks, want ErrUnavailable", err, n)
	}
	if n >= 400 {
		t.Fatal("all blocks reported")
	}
	t.Logf("%d blocks before: %v", n, err)
}

// fakePeer serves h with a plain h2c server: a peer that lies.
func fakePeer(t *testing.T, h http.HandlerFunc) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var p http.Protocols
	p.SetUnencryptedHTTP2(true)
	srv := &http.Server{Handler: h, Protocols: &p}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return ln.Addr().String()
}

func TestLyingPeer(t *testing.T) {
	ctx := context.Background()
	ref := Ref{ID: newID(), Gen: 1}
	const bs = 64 << 10
	addr := fakePeer(t, func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case pathRange:
			w.Header().Set(hSize, strconv.Itoa(10*bs))
			w.Header().Set(hBlockSize, strconv.Itoa(bs))
			w.Header().Set("Trailer", hStatus)
			if r.Header.Get(hFrom) == "1" {
				// All the data but no status trailer.
				w.Write(make([]byte, 2*bs))
				return
			}
			if r.Header.Get(hFrom) == "2" {
				// Lies about the geometry.
				w.Header().Set(hSize, strconv.Itoa(bs))
				w.WriteHeader(200)
				return
			}
			w.Write(make([]byte, bs+100)) // short, clean end
		case pathChecksums:
			w.Header().Set(hSize, strconv.Itoa(10*bs))
			w.Header().Set(hBlockSize, strconv.Itoa(bs))
			w.Header().Set("Trailer", hStatus)
			w.Write(make([]byte, 3*32)) // one sum too many
			w.Header().Set(hStatus, "ok")
		}
	})
	c := newClient(t, addr, ClientConfig{})
	// An HTTP/2-only peer does not speak the block protocol.
	wantErr(t, c.ReadAt(ctx, ref, make([]byte, 4096), 0), ErrUnavailable)
	var n int
	fn := func(int64, []byte) error { n++; return nil }
	wantErr(t, c.ReadRange(ctx, ref, 0, 3, fn), ErrUnavailable)
	if n > 1 {
		t.Fatalf("%d blocks reported from a short stream", n)
	}
	wantErr(t, c.ReadRange(ctx, ref, 1, 3, fn), ErrUnavailable)
	wantErr(t, c.ReadRange(ctx, ref, 2, 4, fn), ErrUnavailable)
	_, err := c.Checksums(ctx, ref, 0, 2)
	wantErr(t, err, ErrUnavailable)
}

// fakeBlkPeer answers every block request it reads with what answer
// returns (raw bytes): a peer that lies.
func fakeBlkPeer(t *testing.T, answer func(h reqHdr) []byte) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			nc, err := ln.Accept()
			if err != nil {
				return
			}
			t.Cleanup(func() { nc.Close() })
			go func() {
				defer nc.Close()
				br := bufio.NewReader(nc)
				var pre [len(blkPreface)]byte
				if _, err := io.ReadFull(br, pre[:]); err != nil {
					return
				}
				io.WriteString(nc, blkPreface)
				var hb [reqHdrLen]byte
				for {
					if _, err := io.ReadFull(br, hb[:]); err != nil {
						return
					}
					h, err := decodeReq(hb[:])
					if err != nil {
						return
					}
					if hasPayload(h.op) {
						br.Discard(int(h.n))
					}
					if _, err := nc.Write(answer(h)); err != nil {
						return
					}
				}
			}()
		}
	}()
	return ln.Addr().String()
}

func TestLyingBlockPeer(t *testing.T) {
	ctx := context.Background()
	ref := Ref{ID: newID(), Gen: 1}
	resp := func(h respHdr, payload []byte) []byte {
		var b [respHdrLen]byte
		h.n = uint32(len(payload))
		h.encode(&b)
		return append(b[:], payload...)
	}
	for _, tc := range []struct {
		name   string
		answer func(h reqHdr) []byte
		want   error
	}{
		{"short read", func(h reqHdr) []byte { return resp(respHdr{tag: h.tag, code: 200}, make([]byte, 512)) }, ErrUnavailable},
		{"long read", func(h reqHdr) []byte { return resp(respHdr{tag: h.tag, code: 200}, make([]byte, 8192)) }, ErrUnavailable},
		{"cut read", func(h reqHdr) []byte { return resp(respHdr{tag: h.tag, code: 200}, make([]byte, 4096))[:1000] }, ErrUnavailable},
		{"bad magic", func(h reqHdr) []byte {
			b := resp(respHdr{tag: h.tag, code: 200}, make([]byte, 4096))
			b[0] = 'H'
			return b
		}, ErrUnavailable},
		{"bad code", func(h reqHdr) []byte { return resp(respHdr{tag: h.tag, code: 999}, nil) }, ErrUnavailable},
		{"huge message", func(h reqHdr) []byte { return resp(respHdr{tag: h.tag, code: 500}, make([]byte, 4*maxMsg)) }, ErrUnavailable},
		{"bad sense key", func(h reqHdr) []byte {
			return resp(respHdr{tag: h.tag, code: 500, flags: rflagSense, sense: [3]byte{0x30, 0, 0}}, nil)
		}, ErrUnavailable},
		{"unknown flags", func(h reqHdr) []byte { return resp(respHdr{tag: h.tag, code: 200, flags: 0x80}, make([]byte, 4096)) }, ErrUnavailable},
		{"bad gateway", func(h reqHdr) []byte { return resp(respHdr{tag: h.tag, code: 502}, []byte("no")) }, ErrUnavailable},
		{"unexpected 3xx", func(h reqHdr) []byte { return resp(respHdr{tag: h.tag, code: 302}, nil) }, ErrUnavailable},
		{"no copy", func(h reqHdr) []byte { return resp(respHdr{tag: h.tag, code: 404}, []byte("gone")) }, ErrNoCopy},
	} {
		addr := fakeBlkPeer(t, tc.answer)
		c := newClient(t, addr, ClientConfig{Timeout: 2 * time.Second})
		err := c.ReadAt(ctx, ref, make([]byte, 4096), 0)
		if !errors.Is(err, tc.want) {
			t.Errorf("%s: %v, want %v", tc.name, err, tc.want)
		}
	}
	// An answer for another tag is not this request's: it times out.
	addr := fakeBlkPeer(t, func(h reqHdr) []byte { return resp(respHdr{tag: h.tag + 1, code: 200}, nil) })
	c := newClient(t, addr, ClientConfig{Timeout: 300 * time.Millisecond})
	wantErr(t, c.WriteAt(ctx, ref, make([]byte, 4096), 0, false), ErrUnavailable)
}

func TestOneConnection(t *testing.T) {
	ctx := context.Background()
	st := newStore()
	ref, _ := st.addFile(t, 64<<20, 1<<20)
	s, addr := startServer(t, st, ServerConfig{})
	c := newClient(t, addr, ClientConfig{})
	const n = 64
	bufs := make([][]byte, n)
	var wg sync.WaitGroup
	errs := make(chan error, 2*n)
	start := make(chan struct{})
	for g := 0; g < 8; g++ { // several goroutines, 64 writes in flight
		for i := g; i < n; i += 8 {
			bufs[i] = randBytes(4096)
			wg.Add(1)
			go func(i int) {
				defer wg.Done()
				<-start
				if err := c.WriteAt(ctx, ref, bufs[i], int64(i)*4096*3, false); err != nil {
					errs <- err
				}
			}(i)
		}
	}
	close(start)
	wg.Wait()
	start = make(chan struct{})
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			<-start
			got := make([]byte, 4096)
			if err := c.ReadAt(ctx, ref, got, int64(i)*4096*3); err != nil {
				errs <- err
			} else if !bytes.Equal(got, bufs[i]) {
				errs <- fmt.Errorf("write %d did not land", i)
			}
		}(i)
	}
	close(start)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if got := s.accepted.Load(); got != 1 {
		t.Fatalf("%d connections accepted, want 1", got)
	}
}

func TestStalledListener(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var mu sync.Mutex
	var conns []net.Conn
	go func() {
		for {
			cn, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, cn) // accept, never answer
			mu.Unlock()
		}
	}()
	defer func() {
		mu.Lock()
		for _, cn := range conns {
			cn.Close()
		}
		mu.Unlock()
	}()
	const timeout = 300 * time.Millisecond
	ctx := context.Background()
	ref := Ref{ID: newID(), Gen: 1}
	// A fresh client each: once the connection's health ping times out
	// too, later calls fail at once (also ErrUnavailable).
	for name, f := range map[string]func(c *Client) error{
		"read":  func(c *Client) error { return c.ReadAt(ctx, ref, make([]byte, 4096), 0) },
		"write": func(c *Client) error { return c.WriteAt(ctx, ref, make([]byte, 4096), 0, true) },
		"range": func(c *Client) error { return c.ReadRange(ctx, ref, 0, 4, func(int64, []byte) error { return nil }) },
		"sums":  func(c *Client) error { _, err := c.Checksums(ctx, ref, 0, 4); return err },
		"ping":  func(c *Client) error { _, err := c.Ping(ctx); return err },
	} {
		c := newClient(t, ln.Addr().String(), ClientConfig{Timeout: timeout})
		t0 := time.Now()
		err := f(c)
		d := time.Since(t0)
		if !errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), ln.Addr().String()) {
			t.Errorf("%s: %v, want ErrUnavailable naming the peer", name, err)
		}
		if d < timeout || d > timeout+time.Second {
			t.Errorf("%s: returned after %v, timeout %v", name, d, timeout)
		}
	}
	// A cancelled caller is not an unavailable peer.
	cctx, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancel()
	c2 := newClient(t, ln.Addr().String(), ClientConfig{Timeout: timeout})
	err = c2.Sync(cctx, ref)
	if errors.Is(err, ErrUnavailable) || !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("caller deadline: %v", err)
	}
	// Nothing listening at all.
	dead := newClient(t, "127.0.0.1:1", ClientConfig{Timeout: timeout})
	wantErr(t, dead.Sync(ctx, ref), ErrUnavailable)
}

func TestStalledCopy(t *testing.T) {
	ctx := context.Background()
	st := newStore()
	ref, fc := st.addFile(t, 1<<20, 64<<10)
	bc := &blockingCopy{Copy: fc, entered: make(chan struct{}, 1), release: make(chan struct{})}
	st.add(ref.ID, bc, 1<<20, 64<<10)
	s, err := NewServer(ServerConfig{Listen: "127.0.0.1:0"}, st)
	if err != nil {
		t.Fatal(err)
	}
	serveDone := make(chan error, 1)
	go func() { serveDone <- s.Serve(ctx) }()
	for s.Addr() == nil {
		time.Sleep(time.Millisecond)
	}
	const timeout = 300 * time.Millisecond
	c := newClient(t, s.Addr().String(), ClientConfig{Timeout: timeout})
	t0 := time.Now()
	err = c.ReadAt(ctx, ref, make([]byte, 4096), 0)
	if !errors.Is(err, ErrUnavailable) || time.Since(t0) > timeout+time.Second {
		t.Fatalf("stalled copy: %v after %v", err, time.Since(t0))
	}
	// The connection survives a timed-out request.
	if _, err := c.Ping(ctx); err != nil {
		t.Fatal(err)
	}

	// Closing the server ends the requests in flight.
	slow := newClient(t, s.Addr().String(), ClientConfig{Timeout: time.Minute})
	res := make(chan error, 2)
	go func() { res <- slow.WriteAt(ctx, ref, make([]byte, 4096), 0, false) }()
	go func() {
		res <- slow.ReadRange(ctx, ref, 0, 16, func(int64, []byte) error { return nil })
	}()
	<-bc.entered
	time.Sleep(50 * time.Millisecond)
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	t0 = time.Now()
	if err := s.Close(cctx); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 2; i++ {
		select {
		case err := <-res:
			wantErr(t, err, ErrUnavailable)
		case <-time.After(5 * time.Second):
			t.Fatal("in-flight request did not end on Close")
		}
	}
	if err := <-serveDone; err != nil {
		t.Fatal(err)
	}
	t.Logf("close took %v", time.Since(t0))
	wantErr(t, c.Sync(ctx, ref), ErrUnavailable)
}

func TestListen(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	addr := ln.Addr().String()
	s, err := NewServer(ServerConfig{Listen: addr}, newStore())
	if err != nil {
		t.Fatal(err)
	}
	err = s.Listen()
	want := "peer.listen " + addr + ": address already in use"
	if err == nil || err.Error() != want {
		t.Fatalf("listen error %q, want %q", err, want)
	}
	for _, bad := range []string{"localhost:7800", "127.0.0.1", ":7800", "127.0.0.1:x"} {
		if _, err := NewServer(ServerConfig{Listen: bad}, newStore()); err == nil {
			t.Errorf("listen address %q accepted", bad)
		}
	}
	// Serve ends with its context.
	s, err = NewServer(ServerConfig{Listen: "127.0.0.1:0"}, newStore())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx) }()
	for s.Addr() == nil {
		time.Sleep(time.Millisecond)
	}
	if _, err := NewClient(s.Addr().String(), ClientConfig{}).Ping(context.Background()); err != nil {
		t.Fatal(err)
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Serve did not end with its context")
	}
}

// TestReconnect: a peer that restarts on the same address is reached
// again by the same client.
func TestReconnect(t *testing.T) {
	ctx := context.Background()
	st := newStore()
	ref, _ := st.addFile(t, 1<<20, 64<<10)
	s1, err := NewServer(ServerConfig{Listen: "127.0.0.1:0"}, st)
	if err != nil {
		t.Fatal(err)
	}
	if err := s1.Listen(); err != nil {
		t.Fatal(err)
	}
	addr := s1.Addr().String()
	go s1.Serve(ctx)
	c := newClient(t, addr, ClientConfig{Timeout: time.Second})
	if err := c.Sync(ctx, ref); err != nil {
		t.Fatal(err)
	}
	if err := s1.Close(ctx); err != nil {
		t.Fatal(err)
	}
	wantErr(t, c.Sync(ctx, ref), ErrUnavailable)
	s2, _ := startServer(t, st, ServerConfig{Listen: addr})
	deadline := time.Now().Add(3 * time.Second)
	for {
		err := c.Sync(ctx, ref)
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("client did not reconnect: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if n := s2.accepted.Load(); n != 1 {
		t.Fatalf("%d connections to the new server", n)
	}
}
