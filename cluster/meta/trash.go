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
}

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
	var saved []string
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
		saved = append(saved, k.key)
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
		if e, gerr := c.kv.Get(ctx, c.trashKey(img.ID)); gerr == nil {
			_ = c.kv.DeleteCAS(ctx, c.trashKey(img.ID), e.ModifyIndex)
		}
		if errors.Is(err, ErrNotFound) {
			return TrashEntry{}, fmt.Errorf("%q: %w", img.Name, ErrImageNotFound)
		}
		return TrashEntry{}, fmt.Errorf("delete image %q: %w", img.Name, err)
	}
	// The name is free now: what was keyed by it lives in the entry.
	var errs []error
	for _, key := range saved {
		if e, err := c.kv.Get(ctx, key); err == nil {
			if err := c.kv.DeleteCAS(ctx, key, e.ModifyIndex); err != nil && !errors.Is(err, ErrNotFound) {
				errs = append(errs, err)
			}
		}
	}
	if len(exports) > 0 {
		errs = append(errs, c.kv.DeleteTree(ctx, c.exportPrefix(img.Name)))
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

// RestoreImage brings image id back from the trash under name (its old
// one when empty), which must be free. It comes back without an owner,
// at a new generation; its policies and exports come back with it.
func (c *Catalog) RestoreImage(ctx context.Context, id, name string) (Image, error) {
	t, idx, err := c.TrashEntry(ctx, id)
	if err != nil {
		return Image{}, err
	}
	if name == "" {
		name = t.Image.Name
	}
	if err := ValidateName(name); err != nil {
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
		if errors.Is(err, ErrConflict) {
			return Image{}, fmt.Errorf("%w: the name %s is taken by another image: restore under another (--name)", ErrImageExists, name)
		}
		return Image{}, fmt.Errorf("restore %s: %w", name, err)
	}
	var errs []error
	put := func(key string, v []byte) {
		for range 3 {
			var cur uint64
			if e, err := c.kv.Get(ctx, key); err == nil {
				cur = e.ModifyIndex
			}
			err := c.kv.CAS(ctx, key, v, cur)
			if !errors.Is(err, ErrConflict) {
				if err != nil {
					errs = append(errs, err)
				}
				return
			}
		}
		errs = append(errs, fmt.Errorf("%s: %w", key, ErrConflict))
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

// PurgeImage deletes image id from the trash for good: the tombstone
// first (every node then removes its data file), then the block maps,
// the activity log, the ownership lock and the entry. Safe to run twice,
// and from two nodes at once.
func (c *Catalog) PurgeImage(ctx context.Context, id string) error {
	t, _, err := c.TrashEntry(ctx, id)
	if err != nil {
		return err
	}
	// An entry whose image is back under its name (a trash that failed
	// half way) is not purged: the data is the live image's.
	if live, _, err := c.GetImage(ctx, t.Image.Name); err == nil && live.ID == id {
		return fmt.Errorf("%w: image %s (id %s) is not deleted: its trash entry is a leftover", ErrConflict, t.Image.Name, id)
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
