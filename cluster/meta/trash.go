package meta

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"sort"
	"strings"
	"time"
)

// Trash: a deleted image waits there until it is purged.
//
//	<prefix>trash/<image id>   JSON TrashEntry
//
// Moving an image to the trash deletes its record (its name is free at
// once: a new image may take it) and keeps everything keyed by its id:
// the block maps, the activity log, the ownership lock, and every node's
// data file. What is keyed by its name (its policy, its sync policy, its
// access grants) moves into the entry, so that a new image of the same
// name starts with none, and comes back with a restore. Purging writes
// the tombstone (nodes then remove their files) and deletes the rest.

// ErrTrashNotFound: no such image in the trash.
var ErrTrashNotFound = errors.New("not in the trash")

// TrashEntry is an image in the trash.
type TrashEntry struct {
	Image      Image     `json:"image"` // the record as it was deleted
	Deleted    time.Time `json:"deleted"`
	PurgeAfter time.Time `json:"purge_after"`
	// What was keyed by the image's name, as stored.
	Policy     json.RawMessage            `json:"policy,omitempty"`
	SyncPolicy json.RawMessage            `json:"sync_policy,omitempty"`
	Exports    map[string]json.RawMessage `json:"exports,omitempty"` // by escaped initiator
	// State arbitrates a restore and a purge (one check-and-set on the
	// entry each, before either changes anything else): "" in the trash,
	// "restoring" (under RestoreName) or "purging". A restore or purge
	// that stopped half way is finished by the next one of its kind.
	State       string    `json:"state,omitempty"`
	RestoreName string    `json:"restore_name,omitempty"`
	Marked      time.Time `json:"marked,omitzero"` // when State was set
}

// staleRestore: a restore mark older than this, whose record never
// appeared, no longer keeps a purge away (the restore died half way).
const staleRestore = 10 * time.Minute

// Trash entry states.
const (
	trashRestoring = "restoring"
	trashPurging   = "purging"
)

func (c *Catalog) trashPrefix() string       { return c.prefix + "trash/" }
func (c *Catalog) trashKey(id string) string { return c.trashPrefix() + id }

func decodeTrash(key, id string, data []byte) (TrashEntry, error) {
	var e TrashEntry
	if err := json.Unmarshal(data, &e); err != nil {
		return TrashEntry{}, &MalformedError{Key: key, Err: fmt.Errorf("not a trash entry: %w", err)}
	}
	if err := e.Image.Validate(); err != nil {
		return TrashEntry{}, &MalformedError{Key: key, Err: err}
	}
	if e.State != "" && e.State != trashRestoring && e.State != trashPurging {
		return TrashEntry{}, &MalformedError{Key: key, Err: fmt.Errorf("unknown state %q", e.State)}
	}
	if e.State == trashRestoring && ValidateName(e.RestoreName) != nil {
		return TrashEntry{}, &MalformedError{Key: key, Err: fmt.Errorf("restoring under %q, not an image name", e.RestoreName)}
	}
	if e.Image.ID != id || e.Image.IsSnapshot() {
		return TrashEntry{}, &MalformedError{Key: key, Err: fmt.Errorf("the entry holds image %s (id %s)", e.Image.Name, e.Image.ID)}
	}
	for k := range e.Exports {
		if ini, err := url.PathUnescape(k); err != nil || ini == "" || url.PathEscape(ini) != k {
			return TrashEntry{}, &MalformedError{Key: key, Err: fmt.Errorf("export key %q is not an escaped initiator name", k)}
		}
	}
	return e, nil
}

