// Package route decides where an exported image's I/O runs. On the
// image's owner it runs through the owner's backend; on any other node it
// is forwarded to the owner over the data transport (a live-migration
// destination logs in while the source still writes: both go through one
// owner, in order). When the owner cannot be reached the I/O looks again
// — the record is read again, this node may take the image over once the
// ownership rule lets it — until takeoverWait has passed, then it fails
// NOT READY, which initiators retry.
//
// The owner's side of forwarding (Router.Volume, peer.Volumes) lets a
// forwarded I/O in only while this node may serve the image, and counts
// it in like its own (served.Image.BeginIO), so that a release waits for
// it.
//
// The owner holds its I/O, its own and forwarded, to the image's QoS
// limits (served.Image.QoS) before counting it in: a release never waits
// for an I/O that waits for its turn, and one that waited through a
// release looks for the owner again. Flushes are not limited.
//
// Who owns an image is not decided here (package ownership, through
// Host.Acquire). The package holds no lock.
package route

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/ukai-storage/ukai/cluster/peer"
	"github.com/ukai-storage/ukai/node/served"
	"github.com/ukai-storage/ukai/target/qos"
	"github.com/ukai-storage/ukai/target/scsi"
)

// NotOwnerError names the node that owns an image this node does not.
type NotOwnerError struct{ Owner string }

func (e *NotOwnerError) Error() string { return "image is served by node " + e.Owner }

// ErrNotOwner is I/O on a node that is not the image's owner: NOT READY,
// which initiators retry, carrying the owner's name for the router.
func ErrNotOwner(owner string) error {
	return &scsi.SenseError{Key: scsi.SenseNotReady, ASC: 0x04, ASCQ: 0x0a, Err: &NotOwnerError{Owner: owner}}
}

// Forwarder runs I/O on an image's owner (*peer.Client).
type Forwarder interface {
	ForwardRead(ctx context.Context, ref peer.Ref, p []byte, off int64) error
	ForwardWrite(ctx context.Context, ref peer.Ref, p []byte, off int64, fua bool) error
	ForwardFlush(ctx context.Context, ref peer.Ref) error
	ForwardUnmap(ctx context.Context, ref peer.Ref, off, length int64) error
}

// Host is the node's side of routing.
type Host interface {
	// Acquire makes this node the image's owner, or fails: with an error
	// wrapping *NotOwnerError when another node owns it (or may), with
	// any other error when nobody can serve it now.
	Acquire(ctx context.Context, s *served.Image) error
	// Forwarder is the data transport to a node; nil when it has none.
	Forwarder(node string) Forwarder
	// Refresh reads the image's record again and applies it (a new
	// owner, a session that lapsed).
	Refresh(ctx context.Context, s *served.Image)
	// Owned is the owner's backend of the image (its writes preserve
	// snapshots and are refused once this node stops owning it).
	Owned(s *served.Image) scsi.Backend

	// The owner's side.
	ByID(id string) *served.Image
	// MayServe says whether this node owns the image and may do its I/O
	// now; Claims whether it has a claim to take it for a forwarded I/O:
	// its session holds the image's ownership lock (a take that has not
	// finished, a restart that kept the session), or the image is
	// attached to it (the others leave a free lock to it).
	MayServe(s *served.Image) bool
	Claims(ctx context.Context, s *served.Image) bool
}

// Config configures a Router.
type Config struct {
	Self string // this node's name
	Host Host
	Log  *slog.Logger
	// Now is the clock the wait is measured by (default time.Now).
	Now func() time.Time
	// Wait bounds how long an I/O waits for an unreachable owner (default
	// 45 s: a dead owner's session TTL plus lock delay, with margin).
	Wait time.Duration
	// Retry is the pause between two looks (default 200 ms).
	Retry time.Duration
}

// Router routes the I/O of this node's exported images.
type Router struct{ cfg Config }

