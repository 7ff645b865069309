package node

import (
	"context"
	"errors"
	"path/filepath"
	"strings"
	"testing"

	"github.com/ukai-storage/ukai/cluster/meta"
	"github.com/ukai-storage/ukai/node/datadir"
	"github.com/ukai-storage/ukai/node/served"
)

// The node's entry points that name a copy by id (peer.Control's
// PrepareCopy and GrowCopy, removeCopy) go through package datadir, which
// refuses any id that is not 32 lowercase hex digits
// (datadir.TestPathsFromIDsStayInDataDir checks what it refuses).
func TestCopyEntryPointsRefuseBadIDs(t *testing.T) {
	dir, err := datadir.Open(filepath.Join(t.TempDir(), "images"))
	if err != nil {
		t.Fatal(err)
	}
	n := &Node{dir: dir, images: served.NewSet()}
	ctx := context.Background()
	for _, id := range []string{"../../outside/victimvictimvictim", strings.ToUpper(meta.NewImageID()), ""} {
		if err := n.PrepareCopy(ctx, id, 1<<20); !errors.Is(err, meta.ErrInvalid) {
			t.Errorf("PrepareCopy with id %q: %v, want ErrInvalid", id, err)
		}
		if err := n.GrowCopy(ctx, id, 2<<20); !errors.Is(err, meta.ErrInvalid) {
			t.Errorf("GrowCopy with id %q: %v, want ErrInvalid", id, err)
		}
		if err := n.removeCopy(id); !errors.Is(err, meta.ErrInvalid) {
			t.Errorf("removeCopy with id %q: %v, want ErrInvalid", id, err)
		}
	}
	id := meta.NewImageID()
	if err := n.PrepareCopy(ctx, id, 1<<20); err != nil {
		t.Fatal(err)
	}
	if err := n.GrowCopy(ctx, id, 2<<20); err != nil {
		t.Fatal(err)
	}
	if err := n.removeCopy(id); err != nil {
		t.Fatal(err)
	}
}
