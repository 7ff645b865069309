// Package reconcile keeps a node's set of served images in line with the
// catalog. It owns:
//   - the rule for one record (Decide): export an image the record
//     concerns and the node does not serve, apply it to one it serves,
//     withdraw one served under the name of another image;
//   - the full pass (Full): list every record, skip those whose
//     ModifyIndex is the one last applied without decoding them, apply
//     the others, withdraw images whose record is gone;
//   - the pass for one record a doorbell rang for (Refresh), and the
//     export of an image first needed here (ExportLazily);
//   - the memory of the records listed (Known), which discovery answers
//     from.
//
// The Host does what a decision says (package node: volumes, LUs,
// copies). Every Host call runs with the reconciler's lock held: one
// change of the served set at a time. Other code that changes a served
// image (a takeover applying a fresher record) takes the same lock with
// Do.
//
// Lock order: Reconciler.mu (Do) → whatever the Host takes; knownMu is a
// leaf.
package reconcile

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"

	"github.com/ukai-storage/ukai/cluster/meta"
)

// Known is what the node remembers of a record it listed or read: enough
// to skip an unchanged record without decoding it, and to answer
// discovery for images it does not serve.
type Known struct {
	Rev      uint64 // the record's ModifyIndex when last applied
	Snapshot bool   // a snapshot (never exported over iSCSI)
	Retry    bool   // applying it failed: apply again even if unchanged
}

// Host is the node's served set as the reconciler changes it.
type Host interface {
	// ServedID is the id of the image served under name ("": none).
	ServedID(name string) string
	// ServedNames are the names of the images served.
	ServedNames() []string
	// Export starts serving img.
	Export(ctx context.Context, img meta.Image) error
	// Apply brings the image served under img.Name (same id) in line
	// with img.
	Apply(ctx context.Context, img meta.Image) error
	// Withdraw stops serving the image served under name, whose record
	// is gone or names another image now.
	Withdraw(ctx context.Context, name string) error
}

// Config is what a Reconciler needs; all but Log are required.
type Config struct {
	Catalog *meta.Catalog
	Self    string // this node's name
	Host    Host
	Log     *slog.Logger
}

// Reconciler keeps one node's served set in line with the catalog.
type Reconciler struct {
	cfg     Config
	mu      sync.Mutex // one change of the served set at a time
	knownMu sync.Mutex
	known   map[string]Known // by image name
}

// New returns a Reconciler that knows no record yet.
func New(cfg Config) *Reconciler {
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	return &Reconciler{cfg: cfg, known: map[string]Known{}}
}

// Do runs fn with the reconciler's lock held (fn changes a served image
// outside a pass: a takeover applying a fresher record).
func (r *Reconciler) Do(fn func()) {
	r.mu.Lock()
	defer r.mu.Unlock()
	fn()
}

// Concerns says whether the record names node (a copy, the owner, the
// node it is attached to): such a node serves the image and hears of its
// changes (its doorbell rings).
func Concerns(img meta.Image, node string) bool {
	return img.HasLocation(node) || img.Owner == node || img.Attached == node
}

// Action is what to do with one record.
type Action struct {
	// Withdraw the image served under the record's name first: it is
	// another image (deleted and created again under the same name).
	Withdraw bool
	Apply    bool // apply the record to the image served
	Export   bool // start serving the image
}

// Decide is the rule for one record: servedID is the id of the image
// this node serves under the record's name ("": none).
func Decide(img meta.Image, servedID, self string) Action {
	var a Action
	if servedID != "" && servedID != img.ID {
		a.Withdraw, servedID = true, ""
	}
	switch {
	case servedID != "":
		a.Apply = true
	case Concerns(img, self):
		a.Export = true
	}
	return a
}

// Known returns what the node remembers of every record (a copy).
func (r *Reconciler) Known() map[string]Known {
	r.knownMu.Lock()
	defer r.knownMu.Unlock()
	out := make(map[string]Known, len(r.known))
	for k, v := range r.known {
		out[k] = v
	}
	return out
}

func (r *Reconciler) knownOf(name string) (Known, bool) {
	r.knownMu.Lock()
	defer r.knownMu.Unlock()
	k, ok := r.known[name]
	return k, ok
}