// TrashImage moves img (read at index; 0: read it now) to the trash, to be
// purged after purgeAfter. The record goes in one check-and-set that rings
// the doorbells of the nodes serving it (they withdraw it and keep its
// data); the entry is written first, so that a failure in between leaves
// an entry whose image still exists (restore refuses it, purge skips it)
// rather than data nobody can find.
func (c *Catalog) TrashImage(ctx context.Context, img Image, index uint64, now, purgeAfter time.Time) (TrashEntry, error) {
	if index == 0 {
		e, err := c.kv.Get(ctx, c.imageKey(img.Name))
		if errors.Is(err, ErrNotFound) {
			return TrashEntry{}, fmt.Errorf("%q: %w", img.Name, ErrImageNotFound)
		}
		if err != nil {
			return TrashEntry{}, fmt.Errorf("delete image %q: %w", img.Name, err)
		}
		index = e.ModifyIndex
	}
	entry := TrashEntry{Image: img, Deleted: now.UTC(), PurgeAfter: purgeAfter.UTC()}
	entry.Image.Rev = 0
	type savedKey struct {
		key   string
		index uint64
	}
	var saved []savedKey
	for _, k := range []struct {
		key string
		dst *json.RawMessage
	}{{c.imagePolicyKey(img.Name), &entry.Policy}, {c.syncPolicyKey(ImageScope(img.Name)), &entry.SyncPolicy}} {
		e, err := c.kv.Get(ctx, k.key)
		if errors.Is(err, ErrNotFound) {
			continue
		}
		if err != nil {
			return TrashEntry{}, fmt.Errorf("delete image %q: read %s: %w", img.Name, k.key, err)
		}
		*k.dst = json.RawMessage(e.Value)
		saved = append(saved, savedKey{k.key, e.ModifyIndex})
	}
	exports, _, err := c.kv.List(ctx, c.exportPrefix(img.Name))
	if err != nil {
		return TrashEntry{}, fmt.Errorf("delete image %q: read its exports: %w", img.Name, err)
	}
	for _, e := range exports {
		if entry.Exports == nil {
			entry.Exports = map[string]json.RawMessage{}
		}
		entry.Exports[strings.TrimPrefix(e.Key, c.exportPrefix(img.Name))] = json.RawMessage(e.Value)
	}
	b, err := json.Marshal(entry)
	if err != nil {
		return TrashEntry{}, err
	}
	if err := c.kv.CAS(ctx, c.trashKey(img.ID), b, 0); err != nil {
		return TrashEntry{}, fmt.Errorf("delete image %q: write its trash entry: %w", img.Name, err)
	}
	if err := c.kv.CASTouch(ctx, c.imageKey(img.Name), nil, index, c.bells(img)); err != nil {
		// The entry goes only if the record is surely still there (a
		// store that timed out may have deleted it all the same: then
		// the entry is what finds the data).
		if live, _, gerr := c.GetImage(ctx, img.Name); gerr == nil && live.ID == img.ID {
			if e, gerr := c.kv.Get(ctx, c.trashKey(img.ID)); gerr == nil {
				_ = c.kv.DeleteCAS(ctx, c.trashKey(img.ID), e.ModifyIndex)
			}
		}
		if errors.Is(err, ErrNotFound) {
			return TrashEntry{}, fmt.Errorf("%q: %w", img.Name, ErrImageNotFound)
		}
		return TrashEntry{}, fmt.Errorf("delete image %q: %w", img.Name, err)
	}
	// The name is free now: what was keyed by it lives in the entry.
	// Each at the index it was read at: a new image that took the name
	// meanwhile keeps what it set.
	var errs []error
	for _, k := range saved {
		if err := c.kv.DeleteCAS(ctx, k.key, k.index); err != nil && !errors.Is(err, ErrNotFound) {
			errs = append(errs, err)
		}
	}
	for _, e := range exports {
		if err := c.kv.DeleteCAS(ctx, e.Key, e.ModifyIndex); err != nil && !errors.Is(err, ErrNotFound) {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return entry, fmt.Errorf("image %q is in the trash, but its policies or exports could not all be cleared: %w", img.Name, err)
	}
	return entry, nil
}

// Trashed reports whether image id is in the trash.
func (c *Catalog) Trashed(ctx context.Context, id string) (bool, error) {
	_, err := c.kv.Get(ctx, c.trashKey(id))
	if errors.Is(err, ErrNotFound) {
		return false, nil
	}
	return err == nil, err
}

// ListTrash returns the trash's entries, oldest deletion first, and one
// MalformedError per entry that cannot be read (left alone: nothing is
// purged or restored from a record nobody can read).
func (c *Catalog) ListTrash(ctx context.Context) ([]TrashEntry, []error, error) {
	entries, _, err := c.kv.List(ctx, c.trashPrefix())
	if err != nil {
		return nil, nil, fmt.Errorf("list the trash: %w", err)
	}
	var out []TrashEntry
	var bad []error
	for _, e := range entries {
		id := strings.TrimPrefix(e.Key, c.trashPrefix())
		if ValidateID(id) != nil {
			bad = append(bad, &MalformedError{Key: e.Key, Err: errors.New("not a trash key")})
			continue
		}
		t, err := decodeTrash(e.Key, id, e.Value)
		if err != nil {
			bad = append(bad, err)
			continue
		}
		out = append(out, t)
	}
	sort.SliceStable(out, func(i, j int) bool { return out[i].Deleted.Before(out[j].Deleted) })
	return out, bad, nil
}

// TrashEntry reads image id's trash entry and its index.
func (c *Catalog) TrashEntry(ctx context.Context, id string) (TrashEntry, uint64, error) {
	if err := ValidateID(id); err != nil {
		return TrashEntry{}, 0, err
	}
	e, err := c.kv.Get(ctx, c.trashKey(id))
	if errors.Is(err, ErrNotFound) {
		return TrashEntry{}, 0, fmt.Errorf("image id %s: %w", id, ErrTrashNotFound)
	}
	if err != nil {
		return TrashEntry{}, 0, fmt.Errorf("read trash entry %s: %w", id, err)
	}
	t, err := decodeTrash(e.Key, id, e.Value)
	return t, e.ModifyIndex, err
}

// setTrashState moves entry t (read at index) to state, with a check-and-set:
// the one step that decides between a restore and a purge.
func (c *Catalog) setTrashState(ctx context.Context, t TrashEntry, index uint64, state, restoreName string) (uint64, error) {
	t.State, t.RestoreName, t.Marked = state, restoreName, time.Now().UTC()
	b, err := json.Marshal(t)
	if err != nil {
		return 0, err
	}
	if err := c.kv.CAS(ctx, c.trashKey(t.Image.ID), b, index); err != nil {
		return 0, fmt.Errorf("trash entry of %s (id %s): %w", t.Image.Name, t.Image.ID, err)
	}
	e, err := c.kv.Get(ctx, c.trashKey(t.Image.ID))
	if err != nil {
		return 0, fmt.Errorf("trash entry of %s (id %s): %w", t.Image.Name, t.Image.ID, err)
	}
	return e.ModifyIndex, nil
}

// liveUnder says whether image id has a record under name.
func (c *Catalog) liveUnder(ctx context.Context, name, id string) (bool, error) {
	if name == "" {
		return false, nil
	}
	live, _, err := c.GetImage(ctx, name)
	if errors.Is(err, ErrImageNotFound) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	return live.ID == id, nil
}

// RestoreImage brings image id back from the trash under name (its old
// one when empty), which must be free. It comes back without an owner,
// at a new generation; its policies and exports come back with it.
//
// The entry is marked restoring first (check-and-set): a purge that marked
// it first wins, and a purge that comes after sees the mark. An entry whose
// image still has its record (a trash that failed half way) is not
// restored under a second name: one id, one record.
func (c *Catalog) RestoreImage(ctx context.Context, id, name string) (Image, error) {
	t, idx, err := c.TrashEntry(ctx, id)
	if err != nil {
		return Image{}, err
	}
	if t.State == trashPurging {
		return Image{}, fmt.Errorf("%w: image %s (id %s) is being purged", ErrConflict, t.Image.Name, id)
	}
	if t.State == trashRestoring && name == "" {
		name = t.RestoreName // finish the restore that stopped half way
	}
	if name == "" {
		name = t.Image.Name
	}
	if err := ValidateName(name); err != nil {
		return Image{}, err
	}
	for _, n := range []string{t.Image.Name, t.RestoreName} {
		if live, err := c.liveUnder(ctx, n, id); err != nil {
			return Image{}, err
		} else if live && n != name {
			return Image{}, fmt.Errorf("%w: image id %s is live as %s: its trash entry is a leftover (purge it)", ErrConflict, id, n)
		}
	}
	if ts, err := c.Tombstoned(ctx, id); err != nil {
		return Image{}, err
	} else if ts {
		return Image{}, fmt.Errorf("%w: image id %s was deleted for good", ErrConflict, id)
	}
	if idx, err = c.setTrashState(ctx, t, idx, trashRestoring, name); err != nil {
		return Image{}, err
	}
	img := t.Image
	img.Name, img.Owner, img.Attached = name, "", ""
	img.Generation++
	b, err := json.Marshal(img)
	if err != nil {
		return Image{}, err
	}
	if err := c.kv.CASTouch(ctx, c.imageKey(name), b, 0, c.bells(img)); err != nil {
		live, lerr := c.liveUnder(ctx, name, id)
		switch {
		case lerr == nil && live:
			// An earlier attempt created it: finish that one.
			if cur, _, gerr := c.GetImage(ctx, name); gerr == nil {
				img = cur
			}
		case errors.Is(err, ErrConflict):
			_, _ = c.setTrashState(ctx, t, idx, "", "")
			return Image{}, fmt.Errorf("%w: the name %s is taken by another image: restore under another (--name)", ErrImageExists, name)
		default:
			return Image{}, fmt.Errorf("restore %s: %w", name, err)
		}
	}
	var errs []error
	put := func(key string, v []byte) {
		if err := c.kv.CAS(ctx, key, v, 0); err != nil && !errors.Is(err, ErrConflict) {
			errs = append(errs, err)
		}
	}
	if t.Policy != nil {
		put(c.imagePolicyKey(name), t.Policy)
	}
	if t.SyncPolicy != nil {
		put(c.syncPolicyKey(ImageScope(name)), t.SyncPolicy)
	}
	for k, v := range t.Exports {
		put(c.exportPrefix(name)+k, v)
	}
	if err := c.kv.DeleteCAS(ctx, c.trashKey(id), idx); err != nil && !errors.Is(err, ErrNotFound) {
		errs = append(errs, fmt.Errorf("remove the trash entry: %w", err))
	}
	if err := errors.Join(errs...); err != nil {
		return img, fmt.Errorf("image %s is back, but not all of its policies and exports: %w", name, err)
	}
	return img, nil
}

// PurgeImage deletes image id from the trash for good: the entry is
// marked purging (check-and-set: a restore that marked it first wins,
// unless its mark is older than staleRestore and its record never came),
// then the tombstone is written (every node then removes its data file),
// then the block maps, the activity log, the ownership lock and the entry
// go. Safe to run twice, and from two nodes at once. An entry whose image
// has its record (restored, or a trash that failed half way) is only
// cleared away: the data is the live image's.
func (c *Catalog) PurgeImage(ctx context.Context, id string) error {
	t, idx, err := c.TrashEntry(ctx, id)
	if err != nil {
		return err
	}
	for _, n := range []string{t.Image.Name, t.RestoreName} {
		live, err := c.liveUnder(ctx, n, id)
		if err != nil {
			return err
		}
		if live {
			if err := c.kv.DeleteCAS(ctx, c.trashKey(id), idx); err != nil && !errors.Is(err, ErrNotFound) {
				return fmt.Errorf("purge %s: remove a leftover entry: %w", id, err)
			}
			return fmt.Errorf("%w: image %s (id %s) is live: its trash entry was a leftover, removed", ErrConflict, n, id)
		}
	}
	if t.State == trashRestoring && time.Since(t.Marked) < staleRestore {
		// Its record may appear any moment: the restore marked the entry
		// first, so it wins.
		return fmt.Errorf("%w: image %s (id %s) is being restored as %s", ErrConflict, t.Image.Name, id, t.RestoreName)
	}
	if t.State != trashPurging {
		// The mark is a check-and-set at the index read: a restore that
		// marks the entry in between makes it fail.
		if _, err = c.setTrashState(ctx, t, idx, trashPurging, ""); err != nil {
			return err
		}
	}
	ts, err := json.Marshal(Tombstone{Name: t.Image.Name, Deleted: time.Now().UTC()})
	if err != nil {
		return err
	}
	if err := c.kv.CAS(ctx, c.tombstoneKey(id), ts, 0); err != nil && !errors.Is(err, ErrConflict) {
		return fmt.Errorf("purge %s: write tombstone: %w", id, err)
	}
	if err := c.kv.DeleteTree(ctx, c.prefix+"blockmaps/"+id+"/"); err != nil {
		return fmt.Errorf("purge %s: delete block maps: %w", id, err)
	}
	for _, key := range []string{c.activityKey(id), c.ownerKey(id), c.trashKey(id)} {
		if e, err := c.kv.Get(ctx, key); err == nil {
			if err := c.kv.DeleteCAS(ctx, key, e.ModifyIndex); err != nil && !errors.Is(err, ErrNotFound) && !errors.Is(err, ErrConflict) {
				return fmt.Errorf("purge %s: delete %s: %w", id, key, err)
			}
		}
	}
	return nil
}
