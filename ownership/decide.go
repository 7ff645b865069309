// Package ownership decides which node does an image's I/O, on the
// metadata store's own lock service (meta.Locker): a node holds one
// session, and owning an image is holding the lock on the image's
// ownership key with it. Decide is the rule, a pure function of what the
// node knows (tested as a table, like the placement planner); Session
// keeps the node's session alive and says, by this process's monotonic
// clock alone, whether the node may still act on it.
//
// Safety rests on two durations and no clock comparison between nodes:
// a node stops doing I/O when it has not renewed its session for TTL
// (counted from the moment it sent its last successful renewal), and the
// store hands a lock whose session was invalidated (TTL ran out, or a
// peer destroyed the session of a node the membership saw die) to nobody
// for LockDelay >= TTL. Copies refuse writes of an older generation
// (raised by every takeover) besides. docs/ownership.md has the design
// and the measurements that chose it.
//
// Lock order: Session.mu is a leaf.
package ownership

import "time"

// Input is what a node knows about one image when it is asked to do its
// I/O and does not own it yet (or no longer may).
type Input struct {
	// Self is this node's name.
	Self string
	// Session is this node's session when it is valid now, "" when the
	// node has none (not created yet, or renewals failing past the TTL).
	Session string
	// LockSession is the session holding the image's ownership lock as
	// last read ("" when free), LockNode the node that took it.
	LockSession, LockNode string
	// HolderDead says the membership saw LockNode die (dead or left, not
	// merely unknown or suspected).
	HolderDead bool
	// StoreReachable says the metadata store answered.
	StoreReachable bool
	// OnlyLocalCopy says this node holds the image's only copy and the
	// record names no other owner.
	OnlyLocalCopy bool
	// PinnedTo is the node the image is attached to (an orchestrator
	// moving a VM there) when that is another node the membership sees
	// alive; "" otherwise. PinWaited is how long this node has seen the
	// lock free (or held by its own session) while pinned elsewhere, by
	// its own monotonic clock.
	PinnedTo  string
	PinWaited time.Duration
}

// PinHold is how long a node leaves a free lock to the live node the
// image is attached to before it takes the lock itself. The attached node
// takes it within its next attempt (every 200 ms, 1 s after a refusal);
// the hold only bounds how long the image waits for an attached node
// that cannot take it (no session, not serving the image).
const PinHold = 5 * time.Second

// Action is what the node does next.
type Action int

const (
	// Wait: nothing can be done now (no session, store unreachable);
	// the I/O fails with a retryable NOT READY.
	Wait Action = iota
	// Take: this node's session holds the lock: record the takeover
	// (a new owner raises the generation) and serve.
	Take
	// Acquire: the lock is free: acquire it with this node's session,
	// then Take. The store refuses while a lock delay runs.
	Acquire
	// Forward: a live node holds the lock: send the I/O to LockNode.
	Forward
	// Break: the holder is dead (or is this node's own previous
	// session): destroy its session so the store frees the lock after
	// its lock delay; meanwhile the I/O waits.
	Break
	// Yield: the lock is free, or held by this node's session while the
	// node does not serve the image (a handover in progress), and the
	// image is attached to another live node: leave it to that node
	// (send the I/O there) for PinHold.
	// Without it, the former owner's own initiators took the lock back
	// the moment it handed the image over, before the attaching node,
	// whose attach then timed out (chaos seed 119: two attaches killed
	// by the harness after 30 s, one at each of the two moments the
	// lock came free).
	Yield
	// Offline: the store is unreachable and the only copy is here:
	// serve it without recording ownership (no other copy can diverge;
	// a newer owner could only write through this copy, which raises
	// the generation floor and fences this node).
	Offline
)

func (a Action) String() string {
	switch a {
	case Take:
		return "take"
	case Acquire:
		return "acquire"
	case Forward:
		return "forward"
	case Break:
		return "break"
	case Offline:
		return "offline"
	case Yield:
		return "yield"
	}
	return "wait"
}

// Decide is the ownership rule.
func Decide(in Input) Action {
	switch {
	case !in.StoreReachable && in.OnlyLocalCopy:
		return Offline
	case !in.StoreReachable, in.Session == "":
		return Wait
	case in.PinnedTo != "" && in.PinWaited < PinHold && (in.LockSession == "" || in.LockSession == in.Session):
		// Also while this node's session still holds the lock: a
		// handover in progress (the release flushes before it frees the
		// lock), which the node's own I/O would otherwise take back.
		return Yield
	case in.LockSession == in.Session:
		return Take
	case in.LockSession == "":
		return Acquire
	case in.LockNode == in.Self, in.HolderDead:
		// Our own previous session (a restart that could not reuse it,
		// or a session replaced after it was invalidated): nothing of
		// this process uses it.
		return Break
	default:
		return Forward
	}
}