// New returns a router.
func New(cfg Config) *Router {
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Wait == 0 {
		cfg.Wait = 45 * time.Second
	}
	if cfg.Retry == 0 {
		cfg.Retry = 200 * time.Millisecond
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	return &Router{cfg: cfg}
}

// Backend is the scsi.Backend of an exported image: its I/O runs where
// the router decides.
func (r *Router) Backend(s *served.Image) scsi.Backend { return &gate{r: r, s: s} }

type gate struct {
	r *Router
	s *served.Image
}

// forwardFn runs one I/O on the owner.
type forwardFn func(ctx context.Context, f Forwarder, ref peer.Ref) error

// ioCost is what an I/O counts against the image's QoS limits.
type ioCost struct {
	limited bool // false: a flush, never held
	op      qos.Op
	bytes   int64 // data moved; 0 for an UNMAP
}

// waitTurn holds an I/O on the owner until the image's limits let it
// run; it fails only when ctx ends.
func waitTurn(ctx context.Context, s *served.Image, c ioCost) error {
	if !c.limited {
		return nil
	}
	return s.QoS.Wait(ctx, c.op, c.bytes)
}

func (g *gate) do(ctx context.Context, c ioCost, local func(ctx context.Context, b scsi.Backend) error, fwd forwardFn) error {
	r, s := g.r, g.s
	deadline := r.cfg.Now().Add(r.cfg.Wait)
	for {
		err := r.cfg.Host.Acquire(ctx, s)
		if err == nil {
			if err := waitTurn(ctx, s, c); err != nil {
				return err
			}
			if !s.BeginIO() {
				continue // released meanwhile: acquire again or forward
			}
			defer s.EndIO()
			return local(ctx, r.cfg.Host.Owned(s))
		}
		var no *NotOwnerError
		if !errors.As(err, &no) {
			return err
		}
		if f := r.cfg.Host.Forwarder(no.Owner); f != nil && no.Owner != r.cfg.Self {
			img := s.Record()
			ferr := fwd(ctx, f, peer.Ref{ID: img.ID, Gen: img.Generation})
			switch {
			case ferr == nil:
				return nil
			case retryable(ferr):
				// The owner changed, let go or died, or (unknown image)
				// restarted and has not loaded the image yet: look again.
				// Chaos runs saw the last one answered HARDWARE ERROR,
				// which initiators do not retry.
				r.cfg.Log.Debug("forwarding to the owner failed; retrying", "image", img.Name, "owner", no.Owner, "err", ferr)
				err = ferr
			default:
				return ForwardedSense(ferr)
			}
		}
		if !r.cfg.Now().Before(deadline) || ctx.Err() != nil {
			return &scsi.SenseError{Key: scsi.SenseNotReady, ASC: 0x04, ASCQ: 0x0a, Err: fmt.Errorf("the image's owner %s cannot be reached: %w", no.Owner, err)}
		}
		sleep(ctx, r.cfg.Retry)
		// Read the record again (a new owner, or the session lapsed).
		r.cfg.Host.Refresh(ctx, s)
	}
}

// retryable: a forwarding failure after which the owner is looked up
// again rather than the I/O failed.
func retryable(err error) bool {
	return errors.Is(err, peer.ErrNotOwner) || errors.Is(err, peer.ErrUnavailable) ||
		errors.Is(err, peer.ErrStaleGeneration) || errors.Is(err, peer.ErrUnknownImage)
}

// ForwardedSense keeps the owner's SCSI sense for the initiator; a
// failure without one is a HARDWARE ERROR.
func ForwardedSense(err error) error {
	var fe *peer.ForwardedError
	if errors.As(err, &fe) {
		if scsi.IsRunRemotely(fe.Key, fe.ASC, fe.ASCQ) {
			return fmt.Errorf("%w (%v)", scsi.ErrRunRemotely, err)
		}
		return &scsi.SenseError{Key: fe.Key, ASC: fe.ASC, ASCQ: fe.ASCQ, Err: err}
	}
	return &scsi.SenseError{Key: scsi.SenseHardwareError, ASC: 0x44, ASCQ: 0x00, Err: err}
}

func sleep(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}

func (g *gate) ReadAt(ctx context.Context, p []byte, off int64) error {
	return g.do(ctx, ioCost{true, qos.Read, int64(len(p))}, func(ctx context.Context, b scsi.Backend) error { return b.ReadAt(ctx, p, off) },
		func(ctx context.Context, f Forwarder, ref peer.Ref) error { return f.ForwardRead(ctx, ref, p, off) })
}

func (g *gate) WriteAt(ctx context.Context, p []byte, off int64, fua bool) error {
	return g.do(ctx, ioCost{true, qos.Write, int64(len(p))}, func(ctx context.Context, b scsi.Backend) error { return b.WriteAt(ctx, p, off, fua) },
		func(ctx context.Context, f Forwarder, ref peer.Ref) error {
			return f.ForwardWrite(ctx, ref, p, off, fua)
		})
}

func (g *gate) Flush(ctx context.Context) error {
	return g.do(ctx, ioCost{}, func(ctx context.Context, b scsi.Backend) error { return b.Flush(ctx) },
		func(ctx context.Context, f Forwarder, ref peer.Ref) error { return f.ForwardFlush(ctx, ref) })
}

func (g *gate) Unmap(ctx context.Context, off, length int64) error {
	return g.do(ctx, ioCost{limited: true, op: qos.Write}, func(ctx context.Context, b scsi.Backend) error { return b.Unmap(ctx, off, length) },
		func(ctx context.Context, f Forwarder, ref peer.Ref) error {
			return f.ForwardUnmap(ctx, ref, off, length)
		})
}

// Volume implements peer.Volumes: the owner serves forwarded I/O of an
// image it owns, through its backend; anyone else answers ErrNotOwner,
// and an id it does not serve ErrUnknownImage.
func (r *Router) Volume(ctx context.Context, ref peer.Ref) (peer.Backend, error) {
	h := r.cfg.Host
	s := h.ByID(ref.ID)
	if s == nil {
		return nil, fmt.Errorf("image %s: %w", ref.ID, peer.ErrUnknownImage)
	}
	if !h.MayServe(s) && !h.Claims(ctx, s) {
		return nil, fmt.Errorf("image %s: %w", s.Record().Name, peer.ErrNotOwner)
	}
	if err := h.Acquire(ctx, s); err != nil {
		return nil, fmt.Errorf("image %s: %w (%v)", s.Record().Name, peer.ErrNotOwner, err)
	}
	if img := s.Record(); ref.Gen < img.Generation {
		// The forwarder's record is older than ours: it re-reads.
		r.cfg.Log.Debug("forwarded I/O with an older generation", "image", img.Name, "gen", ref.Gen, "ours", img.Generation)
	}
	return counted{s: s, b: h.Owned(s)}, nil
}

// counted is the owner's backend for one forwarded I/O: counted in
// (served.Image.BeginIO) for the time it runs, so that a release waits
// for it.
type counted struct {
	s *served.Image
	b scsi.Backend
}

func (c counted) run(ctx context.Context, io ioCost, fn func() error) error {
	if c.s.LU == nil || !c.s.LU.Reserved() { // else handed over below, and counted then
		if err := waitTurn(ctx, c.s, io); err != nil {
			return err
		}
	}
	if !c.s.BeginIO() {
		return fmt.Errorf("image %s: %w (released)", c.s.Record().Name, peer.ErrNotOwner)
	}
	defer c.s.EndIO()
	if c.s.LU != nil && c.s.LU.Reserved() {
		// Forwarded I/O comes without its nexus: while a reservation
		// exists the forwarding node sends the whole command (Remote),
		// to be checked against it.
		return handOver{}
	}
	return fn()
}

func (c counted) ReadAt(ctx context.Context, p []byte, off int64) error {
	return c.run(ctx, ioCost{true, qos.Read, int64(len(p))}, func() error { return c.b.ReadAt(ctx, p, off) })
}

func (c counted) WriteAt(ctx context.Context, p []byte, off int64, fua bool) error {
	return c.run(ctx, ioCost{true, qos.Write, int64(len(p))}, func() error { return c.b.WriteAt(ctx, p, off, fua) })
}

func (c counted) Flush(ctx context.Context) error {
	return c.run(ctx, ioCost{}, func() error { return c.b.Flush(ctx) })
}

func (c counted) Unmap(ctx context.Context, off, n int64) error {
	return c.run(ctx, ioCost{limited: true, op: qos.Write}, func() error { return c.b.Unmap(ctx, off, n) })
}

// Commander runs SCSI commands on an image's owner (*peer.Client).
type Commander interface {
	RunCommand(ctx context.Context, ref peer.Ref, nexus string, cdb, dataOut []byte) (peer.CommandResult, error)
}

// Remote is the scsi.Remote of an exported image: the commands that run at
// the device server (reservations, COMPARE AND WRITE) run on the owner's
// LU; on the owner itself, by its own LU.
func (r *Router) Remote(s *served.Image) scsi.Remote { return remote{r: r, s: s} }

type remote struct {
	r *Router
	s *served.Image
}

// Here says whether this node owns the image: only then is its LU's own
// reservation state the device's.
func (m remote) Here() bool { return m.s.Owned() }

// Serve takes the image if this node may (free, or its owner dead), as
// I/O does.
func (m remote) Serve(ctx context.Context) bool { return m.r.cfg.Host.Acquire(ctx, m.s) == nil }

func (m remote) Run(ctx context.Context, cmd *scsi.Command) (scsi.Result, bool) {
	r, s := m.r, m.s
	deadline := r.cfg.Now().Add(r.cfg.Wait)
	for {
		err := r.cfg.Host.Acquire(ctx, s)
		if err == nil {
			return scsi.Result{}, false // the owner: its LU runs it
		}
		var no *NotOwnerError
		if !errors.As(err, &no) {
			return senseResult(err), true
		}
		var c Commander
		if f := r.cfg.Host.Forwarder(no.Owner); f != nil && no.Owner != r.cfg.Self {
			c, _ = f.(Commander)
		}
		if c != nil {
			img := s.Record()
			res, ferr := c.RunCommand(ctx, peer.Ref{ID: img.ID, Gen: img.Generation}, string(cmd.Nexus), cmd.CDB, cmd.DataOut)
			switch {
			case ferr == nil:
				return scsi.Result{Status: res.Status, Sense: res.Sense, DataIn: res.DataIn, TransferLen: res.TransferLen}, true
			case errors.Is(ferr, peer.ErrUnavailable):
				// The owner may have run it and the answer was lost: it
				// is not resent here. The initiator hears NOT READY and
				// resends it itself, as after any lost answer; a PR OUT
				// or COMPARE AND WRITE run twice may then answer a
				// conflict or a miscompare (SCSI's own ambiguity).
				return senseResult(&scsi.SenseError{Key: scsi.SenseNotReady, ASC: 0x04, ASCQ: 0x0a, Err: ferr}), true
			case retryable(ferr):
				r.cfg.Log.Debug("forwarding a command to the owner failed; retrying", "image", img.Name, "owner", no.Owner, "err", ferr)
				err = ferr
			default:
				return senseResult(ForwardedSense(ferr)), true
			}
		}
		if !r.cfg.Now().Before(deadline) || ctx.Err() != nil {
			if ctx.Err() != nil {
				return scsi.Result{Aborted: true}, true
			}
			return senseResult(&scsi.SenseError{Key: scsi.SenseNotReady, ASC: 0x04, ASCQ: 0x0a, Err: fmt.Errorf("the image's owner %s cannot be reached: %w", no.Owner, err)}), true
		}
		sleep(ctx, r.cfg.Retry)
		r.cfg.Host.Refresh(ctx, s)
	}
}

// senseResult is a CHECK CONDITION with err's sense (HARDWARE ERROR when
// it carries none).
func senseResult(err error) scsi.Result {
	se, ok := scsi.AsSense(err)
	if !ok {
		se = &scsi.SenseError{Key: scsi.SenseHardwareError, ASC: 0x44, ASCQ: 0x00, Err: err}
	}
	return scsi.SenseResult(se.Key, se.ASC, se.ASCQ)
}

// RunCommand implements peer.Commands: the owner runs a command another
// node forwarded on its LU, counted in like forwarded I/O.
func (r *Router) RunCommand(ctx context.Context, ref peer.Ref, nexus string, cdb, dataOut []byte) (peer.CommandResult, error) {
	h := r.cfg.Host
	s := h.ByID(ref.ID)
	if s == nil {
		return peer.CommandResult{}, fmt.Errorf("image %s: %w", ref.ID, peer.ErrUnknownImage)
	}
	if !h.MayServe(s) && !h.Claims(ctx, s) {
		return peer.CommandResult{}, fmt.Errorf("image %s: %w", s.Record().Name, peer.ErrNotOwner)
	}
	if err := h.Acquire(ctx, s); err != nil {
		return peer.CommandResult{}, fmt.Errorf("image %s: %w (%v)", s.Record().Name, peer.ErrNotOwner, err)
	}
	if !s.BeginIO() {
		return peer.CommandResult{}, fmt.Errorf("image %s: %w (released)", s.Record().Name, peer.ErrNotOwner)
	}
	defer s.EndIO()
	res := s.LU.ExecuteRemote(ctx, &scsi.Command{Nexus: scsi.NexusID(nexus), CDB: cdb, DataOut: dataOut,
		ExpectedLen: maxCommandIn, Read: true, Write: len(dataOut) > 0})
	defer res.Release()
	if res.Aborted {
		return peer.CommandResult{}, fmt.Errorf("image %s: command abandoned: %w", s.Record().Name, ctx.Err())
	}
	data := res.DataIn
	if len(data) > maxCommandIn {
		data = data[:maxCommandIn]
	}
	return peer.CommandResult{Status: res.Status, Sense: res.Sense, DataIn: append([]byte(nil), data...), TransferLen: res.TransferLen}, nil
}

// maxCommandIn bounds a handed-over command's data-in: a read handed over
// while a reservation exists, up to the largest transfer an LU advertises.
const maxCommandIn = 32 << 20

// handOver is the owner's answer to forwarded I/O while a reservation
// exists: scsi.ErrRunRemotely's sense, and no warning in the log.
type handOver struct{}

func (handOver) Error() string  { return scsi.ErrRunRemotely.Error() }
func (handOver) Unwrap() error  { return scsi.ErrRunRemotely }
func (handOver) Expected() bool { return true }
func (handOver) SCSISense() (key, asc, ascq byte) {
	return scsi.ErrRunRemotely.Key, scsi.ErrRunRemotely.ASC, scsi.ErrRunRemotely.ASCQ
}
