package node

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/ukai-storage/ukai/cluster/membership"
	"github.com/ukai-storage/ukai/cluster/meta"
	"github.com/ukai-storage/ukai/node/paths"
	"github.com/ukai-storage/ukai/node/served"
	"github.com/ukai-storage/ukai/target/scsi"
)

// portFile holds this node's target port number in its data dir: the
// number never changes, and a node restarting while the store is down
// must serve with the one it had.
const portFile = "target-port"

// targetPortWait bounds how long a node's first start waits for the store
// to hand out its target port number.
const targetPortWait = time.Minute

// targetPort returns this node's target port number: the cached one, or
// on the first start one handed out by the store (meta.PortNumber).
func (n *Node) targetPort(ctx context.Context) (uint16, error) {
	path := filepath.Join(n.cfg.Node.DataDir, portFile)
	if b, err := os.ReadFile(path); err == nil {
		v, perr := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 16)
		if perr != nil || v == 0 {
			return 0, fmt.Errorf("%s: %q is not a target port number (1-%d); remove the file to have the store hand out this node's number again", path, strings.TrimSpace(string(b)), meta.MaxPortNumber)
		}
		num := uint16(v)
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		switch err := n.cat.ClaimPortNumber(cctx, n.cfg.Node.Name, num); {
		case errors.Is(err, meta.ErrPortTaken):
			return 0, fmt.Errorf("%s: %w; if this data dir was copied from another node, remove the file to have the store hand out a number of this node's own", path, err)
		case err != nil:
			// The store is down: serve with the number kept (it was
			// checked at an earlier start).
			n.log.Warn("cannot check the target port number against the metadata store; using the one kept", "port", num, "err", err)
		}
		return num, nil
	} else if !errors.Is(err, os.ErrNotExist) {
		return 0, fmt.Errorf("read the target port number: %w", err)
	}
	ctx, cancel := context.WithTimeout(ctx, targetPortWait)
	defer cancel()
	var num uint16
	var err error
	for {
		if num, err = n.cat.PortNumber(ctx, n.cfg.Node.Name); err == nil || !errors.Is(err, meta.ErrUnavailable) {
			break
		}
		n.log.Warn("waiting for the metadata store to hand out this node's target port number (first start)", "err", err)
		select {
		case <-ctx.Done():
			return 0, fmt.Errorf("first start: no target port number from the metadata store within %v: %w", targetPortWait, err)
		case <-time.After(time.Second):
		}
	}
	if err != nil {
		return 0, fmt.Errorf("first start: target port number: %w", err)
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(strconv.Itoa(int(num))+"\n"), 0o600); err != nil {
		return 0, fmt.Errorf("keep the target port number: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return 0, fmt.Errorf("keep the target port number: %w", err)
	}
	n.log.Info("target port number handed out", "port", num)
	return num, nil
}

// imagePaths are the paths to a served image now (package paths).
func (n *Node) imagePaths(s *served.Image) []paths.Path {
	rec := s.Record()
	named := slices.Clone(rec.Locations)
	if rec.Attached != "" {
		named = append(named, rec.Attached)
	}
	return paths.Paths(paths.Input{
		Self:     n.cfg.Node.Name,
		SelfOwns: s.Owned(),
		Owner:    rec.Owner,
		Named:    named,
		SelfNode: paths.Node{Alive: true, Portal: n.iscsiAdvertise(), Port: n.port},
		Lookup:   n.pathNode,
	})
}

// pathNode is what the membership says of a node, for paths.
func (n *Node) pathNode(name string) (paths.Node, bool) {
	if n.members == nil {
		return paths.Node{}, false
	}
	m, ok := n.members.Member(name)
	if !ok {
		return paths.Node{}, false
	}
	return paths.Node{Alive: m.State == membership.StateAlive, Portal: m.Meta.ISCSI, Port: m.Meta.Port}, true
}

// TargetPortals implements iscsi.PortalLister: discovery names, for each
// target, every node's portal that serves its image, each with its own
// tag. Served images are answered from memory; the others from one
// listing of the catalog (discovery is rare).
func (n *Node) TargetPortals(iqns []string) map[string][]string {
	out := make(map[string][]string, len(iqns))
	var missing []string
	for _, iqn := range iqns {
		name, ok := strings.CutPrefix(iqn, n.cfg.ISCSI.IQNPrefix+":")
		if !ok {
			continue
		}
		if s := n.images.Get(name); s != nil {
			out[iqn] = paths.Portals(n.imagePaths(s))
		} else {
			missing = append(missing, iqn)
		}
	}
	if len(missing) == 0 {
		return out
	}
	ctx, cancel := context.WithTimeout(context.Background(), lazyExportTimeout)
	defer cancel()
	imgs, _, _, err := n.cat.ListImages(ctx)
	if err != nil {
		return out // this portal's own address is answered for them
	}
	byName := make(map[string]meta.Image, len(imgs))
	for _, img := range imgs {
		byName[img.Name] = img
	}
	for _, iqn := range missing {
		if img, ok := byName[strings.TrimPrefix(iqn, n.cfg.ISCSI.IQNPrefix+":")]; ok {
			out[iqn] = paths.Portals(n.imagePaths(served.New(img, nil)))
		}
	}
	return out
}

// aluaSource is a served image's target port groups for its LU.
type aluaSource struct {
	n *Node
	s *served.Image
}

func (a aluaSource) LocalGroup() uint16 { return a.n.port }

func (a aluaSource) PortGroups() []scsi.PortGroup { return paths.Groups(a.n.imagePaths(a.s)) }

// pathsWatcher returns the served image's PathsChanged: when the target
// port groups of its paths differ from those its initiators were last
// told of, every nexus gets a unit attention and asks again (REPORT TARGET
// PORT GROUPS).
//
// Reservations live in the owner's LU. When this node lets go of the
// image its LU keeps them, dormant (the LU enforces them only while this
// node owns the image, scsi.Remote.Here). When it takes the image again
// they still hold if nobody else owned it meanwhile: a take raises the
// generation by one, so the generation is the one it let go with (a
// release it gave up on) or the next (its own take back); any other
// owner in between raised it further, and the reservations are dropped.
func (n *Node) pathsWatcher(s *served.Image) func() {
	var mu sync.Mutex
	last := paths.Groups(n.imagePaths(s))
	lastOwned, heldGen := false, uint64(0)
	return func() {
		mu.Lock()
		now := paths.Groups(n.imagePaths(s))
		owned := s.Owned()
		changed := !slices.Equal(last, now)
		if owned && !lastOwned {
			if g := s.OwnedGen.Load(); heldGen == 0 || (g != heldGen && g != heldGen+1) {
				s.LU.DropReservations()
			}
		}
		if owned {
			heldGen = s.OwnedGen.Load()
		}
		last, lastOwned = now, owned
		mu.Unlock()
		if changed {
			n.log.Debug("access states of the image's paths changed", "image", s.Record().Name, "groups", now)
			s.LU.AccessStateChanged()
		}
	}
}
