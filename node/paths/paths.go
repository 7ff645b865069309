// Package paths decides the paths a multipath initiator has to an image:
// which nodes' iSCSI portals discovery (SendTargets) names for it, and the
// asymmetric access state (ALUA) of each node's target port group. Pure
// functions of what a node knows in memory (the image's record, the
// membership, whether it owns the image itself): no I/O, a table test.
//
// The paths of an image are the nodes its record names (its copies, its
// owner, the node it is attached to): those a hypervisor should log in
// to, which also learn of the record's changes at once (their doorbells
// ring, docs/metadata.md). Any node can serve any image (a node that is
// not the owner forwards the I/O), so a node an initiator reached without
// being named still reports itself.
//
// States: the owner applies the I/O itself and is active/optimized; every
// other live path forwards to it and is active/non-optimized. An image
// nobody owns is taken by the first node that gets I/O, so every live path
// is active/optimized then. A path whose node is dead or unknown is
// unavailable; discovery leaves it out.
package paths

import (
	"cmp"
	"net"
	"slices"
	"strconv"

	"github.com/ukai-storage/ukai/target/scsi"
)

// Node is what the membership says of one node.
type Node struct {
	Alive  bool
	Portal string // the iSCSI address initiators use ("host:port"), "" if not known
	Port   uint16 // its target port (group) number, 0 if not known
}

// Input is what a node knows of one image.
type Input struct {
	Self     string // this node's name
	SelfOwns bool   // this node owns the image now (its own state, never stale)
	Owner    string // the record's owner ("" when none)
	Named    []string
	// Lookup returns what the membership says of a node (ok false: not a
	// member). It is not asked about Self.
	Lookup func(name string) (Node, bool)
	// SelfNode is this node's own entry.
	SelfNode Node
}

// Path is one node's target port group for the image.
type Path struct {
	Node   string
	Portal string
	Port   uint16
	State  scsi.AccessState
}

// Paths returns every path of the image, this node's included, by port
// number. Nodes without a port number (not known yet) are left out: a
// group without a number cannot be reported.
func Paths(in Input) []Path {
	names := append([]string{in.Self}, in.Named...)
	if in.Owner != "" {
		names = append(names, in.Owner)
	}
	slices.Sort(names)
	names = slices.Compact(names)
	owner := in.Owner
	if in.SelfOwns {
		owner = in.Self
	} else if owner == in.Self {
		// The record says this node, but it does not own the image (any
		// more, or not yet): its own state is the truth.
		owner = ""
	}
	var out []Path
	for _, name := range names {
		nd, ok := in.SelfNode, true
		if name != in.Self {
			if in.Lookup == nil {
				ok = false
			} else {
				nd, ok = in.Lookup(name)
			}
		}
		if !ok || nd.Port == 0 {
			continue
		}
		p := Path{Node: name, Portal: nd.Portal, Port: nd.Port, State: scsi.ActiveNonOptimized}
		switch {
		case !nd.Alive:
			p.State = scsi.Unavailable
		case name == owner:
			p.State = scsi.ActiveOptimized
		}
		out = append(out, p)
	}
	if owner == "" {
		for i := range out {
			if out[i].State == scsi.ActiveNonOptimized {
				out[i].State = scsi.ActiveOptimized
			}
		}
	}
	slices.SortFunc(out, func(a, b Path) int { return cmp.Compare(a.Port, b.Port) })
	return out
}

// Groups is Paths as SCSI target port groups.
func Groups(ps []Path) []scsi.PortGroup {
	out := make([]scsi.PortGroup, 0, len(ps))
	for _, p := range ps {
		out = append(out, scsi.PortGroup{ID: p.Port, State: p.State})
	}
	return out
}

// Portals is what SendTargets answers for the image: "host:port,tag" of
// every path an initiator can use now (live, with a known portal), the
// active/optimized ones first, each group by port number.
func Portals(ps []Path) []string {
	var out, rest []string
	for _, p := range ps {
		if p.State == scsi.Unavailable || p.Portal == "" {
			continue
		}
		host, port, err := net.SplitHostPort(p.Portal)
		if err != nil {
			continue
		}
		a := net.JoinHostPort(host, port) + "," + strconv.Itoa(int(p.Port))
		if p.State == scsi.ActiveOptimized {
			out = append(out, a)
		} else {
			rest = append(rest, a)
		}
	}
	return append(out, rest...)
}
