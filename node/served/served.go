// Package served holds the images this node exports: the set of them, by
// name and by id (the per-I/O lookup), and each one's serving state — its
// volume and LU, the record as last applied, whether this node owns it and
// with which generation and session, and the count of I/O running under
// that ownership.
//
// It decides nothing: which images are served is package reconcile's
// rule, who owns one is package ownership's, and the node sets the state
// they decide. What it keeps is the protocol between an I/O and a release
// (BeginIO, InFlight): either the I/O sees the release, or the release
// waits for the I/O.
//
// Lock order: Set.mu → Image.mu (Add and Remove read the record); both
// are leaves otherwise, and no method calls out while holding one.
package served

import (
	"errors"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ukai-storage/ukai/cluster/meta"
	"github.com/ukai-storage/ukai/node/activity"
	"github.com/ukai-storage/ukai/node/cow"
	"github.com/ukai-storage/ukai/placement"
	"github.com/ukai-storage/ukai/target/lun"
	"github.com/ukai-storage/ukai/target/qos"
	"github.com/ukai-storage/ukai/target/scsi"
)

// Image is an image this node exports. Every node may export every
// image: a hypervisor may use any node, and the node reads and writes the
// image's copies wherever they are. Only the image's owner does I/O.
//
// The exported fields are set while the image is built (before it is in
// a Set) and by the node's rules after; the comments say which lock of
// the node's guards the plain ones.
type Image struct {
	Local *lun.FileCopy // this node's copy; nil when it holds none
	Vol   *lun.Volume
	LU    *scsi.LU

	// OwnedGen is the generation this node took the image with: its
	// in-sync records are refused once the record has another.
	OwnedGen atomic.Uint64
	// EverOwned: this process owned the image before; NextAcquire: no
	// attempt on its free lock before then (both guarded by the node's
	// ownership lock).
	EverOwned   bool
	NextAcquire time.Time
	// PinSince: since when this node has left the image's lock to PinTo,
	// the other node the image is attached to (both guarded by the node's
	// ownership lock; zero when it is not leaving it).
	PinSince time.Time
	PinTo    string
	// Releasing: this node's release of the image is running (from
	// clearing owned to freeing the lock).
	Releasing atomic.Bool
	// Offline: its owner's last settle found no copy to serve from.
	Offline atomic.Bool
	Act     *activity.Log // its volume's writes, for a successor
	// Fence holds the owner's I/O off the image while a revert rewrites
	// it (ownedBackend enters it for every I/O).
	Fence Fence
	// Cow caches the copy-on-write maps of the image's snapshots.
	Cow *cow.Maps
	// QoS holds the image's I/O to the limits of the record as last
	// applied (SetRecord keeps it in line; never nil). Only the owner's
	// I/O waits on it (package route).
	QoS *qos.Limiter
	// FromCache: exported from the cached record with only the local copy
	// (guarded by the reconciler's lock).
	FromCache bool
	// PathsChanged, when set (before the image is in a Set), is called
	// after a change that may move its paths' access states: this node
	// took or let go of it, or the record's owner, copies or attachment
	// changed. It runs with no lock of this package held.
	PathsChanged func()

	owned atomic.Bool
	// io counts the I/O this node does as the owner (its initiators' and
	// forwarded), from the ownership check to the end: a release waits
	// for it (see BeginIO).
	io atomic.Int64
	// busy counts syncs and verifies running on the image, which keep
	// ownership like a session does.
	busy atomic.Int32

	mu  sync.Mutex // guards img and sess
	img meta.Image // the record as last applied
	// sess is the ownership session the image was taken with: I/O stops
	// once it is no longer valid.
	sess string
}

// New returns img as served here, before its copies and volume are set
// up; cow is its snapshots' copy-on-write cache.
func New(img meta.Image, cow *cow.Maps) *Image {
	s := &Image{img: img, Cow: cow, QoS: qos.New(nil)}
	s.QoS.Set(img.QoS.Limits())
	return s
}

// Close closes the volume and the local copy (synced).
func (s *Image) Close() error {
	var err error
	if s.Vol != nil {
		err = s.Vol.Close()
	}
	if s.Local != nil {
		err = errors.Join(err, s.Local.Close())
	}
	return err
}

// Record is the image's record as last applied here.
func (s *Image) Record() meta.Image {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.img
}

// SetRecord makes img the record as applied here, its QoS limits
// included (live: the LU stays as it is).
func (s *Image) SetRecord(img meta.Image) {
	s.mu.Lock()
	old := s.img
	s.img = img
	s.mu.Unlock()
	if s.QoS != nil {
		s.QoS.Set(img.QoS.Limits())
	}
	if s.PathsChanged != nil && (old.Owner != img.Owner || old.Attached != img.Attached || !slices.Equal(old.Locations, img.Locations)) {
		s.PathsChanged()
	}
}

// SetSnapshots takes the snapshot list of rec, a record this node wrote
// itself (a snapshot taken or deleted), without applying the rest of it:
// the revision only moves forward.
func (s *Image) SetSnapshots(rec meta.Image) {
	s.mu.Lock()
	s.img.Snapshots = slices.Clone(rec.Snapshots)
	s.img.Rev = max(s.img.Rev, rec.Rev)
	s.mu.Unlock()
}

