package route

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/ukai-storage/ukai/cluster/meta"
	"github.com/ukai-storage/ukai/cluster/peer"
	"github.com/ukai-storage/ukai/node/served"
	"github.com/ukai-storage/ukai/target/scsi"
)

// memBackend is an owner's backend in memory; it records the I/O
// counted in while it runs.
type memBackend struct {
	s        *served.Image
	mu       sync.Mutex
	data     []byte
	inFlight []int64
}

func (b *memBackend) note() {
	b.mu.Lock()
	b.inFlight = append(b.inFlight, b.s.InFlight())
	b.mu.Unlock()
}
func (b *memBackend) ReadAt(_ context.Context, p []byte, off int64) error {
	b.note()
	copy(p, b.data[off:])
	return nil
}
func (b *memBackend) WriteAt(_ context.Context, p []byte, off int64, _ bool) error {
	b.note()
	copy(b.data[off:], p)
	return nil
}
func (b *memBackend) Flush(context.Context) error { b.note(); return nil }
func (b *memBackend) Unmap(_ context.Context, off, n int64) error {
	b.note()
	clear(b.data[off : off+n])
	return nil
}

// host is a scripted node: acquire answers from a list (the last one
// repeats), forwards go to fwd.
type host struct {
	s         *served.Image
	owned     scsi.Backend
	acquire   []error
	calls     int
	fwd       map[string]Forwarder
	refreshes int
	mayServe  bool
	claims    bool
}

func (h *host) Acquire(context.Context, *served.Image) error {
	err := h.acquire[min(h.calls, len(h.acquire)-1)]
	h.calls++
	if err == nil {
		h.s.SetOwned(true)
	}
	return err
}
func (h *host) Forwarder(node string) Forwarder {
	if f, ok := h.fwd[node]; ok {
		return f
	}
	return nil
}
func (h *host) Refresh(context.Context, *served.Image) { h.refreshes++ }
func (h *host) Owned(*served.Image) scsi.Backend       { return h.owned }
func (h *host) ByID(id string) *served.Image {
	return map[bool]*served.Image{true: h.s}[h.s.Record().ID == id]
}
func (h *host) MayServe(*served.Image) bool                { return h.mayServe }
func (h *host) Claims(context.Context, *served.Image) bool { return h.claims }

// scripted is a forwarder whose answers come from a list (the last one
// repeats); it records the references it was sent.
type scripted struct {
	answers []error
	refs    []peer.Ref
}

func (f *scripted) next(ref peer.Ref) error {
	f.refs = append(f.refs, ref)
	return f.answers[min(len(f.refs)-1, len(f.answers)-1)]
}
func (f *scripted) ForwardRead(_ context.Context, ref peer.Ref, _ []byte, _ int64) error {
	return f.next(ref)
}
func (f *scripted) ForwardWrite(_ context.Context, ref peer.Ref, _ []byte, _ int64, _ bool) error {
	return f.next(ref)
}
func (f *scripted) ForwardFlush(_ context.Context, ref peer.Ref) error { return f.next(ref) }
func (f *scripted) ForwardUnmap(_ context.Context, ref peer.Ref, _, _ int64) error {
	return f.next(ref)
}

// fakeClock moves forward by step on every reading.
type fakeClock struct {
	t    time.Time
	step time.Duration
}

func (c *fakeClock) now() time.Time { c.t = c.t.Add(c.step); return c.t }

func sense(err error) (byte, bool) {
	var se *scsi.SenseError
	if errors.As(err, &se) {
		return se.Key, true
	}
	return 0, false
}

