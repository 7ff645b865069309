package membership

import (
	"strings"
	"time"

	"github.com/hashicorp/memberlist"
)

// delegate implements memberlist's Delegate, EventDelegate, MergeDelegate
// and AliveDelegate for an Agent. memberlist calls the event and alive
// hooks with its node lock held: they only touch the agent's table (a.mu)
// and never call back into memberlist.
type delegate struct{ a *Agent }

var (
	_ memberlist.Delegate      = delegate{}
	_ memberlist.EventDelegate = delegate{}
	_ memberlist.MergeDelegate = delegate{}
	_ memberlist.AliveDelegate = delegate{}
)

// leaveIntentPrefix starts the user message a leaving node sends to every
// live peer before its memberlist leave, so they can tell "left" from
// "dead" (memberlist v0.6.0 and v0.7.0 do not expose that difference).
const leaveIntentPrefix = "ukai-membership/leave:"

// leaveIntentTTL bounds how long a leave intent stays valid.
const leaveIntentTTL = 2 * time.Minute

// NodeMeta returns our encoded meta (validated against limit when set).
func (d delegate) NodeMeta(limit int) []byte {
	d.a.metaMu.Lock()
	defer d.a.metaMu.Unlock()
	if len(d.a.meta) > limit {
		return nil // cannot happen: New/SetMeta check MetaMaxSize
	}
	return append([]byte(nil), d.a.meta...)
}

// NotifyMsg receives user messages: only leave intents.
func (d delegate) NotifyMsg(b []byte) {
	name, ok := strings.CutPrefix(string(b), leaveIntentPrefix)
	if !ok || name == "" {
		return
	}
	a := d.a
	a.mu.Lock()
	defer a.mu.Unlock()
	a.leaving[name] = time.Now()
	// The intent may arrive after the dead message: a node that sends an
	// intent is leaving, not failed.
	if e, ok := a.members[name]; ok && e.m.State == StateDead {
		if m, ok := a.markGone(name, StateLeft, time.Now()); ok {
			a.push(Event{Member: m, Type: EventLeave})
		}
	}
}

func (delegate) GetBroadcasts(overhead, limit int) [][]byte { return nil }
func (delegate) LocalState(join bool) []byte                { return nil }
func (delegate) MergeRemoteState(buf []byte, join bool)     {}

func (d delegate) NotifyJoin(n *memberlist.Node) {
	a := d.a
	a.mu.Lock()
	defer a.mu.Unlock()
	m, typ := a.upsertAlive(n, time.Now())
	a.push(Event{Member: m, Type: typ})
}

func (d delegate) NotifyUpdate(n *memberlist.Node) {
	a := d.a
	a.mu.Lock()
	defer a.mu.Unlock()
	m, typ := a.upsertAlive(n, time.Now())
	a.push(Event{Member: m, Type: typ})
}

// NotifyLeave is called for both failures and graceful leaves; n.State is
// not set by memberlist, so the leave intents decide which it is.
func (d delegate) NotifyLeave(n *memberlist.Node) {
	a := d.a
	a.mu.Lock()
	defer a.mu.Unlock()
	now := time.Now()
	st, typ := StateDead, EventFail
	if t, ok := a.leaving[n.Name]; ok && now.Sub(t) < leaveIntentTTL {
		st, typ = StateLeft, EventLeave
	}
	delete(a.leaving, n.Name)
	if m, ok := a.markGone(n.Name, st, now); ok {
		a.push(Event{Member: m, Type: typ})
	}
}

// NotifyMerge is called on both sides of a join: on the newcomer with the
// cluster's nodes, on the contacted node with the newcomer's. A live node
// using a name that another live node holds at another address cancels
// the merge on both sides.
func (d delegate) NotifyMerge(peers []*memberlist.Node) error {
	for _, p := range peers {
		if err := d.a.conflictWith(p, stateOf(p.State).live()); err != nil {
			d.a.log.Warn("membership: refusing merge", "err", err)
			return err
		}
	}
	return nil
}

// NotifyAlive filters gossiped alive messages with the same rule, so a
// name cannot be taken over passively either.
func (d delegate) NotifyAlive(p *memberlist.Node) error {
	if err := d.a.conflictWith(p, true); err != nil {
		return err
	}
	return nil
}
