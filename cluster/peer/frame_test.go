package peer

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"testing"
	"time"
)

func TestFrameRoundTrip(t *testing.T) {
	id := newID()
	for op := byte(1); op <= opLast; op++ {
		h := reqHdr{op: op, tag: 0xdeadbeef, gen: 1<<63 + 5, id: id}
		switch op {
		case opRead, opFwdRead, opUnmap, opFwdUnmap:
			h.off, h.n = 1<<40, 4096
		case opWrite, opFwdWrite:
			h.off, h.n, h.flags = 512, MaxIO, flagFUA
		case opPing, opCancel:
			h.id = pingID
		}
		if op == opWrite || op == opUnmap || op == opFence {
			h.epoch = 0x1122334455667788
		}
		got, err := decodeReq(h.bytes())
		if err != nil || got != h {
			t.Errorf("%s: %+v %v, want %+v", opNames[op], got, err, h)
		}
	}
	r := respHdr{flags: rflagSense | rflagForward, code: 500, tag: 7, n: 12, sense: [3]byte{5, 0x21, 0}}
	var b [respHdrLen]byte
	r.encode(&b)
	if got, err := decodeResp(b[:]); err != nil || got != r {
		t.Fatalf("response %+v %v, want %+v", got, err, r)
	}
}

// FuzzDecodeReq: a header decodes without a panic, and one that decodes
// cleanly encodes back to the same bytes (nothing in it is ignored).
func FuzzDecodeReq(f *testing.F) {
	f.Add(reqHdr{op: opWrite, tag: 1, gen: 2, off: 4096, n: 4096, id: newID()}.bytes())
	f.Add(reqHdr{op: opPing, id: pingID}.bytes())
	f.Add(reqHdr{op: opFwdUnmap, off: 1 << 62, n: 1 << 62, id: newID()}.bytes())
	f.Fuzz(func(t *testing.T, b []byte) {
		h, err := decodeReq(b)
		if err != nil {
			return
		}
		if !bytes.Equal(h.bytes(), b) {
			t.Fatalf("%x decoded to %+v, which encodes to %x", b, h, h.bytes())
		}
		if hasPayload(h.op) && h.n > MaxIO {
			t.Fatalf("payload of %d accepted", h.n)
		}
	})
}

// FuzzDecodeResp: the same for answers.
func FuzzDecodeResp(f *testing.F) {
	for _, r := range []respHdr{{code: 200, n: 4096, tag: 3}, {code: 500, flags: rflagSense, sense: [3]byte{3, 0x11, 0}, n: 9}} {
		var b [respHdrLen]byte
		r.encode(&b)
		f.Add(b[:])
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		h, err := decodeResp(b)
		if err != nil {
			return
		}
		var e [respHdrLen]byte
		h.encode(&e)
		if !bytes.Equal(e[:], b) {
			t.Fatalf("%x decoded to %+v, which encodes to %x", b, h, e)
		}
		if h.code != codeOK && h.n > maxMsg || h.n > MaxIO {
			t.Fatalf("payload of %d accepted with code %d", h.n, h.code)
		}
	})
}

// FuzzBlkSession feeds a live server connection garbage after the
// preface: the server must end or go on answering, never hang or crash,
// and a well-behaved client must be served afterwards.
func FuzzBlkSession(f *testing.F) {
	st := newStore()
	ref, _ := st.addFile(f, 1<<20, 64<<10)
	_, addr := startServer(f, st, ServerConfig{})
	c := newClient(f, addr, ClientConfig{Timeout: 5 * time.Second})
	w := reqHdr{op: opWrite, tag: 1, gen: 1, n: 4096, id: ref.ID}.bytes()
	f.Add(append(w, make([]byte, 4096)...))
	f.Add(reqHdr{op: opRead, tag: 2, gen: 1, n: 4096, id: ref.ID}.bytes())
	f.Add(append(reqHdr{op: opRead, tag: 2, gen: 1, n: 4096, id: ref.ID}.bytes(), reqHdr{op: opCancel, tag: 2, id: pingID}.bytes()...))
	f.Add(reqHdr{op: opSync, tag: 3, gen: 0, id: ref.ID}.bytes())
	// A fence, then a write older and one newer than it.
	fenceSeed := reqHdr{op: opFence, tag: 4, gen: 1, epoch: 9, id: ref.ID}.bytes()
	fenceSeed = append(fenceSeed, reqHdr{op: opWrite, tag: 5, gen: 1, epoch: 8, n: 512, id: ref.ID}.bytes()...)
	fenceSeed = append(fenceSeed, make([]byte, 512)...)
	fenceSeed = append(fenceSeed, reqHdr{op: opWrite, tag: 6, gen: 1, epoch: 9, n: 512, id: ref.ID}.bytes()...)
	f.Add(append(fenceSeed, make([]byte, 512)...))
	f.Add([]byte("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"))
	f.Add(bytes.Repeat([]byte{reqMagic}, 300))
	f.Fuzz(func(t *testing.T, b []byte) {
		nc, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer nc.Close()
		nc.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := nc.Write(append([]byte(blkPreface), b...)); err != nil {
			t.Fatal(err)
		}
		nc.(*net.TCPConn).CloseWrite()
		// The server answers what it understood, then ends the connection
		// (end of input or a broken frame): never a hang.
		if _, err := io.Copy(io.Discard, nc); err != nil && !errors.Is(err, net.ErrClosed) {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				t.Fatal("server did not end the connection")
			}
		}
		if _, err := c.Ping(context.Background()); err != nil {
			t.Fatalf("after garbage: %v", err)
		}
		// (The garbage may carry any generation: read as the newest.)
		if err := c.ReadAt(context.Background(), Ref{ID: ref.ID, Gen: ^uint64(0)}, make([]byte, 4096), 0); err != nil {
			t.Fatalf("after garbage: %v", err)
		}
	})
}