func TestRouting(t *testing.T) {
	unavailable := fmt.Errorf("peer: %w", peer.ErrUnavailable)
	for _, tc := range []struct {
		name      string
		acquire   []error
		forward   []error // n2's answers; nil: n2 has no data transport
		wantErr   bool
		wantKey   byte
		local     bool // the I/O ran on this node's backend
		forwards  int  // I/O sent to n2
		refreshes int
	}{
		{name: "owner here", acquire: []error{nil}, local: true},
		{name: "owned elsewhere: forwarded", acquire: []error{ErrNotOwner("n2")}, forward: []error{nil}, forwards: 1},
		{name: "the owner moved twice, then answers", acquire: []error{ErrNotOwner("n2")},
			forward: []error{fmt.Errorf("x: %w", peer.ErrNotOwner), fmt.Errorf("x: %w", peer.ErrStaleGeneration), nil}, forwards: 3, refreshes: 2},
		{name: "an owner restarting does not know the image yet", acquire: []error{ErrNotOwner("n2")},
			forward: []error{fmt.Errorf("x: %w", peer.ErrUnknownImage), nil}, forwards: 2, refreshes: 1},
		{name: "the owner dies, this node takes over", acquire: []error{ErrNotOwner("n2"), ErrNotOwner("n2"), nil},
			forward: []error{unavailable}, forwards: 2, refreshes: 2, local: true},
		{name: "the owner's sense reaches the initiator", acquire: []error{ErrNotOwner("n2")},
			forward: []error{&peer.ForwardedError{Key: scsi.SenseMediumError, ASC: 0x11}}, forwards: 1, wantErr: true, wantKey: scsi.SenseMediumError},
		{name: "a failure without sense is a hardware error, not retried", acquire: []error{ErrNotOwner("n2")},
			forward: []error{errors.New("garbled answer")}, forwards: 1, wantErr: true, wantKey: scsi.SenseHardwareError},
		{name: "an owner unreachable for the whole wait: NOT READY", acquire: []error{ErrNotOwner("n2")},
			forward: []error{unavailable}, forwards: 5, refreshes: 4, wantErr: true, wantKey: scsi.SenseNotReady},
		{name: "an owner without data transport: wait, then NOT READY", acquire: []error{ErrNotOwner("n2")},
			refreshes: 4, wantErr: true, wantKey: scsi.SenseNotReady},
		{name: "this node holds the lock but has not taken the image: nothing is forwarded to itself",
			acquire: []error{ErrNotOwner("n1"), nil}, forward: []error{nil}, refreshes: 1, local: true},
		{name: "nobody can serve it now: the acquire's error as is", acquire: []error{&scsi.SenseError{Key: scsi.SenseNotReady, Err: errors.New("no session")}},
			wantErr: true, wantKey: scsi.SenseNotReady},
	} {
		for _, op := range []string{"read", "write", "flush", "unmap"} {
			t.Run(op+": "+tc.name, func(t *testing.T) {
				s := served.New(meta.Image{Name: "vm", ID: meta.NewImageID(), Generation: 7}, nil)
				b := &memBackend{s: s, data: make([]byte, 4096)}
				h := &host{s: s, owned: b, acquire: tc.acquire, fwd: map[string]Forwarder{}}
				f := &scripted{answers: tc.forward}
				if tc.forward != nil {
					h.fwd["n2"] = f
					h.fwd["n1"] = f // a transport to itself must not be used
				}
				// Every clock reading is 10 s later: a 45 s wait allows
				// five looks.
				clk := &fakeClock{t: time.Unix(1e9, 0), step: 10 * time.Second}
				r := New(Config{Self: "n1", Host: h, Now: clk.now, Wait: 45 * time.Second, Retry: time.Microsecond})
				g, ctx := r.Backend(s), context.Background()
				var err error
				switch op {
				case "read":
					err = g.ReadAt(ctx, make([]byte, 4), 0)
				case "write":
					err = g.WriteAt(ctx, []byte("abcd"), 0, false)
				case "flush":
					err = g.Flush(ctx)
				case "unmap":
					err = g.Unmap(ctx, 0, 512)
				}
				if (err != nil) != tc.wantErr {
					t.Fatalf("err %v, want error %v", err, tc.wantErr)
				}
				if tc.wantErr {
					if key, ok := sense(err); !ok || key != tc.wantKey {
						t.Fatalf("err %v: sense key %v, want %v", err, key, tc.wantKey)
					}
				}
				if ran := len(b.inFlight) > 0; ran != tc.local {
					t.Fatalf("ran on this node's backend: %v, want %v", ran, tc.local)
				}
				if op == "write" && bytes.Equal(b.data[:4], []byte("abcd")) != tc.local {
					t.Fatal("the write's data is not where the I/O ran")
				}
				if tc.local && (len(b.inFlight) != 1 || b.inFlight[0] != 1) {
					t.Fatalf("local I/O counted in %v, want [1]: a release would not wait for it", b.inFlight)
				}
				if s.InFlight() != 0 {
					t.Fatalf("%d I/O still counted in after the call", s.InFlight())
				}
				if len(f.refs) != tc.forwards {
					t.Fatalf("forwarded %d times, want %d", len(f.refs), tc.forwards)
				}
				for _, ref := range f.refs {
					if ref.ID != s.Record().ID || ref.Gen != 7 {
						t.Fatalf("forwarded with %+v, want the image's id and generation 7", ref)
					}
				}
				if h.refreshes != tc.refreshes {
					t.Fatalf("record read again %d times, want %d", h.refreshes, tc.refreshes)
				}
			})
		}
	}
}

