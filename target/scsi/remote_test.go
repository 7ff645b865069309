package scsi

import (
	"context"
	"encoding/binary"
	"testing"
)

// device is two LUs over one backend, as two nodes serving one image: the
// owner's runs the device-server commands, the other's hands them over
// (Remote) and forwards its I/O to the owner's backend, which refuses it
// while a reservation exists (ErrRunRemotely), as the node's router does.
type device struct {
	owner, other *LU
	be           *memBackend
	handed       int // commands the other LU handed to the owner
}

type toOwner struct{ d *device }

func (r toOwner) Run(ctx context.Context, cmd *Command) (Result, bool) {
	r.d.handed++
	return r.d.owner.ExecuteRemote(ctx, cmd), true
}

// selfOwner is the owner's Remote: it is the device server.
type selfOwner struct{}

func (selfOwner) Run(context.Context, *Command) (Result, bool) { return Result{}, false }
func (selfOwner) Here() bool                                   { return true }
func (selfOwner) Serve(context.Context) bool                   { return true }

// forwarded is the other node's backend: the owner's, gated by its
// reservations.
func (toOwner) Here() bool                 { return false }
func (toOwner) Serve(context.Context) bool { return false }

type forwarded struct{ d *device }

func (f forwarded) gate() error {
	if f.d.owner.Reserved() {
		return ErrRunRemotely
	}
	return nil
}
func (f forwarded) ReadAt(ctx context.Context, p []byte, off int64) error {
	if err := f.gate(); err != nil {
		return err
	}
	return f.d.be.ReadAt(ctx, p, off)
}
func (f forwarded) WriteAt(ctx context.Context, p []byte, off int64, fua bool) error {
	if err := f.gate(); err != nil {
		return err
	}
	return f.d.be.WriteAt(ctx, p, off, fua)
}
func (f forwarded) Flush(ctx context.Context) error { return f.d.be.Flush(ctx) }
func (f forwarded) Unmap(ctx context.Context, off, n int64) error {
	if err := f.gate(); err != nil {
		return err
	}
	return f.d.be.Unmap(ctx, off, n)
}

func newDevice(t *testing.T) *device {
	d := &device{be: newMemBackend(testSize)}
	cfg := testConfig()
	cfg.Remote = selfOwner{}
	var err error
	if d.owner, err = NewLU(cfg, d.be, nil); err != nil {
		t.Fatal(err)
	}
	cfg.Remote = toOwner{d}
	if d.other, err = NewLU(cfg, forwarded{d}, nil); err != nil {
		t.Fatal(err)
	}
	for _, lu := range []*LU{d.owner, d.other} {
		for _, n := range []NexusID{nexA, nexB} {
			lu.AddNexus(n)
			run(lu, n, cdbTUR(), nil)
		}
	}
	return d
}

