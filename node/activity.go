package node

import (
	"context"
	"errors"
	"fmt"

	"github.com/ukai-storage/ukai/cluster/meta"
	"github.com/ukai-storage/ukai/node/activity"
	"github.com/ukai-storage/ukai/node/served"
)

// beforeWrite is the volume's BeforeWrite hook: blocks about to change
// are preserved into the image's snapshots, then recorded in its
// activity log (package activity).
func (n *Node) beforeWrite(ctx context.Context, s *served.Image, blocks []int64) error {
	if err := n.preserve(ctx, s, blocks); err != nil {
		return err
	}
	if onlyLocalCopy(s.Record(), n.cfg.Node.Name) {
		// One copy cannot diverge from another: no log needed (and I/O
		// goes on while the metadata store is unreachable).
		return nil
	}
	err := s.Act.Before(ctx, blocks)
	if errors.Is(err, activity.ErrNotHeld) {
		return notReady(fmt.Errorf("record the write in the activity log: %w", errDeposed))
	}
	return err
}

// newActivity returns the activity log of s (its volume open).
func (n *Node) newActivity(s *served.Image) *activity.Log {
	return activity.New(activity.Config{
		Volume: s.Vol,
		Store:  activityStore{n: n, s: s},
		// A write that waited past this node's session (a paused
		// process) must not replace the log a new owner writes.
		Held: func() bool { return s.Offline.Load() || n.session.Valid(s.Session()) },
		Log:  n.log.With("image", s.Record().Name),
	})
}

// activityStore keeps the log of s in the catalog, written only under
// the ownership lock s was taken with.
type activityStore struct {
	n *Node
	s *served.Image
}

func (a activityStore) Put(ctx context.Context, blocks []int64) error {
	err := a.n.cat.SetActivity(ctx, a.s.Record(), a.n.cfg.Node.Name, a.s.Session(), blocks)
	if errors.Is(err, meta.ErrNotOwner) {
		return notReady(err) // the image moved: the initiator retries there
	}
	return err
}

func (a activityStore) Get(ctx context.Context) ([]int64, error) {
	return a.n.cat.Activity(ctx, a.s.Record())
}