// TestReleasedBetweenAcquireAndIO: an image released after the ownership
// check but before the I/O counted in is checked again, not written.
func TestReleasedBetweenAcquireAndIO(t *testing.T) {
	s := served.New(meta.Image{Name: "vm", ID: meta.NewImageID()}, nil)
	b := &memBackend{s: s, data: make([]byte, 4096)}
	f := &scripted{answers: []error{nil}}
	calls := 0
	h := &releasingHost{host: host{s: s, owned: b, fwd: map[string]Forwarder{"n2": f}}, acquireFn: func() error {
		calls++
		if calls == 1 {
			return nil // owner, but released before BeginIO (owned left false)
		}
		return ErrNotOwner("n2")
	}}
	r := New(Config{Self: "n1", Host: h, Retry: time.Microsecond})
	if err := r.Backend(s).WriteAt(context.Background(), []byte("abcd"), 0, false); err != nil {
		t.Fatal(err)
	}
	if len(b.inFlight) != 0 || len(f.refs) != 1 || calls != 2 {
		t.Fatalf("local I/O %d, forwarded %d, acquires %d; want 0, 1, 2", len(b.inFlight), len(f.refs), calls)
	}
}

type releasingHost struct {
	host
	acquireFn func() error
}

func (h *releasingHost) Acquire(context.Context, *served.Image) error { return h.acquireFn() }

func TestOwnerSideOfForwarding(t *testing.T) {
	ctx := context.Background()
	s := served.New(meta.Image{Name: "vm", ID: meta.NewImageID(), Generation: 3}, nil)
	b := &memBackend{s: s, data: make([]byte, 4096)}
	h := &host{s: s, owned: b, acquire: []error{nil}}
	r := New(Config{Self: "n1", Host: h})

	if _, err := r.Volume(ctx, peer.Ref{ID: meta.NewImageID()}); !errors.Is(err, peer.ErrUnknownImage) {
		t.Fatalf("unknown id: %v, want ErrUnknownImage", err)
	}
	if _, err := r.Volume(ctx, peer.Ref{ID: s.Record().ID, Gen: 3}); !errors.Is(err, peer.ErrNotOwner) {
		t.Fatalf("neither owner nor lock holder: %v, want ErrNotOwner", err)
	}
	if h.calls != 0 {
		t.Fatal("a node that neither owns the image nor holds its lock tried to take it for a forwarded I/O")
	}
	h.claims = true // a take not finished: the forwarded I/O finishes it
	v, err := r.Volume(ctx, peer.Ref{ID: s.Record().ID, Gen: 3})
	if err != nil {
		t.Fatal(err)
	}
	if err := v.WriteAt(ctx, []byte("abcd"), 0, false); err != nil {
		t.Fatal(err)
	}
	if len(b.inFlight) != 1 || b.inFlight[0] != 1 || s.InFlight() != 0 {
		t.Fatalf("forwarded I/O counted in %v (now %d), want [1] (0)", b.inFlight, s.InFlight())
	}
	// Released between the lookup and the I/O: refused, so that the
	// forwarder looks for the new owner.
	s.SetOwned(false)
	if err := v.WriteAt(ctx, []byte("efgh"), 0, false); !errors.Is(err, peer.ErrNotOwner) {
		t.Fatalf("I/O on a released image: %v, want ErrNotOwner", err)
	}
	if !bytes.Equal(b.data[:4], []byte("abcd")) {
		t.Fatal("a released image was written by a forwarded I/O")
	}
	h.acquire = []error{errors.New("no session")}
	h.calls = 0
	if _, err := r.Volume(ctx, peer.Ref{ID: s.Record().ID, Gen: 3}); !errors.Is(err, peer.ErrNotOwner) {
		t.Fatalf("owner that cannot take the image: %v, want ErrNotOwner", err)
	}
}

// noStore serves no copies: the forwarding tests use only forwarded I/O.
type noStore struct{}

func (noStore) Open(context.Context, peer.Ref, peer.Caller, peer.Access) (peer.Local, error) {
	return peer.Local{}, peer.ErrNoCopy
}