// remember remembers k for name (nil: forgets it).
func (r *Reconciler) remember(name string, k *Known) {
	r.knownMu.Lock()
	defer r.knownMu.Unlock()
	if k == nil {
		delete(r.known, name)
		return
	}
	r.known[name] = *k
}

// Full lists every record and brings the served set in line: the safety
// net under the doorbells, run at start and now and then. A record whose
// ModifyIndex is the one last applied is skipped without being decoded;
// an unreadable one is skipped and forgotten; images whose record is
// gone are withdrawn.
func (r *Reconciler) Full(ctx context.Context) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	prefix := r.cfg.Catalog.ImagesPrefix()
	entries, _, err := r.cfg.Catalog.KV().List(ctx, prefix)
	if err != nil {
		return fmt.Errorf("list images: %w", err)
	}
	var errs []error
	listed := make(map[string]bool, len(entries))
	for _, e := range entries {
		name := strings.TrimPrefix(e.Key, prefix)
		listed[name] = true
		if k, ok := r.knownOf(name); ok && k.Rev == e.ModifyIndex && !k.Retry {
			continue
		}
		img, err := r.cfg.Catalog.ImageFromEntry(e)
		if err != nil {
			r.cfg.Log.Warn("skipping unreadable image record", "err", err)
			r.remember(name, nil)
			listed[name] = false
			continue
		}
		errs = append(errs, r.applyLocked(ctx, img))
	}
	r.knownMu.Lock()
	for name := range r.known {
		if !listed[name] {
			delete(r.known, name)
		}
	}
	r.knownMu.Unlock()
	for _, name := range r.cfg.Host.ServedNames() {
		if !listed[name] {
			errs = append(errs, r.cfg.Host.Withdraw(ctx, name))
		}
	}
	return errors.Join(errs...)
}

// applyLocked does what Decide says for img; the caller holds mu.
func (r *Reconciler) applyLocked(ctx context.Context, img meta.Image) error {
	a := Decide(img, r.cfg.Host.ServedID(img.Name), r.cfg.Self)
	if a.Withdraw {
		if err := r.cfg.Host.Withdraw(ctx, img.Name); err != nil {
			r.remember(img.Name, &Known{Rev: img.Rev, Snapshot: img.IsSnapshot(), Retry: true})
			return err
		}
	}
	var err error
	switch {
	case a.Apply:
		err = r.cfg.Host.Apply(ctx, img)
	case a.Export:
		err = r.cfg.Host.Export(ctx, img)
	}
	r.remember(img.Name, &Known{Rev: img.Rev, Snapshot: img.IsSnapshot(), Retry: err != nil})
	return err
}

// Refresh reads the record of name and applies it (a doorbell rang, or
// this node changed it). It reports whether the record still concerns
// this node. A record older than the one last applied changes nothing.
func (r *Reconciler) Refresh(ctx context.Context, name string) (bool, error) {
	img, _, err := r.cfg.Catalog.GetImage(ctx, name)
	r.mu.Lock()
	defer r.mu.Unlock()
	if errors.Is(err, meta.ErrImageNotFound) {
		r.remember(name, nil)
		if r.cfg.Host.ServedID(name) != "" {
			return false, r.cfg.Host.Withdraw(ctx, name)
		}
		return false, nil
	}
	if err != nil {
		return true, err
	}
	if k, ok := r.knownOf(name); ok && k.Rev > img.Rev {
		return true, nil // older than what this node applied
	}
	return Concerns(img, r.cfg.Self), r.applyLocked(ctx, img)
}

// ExportLazily exports an image this node neither holds a copy of nor
// owns when it is first needed here (an iSCSI login, an operation): its
// record is read and the image served from then on.
func (r *Reconciler) ExportLazily(ctx context.Context, name string) error {
	img, _, err := r.cfg.Catalog.GetImage(ctx, name)
	if err != nil {
		return err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.cfg.Host.ServedID(name) == "" {
		if err := r.cfg.Host.Export(ctx, img); err != nil {
			return err
		}
	}
	r.remember(name, &Known{Rev: img.Rev, Snapshot: img.IsSnapshot()})
	return nil
}