// TestReservationsAcrossNodes: a reservation taken through one node holds
// through the other, both ways, for reservation commands and for reads
// and writes; COMPARE AND WRITE runs on the owner's LU.
func TestReservationsAcrossNodes(t *testing.T) {
	d := newDevice(t)
	// nexA on the other node, nexB on the owner: different I_T nexuses
	// (in a cluster their ids name different target ports).
	const a, b = nexA, nexB
	wantGood(t, run(d.other, a, proutCDB(proutRegister, 0), proutData(0, 0xaa)))
	if d.handed != 1 {
		t.Fatalf("PR OUT through the other node was not handed to the owner (%d)", d.handed)
	}
	// The owner's READ KEYS sees the key registered through the other node.
	keys := prin(t, d.owner, b, prinReadKeys)
	if binary.BigEndian.Uint32(keys[4:8]) != 8 || binary.BigEndian.Uint64(keys[8:16]) != 0xaa {
		t.Fatalf("the owner does not see the key registered through the other node: % x", keys)
	}
	// a reserves (write exclusive) through the other node.
	wantGood(t, run(d.other, a, proutCDB(proutReserve, prWriteExclusive), proutData(0xaa, 0)))
	// b writes through the owner: conflict.
	if r := run(d.owner, b, cdb10(opWrite10, 0, 1), fill(512, 1)); r.Status != StatusReservationConflict {
		t.Fatalf("a write through the owner by a nexus without the reservation: status %#x", r.Status)
	}
	// a writes through the other node: its forwarded write is refused
	// without the nexus, handed over with it, and lands.
	before := d.handed
	wantGood(t, run(d.other, a, cdb10(opWrite10, 0, 1), fill(512, 2)))
	if d.handed != before+1 {
		t.Fatalf("the holder's write was not handed to the owner (%d)", d.handed-before)
	}
	got := make([]byte, 512)
	d.be.ReadAt(context.Background(), got, 0)
	if got[0] != 2 {
		t.Fatalf("the holder's write did not land: %x", got[0])
	}
	// b reads through the other node (write exclusive lets it): handed
	// over, the data comes back.
	if r := run(d.other, b, cdb10(opRead10, 0, 1), nil); r.Status != StatusGood || len(r.DataIn) != 512 || r.DataIn[0] != 2 || r.TransferLen != 512 {
		t.Fatalf("a read through the other node under write exclusive: status %#x sense %x, %d bytes, transfer %d", r.Status, r.Sense, len(r.DataIn), r.TransferLen)
	}
	// Reservation through the owner, I/O through the other node: b
	// registers and reserves after a releases.
	wantGood(t, run(d.other, a, proutCDB(proutRelease, prWriteExclusive), proutData(0xaa, 0)))
	wantGood(t, run(d.owner, b, proutCDB(proutRegister, 0), proutData(0, 0xbb)))
	wantGood(t, run(d.owner, b, proutCDB(proutReserve, prExclusiveAccess), proutData(0xbb, 0)))
	if r := run(d.other, a, cdb10(opRead10, 0, 1), nil); r.Status != StatusReservationConflict {
		t.Fatalf("a read through the other node while b holds exclusive access: status %#x sense %x", r.Status, r.Sense)
	}
	if r := run(d.other, a, cdb10(opWrite10, 0, 1), fill(512, 3)); r.Status != StatusReservationConflict {
		t.Fatalf("a write through the other node while b holds exclusive access: status %#x", r.Status)
	}
	d.be.ReadAt(context.Background(), got, 0)
	if got[0] != 2 {
		t.Fatalf("a conflicting write landed: %x", got[0])
	}
	// Released: I/O through the other node runs as plain forwarded I/O
	// again (nothing handed over).
	wantGood(t, run(d.owner, b, proutCDB(proutRelease, prExclusiveAccess), proutData(0xbb, 0)))
	before = d.handed
	wantGood(t, run(d.other, a, cdb10(opWrite10, 0, 1), fill(512, 4)))
	if d.handed != before {
		t.Fatalf("plain I/O handed to the owner without a reservation")
	}

	// COMPARE AND WRITE through the other node runs on the owner's LU.
	before = d.handed
	wantGood(t, run(d.other, a, cawCDB(0, 1), append(fill(512, 4), fill(512, 5)...)))
	r := run(d.other, a, cawCDB(0, 1), append(fill(512, 4), fill(512, 6)...))
	wantSense(t, r, SenseMiscompare, 0x1d, 0)
	if d.handed != before+2 {
		t.Fatalf("COMPARE AND WRITE was not handed to the owner (%d)", d.handed-before)
	}

	// Ownership moves: the LU drops what it held; the registrants it knows
	// of hear of it.
	wantGood(t, run(d.owner, b, proutCDB(proutReserve, prExclusiveAccess), proutData(0xbb, 0)))
	d.owner.DropReservations()
	if d.owner.Reserved() {
		t.Fatal("still reserved after DropReservations")
	}
	wantSense(t, run(d.owner, b, cdbTUR(), nil), SenseUnitAttention, 0x2a, 0x04)
	if keys := prin(t, d.owner, b, prinReadKeys); binary.BigEndian.Uint32(keys[4:8]) != 0 {
		t.Fatalf("keys left after DropReservations: % x", keys)
	}

	// SPC-2 RESERVE only through the owner's path: through the other it is
	// refused, and a handed-over one too.
	wantSense(t, run(d.other, a, []byte{opReserve6, 0, 0, 0, 0, 0}, nil), SenseIllegalRequest, 0x20, 0)
	if r := d.owner.ExecuteRemote(context.Background(), &Command{Nexus: a, CDB: []byte{opReserve6, 0, 0, 0, 0, 0}}); r.Status != StatusCheckCondition {
		t.Fatalf("RESERVE(6) handed over: status %#x", r.Status)
	}
	wantGood(t, run(d.owner, b, []byte{opReserve6, 0, 0, 0, 0, 0}, nil))
	wantGood(t, run(d.owner, b, []byte{opRelease6, 0, 0, 0, 0, 0}, nil))

	// The owner accepts handed-over commands only of those kinds.
	if r := d.owner.ExecuteRemote(context.Background(), &Command{Nexus: a, CDB: cdbTUR()}); r.Status != StatusCheckCondition {
		t.Fatalf("TEST UNIT READY handed over: status %#x", r.Status)
	}
	// READ FULL STATUS names each registrant's own relative target port.
	if p := relativePort("iqn.a,i,0x000000000001,iqn.t,t,0x0007"); p != 7 {
		t.Fatalf("relative port %d, want 7", p)
	}
	if p := relativePort("iqn.a,i,0x000000000001,iqn.t"); p != 1 {
		t.Fatalf("relative port %d without one, want 1", p)
	}
}

// takesBack is a node holding reservations dormant: not the device server
// until a command makes it take the device (Serve).
type takesBack struct{ here bool }

func (r *takesBack) Run(context.Context, *Command) (Result, bool) { return Result{}, false }
func (r *takesBack) Here() bool                                   { return r.here }
func (r *takesBack) Serve(context.Context) bool                   { r.here = true; return true }

// TestDormantReservationsChecked: a node that let go of the device keeps
// its reservations unenforced; the first command after it takes the
// device back is checked against them.
func TestDormantReservationsChecked(t *testing.T) {
	rb := &takesBack{here: true}
	cfg := testConfig()
	cfg.Remote = rb
	lu, be := readyLU(t, cfg)
	wantGood(t, run(lu, nexA, proutCDB(proutRegister, 0), proutData(0, 0xaa)))
	wantGood(t, run(lu, nexA, proutCDB(proutReserve, prWriteExclusive), proutData(0xaa, 0)))
	rb.here = false // let go: dormant
	if r := run(lu, nexB, cdb10(opWrite10, 0, 1), fill(512, 9)); r.Status != StatusReservationConflict {
		t.Fatalf("the first write after taking the device back: status %#x, want RESERVATION CONFLICT", r.Status)
	}
	if !rb.here {
		t.Fatal("the device was not taken before the check")
	}
	got := make([]byte, 512)
	be.ReadAt(context.Background(), got, 0)
	if got[0] == 9 {
		t.Fatal("the conflicting write landed")
	}
}