// TestForwardOverTheDataTransport runs a forwarded write and read from
// one router to another over a real peer server and client on loopback,
// then the owner lets go: the forwarder's I/O fails over to itself.
func TestForwardOverTheDataTransport(t *testing.T) {
	ctx := context.Background()
	img := meta.Image{Name: "vm", ID: meta.NewImageID(), Generation: 2}

	// n2 owns the image.
	s2 := served.New(img, nil)
	b2 := &memBackend{s: s2, data: make([]byte, 4096)}
	h2 := &host{s: s2, owned: b2, acquire: []error{nil}, mayServe: true}
	r2 := New(Config{Self: "n2", Host: h2})
	srv, err := peer.NewServer(peer.ServerConfig{Listen: "127.0.0.1:0", Volumes: r2}, noStore{})
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Listen(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx) }()
	defer func() {
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		if err := srv.Close(cctx); err != nil {
			t.Error(err)
		}
		<-done
	}()
	c := peer.NewClient(srv.Addr().String(), peer.ClientConfig{Timeout: 5 * time.Second})
	defer c.Close()

	// n1 forwards to n2 until n2 lets go, then takes the image itself.
	s1 := served.New(img, nil)
	b1 := &memBackend{s: s1, data: make([]byte, 4096)}
	h1 := &host{s: s1, owned: b1, acquire: []error{ErrNotOwner("n2")}, fwd: map[string]Forwarder{"n2": c}}
	r1 := New(Config{Self: "n1", Host: h1, Retry: time.Millisecond})
	g := r1.Backend(s1)
	want := bytes.Repeat([]byte("written via n1 "), 512/15+1)[:512]
	if err := g.WriteAt(ctx, want, 512, true); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 512)
	if err := g.ReadAt(ctx, got, 512); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) || !bytes.Equal(b2.data[512:1024], want) || b1.data[512] != 0 {
		t.Fatalf("read %.20q, owner holds %.20q: the I/O did not run on the owner", got, b2.data[512:1024])
	}
	if len(b2.inFlight) != 2 || b2.inFlight[0] != 1 || b2.inFlight[1] != 1 {
		t.Fatalf("forwarded I/O counted in on the owner %v, want [1 1]", b2.inFlight)
	}

	// n2 releases; n1's next look finds itself the owner.
	s2.SetOwned(false)
	h2.mayServe = false
	h2.acquire = []error{ErrNotOwner("n1")}
	h1.acquire, h1.calls = []error{ErrNotOwner("n2"), nil}, 0
	after := bytes.Repeat([]byte("a"), 512)
	if err := g.WriteAt(ctx, after, 0, false); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(b1.data[:512], after) || b2.data[0] != 0 {
		t.Fatal("after the owner let go, the write did not run on the node that took the image")
	}
	// n2's refusal crossed the transport as "not the owner", which is
	// looked up again, not failed.
	if h1.calls != 2 || h1.refreshes != 1 || len(b2.inFlight) != 2 {
		t.Fatalf("acquires %d, record reads %d, I/O on n2 %d; want 2, 1, 2", h1.calls, h1.refreshes, len(b2.inFlight))
	}
}

// commander is a scripted owner for handed-over commands.
type commander struct {
	scripted
	answers []error
	sent    int
}

func (c *commander) RunCommand(_ context.Context, ref peer.Ref, nexus string, cdb, _ []byte) (peer.CommandResult, error) {
	c.sent++
	if err := c.answers[min(c.sent-1, len(c.answers)-1)]; err != nil {
		return peer.CommandResult{}, err
	}
	return peer.CommandResult{Status: scsi.StatusReservationConflict, TransferLen: 24}, nil
}