// Session is the ownership session the image was taken with.
func (s *Image) Session() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.sess
}

// SetSession records the session the image was taken with.
func (s *Image) SetSession(id string) {
	s.mu.Lock()
	s.sess = id
	s.mu.Unlock()
}

// Owned says whether this node owns the image (does its I/O).
func (s *Image) Owned() bool { return s.owned.Load() }

// SetOwned sets whether this node owns the image. A release clears it
// before waiting for InFlight to reach zero.
func (s *Image) SetOwned(v bool) {
	if s.owned.Swap(v) != v && s.PathsChanged != nil {
		s.PathsChanged()
	}
}

// BeginIO counts an I/O that passed the ownership check in; false when
// the image stopped being owned meanwhile (the caller checks again). The
// count goes up before owned is read, and a release clears owned before
// it reads the count: either the I/O sees the release, or the release
// waits for the I/O. Without it, an I/O that passed the check just
// before a release could land after the next owner's writes.
func (s *Image) BeginIO() bool {
	s.io.Add(1)
	if !s.owned.Load() {
		s.io.Add(-1)
		return false
	}
	return true
}

// EndIO counts out an I/O BeginIO let in.
func (s *Image) EndIO() { s.io.Add(-1) }

// InFlight is the number of I/O between BeginIO and EndIO.
func (s *Image) InFlight() int64 { return s.io.Load() }

// BeginBusy counts a sync or verify in: the image is kept owned while one
// runs. EndBusy counts it out.
func (s *Image) BeginBusy() { s.busy.Add(1) }

// EndBusy counts out what BeginBusy counted in.
func (s *Image) EndBusy() { s.busy.Add(-1) }

// Busy says whether a sync or verify runs on the image.
func (s *Image) Busy() bool { return s.busy.Load() > 0 }

// Maps is a snapshot of the image's block maps by location (with Record,
// Owned, Busy and MapVersion, the placement executor's view of it).
func (s *Image) Maps() map[string]*placement.BlockMap { return s.Vol.MapsSnapshot() }

// MapVersion changes whenever a block map of the volume does.
func (s *Image) MapVersion() uint64 { return uint64(s.Vol.MapVersion()) }

// Set is the images this node exports, by name and by id.
type Set struct {
	mu     sync.RWMutex
	byName map[string]*Image
	byID   map[string]*Image
}

// NewSet returns an empty set.
func NewSet() *Set {
	return &Set{byName: map[string]*Image{}, byID: map[string]*Image{}}
}

// Get returns the image served under name, or nil.
func (t *Set) Get(name string) *Image {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return t.byName[name]
}

// ByID returns the image served with that id, or nil: the per-I/O lookup
// of the data transport (one map read, whatever the number of images).
func (t *Set) ByID(id string) *Image {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return t.byID[id]
}

// Add serves s under its record's name and id. An image it replaces
// under that name leaves the set entirely, so that the two maps always
// hold the same images.
func (t *Set) Add(s *Image) {
	img := s.Record()
	t.mu.Lock()
	defer t.mu.Unlock()
	if old := t.byName[img.Name]; old != nil && old != s {
		t.removeLocked(old)
	}
	if old := t.byID[img.ID]; old != nil && old != s {
		t.removeLocked(old)
	}
	t.byName[img.Name] = s
	t.byID[img.ID] = s
}

// Remove takes s out of the set; entries that are another image (one
// served again under the same name meanwhile) stay.
func (t *Set) Remove(s *Image) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.removeLocked(s)
}

// removeLocked removes s under its record's name and id, which do not
// change while it is served (a record with another id is another image).
func (t *Set) removeLocked(s *Image) {
	img := s.Record()
	if t.byName[img.Name] == s {
		delete(t.byName, img.Name)
	}
	if t.byID[img.ID] == s {
		delete(t.byID, img.ID)
	}
}

// List returns the images served, only the owned ones with ownedOnly.
func (t *Set) List(ownedOnly bool) []*Image {
	t.mu.RLock()
	defer t.mu.RUnlock()
	out := make([]*Image, 0, len(t.byName))
	for _, s := range t.byName {
		if !ownedOnly || s.Owned() {
			out = append(out, s)
		}
	}
	return out
}

// Names returns the names served, sorted.
func (t *Set) Names() []string {
	t.mu.RLock()
	out := make([]string, 0, len(t.byName))
	for name := range t.byName {
		out = append(out, name)
	}
	t.mu.RUnlock()
	slices.Sort(out)
	return out
}

// Len is the number of images served.
func (t *Set) Len() int {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return len(t.byName)
}

// TakeAll empties the set and returns what it held (shutdown closes them).
func (t *Set) TakeAll() []*Image {
	t.mu.Lock()
	defer t.mu.Unlock()
	out := make([]*Image, 0, len(t.byName))
	for _, s := range t.byName {
		out = append(out, s)
	}
	clear(t.byName)
	clear(t.byID)
	return out
}
