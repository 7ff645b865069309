package membership

import (
	"bytes"
	"time"

	"github.com/hashicorp/memberlist"
)

// State is the state of a member as seen by this agent.
type State string

const (
	// StateAlive: the node answers probes (or was just heard from).
	StateAlive State = "alive"
	// StateSuspect: the node stopped answering and may soon be declared
	// dead. Reserved: memberlist (v0.6.0, v0.7.0) exposes suspicion neither through
	// its delegates nor through Node.State, so the agent does not report
	// it yet; a suspect node is listed as alive until declared dead.
	StateSuspect State = "suspect"
	// StateDead: failure detection declared the node dead.
	StateDead State = "dead"
	// StateLeft: the node left gracefully.
	StateLeft State = "left"
)

// live reports whether the node holds its name (alive or suspect).
func (s State) live() bool { return s == StateAlive || s == StateSuspect }

// stateOf maps memberlist's node states onto ours.
func stateOf(s memberlist.NodeStateType) State {
	switch s {
	case memberlist.StateSuspect:
		return StateSuspect
	case memberlist.StateDead:
		return StateDead
	case memberlist.StateLeft:
		return StateLeft
	}
	return StateAlive
}

// Member is a node as seen by this agent.
type Member struct {
	Name  string
	Addr  string // gossip "ip:port"
	State State
	Meta  NodeMeta  // last meta heard; empty if the node sent malformed meta
	Since time.Time // when State last changed, as seen here
}

func (m Member) clone() Member {
	m.Meta = m.Meta.clone()
	return m
}

// entry is a row of the member table.
type entry struct {
	m       Member
	rawMeta []byte // as gossiped, to log malformed meta once per change
}

// The table methods below are called with a.mu held.

// upsertAlive records n as alive and returns the event type to report.
func (a *Agent) upsertAlive(n *memberlist.Node, now time.Time) (Member, EventType) {
	e, ok := a.members[n.Name]
	if !ok {
		e = &entry{m: Member{Name: n.Name}}
		a.members[n.Name] = e
	}
	typ := EventUpdate
	if !ok || !e.m.State.live() {
		typ = EventJoin
		e.m.State = StateAlive
		e.m.Since = now
	}
	e.m.Addr = n.Address()
	if !ok || !bytes.Equal(e.rawMeta, n.Meta) {
		e.rawMeta = append([]byte(nil), n.Meta...)
		meta, err := decodeMeta(n.Meta)
		if err != nil {
			a.log.Warn("membership: peer gossips malformed meta; its meta is ignored",
				"member", n.Name, "addr", e.m.Addr, "bytes", len(n.Meta), "err", err)
		}
		e.m.Meta = meta
	}
	delete(a.leaving, n.Name)
	return e.m.clone(), typ
}

// markGone records n as dead or left.
func (a *Agent) markGone(name string, st State, now time.Time) (Member, bool) {
	e, ok := a.members[name]
	if !ok || e.m.State == st {
		return Member{}, false
	}
	e.m.State = st
	e.m.Since = now
	return e.m.clone(), true
}