// TestRemoteCommands: a command that runs at the device server runs here
// when this node owns the image, is handed to the owner otherwise (its
// answer kept, status and transfer length included), looked up again when
// the owner moved, and never resent after an answer that may have been
// lost (a PR OUT or COMPARE AND WRITE run twice answers differently).
func TestRemoteCommands(t *testing.T) {
	unavailable := fmt.Errorf("peer: %w", peer.ErrUnavailable)
	for _, tc := range []struct {
		name    string
		acquire []error
		answers []error
		local   bool
		sent    int
		status  byte
		key     byte
	}{
		{name: "owner here: its LU runs it", acquire: []error{nil}, local: true},
		{name: "handed to the owner", acquire: []error{ErrNotOwner("n2")}, answers: []error{nil}, sent: 1, status: scsi.StatusReservationConflict},
		{name: "the owner moved: looked up again", acquire: []error{ErrNotOwner("n2")},
			answers: []error{fmt.Errorf("x: %w", peer.ErrNotOwner), nil}, sent: 2, status: scsi.StatusReservationConflict},
		{name: "an answer that may be lost: NOT READY, not resent", acquire: []error{ErrNotOwner("n2")},
			answers: []error{unavailable, nil}, sent: 1, status: scsi.StatusCheckCondition, key: scsi.SenseNotReady},
		{name: "the owner dies, this node takes over: runs here", acquire: []error{ErrNotOwner("n2"), nil},
			answers: []error{fmt.Errorf("x: %w", peer.ErrNotOwner)}, sent: 1, local: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := served.New(meta.Image{Name: "vm", ID: meta.NewImageID(), Generation: 7}, nil)
			c := &commander{answers: tc.answers}
			h := &host{s: s, acquire: tc.acquire, fwd: map[string]Forwarder{"n2": c}}
			clk := &fakeClock{t: time.Unix(1e9, 0), step: time.Second}
			r := New(Config{Self: "n1", Host: h, Now: clk.now, Wait: 45 * time.Second, Retry: time.Microsecond})
			res, ok := r.Remote(s).Run(context.Background(), &scsi.Command{Nexus: "iqn.x,i,0x1,t", CDB: make([]byte, 10)})
			if ok == tc.local {
				t.Fatalf("handed over: %v, want %v", ok, !tc.local)
			}
			if c.sent != tc.sent {
				t.Fatalf("sent to the owner %d times, want %d", c.sent, tc.sent)
			}
			if tc.local {
				return
			}
			if res.Status != tc.status {
				t.Fatalf("status %#x, want %#x", res.Status, tc.status)
			}
			if tc.key != 0 && (len(res.Sense) < 3 || res.Sense[2]&0x0f != tc.key) {
				t.Fatalf("sense %x, want key %x", res.Sense, tc.key)
			}
			if tc.status == scsi.StatusReservationConflict && res.TransferLen != 24 {
				t.Fatalf("transfer length %d, want the owner's 24", res.TransferLen)
			}
		})
	}
}

// TestOwnerHoldsIOToQoS: on the owner an I/O over the image's limits
// waits for its turn before it is counted in (a release does not wait
// for it), a flush and a read under a write limit pass meanwhile, a
// cancelled wait fails without running, a removed limit lets the waiting
// write run at once; forwarded I/O waits the same way.
func TestOwnerHoldsIOToQoS(t *testing.T) {
	img := meta.Image{Name: "vm", ID: meta.NewImageID(), Generation: 1, QoS: &meta.QoS{WriteIOPSLimit: 1, WriteIOPSBurst: 1}}
	s := served.New(img, nil)
	mb := &memBackend{s: s, data: make([]byte, 1<<16)}
	h := &host{s: s, owned: mb, acquire: []error{nil}, mayServe: true}
	r := New(Config{Self: "n1", Host: h})
	b := r.Backend(s)
	ctx := context.Background()
	if err := b.WriteAt(ctx, make([]byte, 512), 0, false); err != nil {
		t.Fatal(err)
	}
	// The next write waits a second: cancelled, it never runs.
	cctx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- b.WriteAt(cctx, make([]byte, 512), 512, false) }()
	waitUntil(t, "the write waits", func() bool { return s.QoS.Waiting() == 1 })
	if n := s.InFlight(); n != 0 {
		t.Fatalf("a write waiting for its turn is counted in (%d)", n)
	}
	if err := b.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	if err := b.ReadAt(ctx, make([]byte, 512), 0); err != nil {
		t.Fatal(err)
	}
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled wait: %v", err)
	}
	if got := len(mb.inFlight); got != 3 {
		t.Fatalf("%d I/O ran on the backend, want 3 (write, flush, read; not the cancelled write)", got)
	}
	// Forwarded I/O waits too; the limits removed (a record applied), it
	// runs at once.
	v, err := r.Volume(ctx, peer.Ref{ID: img.ID, Gen: img.Generation})
	if err != nil {
		t.Fatal(err)
	}
	go func() { done <- v.WriteAt(ctx, make([]byte, 512), 1024, false) }()
	waitUntil(t, "the forwarded write waits", func() bool { return s.QoS.Waiting() == 1 })
	img.QoS = nil
	s.SetRecord(img)
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(500 * time.Millisecond): // its turn was at 1-2 s
		t.Fatal("removing the limits did not release the waiting write")
	}
	if got := len(mb.inFlight); got != 4 {
		t.Fatalf("%d I/O ran, want 4", got)
	}
}

func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out: %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}
