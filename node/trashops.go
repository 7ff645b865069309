package node

import (
	"context"
	"fmt"
	"strings"

	"github.com/ukai-storage/ukai/api"
	"github.com/ukai-storage/ukai/cluster/meta"
)

// sweptDir is the data directory as the trash sweep sees it: a copy is
// removed only while no served image uses its id, with the reconciler's
// lock held (an export creates a copy, then caches its record), and
// through removeCopy (the data transport forgets its fence).
type sweptDir struct{ n *Node }

func (d sweptDir) Uncached() []string { return d.n.dir.Uncached() }

func (d sweptDir) Remove(id string) error {
	var err error
	d.n.recon.Do(func() {
		if d.n.servedByID(id) != nil {
			err = fmt.Errorf("copy %s is in use", id)
			return
		}
		err = d.n.removeCopy(id)
	})
	return err
}

// ListTrash implements api.Service.
func (n *Node) ListTrash(ctx context.Context) ([]api.TrashEntry, error) {
	l, bad, err := n.cat.ListTrash(ctx)
	if err != nil {
		return nil, err
	}
	for _, b := range bad {
		n.log.Warn("ignoring an unreadable trash entry", "err", b)
	}
	out := make([]api.TrashEntry, 0, len(l))
	for _, e := range l {
		out = append(out, api.TrashEntry{ID: e.Image.ID, Name: e.Image.Name, Size: e.Image.Size, Locations: e.Image.Locations,
			Deleted: e.Deleted, PurgeAfter: e.PurgeAfter})
	}
	return out, nil
}

// trashID resolves ref, an image id or the name of one image in the
// trash (several images of one name may wait there: then the id).
func (n *Node) trashID(ctx context.Context, ref string) (string, error) {
	if meta.ValidateID(ref) == nil {
		return ref, nil
	}
	if err := meta.ValidateName(ref); err != nil {
		return "", fmt.Errorf("%w: %q is neither an image id nor an image name", meta.ErrInvalid, ref)
	}
	l, _, err := n.cat.ListTrash(ctx)
	if err != nil {
		return "", err
	}
	var ids []string
	for _, e := range l {
		if e.Image.Name == ref {
			ids = append(ids, e.Image.ID)
		}
	}
	switch len(ids) {
	case 0:
		return "", fmt.Errorf("no image %s: %w", ref, meta.ErrTrashNotFound)
	case 1:
		return ids[0], nil
	}
	return "", fmt.Errorf("%w: %d images named %s are in the trash (%s): name one by its id", meta.ErrInvalid, len(ids), ref, strings.Join(ids, ", "))
}

// RestoreTrash implements api.Service: the record comes back (every node
// holding a copy serves it again, from the data it kept).
func (n *Node) RestoreTrash(ctx context.Context, ref, name string) (api.Image, error) {
	id, err := n.trashID(ctx, ref)
	if err != nil {
		return api.Image{}, err
	}
	img, err := n.cat.RestoreImage(ctx, id, name)
	if err != nil {
		return api.Image{}, err
	}
	n.log.Info("image restored from the trash", "image", img.Name, "id", img.ID)
	if _, err := n.recon.Refresh(ctx, img.Name); err != nil {
		return api.Image{}, err
	}
	return n.GetImage(ctx, img.Name, api.BlockView{})
}

// PurgeTrash implements api.Service: the image is gone for good (every
// node removes its copy at its next trash sweep).
func (n *Node) PurgeTrash(ctx context.Context, ref string) error {
	id, err := n.trashID(ctx, ref)
	if err != nil {
		return err
	}
	if err := n.cat.PurgeImage(ctx, id); err != nil {
		return err
	}
	n.log.Info("image purged from the trash", "id", id)
	// This node's own copy goes now; the others' at their next sweep.
	if _, err := n.sweeper.Sweep(ctx); err != nil {
		n.log.Warn("trash sweep after a purge", "err", err)
	}
	return nil
}
