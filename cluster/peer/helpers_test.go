package peer

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/ukai-storage/ukai/target/lun"
)

// memStore is a Store over real lun.FileCopy temp files.
type memStore struct {
	mu      sync.Mutex
	imgs    map[string]*image
	callers []Caller // every Open's caller, in order
}

type image struct {
	copy lun.Copy
	size int64
	bs   int64
	gen  uint64 // newest generation seen
}

func newStore() *memStore { return &memStore{imgs: map[string]*image{}} }

func (s *memStore) Open(_ context.Context, ref Ref, caller Caller, _ Access) (Local, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.callers = append(s.callers, caller)
	im, ok := s.imgs[ref.ID]
	if !ok {
		return Local{}, fmt.Errorf("image %s: %w", ref.ID, ErrNoCopy)
	}
	if ref.Gen < im.gen {
		return Local{}, fmt.Errorf("image %s generation %d < %d: %w", ref.ID, ref.Gen, im.gen, ErrStaleGeneration)
	}
	im.gen = ref.Gen
	return Local{Copy: im.copy, Size: im.size, BlockSize: im.bs}, nil
}

func (s *memStore) gen(id string) uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.imgs[id].gen
}

func newID() string {
	var b [16]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// addFile adds an image backed by a sparse temp file and returns its ref
// and the file copy.
func (s *memStore) addFile(t testing.TB, size, bs int64) (Ref, *lun.FileCopy) {
	t.Helper()
	id := newID()
	fc, err := lun.CreateFile(filepath.Join(t.TempDir(), id), size)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { fc.Close() })
	s.add(id, fc, size, bs)
	return Ref{ID: id, Gen: 1}, fc
}

func (s *memStore) add(id string, c lun.Copy, size, bs int64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.imgs[id] = &image{copy: c, size: size, bs: bs, gen: 1}
}

// startServer serves st on 127.0.0.1 and returns the server and its
// address; the server is closed at cleanup.
func startServer(t testing.TB, st Store, cfg ServerConfig) (*Server, string) {
	t.Helper()
	if cfg.Listen == "" {
		cfg.Listen = "127.0.0.1:0"
	}
	s, err := NewServer(cfg, st)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Listen(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- s.Serve(context.Background()) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := s.Close(ctx); err != nil {
			t.Errorf("close: %v", err)
		}
		if err := <-done; err != nil {
			t.Errorf("serve: %v", err)
		}
	})
	return s, s.Addr().String()
}

func newClient(t testing.TB, addr string, cfg ClientConfig) *Client {
	c := NewClient(addr, cfg)
	t.Cleanup(func() { c.Close() })
	return c
}

func randBytes(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

// rawClient is a plain h2c HTTP client for hand-made requests.
func rawClient(t testing.TB) *http.Client {
	var p http.Protocols
	p.SetUnencryptedHTTP2(true)
	tr := &http.Transport{Protocols: &p}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr, Timeout: 5 * time.Second}
}

func wantErr(t testing.TB, err, target error) {
	t.Helper()
	if !errors.Is(err, target) {
		t.Fatalf("error %v, want %v", err, target)
	}
}

// blockingCopy blocks every call until ctx ends (honouring it) or release
// is closed.
type blockingCopy struct {
	lun.Copy
	entered chan struct{}
	release chan struct{}
}

func (b *blockingCopy) wait(ctx context.Context) error {
	select {
	case b.entered <- struct{}{}:
	default:
	}
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-b.release:
		return nil
	}
}

func (b *blockingCopy) ReadAt(ctx context.Context, p []byte, off int64) error {
	if err := b.wait(ctx); err != nil {
		return err
	}
	return b.Copy.ReadAt(ctx, p, off)
}

func (b *blockingCopy) WriteAt(ctx context.Context, p []byte, off int64, durable bool) error {
	if err := b.wait(ctx); err != nil {
		return err
	}
	return b.Copy.WriteAt(ctx, p, off, durable)
}

// sumOf is the checksum of data as the server computes it.
func sumOf(data []byte) Sum { return sha256.Sum256(data) }

// rawBlk is a hand-driven block protocol connection, for requests the
// client would never send.
type rawBlk struct {
	t  testing.TB
	nc net.Conn
	br *bufio.Reader
}

func dialRawBlk(t testing.TB, addr string) *rawBlk {
	t.Helper()
	nc, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	nc.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(nc, blkPreface); err != nil {
		t.Fatal(err)
	}
	r := &rawBlk{t: t, nc: nc, br: bufio.NewReader(nc)}
	var got [len(blkPreface)]byte
	if _, err := io.ReadFull(r.br, got[:]); err != nil || string(got[:]) != blkPreface {
		t.Fatalf("server preface %q: %v", got[:], err)
	}
	return r
}

// header encodes h; mutate the bytes to make it malformed.
func (h reqHdr) bytes() []byte {
	var b [reqHdrLen]byte
	h.encode(&b)
	return b[:]
}

func (r *rawBlk) send(parts ...[]byte) {
	r.t.Helper()
	for _, p := range parts {
		if _, err := r.nc.Write(p); err != nil {
			r.t.Fatal(err)
		}
	}
}

// recv reads one answer.
func (r *rawBlk) recv() (respHdr, []byte, error) {
	var hb [respHdrLen]byte
	if _, err := io.ReadFull(r.br, hb[:]); err != nil {
		return respHdr{}, nil, err
	}
	h, err := decodeResp(hb[:])
	if err != nil {
		return h, nil, err
	}
	p := make([]byte, h.n)
	_, err = io.ReadFull(r.br, p)
	return h, p, err
}

// refused sends a malformed request (parts[0] its header, copied and
// given tag) and reports an error unless the answer is a 400 for that tag
// with the response flags want set; the connection must go on.
func (r *rawBlk) refused(name string, tag uint32, want byte, parts ...[]byte) {
	r.t.Helper()
	parts[0] = append([]byte(nil), parts[0]...)
	putTag((*[reqHdrLen]byte)(parts[0]), tag)
	r.send(parts...)
	h, msg, err := r.recv()
	if err != nil || h.tag != tag || h.code != 400 || h.flags&want != want {
		r.t.Errorf("%s: answer %+v %q %v, want 400 for tag %d with flags %#x", name, h, msg, err, tag, want)
	}
}

// closed reports whether the server ended the connection (after any
// answers still buffered).
func (r *rawBlk) closed() bool {
	for {
		if _, _, err := r.recv(); err != nil {
			return errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, syscall.ECONNRESET)
		}
	}
}
