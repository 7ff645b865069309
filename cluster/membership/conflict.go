package membership

import (
	"fmt"
	"strings"

	"github.com/hashicorp/memberlist"
)

// NameConflictError is returned by New and Rejoin when the cluster already
// has a live node with this agent's name at another address. The existing
// nodes refuse the merge too, so the cluster's view of that node does not
// change.
type NameConflictError struct {
	Name string
	Addr string // gossip address of the live node holding the name
}

func (e *NameConflictError) Error() string {
	return fmt.Sprintf("node name %q is already used by the live node at %s", e.Name, e.Addr)
}

// JoinError is returned by New and Rejoin when no seed answered.
type JoinError struct {
	Seeds []string
	Err   error // memberlist's per-seed errors, or the context's error
}

func (e *JoinError) Error() string {
	// memberlist's multierror spans lines: keep the message on one.
	return fmt.Sprintf("membership: could not join the cluster: no seed answered (seeds %s): %s",
		strings.Join(e.Seeds, ", "), strings.Join(strings.Fields(fmt.Sprint(e.Err)), " "))
}

func (e *JoinError) Unwrap() error { return e.Err }

// conflictWith checks one node a peer announces against the table: a live
// node may not take a name held by another live node at another address.
// A name held by a dead or left node is free. It returns nil or a
// *NameConflictError naming the address of the node that keeps the name.
func (a *Agent) conflictWith(n *memberlist.Node, announcedLive bool) *NameConflictError {
	if !announcedLive {
		return nil
	}
	addr := n.Address()
	a.mu.Lock()
	defer a.mu.Unlock()
	e, ok := a.members[n.Name]
	if !ok || !e.m.State.live() || e.m.Addr == addr {
		return nil
	}
	if n.Name == a.name && a.joining > 0 {
		// We are the newcomer: the cluster's node keeps the name.
		err := &NameConflictError{Name: n.Name, Addr: addr}
		a.conflict = err
		return err
	}
	return &NameConflictError{Name: n.Name, Addr: e.m.Addr}
}
